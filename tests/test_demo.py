"""`make demo`'s job on a tiny network: identical loss curves, timings, a PNG plot."""

from __future__ import annotations

import pytest

from fastadagrad.demo import main


def test_demo_small(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "demo.png"
    rc = main(["--steps", "12", "--batch", "16", "--samples", "256", "--hidden", "32", "16",
               "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "loss curves identical (bit for bit): True" in out
    assert "final parameters identical: True" in out
    assert "speedup" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_progress_lines_and_threads(capsys):
    import numba

    threads = numba.get_num_threads()
    rc = main(["--steps", "6", "--batch", "8", "--samples", "64", "--hidden", "8",
               "--progress", "3", "--plot", "", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert numba.get_num_threads() == threads  # --threads is undone afterwards
    for label in ("NumPy", "fastadagrad"):
        steps = [ln.split()[2] for ln in out.splitlines()
                 if ln.startswith(f"  {label} ") and " step " in ln]
        assert steps == ["3/6", "6/6"], out
    assert "use 1 thread(s) (--threads)" in out
    assert "loss curves identical (bit for bit): True" in out
    assert "plot written" not in out


def test_demo_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "0"])
    assert exc.value.code == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    for flag in ("--threads", "--blas-threads"):  # (-1 BLAS threads ran as 0: as is)
        with pytest.raises(SystemExit) as exc:
            main([flag, "-1"])
        assert exc.value.code == 2
        assert "--blas-threads at least 0" in capsys.readouterr().err


def test_demo_without_matplotlib_stops_before_training(monkeypatch, capsys):
    import sys

    from fastadagrad import demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    trained = []
    monkeypatch.setattr(demo, "train", lambda *a, **k: trained.append(1))
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "3", "--hidden", "4", "--plot", "out.png"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "needs matplotlib, which is not installed" in err
    assert 'pip install ".[demo]"' in err and "--plot ''" in err
    assert not trained  # nothing ran
    # no plot asked for: it trains without matplotlib
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["--steps", "3", "--batch", "4", "--samples", "16", "--hidden", "4",
                 "--progress", "0", "--plot", ""]) == 0


def test_demo_says_why_when_fastadagrad_is_slower(monkeypatch, capsys):
    import time

    from fastadagrad import demo

    class Slow(demo.AdaGrad):
        def update(self, *a, **k):  # noqa: ANN002, ANN003, ANN202
            time.sleep(0.002)
            return super().update(*a, **k)

    monkeypatch.setattr(demo, "AdaGrad", Slow)
    assert main(["--steps", "3", "--batch", "4", "--samples", "16", "--hidden", "4",
                 "--progress", "0", "--plot", ""]) == 0
    out = capsys.readouterr().out
    assert "fastadagrad was SLOWER than the NumPy class" in out
    assert "This model is small" in out


def test_slower_hint_names_the_causes_that_apply():
    from fastadagrad.demo import _slower_hint

    both = _slower_hint(50_000, 2)
    assert "small (50,000 parameters)" in both and "all 2 threads" in both
    assert "--threads 1" in both and "load average" in both
    neither = _slower_hint(2_000_000, 1)
    assert "small" not in neither and "threads" not in neither


@pytest.mark.parametrize("args,msg", [
    (["--lr", "nan"], "--lr: lr must be finite"),
    (["--lr", "-1"], "--lr: lr must be >= 0"),
    (["--lr", "1e39"], "overflows to inf in float32"),
    (["--plot", "out.txt"], "matplotlib cannot write '.txt' files"),
])
def test_demo_bad_lr_or_plot_is_a_usage_error_before_training(tmp_path, capsys, args, msg):
    """A bad --lr was a traceback with the exit code of "results differ" (1); a plot
    path matplotlib cannot write failed after both optimizers had trained."""
    if "--plot" in args:
        pytest.importorskip("matplotlib")
        args = ["--plot", str(tmp_path / args[1])]
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "3", "--hidden", "4", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert msg in err, err


def test_demo_plot_name_without_extension(tmp_path, capsys):
    """savefig adds .png to a name without an extension: the demo says the name it
    wrote (it printed the one it was given)."""
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sub" / "curves"
    assert main(["--steps", "3", "--batch", "4", "--samples", "16", "--hidden", "4",
                 "--plot", str(plot)]) == 0
    assert f"plot written to {plot}.png" in capsys.readouterr().out
    assert (tmp_path / "sub" / "curves.png").read_bytes()[:4] == b"\x89PNG"
