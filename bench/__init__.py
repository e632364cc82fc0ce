"""The benchmark suite (a package so that its ``conftest`` and helpers are imported
as ``bench.conftest`` / ``bench.benchlib`` and never collide with ``tests/conftest.py``)."""
