"""``python -m fastadagrad COMMAND [options]``: the demo, the GPU check and the warm-up."""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module with a ``main(argv) -> int``, one line of help)
COMMANDS = {
    "demo": ("fastadagrad.demo",
             "train a small NumPy network with the NumPy AdaGrad class and with "
             "fastadagrad: identical results, step times, a plot"),
    "validate": ("fastadagrad.validate",
                 "on a GPU machine: check the GPU kernels bit for bit against the CPU "
                 "kernels and measure bandwidth"),
    "warmup": ("fastadagrad.warmup",
               "compile the CPU kernels into Numba's on-disk cache ahead of the first "
               "run"),
}


def parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(
        prog="python -m fastadagrad",
        description="fastadagrad: the AdaGrad update fused into one compiled pass over "
                    "memory, on CPU (Numba) and GPU (numba-cuda).",
        epilog="Run 'python -m fastadagrad COMMAND --help' for a command's options.")
    ap.add_argument("--version", action="version", version=f"fastadagrad {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (_, help_line) in COMMANDS.items():
        sub.add_parser(name, help=help_line, add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns its exit status (2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = parser()
    try:
        if not argv or argv[0].startswith("-"):
            ap.parse_args(argv)  # --help / --version exit here; anything else is an error
            ap.print_help(sys.stderr)
            return 2
        cmd, rest = argv[0], argv[1:]
        if cmd not in COMMANDS:
            ap.error(f"unknown command {cmd!r} (choose from {', '.join(COMMANDS)})")
        run = importlib.import_module(COMMANDS[cmd][0]).main
        return int(run(rest) or 0)
    except SystemExit as exc:  # argparse's --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
