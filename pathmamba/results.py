"""Finding a run's finished results and loading them (docs/design.md §4.5); shared by tables and plots.

Everything here reads what finished under the run folder (:mod:`pathmamba.layout`) and never needs a
GPU. A run counts as finished when its ``test_metrics.json`` exists.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pathmamba.layout import TRIVIAL, run_path
from pathmamba.metrics import METRICS, confusion_columns
from pathmamba.runtime import InputError

#: What to do about a damaged run file.
RERUN = "delete it and run the job that writes it again"


def read_run_json(path: Path) -> dict:
    """A JSON file of a run (``test_metrics.json``, ``run.json``); a damaged one (a job killed while
    writing it by hand, a disk that filled) raises :class:`InputError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable JSON file ({error}); {RERUN}") from None


@dataclass(frozen=True)
class Grid:
    """The configured experiment: what a complete run holds."""

    datasets: list[str]
    methods: list[str]
    seeds: list[int]


@dataclass(frozen=True)
class Selection:
    """What a ``tables`` or ``figures`` command reads: the run folder, its grid, the datasets' folders."""

    run_dir: Path
    grid: Grid
    data_roots: dict[str, str]


def select_runs(configfile: Path | None = None, run_dir: Path | None = None, datasets: list[str] | None = None,
                methods: list[str] | None = None, seeds: list[int] | None = None,
                data_roots: list[str] = ()) -> Selection:
    """The runs a command reads: each of ``run_dir``, ``datasets``, ``methods``, ``seeds`` given, else the
    workflow config ``configfile``'s (its ``grid``); ``data_roots`` (``DATASET=FOLDER``) over the config's
    dataset folders. Raises :class:`InputError` naming the argument for what is missing, repeated or not
    a folder."""
    from pathmamba.config import grid_datasets, grid_methods

    config = yaml.safe_load(Path(configfile).read_text()) if configfile else {}
    resources = config.get("resources_dir", "resources")
    roots = {name: entry.get("root", f"{resources}/datasets/{name}")
             for name, entry in config.get("datasets", {}).items()}
    for item in data_roots:
        name, sep, folder = item.partition("=")
        if not sep:
            raise InputError(f"--data-root: expected DATASET=FOLDER, got {item!r}")
        roots[name] = folder
    given = {"run_dir": run_dir, "datasets": datasets, "methods": methods, "seeds": seeds}
    if run_dir is None and "run" in config:
        run_dir = Path(config.get("results_dir", "results")) / config["run"]
    chosen = {"datasets": datasets or (grid_datasets(config) if config else []),
              "methods": methods or (grid_methods(config) if config else []),
              "seeds": seeds or [int(seed) for seed in config.get("seeds", [])]}
    missing = [key for key, value in {"run-dir": run_dir, **chosen}.items() if not value]
    if missing:
        raise InputError(f"give --configfile or --{', --'.join(missing)}")
    for key, values in chosen.items():
        # A seed given twice would count as two finished runs: "3 seeds, ± 0.000" from one run.
        repeated = sorted({str(value) for value in values if values.count(value) > 1})
        if repeated:
            where = f"--{key}" if given[key] else f"{configfile}: {key}"
            raise InputError(f"{where}: {', '.join(repeated)} given more than once; each must be unique")
    if not Path(run_dir).is_dir():
        # A mistyped run folder would give tables of "—" (no finished run) and exit 0.
        where = "--run-dir" if given["run_dir"] else f"{configfile}: results_dir/run"
        raise InputError(f"{where}: {run_dir} is not a folder; expected results/<run> holding runs/")
    return Selection(Path(run_dir), Grid(chosen["datasets"], chosen["methods"], chosen["seeds"]), roots)


def finished_runs(run_dir: Path, grid: Grid) -> pd.DataFrame:
    """The runs of ``grid`` whose ``test_metrics.json`` exists, plus each dataset's trivial reference.

    Columns: dataset, method, seed (None for trivial), path (the run folder).
    """
    rows = []
    for dataset in grid.datasets:
        for method in grid.methods:
            for seed in grid.seeds:
                folder = run_path(run_dir, dataset, method, seed)
                if (folder / "test_metrics.json").exists():
                    rows.append({"dataset": dataset, "method": method, "seed": seed, "path": folder})
        folder = run_path(run_dir, dataset, TRIVIAL, None)
        if (folder / "test_metrics.json").exists():
            rows.append({"dataset": dataset, "method": TRIVIAL, "seed": None, "path": folder})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", "path"])


def load_metrics(paths: list[Path], protocol: str = "ignore_background") -> pd.DataFrame:
    """One row per ``test_metrics.json``: dataset, method, seed and the four m-metrics of ``protocol``."""
    rows = []
    for path in paths:
        record = read_run_json(path)
        scores = record["protocols"][protocol]
        rows.append({"dataset": record["dataset"], "method": record["method"], "seed": record["seed"],
                     **{metric: scores[metric] for metric in METRICS}})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", *METRICS])


def load_per_class_iou(paths: list[Path], protocol: str = "ignore_background") -> pd.DataFrame:
    """One row per run and tissue class: dataset, method, seed, class (the dataset's name), IoU."""
    rows = []
    for path in paths:
        record = read_run_json(path)
        for name, value in zip(record["classes"], record["protocols"][protocol]["per_class"]["IoU"], strict=True):
            rows.append({"dataset": record["dataset"], "method": record["method"], "seed": record["seed"],
                         "class": name, "IoU": value})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", "class", "IoU"])


def load_per_image(runs: pd.DataFrame) -> pd.DataFrame:
    """All ``per_image.csv`` rows of ``runs`` (from :func:`finished_runs`) with dataset, method, seed."""
    frames = []
    for run in runs.itertuples(index=False):
        path = Path(run.path) / "per_image.csv"
        try:
            frame = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: not a readable CSV file ({error}); {RERUN}") from None
        lacking = [column for column in confusion_columns() if column not in frame]
        if lacking:
            raise ValueError(f"{path}: no per-image confusion matrix ({lacking[0]}, ...), which the split-level "
                             "statistics need; it was written by an older evaluate: run it again "
                             "(snakemake --forcerun evaluate evaluate_trivial)")
        frames.append(frame.assign(dataset=run.dataset, method=run.method, seed=run.seed))
    if not frames:
        return pd.DataFrame(columns=["image", *METRICS, "dataset", "method", "seed"])
    return pd.concat(frames, ignore_index=True)


def run_runtimes(runs: pd.DataFrame) -> dict[tuple[str, str], dict[int, str]]:
    """``{(dataset, method): {seed: "scan ..., precision ..."}}``: what computed each seed's result, from
    the environment records of its training (``run.json``) and evaluation (``test_metrics.json``)."""
    runtimes: dict[tuple[str, str], dict[int, str]] = {}
    for run in runs.itertuples(index=False):
        if run.method == TRIVIAL:
            continue
        parts = []
        for name in ("run.json", "test_metrics.json"):
            path = Path(run.path) / name
            environment = read_run_json(path).get("environment", {}) if path.exists() else {}
            parts.append("/".join(environment.get(key) or "unrecorded" for key in ("scan", "precision")))
        label = "scan/precision " + (parts[0] if parts[0] == parts[1] else f"{parts[0]} (train), {parts[1]} (test)")
        runtimes.setdefault((run.dataset, run.method), {})[int(run.seed)] = label
    return runtimes


def load_paper_results(path: Path) -> dict:
    """``config/paper_results.yaml`` as ``{"table1": {dataset: {method: {metric: value}}}, "table2": ...}``."""
    data = yaml.safe_load(Path(path).read_text())
    for table in ("table1", "table2"):
        if not isinstance(data.get(table), dict):
            raise TypeError(f"{path}: key {table!r} must map dataset -> method -> metric values")
        for dataset, methods in data[table].items():
            for method, values in methods.items():
                missing = [metric for metric in METRICS if not isinstance(values.get(metric), (int, float))]
                if missing:
                    raise ValueError(f"{path}: {table}.{dataset}.{method} lacks numeric {', '.join(missing)}")
    return data
