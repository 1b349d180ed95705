PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONSTRAINTS ?= constraints.txt

.PHONY: setup run test bench clean

$(BIN)/robustsweep: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

setup: $(BIN)/robustsweep

run: setup
	$(BIN)/robustsweep run jobs/demo.toml

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/robustsweep bench elbo

clean:
	rm -rf $(VENV) results .pytest_cache
