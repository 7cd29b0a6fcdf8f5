"""pyproject.toml is the single list of Python dependencies: the conda environments must match it.

`snakemake --use-conda` builds every rule's environment from workflow/envs/*.yaml, and clusters use
environment.yml; both must hold the same packages and version bounds as pyproject.toml's
``dependencies`` (conda names; a ``pip:`` sub-list holds packages that conda-forge lacks).
"""

import re
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO

if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")

# PyPI name -> conda-forge name, where they differ.
CONDA_NAMES = {"torch": "pytorch"}
# Conda has no extras: the packages an extra pulls in are listed by name.
EXTRA_PACKAGES = {("snakemake", "reports"): {"pygments"}}
# Interpreter and installer, not dependencies.
CONDA_ONLY = {"python", "pip"}

REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?\s*(.*?)\s*$")


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(text: str) -> tuple[str, set[str], str]:
    """``"snakemake[reports]>=8.0"`` -> ``("snakemake", {"reports"}, ">=8.0")``."""
    match = REQUIREMENT.match(text)
    assert match, f"cannot parse the requirement {text!r}"
    name, extras, specifier = match.groups()
    return normalized(name), {e.strip() for e in (extras or "").split(",") if e.strip()}, specifier.replace(" ", "")


def expected_conda_packages() -> dict[str, str]:
    """Conda package -> version specifier, from pyproject.toml's dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    packages = {}
    for requirement in project["dependencies"]:
        name, extras, specifier = parse_requirement(requirement)
        packages[CONDA_NAMES.get(name, name)] = specifier
        for extra in extras:
            assert (name, extra) in EXTRA_PACKAGES, (
                f"pyproject.toml: {requirement!r} has the extra [{extra}]; list the packages it pulls in "
                "under EXTRA_PACKAGES in tests/test_environment.py and in the conda environments")
            packages.update({package: "" for package in EXTRA_PACKAGES[(name, extra)]})
    return packages


def conda_packages(path: Path) -> dict[str, str]:
    """Package -> version specifier of a conda environment file (``pip:`` entries included)."""
    packages = {}
    for entry in yaml.safe_load(path.read_text())["dependencies"]:
        for text in entry["pip"] if isinstance(entry, dict) else [entry]:
            name, _, specifier = parse_requirement(text)
            if name not in CONDA_ONLY:
                packages[name] = specifier
    return packages


def drift(env_file: Path) -> list[str]:
    """What differs between ``env_file`` and pyproject.toml's dependencies; empty when they match."""
    expected, found = expected_conda_packages(), conda_packages(env_file)
    return ([f"missing {name}{expected[name]}" for name in sorted(set(expected) - set(found))]
            + [f"not in pyproject.toml: {name}" for name in sorted(set(found) - set(expected))]
            + [f"{name}: {found[name]!r} here, {expected[name]!r} in pyproject.toml"
               for name in sorted(set(expected) & set(found)) if expected[name] != found[name]])


ENV_FILES = [REPO / "environment.yml", *sorted((REPO / "workflow" / "envs").glob("*.yaml"))]


@pytest.mark.parametrize("env_file", ENV_FILES, ids=[str(p.relative_to(REPO)) for p in ENV_FILES])
def test_conda_environment_matches_pyproject(env_file):
    problems = drift(env_file)
    assert not problems, f"{env_file.relative_to(REPO)} drifted from pyproject.toml: {problems}"


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


def test_the_check_catches_drift(tmp_path):
    """A changed bound, a dropped package and a renamed one are all reported."""
    env = yaml.safe_load((REPO / "workflow" / "envs" / "pathmamba.yaml").read_text())
    deps = [d for d in env["dependencies"] if not (isinstance(d, str) and d.startswith(("numpy", "scipy")))]
    env["dependencies"] = [*deps, "numpy>=1.0", "torch>=2.1"]
    drifted = tmp_path / "drifted.yaml"
    drifted.write_text(yaml.safe_dump(env))
    problems = drift(drifted)
    assert any(p.startswith("numpy: '>=1.0' here") for p in problems), problems
    assert any(p.startswith("missing scipy") for p in problems), problems
    assert "not in pyproject.toml: torch" in problems
    assert len(problems) == 3, problems
