"""The examples in the public docstrings run and print what they show."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fastadagrad"


def _modules_with_examples() -> list[str]:
    """Every module of the package whose source holds a doctest prompt."""
    names = []
    for path in sorted(PACKAGE.glob("*.py")):
        if ">>> " in path.read_text(encoding="utf-8"):
            stem = path.stem
            names.append("fastadagrad" if stem == "__init__" else f"fastadagrad.{stem}")
    return names


MODULES = _modules_with_examples()


def test_the_public_modules_with_examples_are_found():
    # a module that lost its examples, or a scan that finds nothing, fails here
    assert {"fastadagrad", "fastadagrad.optim", "fastadagrad.flat", "fastadagrad.rows",
            "fastadagrad.warmup", "fastadagrad.torch"} <= set(MODULES), MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name == "fastadagrad.torch" and importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed (the `torch` extra)")
    module = importlib.import_module(name)
    result = doctest.testmod(module, report=True)
    assert result.attempted > 0, f"{name}: no examples were run"
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} failed"


def test_contributing_layout_names_every_module():
    text = (PACKAGE.parent / "CONTRIBUTING.md").read_text(encoding="utf-8")
    layout = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    missing = [p.name for p in sorted(PACKAGE.glob("*.py"))
               if f"`fastadagrad/{p.name}`" not in layout]
    assert not missing, f"CONTRIBUTING.md's layout table leaves out {missing}"
