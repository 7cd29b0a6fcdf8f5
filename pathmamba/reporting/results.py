"""Finding a run's finished results and loading them (docs/design.md §4.5); shared by tables and plots.

Everything here reads what finished under the experiment folder (:mod:`pathmamba.core.layout`) and never needs a
GPU. A run counts as finished when its ``test_metrics.json`` exists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pathmamba.core.errors import InputError
from pathmamba.core.layout import (
    DATASET,
    HISTORY,
    PER_IMAGE,
    RUN_RECORD,
    TEST_METRICS,
    TRIVIAL,
    configured_experiment_dir,
    run_path,
)
from pathmamba.data.specs import DatasetSpec, get_dataset_spec, recorded_spec
from pathmamba.engine.metrics import METRICS, confusion_classes, confusion_columns

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
    """What a ``tables`` or ``figures`` command reads: the experiment folders (one, or several whose runs are
    combined), their grid, the datasets' folders."""

    experiment_dirs: list[Path]
    grid: Grid
    data_roots: dict[str, str]


def select_runs(configfile: Path | None = None, experiment_dirs: list[Path] | None = None,
                datasets: list[str] | None = None, methods: list[str] | None = None, seeds: list[int] | None = None,
                data_roots: list[str] = ()) -> Selection:
    """The runs a command reads: each of ``experiment_dirs``, ``datasets``, ``methods``, ``seeds`` given, else the
    workflow config ``configfile``'s (its experiment folder and ``grid``); ``data_roots`` (``DATASET=FOLDER``) over
    the config's dataset folders. Raises :class:`InputError` naming the argument for what is missing,
    repeated or not a folder."""
    from pathmamba.engine.config import grid_datasets, grid_methods, load_config_mapping

    config = load_config_mapping(configfile) if configfile else {}
    resources = config.get("resources_dir", "resources")
    roots = {name: entry.get("root", str(Path(resources) / DATASET.format(dataset=name)))
             for name, entry in config.get("datasets", {}).items()}
    for item in data_roots:
        name, sep, folder = item.partition("=")
        if not sep:
            raise InputError(f"--data-root: expected DATASET=FOLDER, got {item!r}")
        roots[name] = folder
    given = {"experiment-dir": experiment_dirs, "datasets": datasets, "methods": methods, "seeds": seeds}
    if not experiment_dirs and "experiment" in config:
        experiment_dirs = [configured_experiment_dir(config.get("results_dir", "results"), config["experiment"])]
    chosen = {"experiment-dir": [Path(folder) for folder in experiment_dirs or []],
              "datasets": datasets or (grid_datasets(config) if config else []),
              "methods": methods or (grid_methods(config) if config else []),
              "seeds": seeds or [int(seed) for seed in config.get("seeds", [])]}
    missing = [key for key, value in chosen.items() if not value]
    if missing:
        raise InputError(f"give --configfile or --{', --'.join(missing)}")
    for key, values in chosen.items():
        # A seed given twice would count as two finished runs: "3 seeds, ± 0.000" from one run.
        repeated = sorted({str(value) for value in values if values.count(value) > 1})
        if repeated:
            where = f"--{key}" if given[key] else f"{configfile}: {key}"
            raise InputError(f"{where}: {', '.join(repeated)} given more than once; each must be unique")
    for experiment_dir in chosen["experiment-dir"]:
        if not experiment_dir.is_dir():
            # A mistyped experiment folder would give tables of "—" (no finished run) and exit 0.
            where = "--experiment-dir" if given["experiment-dir"] else f"{configfile}: results_dir/experiment"
            raise InputError(f"{where}: {experiment_dir} is not a folder; expected results/<experiment> holding runs/")
    return Selection(chosen["experiment-dir"], Grid(chosen["datasets"], chosen["methods"], chosen["seeds"]), roots)


