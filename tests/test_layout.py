"""The results layout has one owner, pathmamba/core/layout.py: rules and code build their paths from it."""

import ast
import re
from pathlib import Path

from conftest import REPO

from pathmamba.core import layout


def test_run_path_fills_the_patterns():
    assert layout.run_path(Path("r"), "d", "m", 3) == Path("r/runs/d/m/seed3")
    assert layout.run_path(Path("r"), "d", "ignored", None) == Path("r/runs/d/trivial")
    assert layout.benchmark_path(Path("r"), "d", "m", 0) == Path("r/benchmarks/d/m/seed0")


# A folder of the run layout spelled as a path literal: "runs/...", ".../benchmarks/..." and the like.
SPELLED_LAYOUT = re.compile(r"""["'/](runs|logs|checkpoints|benchmarks)/|["']datasets/\{""")


def test_nothing_but_the_layout_module_spells_the_experiment_folders():
    files = [*sorted((REPO / "workflow" / "rules").glob("*.smk")), REPO / "workflow" / "Snakefile",
             *sorted((REPO / "pathmamba").rglob("*.py"))]
    spelled = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
               for path in files if path.name != "layout.py"
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if SPELLED_LAYOUT.search(line) and not line.lstrip().startswith("#")]
    assert not spelled, "\n".join(spelled)


def test_experiment_dir_of_a_run_file():
    run_file = layout.run_path(Path("results/my run"), "d", "m", 0) / "test_metrics.json"
    assert layout.experiment_dir_of(run_file) == Path("results/my run")


def layout_names() -> set[str]:
    """What layout.py names: the literal pieces of its patterns' path components (``runs``, ``model.pt``,
    ``qualitative_``, ``-imagenet.pth``, ...), from every string constant of the module and of its dicts."""
    values = [value for name, value in vars(layout).items() if name.isupper()]
    constants = [value for value in values if isinstance(value, str)]
    constants += [item for value in values if isinstance(value, dict) for item in value.values() if isinstance(item, str)]
    return {piece for constant in constants for component in constant.split("/")
            for piece in re.split(r"\{\w+\}", component) if len(piece) > 3 and not piece.startswith(".")}


def spells(component: str, names: set[str]) -> bool:
    """Whether a path component is, begins or ends with a name of the layout."""
    return any(component == name or (component.startswith(name) and name.endswith(("_", "-")))
               or (component.endswith(name) and name.startswith("-")) for name in names)


def _docstrings(tree: ast.AST) -> set[int]:
    return {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
            and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}


def hand_built_paths(source: str, names: set[str]) -> list[int]:
    """Lines of Python ``source`` that build a path from a layout name: ``folder / "model.pt"``,
    ``f"{folder}/tables"``, ``f"runs/{dataset}"`` or a literal such as ``"results/demo/tables/x.md"``
    (docstrings aside: they describe the layout)."""
    tree = ast.parse(source)
    skipped = _docstrings(tree)
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right.values[0] if isinstance(node.right, ast.JoinedStr) and node.right.values else node.right
            if isinstance(right, ast.Constant) and isinstance(right.value, str) \
                    and spells(right.value.split("/")[0], names):
                lines.append(node.lineno)
        elif isinstance(node, ast.JoinedStr):
            text = "".join(part.value if isinstance(part, ast.Constant) else "{}" for part in node.values)
            if "/" in text and any(spells(component, names) for component in text.split("/")):
                lines.append(node.lineno)
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped
              and "/" in node.value and "\n" not in node.value
              and any(spells(component, names) for component in node.value.split("/"))):
            lines.append(node.lineno)
    return sorted(set(lines))


def smk_pattern(names: set[str]) -> re.Pattern:
    """A rule file's path expression spelling a layout name: joined to a placeholder (``f"{EXPERIMENT_DIR}/model.pt"``)
    or by pathlib (``/ "tables"``), a literal that begins a path with it (``"runs/..."``), or a file name
    given alone (``run_files("history.csv")``)."""
    alternatives = "|".join(sorted(map(re.escape, names), key=len, reverse=True))
    files = "|".join(sorted(map(re.escape, (name for name in names if "." in name)), key=len, reverse=True))
    return re.compile(rf"""(\}}/|/ *["'])({alternatives})(?=[/"'.{{]|$)|["']({alternatives})/|["']({files})["']""")


#: Layout names that a module uses for something else: predict writes a folder of its own that has a masks/
#: too.
OTHER_MEANINGS = {"pathmamba/engine/predict.py": {"masks"}}


def test_no_results_or_resources_path_is_built_outside_the_layout_module():
    names = layout_names()
    assert {"runs", "model.pt", "test_metrics.json", "tables", "figures", "table1_comparison", "qualitative_",
            "weights", "datasets", "throughput-", "run.json", "train.tsv"} <= names  # the scan is wired
    found = []
    for path in sorted((REPO / "pathmamba").rglob("*.py")):
        relative = str(path.relative_to(REPO))
        if path.name != "layout.py":
            found += [f"{relative}:{line}" for line in
                      hand_built_paths(path.read_text(), names - OTHER_MEANINGS.get(relative, set()))]
    joined = smk_pattern(names)
    for path in [*sorted((REPO / "workflow" / "rules").glob("*.smk")), REPO / "workflow" / "Snakefile"]:
        found += [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
                  for number, line in enumerate(path.read_text().splitlines(), 1)
                  if joined.search(line.split("#")[0])]
    assert not found, "paths spelled outside pathmamba/core/layout.py:\n" + "\n".join(found)


def test_the_scan_finds_each_way_of_spelling_a_path():
    names = layout_names()
    source = ('"""A docstring may say runs/<dataset>/model.pt."""\n'
              'a = folder / "model.pt"\n'
              'b = f"{results}/tables/{name}"\n'
              'c = "results/demo/tables/table1_comparison.md"\n'
              'd = folder / f"qualitative_{dataset}"\n'
              'e = "a message about masks, no path"\n'
              'f = folder / layout.MODEL\n')
    assert hand_built_paths(source, names) == [2, 3, 4, 5]
    rules = ['        model=f"{EXPERIMENT_DIR}/model.pt",', '        runs=run_files("test_metrics.json"),',
             '        f"{RESOURCES}/datasets/{{dataset}}",', '        folder=f"runs/{RUN}",',
             '        model=f"{EXPERIMENT_DIR}/{layout.MODEL}",', '        entry = config["datasets"][wildcards.dataset]',
             '        job_log("tables", REPORT_LOG_DIR),']
    assert [bool(smk_pattern(names).search(line)) for line in rules] == [True] * 4 + [False] * 3
