import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def snakemake_bin() -> str:
    """The snakemake of the interpreter running the tests (the project's virtualenv)."""
    candidate = Path(sys.executable).with_name("snakemake")
    found = str(candidate) if candidate.exists() else shutil.which("snakemake")
    assert found, "snakemake is not installed beside this Python"
    return found


@pytest.fixture(scope="session")
def workflow_env() -> dict:
    """The environment for snakemake: this Python first on PATH (the rules call `python`)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env
