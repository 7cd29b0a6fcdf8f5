"""PathMamba benchmark: weakly supervised multi-class segmentation of pathology images."""

import tomllib
from importlib import metadata
from pathlib import Path


def _version() -> str:
    """The installed distribution's version; in a source tree that was never installed (the workflow's
    conda jobs import the package through PYTHONPATH) the version pyproject.toml beside it declares."""
    try:
        return metadata.version("pathmamba-benchmark")
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


__version__ = _version()

# Before torch or numpy is imported anywhere (they read the pins when they load): pathmamba/core/cpu_pins.py.
from pathmamba.core import cpu_pins as _cpu_pins

_cpu_pins.apply()
