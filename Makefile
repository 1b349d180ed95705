PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints.txt

.PHONY: setup setup-browser run test test-fast bench gpu-check clean

$(BIN)/robustsweep: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

setup: $(BIN)/robustsweep

run: setup
	$(BIN)/robustsweep run jobs/demo.toml

# Two pytest-xdist workers, a test file each at a time: the suite mostly waits on Ray, S3 and
# subprocesses, so two sessions overlap their waits on two cores.
PYTEST_WORKERS ?= 2

# Bytecode first: every Ray worker and CLI subprocess of the suite imports the package, and
# where PYTHONDONTWRITEBYTECODE is set none of them would keep what it compiled.
test: setup
	$(BIN)/python -m compileall -q pipeline tests
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# The unit tests: no Ray, no S3 server, no subprocess CLI, no GPU.
test-fast: setup
	$(BIN)/python -m compileall -q pipeline tests
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not slow and not gpu"

# Headless Chromium (Debian's package) for the test that opens the HTML report; skipped when present.
setup-browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; else \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi

bench: setup
	$(BIN)/robustsweep bench elbo
	$(BIN)/robustsweep bench elbo --autocast bf16 --compile forward

# On a machine with a CUDA device: CUDA tests and GPU benchmarks as JSON in GPU_CHECK_OUT, with the
# machine's own python3 (no venv, nothing installed; a step whose packages are missing is skipped).
GPU_PY ?= python3
GPU_CHECK_OUT ?= gpu-check
gpu-check:
	PYTHON=$(GPU_PY) $(GPU_PY) scripts/gpu_check.py $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) results .pytest_cache
