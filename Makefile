# Set-up and entry points; `make demo` and `make test` work on a fresh machine with Python >= 3.10.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install demo test lint

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/snakemake --cores all --configfile config/demo.yaml

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/snakemake --lint --configfile config/demo.yaml
	$(BIN)/ruff check pathmamba baselines tests benchmarks
