# Two commands on a fresh machine: `make demo` and `make test`. Each creates the
# virtualenv the first time and installs only what it needs into it: one stamp file per
# extra of pyproject.toml (.venv/.installed-demo, .installed-test, ...), so `make test`
# after `make demo` adds the test set to the same .venv, and a changed pyproject.toml
# reinstalls. Install times in the messages were measured on a 2-core machine (README).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# extra arguments for every pip install, e.g. PyTorch's CPU-only wheels on Linux (PyPI's
# torch is the CUDA build there):
#   make test PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_ARGS ?=

# what each extra brings, for the one-line message printed before its install (times:
# fresh clones on a shared 2-core machine with an empty pip cache, README Quick start)
ABOUT_demo := numba, numpy, matplotlib, threadpoolctl: about 105 MB of wheels, about 30 s
ABOUT_test := the test set: pytest, hypothesis, torch, numba-cuda and the CUDA toolkit \
              wheels: about 515 MB of wheels with the above and torch's CPU build (PyPI's \
              Linux torch is the CUDA build: several GB; see PIP_ARGS), 1 to 2 minutes
ABOUT_bench := pytest-benchmark, matplotlib, torch
ABOUT_dev := everything above and ruff

.PHONY: demo test test-cpu test-sim bench lint clean
# keep the stamps: make would delete files made by a pattern rule as intermediates
.PRECIOUS: $(VENV)/.installed-%

$(VENV)/.created:
	@echo "creating the virtualenv $(VENV) and updating pip in it (about 10 s)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.created
	@echo "installing fastadagrad[$*] into $(VENV): $(ABOUT_$*)"
	$(PIP) install --progress-bar on $(PIP_ARGS) -e ".[$*]"
	touch $@

# The warm-up compiles the kernels the demo uses into Numba's on-disk cache (and says
# how long that took), so the demo itself starts at once.
demo: $(VENV)/.installed-demo
	$(PY) -m fastadagrad warmup --dtype float32
	$(PY) -m fastadagrad demo

# CPU tests, every benchmark once with timing disabled (so a broken benchmark fails),
# then the CUDA kernels under the simulator (a separate process: the simulator must be
# switched on before numba is imported).
test: test-cpu test-sim

test-cpu: $(VENV)/.installed-test
	$(PY) -m pytest tests bench --benchmark-disable -p no:cacheprovider

test-sim: $(VENV)/.installed-test
	NUMBA_ENABLE_CUDASIM=1 $(PY) -m pytest tests/cuda -p no:cacheprovider

# Timed benchmarks (medians of >= 15 rounds, ~10 min on the 2-core machine), import/first-call
# times with a cold and a warm Numba cache, the interleaved probes (the CPU kernels against
# the plain loops, ~3 min; the torch adapter against torch, ~10 s), then the report:
# bench/results/cpu.{json,md,png}, cpu-probe.{json,md}, torch-probe.{json,md} and the README
# block between the bench:start/bench:end markers.
bench: $(VENV)/.installed-test $(VENV)/.installed-bench
	$(PY) -m pytest bench --benchmark-only --benchmark-min-rounds=15 --benchmark-json=bench/results/cpu.json
	$(PY) bench/startup.py --json bench/results/startup.json
	$(PY) bench/cpu_probe.py --json bench/results/cpu-probe.json
	$(PY) bench/torch_probe.py --json bench/results/torch-probe.json
	$(PY) bench/report.py bench/results/cpu.json --probe bench/results/cpu-probe.json \
		--torch-probe bench/results/torch-probe.json

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check fastadagrad tests bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
