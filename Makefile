# Set-up and entry points; `make demo` and `make test` work on a fresh machine with Python >= 3.11.
VENV ?= .venv
PYTHON ?= python3
BIN := $(abspath $(VENV))/bin
# Rules call `python -m pathmamba`: the virtualenv's python must come first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: install kernels demo readme readme-check report test test-fast lint rehearse

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# mamba-ssm's fused selective-scan CUDA extension, compiled for this machine's GPUs (or ARCH=9.0; JOBS=N
# compile jobs, default sized to the memory) and installed into the virtualenv: docs/environment.md.
# ARCH and JOBS reach pathmamba.operations.kernels through its environment, not through the shell's command line.
kernels: export PATHMAMBA_KERNEL_ARCH = $(ARCH)
kernels: export PATHMAMBA_KERNEL_JOBS = $(JOBS)
kernels: install
	$(BIN)/python -m pathmamba.operations.kernels

demo: install
	$(BIN)/snakemake --cores all --configfile config/demo.yaml

# The README's results section: the demo run's Table 1, spliced between its markers.
readme: install
	$(BIN)/snakemake --cores all --configfile config/demo.yaml
	$(BIN)/python -m pathmamba readme --table results/demo/tables/table1_comparison.md --readme README.md

# Fails, with a diff, when the README's results are not what the demo run of this checkout gives.
readme-check: install
	$(BIN)/snakemake --cores all --configfile config/demo.yaml
	$(BIN)/python -m pathmamba readme --check --table results/demo/tables/table1_comparison.md --readme README.md

# Every table and figure of the demo run in one self-contained HTML file.
report: install
	$(BIN)/snakemake --cores all --configfile config/demo.yaml
	$(BIN)/snakemake --configfile config/demo.yaml --report results/demo/report.html

test: install
	$(BIN)/python -m pytest

# The suite without its Snakemake end-to-end runs, the SLURM run, the emulated CPUs and the environment installs.
test-fast: install
	$(BIN)/python -m pytest -m "not e2e and not slurm and not qemu and not install"

# The paper config at the paper's model sizes on generated data and random weights, in a folder of its
# own (docs/rehearsal.md); fails when the run or its checks fail. REHEARSAL: a new folder, or one an
# earlier rehearsal created (it resumes).
REHEARSAL ?= results/rehearsal
rehearse: install
	$(BIN)/python -m pathmamba rehearse --folder "$(REHEARSAL)"

lint: install
	$(BIN)/snakefmt --check workflow
	$(BIN)/snakemake --lint --configfile config/demo.yaml
	$(BIN)/ruff check pathmamba baselines tests benchmarks
