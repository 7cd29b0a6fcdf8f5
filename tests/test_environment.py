"""The conda environment files: written from pyproject.toml and constraints.txt, and installable.

`snakemake --use-conda` builds every rule's environment from workflow/envs/pathmamba.yaml; the host that
runs snakemake uses environment.yml. Their conda part is only what conda-forge surely has; every Python
package is a pip requirement pinned as constraints.txt pins it. The ``install`` tests resolve both pip
parts (pip's dry run) and really install the job environment's into a fresh virtualenv (2-3 minutes
with pip's cache warm from `make install`; ``-m "not install"`` leaves them out).
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pathmamba.operations.envfiles import EnvFileError, pinned_requirements, read_pins, stale_files

JOB_ENV = REPO / "workflow" / "envs" / "pathmamba.yaml"
HOST_ENV = REPO / "environment.yml"
ENV_FILES = [HOST_ENV, *sorted((REPO / "workflow" / "envs").glob("*.yaml"))]
ENV_IDS = [str(path.relative_to(REPO)) for path in ENV_FILES]
# What conda-forge surely has (anaconda.org/conda-forge lists c-compiler and cxx-compiler for linux-64,
# osx-64, osx-arm64): the interpreter, pip, and the compilers pip builds pydensecrf2's sdist with.
ALLOWED_CONDA_PACKAGES = {"python=3.11", "pip", "c-compiler", "cxx-compiler"}
# The engine and the test tools: on the submitting host, never in a job's environment.
HOST_ONLY = {"snakemake", "snakemake-executor-plugin-slurm", "pytest", "ruff", "snakefmt"}


def conda_part(env_file: Path) -> list[str]:
    return [entry for entry in yaml.safe_load(env_file.read_text())["dependencies"] if isinstance(entry, str)]


def pip_part(env_file: Path) -> list[str]:
    pip_sections = [entry["pip"] for entry in yaml.safe_load(env_file.read_text())["dependencies"]
                    if isinstance(entry, dict)]
    assert len(pip_sections) == 1, f"{env_file.relative_to(REPO)}: expected one '- pip:' section"
    return pip_sections[0]


def test_committed_env_files_are_what_the_generator_writes():
    diffs = stale_files()
    assert not diffs, "run `python -m pathmamba.operations.envfiles`:\n" + "\n".join(diffs)


@pytest.mark.parametrize("env_file", ENV_FILES, ids=ENV_IDS)
def test_every_pip_requirement_is_pinned_as_constraints_txt_pins_it(env_file):
    pins = read_pins(REPO / "constraints.txt")
    for text in pip_part(env_file):
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert str(requirement.specifier) == f"=={pins.get(name)}", (
            f"{env_file.relative_to(REPO)}: {text!r}; constraints.txt pins {name}=={pins.get(name)}")


@pytest.mark.parametrize("env_file", ENV_FILES, ids=ENV_IDS)
def test_the_conda_part_is_only_the_allowed_packages(env_file):
    assert set(conda_part(env_file)) <= ALLOWED_CONDA_PACKAGES, env_file.relative_to(REPO)
    assert "pip" in conda_part(env_file)


def test_the_job_env_has_no_engine_and_no_test_tools_and_the_host_env_has_the_engine():
    job = {canonicalize_name(Requirement(text).name) for text in pip_part(JOB_ENV)}
    host = {canonicalize_name(Requirement(text).name) for text in pip_part(HOST_ENV)}
    assert not job & HOST_ONLY, job & HOST_ONLY
    assert job < host
    assert {"snakemake", "snakemake-executor-plugin-slurm"} <= host
    assert "snakemake[reports]" in {re.sub(r"==.*", "", text) for text in pip_part(HOST_ENV)}


def test_the_generator_does_not_import_torch():
    code = "import sys, pathmamba.operations.envfiles; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, check=False).returncode == 0


def test_check_passes_on_this_repository_and_fails_naming_a_stale_file(tmp_path):
    check = [sys.executable, "-m", "pathmamba.operations.envfiles", "--check"]
    result = subprocess.run(check, cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    # A copy of the repository's sources of truth, env files and generator, then one changed pin.
    repo = tmp_path / "repo"
    for name in ("pyproject.toml", "constraints.txt", "environment.yml", "workflow/envs/pathmamba.yaml",
                 "pathmamba/__init__.py", "pathmamba/operations/envfiles.py", "pathmamba/core/__init__.py",
                 "pathmamba/core/cpu_pins.py", "pathmamba/core/layout.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    constraints = repo / "constraints.txt"
    constraints.write_text(re.sub(r"^gdown==\S+", "gdown==6.5.2", constraints.read_text(), flags=re.MULTILINE))
    result = subprocess.run(check, cwd=repo, capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert "--- environment.yml (committed)\n+++ environment.yml (generated)" in result.stdout
    assert "-      - gdown==6.5.1\n+      - gdown==6.5.2\n" in result.stdout
    assert "run `python -m pathmamba.operations.envfiles`" in result.stderr
    assert len(stale_files(repo)) == 2


def test_a_missing_or_contradicting_pin_is_an_error_naming_constraints_txt(tmp_path):
    pyproject, constraints = tmp_path / "pyproject.toml", tmp_path / "constraints.txt"
    pyproject.write_text('[project]\ndependencies = ["numpy>=1.24", "gdown>=6.5"]\n')
    constraints.write_text("numpy==2.4.6\n")
    with pytest.raises(EnvFileError, match=r"constraints.txt: no pin for 'gdown'"):
        pinned_requirements(pyproject, constraints)
    constraints.write_text("numpy==2.4.6\ngdown==5.0\n")
    with pytest.raises(EnvFileError, match=r"gdown==5.0 is outside .*'gdown>=6.5'"):
        pinned_requirements(pyproject, constraints)
    constraints.write_text("numpy>=2\n")
    with pytest.raises(EnvFileError, match=r"constraints.txt:1: 'numpy>=2' is not an exact pin"):
        read_pins(constraints)


def test_every_rule_that_runs_code_has_a_conda_environment():
    """`--use-conda` must build an environment for each rule that runs a shell command."""
    rules_without_env = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^rule ", smk.read_text(), flags=re.MULTILINE)[1:]:
            name = block.split(":", 1)[0]
            if re.search(r"^    shell:", block, re.MULTILINE) and not re.search(r"^    conda:", block, re.MULTILINE):
                rules_without_env.append(f"{smk.name}: {name}")
            env = re.search(r"^    conda:\s*\n\s*\"([^\"]+)\"", block, re.MULTILINE)
            if env:
                assert (smk.parent / env.group(1)).resolve().is_file(), f"{smk.name}: {name}: {env.group(1)}"
    assert not rules_without_env, f"rules running code without a conda: environment: {rules_without_env}"


# Imports every module of the project that a rule's job can run (not pathmamba.operations.envfiles, a maintainer's
# tool, nor __main__, which runs the command line), then says whether snakemake is importable.
IMPORT_EVERY_JOB_MODULE = """
import importlib, importlib.util, pkgutil, sys
import baselines, pathmamba
for package in (pathmamba, baselines):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if module.name not in ("pathmamba.operations.envfiles", "pathmamba.__main__"):
            importlib.import_module(module.name)
