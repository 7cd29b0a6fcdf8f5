"""Write the conda environment files from pyproject.toml and constraints.txt, the one source of truth.

    python -m pathmamba.operations.envfiles            rewrite environment.yml and workflow/envs/pathmamba.yaml
    python -m pathmamba.operations.envfiles --check    exit 1, showing the difference, when a committed file is stale

Either exits 2, naming constraints.txt, when a package has no exact pin there or its pin is outside
pyproject.toml's bound.

The conda part of both files holds only what conda-forge surely has (the interpreter, pip, compilers);
every Python package is a pip requirement pinned as constraints.txt pins it, so that both files resolve
to the versions the test suite runs with. The job environment gets pyproject.toml's ``dependencies``
(what the rules run); environment.yml, for the host that runs snakemake, adds the ``workflow`` extra.
This module must not import torch: it runs in tests and by hand, and has to be quick.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from pathmamba.core.layout import REPO

PYTHON_VERSION = "3.11"
# pydensecrf2 is a source distribution on PyPI (no wheels): pip compiles its C and C++ sources with these.
# Its build requirements (Cython) come from PyPI through pip's build isolation.
CONDA_PACKAGES = (f"python={PYTHON_VERSION}", "pip", "c-compiler", "cxx-compiler")
CHANNELS = ("conda-forge", "nodefaults")


@dataclass(frozen=True)
class EnvFile:
    """One conda environment file: where it lives, what it is for (its header comment, one or more lines)
    and which extras of pyproject.toml it adds to the dependencies."""

    path: str
    purpose: str
    extras: tuple[str, ...]
    name: str | None = None


ENV_FILES = (
    EnvFile("workflow/envs/pathmamba.yaml",
            "The conda environment of every rule (`snakemake --use-conda`): the runtime packages only.", ()),
    EnvFile("environment.yml",
            "The host that runs snakemake (`conda env create -f environment.yml`): the runtime packages,\n"
            "snakemake and the SLURM executor plugin.", ("workflow",), name="pathmamba"),
)


class EnvFileError(ValueError):
    """pyproject.toml or constraints.txt cannot give a pinned environment."""


def read_pins(constraints: Path) -> dict[str, str]:
    """Normalized name -> version of every ``name==version`` line of ``constraints``."""
    pins = {}
    for number, line in enumerate(constraints.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            raise EnvFileError(f"{constraints}:{number}: {error}") from None
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            raise EnvFileError(f"{constraints}:{number}: {text!r} is not an exact pin 'name==version'")
        pins[canonicalize_name(requirement.name)] = specifiers[0].version
    return pins


def pinned_requirements(pyproject: Path, constraints: Path, extras: tuple[str, ...] = ()) -> list[str]:
    """pyproject.toml's ``dependencies`` and the requirements of ``extras``, each pinned to its version
    in constraints.txt (extras and environment markers kept): ``["torch==2.14.1", ...]``."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise EnvFileError(f"{pyproject}: no extra {unknown} under [project.optional-dependencies]")
    pins = read_pins(constraints)
    lines = []
    for text in [*project["dependencies"], *(text for extra in extras for text in optional[extra])]:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in pins:
            raise EnvFileError(f"{constraints}: no pin for {requirement.name!r} ({pyproject}: {text!r}); "
                               f"add a line '{requirement.name}==<version>'")
        if not requirement.specifier.contains(pins[name], prereleases=True):
            raise EnvFileError(f"{constraints}: {requirement.name}=={pins[name]} is outside "
                               f"{pyproject}'s {text!r}")
        extras_text = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        marker = f"; {requirement.marker}" if requirement.marker else ""
        lines.append(f"{requirement.name}{extras_text}=={pins[name]}{marker}")
    return lines


def render(env_file: EnvFile, requirements: list[str]) -> str:
    """The text of ``env_file``: a header, the conda packages, then ``requirements`` under ``pip:``."""
    lines = [*(f"# {line}" for line in env_file.purpose.splitlines()),
             "# Written by `python -m pathmamba.operations.envfiles` from pyproject.toml and constraints.txt: edit those and",
             "# run it again (tests/test_environment.py fails when this file differs). See docs/environment.md."]
    if env_file.name:
        lines.append(f"name: {env_file.name}")
    lines += ["channels:", *(f"  - {channel}" for channel in CHANNELS), "dependencies:"]
    lines += [f"  - {package}" for package in CONDA_PACKAGES]
    lines += ["  - pip:", *(f"      - {requirement}" for requirement in requirements)]
    return "\n".join(lines) + "\n"


def expected_texts(repo: Path = REPO) -> dict[Path, str]:
    """Path -> the text each environment file should have, from ``repo``'s pyproject.toml and constraints."""
    pyproject, constraints = repo / "pyproject.toml", repo / "constraints.txt"
    return {repo / env_file.path: render(env_file, pinned_requirements(pyproject, constraints, env_file.extras))
            for env_file in ENV_FILES}


def write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file and a rename. pathmamba.core.files.atomic_write_text does the same but
    imports torch, which this module must not."""
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    # mkstemp's file is private (0600): give it an ordinary file's permissions (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(name, 0o666 & ~umask)
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


def stale_files(repo: Path = REPO) -> list[str]:
    """A unified diff (committed -> expected) for each environment file that differs; empty when all match."""
    diffs = []
    for path, expected in expected_texts(repo).items():
        found = path.read_text() if path.exists() else ""
        if found != expected:
            relative = path.relative_to(repo)
            diffs.append("".join(difflib.unified_diff(found.splitlines(keepends=True),
                                                      expected.splitlines(keepends=True),
                                                      f"{relative} (committed)", f"{relative} (generated)")))
    return diffs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pathmamba.operations.envfiles", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when a committed environment file differs")
    args = parser.parse_args(argv)
    try:
        if args.check:
            diffs = stale_files()
            for diff in diffs:
                print(diff, end="")
            if diffs:
                print("environment files out of date: run `python -m pathmamba.operations.envfiles`", file=sys.stderr)
            return 1 if diffs else 0
        for path, text in expected_texts().items():
            write_atomically(path, text)
            print(f"wrote {path.relative_to(REPO)}")
    except EnvFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