def finished_runs(experiment_dirs: Path | Sequence[Path], grid: Grid) -> pd.DataFrame:
    """The runs of ``grid`` whose ``test_metrics.json`` exists, plus each dataset's trivial reference, in
    the experiment folder ``experiment_dirs`` or in several (a grid split across machines); a run whose training
    diverged (:func:`diverged`) is never one.

    A run found in several folders must have the same results in each (:func:`agreeing_copy`); the first
    folder's copy is used. Columns: dataset, method, seed (None for trivial), path (the run's folder).
    """
    rows = [{"dataset": dataset, "method": method, "seed": seed, "path": path}
            for dataset, method, seed, path in _evaluated_runs(experiment_dirs, grid) if not diverged(path)]
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", "path"])


def diverged_runs(experiment_dirs: Path | Sequence[Path], grid: Grid) -> list[tuple[str, str, int]]:
    """(dataset, method, seed) of the evaluated runs of ``grid`` left out of :func:`finished_runs` because
    their training diverged."""
    return [(dataset, method, seed) for dataset, method, seed, path in _evaluated_runs(experiment_dirs, grid)
            if diverged(path)]


def _evaluated_runs(experiment_dirs: Path | Sequence[Path], grid: Grid):
    """(dataset, method, seed, folder) of every run of ``grid`` with a ``test_metrics.json`` in ``experiment_dirs``."""
    if isinstance(experiment_dirs, (str, Path)):
        experiment_dirs = [experiment_dirs]
    experiment_dirs = [Path(folder) for folder in experiment_dirs]
    for dataset, method, seed in _grid_runs(grid):
        run = run_path(Path(), dataset, method, seed)
        holding = [folder for folder in experiment_dirs if (folder / run / TEST_METRICS).exists()]
        if holding:
            yield dataset, method, seed, agreeing_copy(holding, run)


def diverged(run: Path) -> bool:
    """Whether the training of the run in folder ``run`` diverged: a nan or infinite loss in its
    ``history.csv``. The engine stops such a run without a model (:class:`pathmamba.engine.train.TrainingDiverged`);
    this keeps one trained before it did out of every table."""
    path = Path(run) / HISTORY
    if not path.is_file():
        return False
    try:
        losses = pd.read_csv(path)["loss"].astype(float)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, KeyError, ValueError, UnicodeDecodeError) as error:
        raise InputError(f"{path}: not a readable training history ({error}); {RERUN}") from None
    return not losses.map(math.isfinite).all()


def _grid_runs(grid: Grid):
    """(dataset, method, seed) of every run of ``grid``, each dataset's trivial reference (seed None) last."""
    for dataset in grid.datasets:
        for method in grid.methods:
            for seed in grid.seeds:
                yield dataset, method, seed
        yield dataset, TRIVIAL, None


