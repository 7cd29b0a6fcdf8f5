"""The results layout has one owner, pathmamba/layout.py: rules and code build their paths from it."""

import re
from pathlib import Path

from conftest import REPO

from pathmamba import layout


def test_run_path_fills_the_patterns():
    assert layout.run_path(Path("r"), "d", "m", 3) == Path("r/runs/d/m/seed3")
    assert layout.run_path(Path("r"), "d", "ignored", None) == Path("r/runs/d/trivial")
    assert layout.benchmark_path(Path("r"), "d", "m", 0) == Path("r/benchmarks/d/m/seed0")


# A folder of the run layout spelled as a path literal: "runs/...", ".../benchmarks/..." and the like.
SPELLED_LAYOUT = re.compile(r"""["'/](runs|logs|checkpoints|benchmarks)/|["']datasets/\{""")


def test_nothing_but_the_layout_module_spells_the_run_folders():
    files = [*sorted((REPO / "workflow" / "rules").glob("*.smk")), REPO / "workflow" / "Snakefile",
             *sorted((REPO / "pathmamba").rglob("*.py"))]
    spelled = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
               for path in files if path.name != "layout.py"
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if SPELLED_LAYOUT.search(line) and not line.lstrip().startswith("#")]
    assert not spelled, "\n".join(spelled)


def test_run_dir_of_a_run_file():
    run_file = layout.run_path(Path("results/my run"), "d", "m", 0) / "test_metrics.json"
    assert layout.run_dir_of(run_file) == Path("results/my run")
