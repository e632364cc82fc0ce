# Two commands on a fresh machine: `make demo` and `make test`. Each creates the
# virtualenv and installs what it needs the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-cpu test-sim bench report lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m fastadagrad demo

# CPU tests, every benchmark once with timing disabled (so a broken benchmark fails),
# then the CUDA kernels under the simulator (a separate process: the simulator must be
# switched on before numba is imported).
test: test-cpu test-sim

test-cpu: $(STAMP)
	$(PY) -m pytest tests bench --benchmark-disable -p no:cacheprovider

test-sim: $(STAMP)
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest tests/cuda -p no:cacheprovider

# Timed benchmarks (medians of >= 15 rounds, ~4 min on the 2-core machine), import/first-call
# times with a cold and a warm Numba cache, then the report: bench/results/cpu.{json,md,png}
# and the README block between the bench:start/bench:end markers.
bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only --benchmark-min-rounds=15 --benchmark-json=bench/results/cpu.json
	$(PY) bench/startup.py --json bench/results/startup.json
	$(PY) bench/report.py bench/results/cpu.json

lint: $(STAMP)
	$(VENV)/bin/ruff check fastadagrad tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