def flat_record(record: dict, prefix: str = "") -> dict[str, str]:
    """A JSON record as one level of dotted keys (``environment.cpu.model``), each value as its canonical
    JSON text: two values are equal exactly when their texts are (floats bitwise; nan equals nan)."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, dict) and value:
            flat.update(flat_record(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return flat


def agreeing_copy(experiment_dirs: list[Path], run: Path) -> Path:
    """``run`` (a run's folder relative to an experiment folder) in the first of ``experiment_dirs``, once its results
    (the ``protocols`` of ``test_metrics.json``) are the same in every other: copies that disagree raise
    :class:`InputError` naming both experiment folders, the run and the first metric that differs."""
    first = flat_record(read_run_json(experiment_dirs[0] / run / TEST_METRICS)["protocols"])
    for experiment_dir in experiment_dirs[1:]:
        other = flat_record(read_run_json(experiment_dir / run / TEST_METRICS)["protocols"])
        differing = next((key for key in {**first, **other} if first.get(key) != other.get(key)), None)
        if differing is not None:
            raise InputError(f"{run} is in {experiment_dirs[0]} and in {experiment_dir} with different results: "
                             f"{differing} {first.get(differing)} vs {other.get(differing)}; a run of one dataset, method and "
                             "seed must have one result: remove the copy that should not count")
    return experiment_dirs[0] / run


def load_metrics(paths: list[Path], protocol: str = "ignore_background") -> pd.DataFrame:
    """One row per ``test_metrics.json``: dataset, method, seed and the four m-metrics of ``protocol``."""
    rows = []
    for path in paths:
        record = read_run_json(path)
        scores = record["protocols"][protocol]
        rows.append({"dataset": record["dataset"], "method": record["method"], "seed": record["seed"],
                     **{metric: scores[metric] for metric in METRICS}})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", *METRICS])


def recorded_dataset_spec(experiment_dirs: Path | Sequence[Path], dataset: str) -> DatasetSpec:
    """``dataset``'s spec as its results recorded it: the description in its trivial reference's
    test_metrics.json in the first of ``experiment_dirs`` that has one (a user's dataset has no shipped
    description to look up by name), else the shipped dataset of that name."""
    for experiment_dir in [experiment_dirs] if isinstance(experiment_dirs, (str, Path)) else experiment_dirs:
        path = run_path(experiment_dir, dataset, TRIVIAL, None) / TEST_METRICS
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("dataset_description"):
                return recorded_spec(record)
    return get_dataset_spec(dataset)


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
        path = Path(run.path) / PER_IMAGE
        try:
            frame = pd.read_csv(path)
        except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
            raise InputError(f"{path}: not a readable CSV file ({error}); {RERUN}") from None
        lacking = [column for column in confusion_columns(max(confusion_classes(frame), 1)) if column not in frame]
        if lacking:
            raise ValueError(f"{path}: no per-image confusion matrix ({lacking[0]}, ...), which the split-level "
                             "statistics need; it was written by an older evaluate: run it again "
                             "(snakemake --forcerun evaluate evaluate_trivial)")
        frames.append(frame.assign(dataset=run.dataset, method=run.method, seed=run.seed))
    if not frames:
        return pd.DataFrame(columns=["image", *METRICS, "dataset", "method", "seed"])
    return pd.concat(frames, ignore_index=True)


def hardware_label(environment: dict) -> str:
    """The hardware that computed a result, as far as it decides the numbers (an environment record of
    :func:`pathmamba.core.environment.environment_record`): the GPU model on CUDA, and the CPU, whose libraries
    run beside a GPU too: "CPU pinned to AVX2" where the instruction-set pins held (then every x86-64 CPU
    with AVX2 gives the same numbers; :mod:`pathmamba.core.cpu_pins`), else the CPU's model. "unrecorded" for a
    record without a device."""
    device = environment.get("device")
    if device is None:
        return "unrecorded"
    cpu = environment.get("cpu")
    if cpu is None:
        processor = "CPU pins unrecorded"
    elif cpu.get("pinned_isa"):
        processor = f"CPU pinned to {cpu['pinned_isa'].upper()}"
    else:
        processor = f"CPU {cpu.get('model') or 'unknown'} unpinned"
    if device.startswith("cuda"):
        return f"GPU {environment.get('device_name') or 'unrecorded'}, {processor}"
    return processor


def _scan_precision(environment: dict) -> str:
    return "/".join(environment.get(key) or "unrecorded" for key in ("scan", "precision"))


#: The aspects of what computed a result that can change its numbers, each as a label of an environment
#: record.
RUNTIME_ASPECTS = {"hardware": hardware_label, "scan/precision": _scan_precision}


def run_runtimes(runs: pd.DataFrame) -> dict[tuple[str, str], dict[int, dict[str, str]]]:
    """``{(dataset, method): {seed: {aspect: label}}}``: what computed each seed's result, per aspect of
    :data:`RUNTIME_ASPECTS`, from the environment records of its training (``run.json``) and evaluation
    (``test_metrics.json``); "<training's> (train), <evaluation's> (test)" where the two differ."""
    runtimes: dict[tuple[str, str], dict[int, dict[str, str]]] = {}
    for run in runs.itertuples(index=False):
        if run.method == TRIVIAL:
            continue
        environments = []
        for name in (RUN_RECORD, TEST_METRICS):
            path = Path(run.path) / name
            environments.append(read_run_json(path).get("environment", {}) if path.exists() else {})
        labels = {}
        for aspect, label_of in RUNTIME_ASPECTS.items():
            train, test = (label_of(environment) for environment in environments)
            labels[aspect] = train if train == test else f"{train} (train), {test} (test)"
        runtimes.setdefault((run.dataset, run.method), {})[int(run.seed)] = labels
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
