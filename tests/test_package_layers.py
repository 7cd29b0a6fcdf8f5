"""The package's folders are its layers and imports never run upward (docs/design.md §1): every import
statement of ``pathmamba/`` and ``baselines/``, at module level or inside a function, is read with ``ast``
and checked against the layers it may use."""

import ast
from pathlib import Path

import pytest
from conftest import REPO

#: Each layer and the layers its modules may import (their own layer is always allowed). ``entry`` is the
#: command line, ``python -m pathmamba`` and the fork server, which runs the command line in its children.
MAY_IMPORT = {
    "core": set(),
    "data": {"core"},
    "models": {"core"},
    "baselines": {"core", "data", "models"},
    "engine": {"core", "data", "models", "baselines"},
    "reporting": {"core", "data", "models", "engine"},
    "operations": {"core", "data", "models", "baselines", "engine"},
    "entry": {"core", "data", "models", "baselines", "engine", "reporting", "operations"},
}
ENTRY_MODULES = {"cli", "__main__", "forkserver"}


def layer(module: str) -> str | None:
    """The layer of a dotted module name of this project; None for the root package ``pathmamba`` (its
    ``__version__``) and for modules of other projects."""
    parts = module.split(".")
    if parts[0] == "baselines":
        return "baselines"
    if parts[0] != "pathmamba" or len(parts) == 1:
        return None
    return "entry" if parts[1] in ENTRY_MODULES else parts[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(source: str, module: str) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in ``source``, the text of module ``module``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            # The project imports absolutely; a relative import would escape this check.
            base = node.module if node.level == 0 else f"<relative import in {module}>"
            # `from pathmamba import cli` imports the module pathmamba.cli, not a name of the root.
            found += [(node.lineno, f"{base}.{alias.name}" if base == "pathmamba" and alias.name != "__version__" else base)
                      for alias in node.names]
    return found


def upward_imports(sources: dict[str, str]) -> list[str]:
    """Every import of a module in ``sources`` (dotted name -> text) that its layer may not make."""
    problems = []
    for module, source in sources.items():
        importer = layer(module)
        if module == "pathmamba":
            allowed = {"core"}  # the root runs on every import: it pins the CPU kernels, nothing more
        else:
            allowed = MAY_IMPORT[importer] | {importer}
        for line, target in imported(source, module):
            target_layer = layer(target)
            if target.startswith("<relative") or (target_layer is not None and target_layer not in allowed):
                problems.append(f"{module}:{line} ({importer or 'root'}) imports {target} ({target_layer})")
    return problems


def project_sources() -> dict[str, str]:
    paths = sorted((REPO / "pathmamba").rglob("*.py")) + sorted((REPO / "baselines").rglob("*.py"))
    return {module_name(path): path.read_text() for path in paths}


def test_no_import_runs_upward():
    sources = project_sources()
    assert len(sources) > 60  # the walk found the package
    assert upward_imports(sources) == []


def test_every_module_sits_in_a_layer():
    top = {path.stem for path in (REPO / "pathmamba").glob("*.py")}
    assert top == {"__init__", *ENTRY_MODULES}, "a module beside the entry points belongs in a layer's folder"
    folders = {path.name for path in (REPO / "pathmamba").iterdir() if (path / "__init__.py").is_file()}
    assert folders == set(MAY_IMPORT) - {"baselines", "entry"}


@pytest.mark.parametrize(("module", "source", "problem"), [
    ("pathmamba.core.files", "from pathmamba.engine.train import train\n", "imports pathmamba.engine.train (engine)"),
    ("pathmamba.engine.train", "def f():\n    from pathmamba.reporting import tables\n",
     "imports pathmamba.reporting (reporting)"),
    ("pathmamba.reporting.tables", "import pathmamba.operations.plan as plan\n", "imports pathmamba.operations.plan"),
    ("baselines.cam.cam", "from pathmamba.engine.train import train\n", "imports pathmamba.engine.train (engine)"),
    ("pathmamba", "from pathmamba import cli\n", "imports pathmamba.cli (entry)"),
])
def test_the_check_finds_an_upward_import(module, source, problem):
    [found] = upward_imports({module: source})
    assert problem in found


def test_downward_and_sideways_imports_pass():
    assert upward_imports({"pathmamba.engine.train": "from pathmamba.core import layout\nimport torch\n",
                           "pathmamba.cli": "from pathmamba.operations.plan import gpu_jobs\n",
                           "pathmamba.core.environment": "from pathmamba import __version__\n"}) == []