print(importlib.util.find_spec("snakemake") is not None)
"""


def pip_in_a_fresh_virtualenv(env_file: Path, where: Path, *options: str) -> tuple[str, str]:
    """``pip install *options -r <env_file's pip part>`` with a new virtualenv's python, under ``where``.
    Returns that python and pip's standard output; a failed install fails the test with pip's message."""
    requirements = where / "requirements.txt"
    requirements.write_text("\n".join(pip_part(env_file)) + "\n")
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True)
    python = str(where / "venv" / "bin" / "python")
    result = subprocess.run([python, "-m", "pip", "install", "--disable-pip-version-check", *options,
                             "-r", str(requirements)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"{env_file.relative_to(REPO)}: pip failed:\n{result.stderr[-4000:]}"
    return python, result.stdout


def assert_pins_hold(env_file: Path, versions: dict[str, str]) -> None:
    for text in pip_part(env_file):
        requirement = Requirement(text)
        found = versions.get(canonicalize_name(requirement.name))
        assert found is not None and requirement.specifier.contains(found), f"{text}: pip chose {found}"


# A real install of the job environment takes 1.5-2.5 minutes here (torch's CUDA libraries), the host one
# as long again; a dry run resolves the same set of packages (checked by hand for both files) in 15-25 s.
@pytest.mark.install
@pytest.mark.parametrize("env_file", ENV_FILES, ids=ENV_IDS)
def test_the_pip_part_resolves(env_file, tmp_path):
    """pip finds every pinned release for this platform and Python, with all their dependencies."""
    try:
        _, report = pip_in_a_fresh_virtualenv(env_file, tmp_path, "--dry-run", "--ignore-installed", "--quiet",
                                              "--report", "-")
    finally:
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)
    resolved = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
                for item in json.loads(report)["install"]}
    assert_pins_hold(env_file, resolved)
    if env_file == HOST_ENV:
        assert "pygments" in resolved, "snakemake[reports] must bring pygments (`snakemake --report`)"


@pytest.mark.install
def test_the_job_env_installs_and_every_job_module_imports_without_snakemake(tmp_path):
    """What `snakemake --use-conda` does with the pip part, pydensecrf2 built from its sdist when pip's
    cache has no wheel; then the project's modules import with only what the job environment has."""
    try:
        python, _ = pip_in_a_fresh_virtualenv(JOB_ENV, tmp_path, "--quiet")
        listed = subprocess.run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
                                capture_output=True, text=True, check=True).stdout
        assert_pins_hold(JOB_ENV, {canonicalize_name(item["name"]): item["version"] for item in json.loads(listed)})
        imported = subprocess.run([python, "-c", IMPORT_EVERY_JOB_MODULE], cwd=REPO, capture_output=True,
                                  text=True, check=False)
    finally:
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)
    assert imported.returncode == 0, f"a module does not import in the job environment:\n{imported.stderr}"
    assert imported.stdout.strip() == "False", "snakemake is importable in the job environment"
