"""Do two results agree? ``python -m pathmamba compare A B`` (docs/comparing-runs.md).

A is an experiment folder (``results/<experiment>``). B is one of:

- another experiment folder: the same configuration run elsewhere (another machine or GPU, other seeds). Its
  runs must have A's configuration but for the hardware keys (:data:`HARDWARE_KEYS`); anything else that
  differs is refused, naming the keys, unless each is accepted by name.
- a README whose results section ``python -m pathmamba readme`` wrote: the published table, which holds
  only means ± std (three decimals) and seed counts.
- the paper's values (``config/paper_results.yaml``): one number per cell, no spread.

Per dataset, method and m-metric: both means over seeds (as the tables compute them), the difference
A − B, a 95% interval for it over seeds and one over test images where both sides' images are known,
and a verdict (:data:`VERDICTS`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pathmamba.core.errors import FileSafetyError, InputError
from pathmamba.core.files import atomic_write_text
from pathmamba.core.layout import RUN, RUN_RECORD, TEST_METRICS, TRIVIAL, TRIVIAL_RUN
from pathmamba.engine.metrics import METRICS, confusion_classes, confusion_columns
from pathmamba.reporting.readme import RESULTS_END, RESULTS_START
from pathmamba.reporting.render import METRIC_LABELS, MISSING, MIXED_MARK, markdown_grid
from pathmamba.reporting.results import (
    flat_record,
    hardware_label,
    load_paper_results,
    load_per_image,
    read_run_json,
)
from pathmamba.reporting.stats import (
    confusions_by_seed,
    one_sample_interval,
    split_level_intervals,
    welch_interval,
)
from pathmamba.reporting.tables import PAPER_ROUNDING, summarise

LEVEL = 0.95
IDENTICAL = "identical"
SEED_NOISE = "within seed noise"
IMAGE_NOISE = "within image noise"
DIFFERS = "differs"
UNDETERMINED = "undetermined"
#: The verdicts, from the most to the least agreement (docs/comparing-runs.md).
VERDICTS = (IDENTICAL, SEED_NOISE, IMAGE_NOISE, DIFFERS, UNDETERMINED)

#: Keys of run.json and test_metrics.json (dotted, :func:`pathmamba.reporting.results.flat_record`) that record the
#: hardware: runs that differ only in these are one configuration. The configured device, the device and
#: GPU that ran, its memory, driver and slot, the host, and the CPU (model, vendor, instruction-set flags,
#: and the ATen kernels chosen from them). Not the CPU pins (``environment.cpu.pins``, ``pinned_isa``,
#: ``pins_requested``), nor threads, scan, precision or package versions: each of those changes results.
HARDWARE_KEYS = ("settings.device", "environment.device", "environment.device_name",
                 "environment.device_memory_gb", "environment.cuda_driver", "environment.cuda_visible_devices",
                 "environment.gpu_slot", "environment.host", "environment.cpu.model", "environment.cpu.vendor",
                 "environment.cpu.isa_flags", "environment.cpu.capability")
#: Keys that are neither configuration nor hardware: which run it is, where its files lay, what came out
#: and how long it took, and the data loader's process count (results do not depend on it).
NOT_CONFIGURATION = ("method", "dataset", "seed", "data_root", "checkpoint_dir", "stage1_model", "pseudo_masks",
                     "resumed_after_epoch", "best_epoch", "best_val_mIoU", "wall_seconds_this_run",
                     "train_seconds_all_epochs", "protocols", "settings.workers")
#: The prefix of test_metrics.json's keys beside run.json's.
EVALUATION = "evaluation."

#: The README's results section, as ``python -m pathmamba readme`` writes it.
#: Half a unit of the README's last digit (three decimals), as the paper's.
README_ROUNDING = PAPER_ROUNDING
#: The first line of a Markdown file compare wrote: an existing ``--out`` without it is not overwritten.
MARKDOWN_SIGNATURE = "<!-- written by python -m pathmamba compare -->"
CSV_COLUMNS = ["dataset", "method", "metric", "a_seeds", "a_n", "a_mean", "a_std", "b_seeds", "b_n", "b_mean",
               "b_std", "difference", "seeds_low", "seeds_high", "seeds_interval", "images_low", "images_high",
               "images_interval", "verdict"]


@dataclass(frozen=True)
class SeedRun:
    """One finished run of an experiment folder: a seed (None for the trivial reference) of a dataset and method."""

    seed: int | None
    path: Path
    scores: dict[str, float]
    #: test_metrics.json's ``protocols`` as canonical JSON: equal texts are bitwise-equal results.
    results: str
    #: run.json's and test_metrics.json's configuration keys (evaluation.*), values as JSON text.
    configuration: dict[str, str]
    #: The hardware that trained it (:func:`machine`); "unrecorded" for the trivial reference.
    machine: str


@dataclass(frozen=True)
class Published:
    """A published cell: mean (± std over ``n`` seeds where published) per metric, as printed with
    ``rounding`` (half a unit of the last digit); ``printed``: the README's cell texts per metric."""

    mean: dict[str, float]
    std: dict[str, float] | None
    n: int | None
    printed: dict[str, str] | None
    rounding: float


@dataclass(frozen=True)
class Side:
    """B: an experiment folder's runs, or published cells, by (dataset, method); ``kind``: experiment, readme or paper."""

    kind: str
    cells: dict


@dataclass(frozen=True)
class Interval:
    """A 95% interval of the difference A − B and how it was computed; nan bounds when there is none
    (``how`` then says why)."""

    low: float
    high: float
    how: str

    @property
    def exists(self) -> bool:
        return not math.isnan(self.low)

    def holds_zero(self) -> bool:
        return self.low <= 0 <= self.high


def none(reason: str) -> Interval:
    """No interval, for ``reason``."""
    return Interval(math.nan, math.nan, reason)


@dataclass(frozen=True)
class Comparison:
    """The outcome: one row per dataset, method and metric (:data:`CSV_COLUMNS`), the notes under it and the
    (dataset, method) cells that only one side has (not compared)."""

    title: str
    rows: pd.DataFrame
    notes: list[str]
    one_sided: list[tuple[str, str]]


# Reading the two sides.


def read_experiment_folder(experiment_dir: Path, role: str) -> dict[tuple[str, str], list[SeedRun]]:
    """Every finished run under ``experiment_dir`` (``role``: "A" or "B", for messages), by (dataset, method)."""
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise InputError(f"{role}: {experiment_dir} is not a folder; expected results/<experiment> holding runs/")
    patterns = [RUN.format(dataset="*", method="*", seed="*"), TRIVIAL_RUN.format(dataset="*")]
    folders = sorted({path.parent for pattern in patterns for path in experiment_dir.glob(f"{pattern}/{TEST_METRICS}")})
    if not folders:
        raise InputError(f"{role}: {experiment_dir} holds no finished run "
                         f"({RUN.format(dataset='<dataset>', method='<method>', seed='<N>')}/{TEST_METRICS})")
    cells: dict[tuple[str, str], list[SeedRun]] = {}
    for folder in folders:
        record = read_run_json(folder / TEST_METRICS)
        trained = read_run_json(folder / RUN_RECORD) if (folder / RUN_RECORD).exists() else {}
        configuration = {**flat_record(trained), **flat_record(record, EVALUATION)}
        cells.setdefault((record["dataset"], record["method"]), []).append(SeedRun(
            seed=record["seed"], path=folder,
            scores={metric: record["protocols"]["ignore_background"][metric] for metric in METRICS},
            results=json.dumps(record["protocols"], sort_keys=True),
            configuration={key: value for key, value in configuration.items() if is_configuration(key)},
            machine=machine(trained.get("environment", {}))))
    return {cell: sorted(runs, key=lambda run: -1 if run.seed is None else run.seed)
            for cell, runs in sorted(cells.items(), key=lambda item: (item[0][0], item[0][1] == TRIVIAL, item[0][1]))}


def machine(environment: dict) -> str:
    """The hardware of a training's environment record: :func:`pathmamba.reporting.results.hardware_label` with the
    CPU's model and the host."""
    label = hardware_label(environment)
    model = (environment.get("cpu") or {}).get("model")
    where = [*([f"CPU {model}"] if model and model not in label else []),
             *([f"host {environment['host']}"] if environment.get("host") else [])]
    return f"{label} ({', '.join(where)})" if where else label


def is_configuration(key: str) -> bool:
    """Whether a dotted key of run.json or test_metrics.json (``evaluation.`` prefixed) is configuration:
    neither hardware (:data:`HARDWARE_KEYS`) nor :data:`NOT_CONFIGURATION`."""
    return not under(key.removeprefix(EVALUATION), [*HARDWARE_KEYS, *NOT_CONFIGURATION])


def read_readme(path: Path) -> dict[tuple[str, str], Published]:
    """The cells of a README's results section (one ``### dataset`` table per dataset, as
    :func:`pathmamba.reporting.render.markdown_results` writes them): mean ± std and seed count per metric."""
    text = Path(path).read_text()
    if text.count(RESULTS_START) != 1 or text.count(RESULTS_END) != 1:
        raise InputError(f"B: {path} has no results section between {RESULTS_START} and {RESULTS_END}; "
                         "expected a README written by `python -m pathmamba readme`")
    section = text.split(RESULTS_START)[1].split(RESULTS_END)[0]
    cells: dict[tuple[str, str], Published] = {}
    dataset, header = None, []
    for line in section.splitlines():
        if line.startswith("### "):
            dataset, header = line[4:].strip(), []
        elif line.startswith("|") and dataset:
            row = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not header:
                header = row
            elif not set(row[0]) <= {"-"}:
                cells.update(_readme_cell(dataset, dict(zip(header, row, strict=True)), path))
    if not cells:
        raise InputError(f"B: {path}: its results section holds no table of a dataset (### <dataset>, | Method | ...)")
    return cells


def _readme_cell(dataset: str, row: dict[str, str], path: Path) -> dict[tuple[str, str], Published]:
    """One row of a README results table as ``{(dataset, method): cell}``; nothing for a row without a
    finished run (—)."""
    method = row["Method"].replace(MIXED_MARK, "").strip()
    if row["Seeds"] == MISSING:
        return {}
    found = {metric: re.match(r"^\**(\d+\.\d+)\**(?: ± (\d+\.\d+))?", row[label])
             for metric, label in METRIC_LABELS.items()}
    unreadable = [METRIC_LABELS[metric] for metric, match in found.items() if match is None]
    if unreadable:
        raise InputError(f"B: {path}: {dataset}, {method}: no 'mean ± std' in column {unreadable[0]}: "
                         f"{row[unreadable[0]]!r}")
    n = int(re.match(r"\d+", row["Seeds"]).group())
    return {(dataset, method): Published(
        mean={metric: float(match.group(1)) for metric, match in found.items()},
        std={metric: float(match.group(2) or 0.0) for metric, match in found.items()}, n=n,
        printed={metric: printed(float(match.group(1)), float(match.group(2) or 0.0), n)
                 for metric, match in found.items()},
        rounding=README_ROUNDING)}


def printed(mean: float, std: float, n: int) -> str:
    """A cell as the tables print it: the mean, and ± std for more than one seed."""
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"


def read_paper(path: Path) -> dict[tuple[str, str], Published]:
    """The paper's value of every cell of its Tables 1 and 2 (``config/paper_results.yaml``)."""
    paper = load_paper_results(path)
    cells: dict[tuple[str, str], Published] = {}
    for table in ("table1", "table2"):
        for dataset, methods in paper[table].items():
            for method, values in methods.items():
                cells.setdefault((dataset, method), Published(
                    mean={metric: float(values[metric]) for metric in METRICS}, std=None, n=None, printed=None,
                    rounding=PAPER_ROUNDING))
    return cells


def read_side_b(path: Path) -> Side:
    """B by what it is: an experiment folder, a README (``.md``) or the paper's values (``.yaml``)."""
    path = Path(path)
    if path.is_dir():
        return Side("experiment", read_experiment_folder(path, "B"))
    if path.suffix == ".md":
        return Side("readme", read_readme(path))
    if path.suffix in (".yaml", ".yml"):
        return Side("paper", read_paper(path))
    raise InputError(f"B: {path} is neither an experiment folder (results/<experiment>), a README with a results section "
                     "(.md) nor the paper's values (config/paper_results.yaml)")


# Configuration.


def configuration_differences(a: dict, b: dict, cells: list[tuple[str, str]]) -> dict[str, str]:
    """The configuration keys whose values differ between A's and B's runs of a cell: ``{key: where}``.
    A key of test_metrics.json counts as run.json's key of the same name; ``where`` names the first cell
    where it differs and both sides' values (a key a run lacks is "absent")."""
    found: dict[str, str] = {}
    files: dict[str, set[str]] = {}
    for cell in cells:
        values_a, values_b = _values_by_key(a[cell]), _values_by_key(b[cell])
        # Sorted: run.json's environment.* before test_metrics.json's evaluation.environment.*.
        for key in sorted(set(values_a) | set(values_b)):
            value_a, value_b = values_a.get(key, {"absent"}), values_b.get(key, {"absent"})
            if value_a != value_b:
                name = key.removeprefix(EVALUATION)
                files.setdefault(name, set()).add("test_metrics.json" if key.startswith(EVALUATION) else "run.json")
                found.setdefault(name, f"{cell[0]} {cell[1]}: A {_shown(value_a)}, B {_shown(value_b)}")
    return {name: where + ("" if "run.json" in files[name] else ", in test_metrics.json")
            for name, where in found.items()}


def under(key: str, names: Sequence[str]) -> bool:
    """Whether the dotted ``key`` is one of ``names`` or under one (``environment.cpu.pins.MKL_CBWR`` is
    under ``environment.cpu.pins``)."""
    return any(key == name or key.startswith(f"{name}.") for name in names)


def _values_by_key(runs: list[SeedRun]) -> dict[str, set[str]]:
    """Every configuration key of ``runs`` with the values it takes among them ("absent" where a run lacks it)."""
    keys = {key for run in runs for key in run.configuration}
    return {key: {run.configuration.get(key, "absent") for run in runs} for key in keys}


def _shown(values: set[str]) -> str:
    return " / ".join(value if len(value) <= 40 else value[:37] + "..." for value in sorted(values))


# The statistics of one cell.


def _summary(runs: list[SeedRun]) -> pd.Series:
    """Mean, std (ddof=1; 0 for one seed) and number of seeds of ``runs``, as the tables compute them
    (:func:`pathmamba.reporting.tables.summarise`): one row, columns ``<metric>_mean``, ``<metric>_std``, ``n_seeds``."""
    frame = pd.DataFrame([{"cell": 0, **run.scores} for run in runs])
    return summarise(frame, keys=("cell",)).iloc[0]


def _confusions(runs: list[SeedRun]) -> pd.DataFrame:
    """The per-image rows (image, confusion columns, seed) of ``runs``' per_image.csv files."""
    return load_per_image(pd.DataFrame([{"dataset": "", "method": "", "seed": run.seed, "path": run.path}
                                        for run in runs]))


def paired_images(a: pd.DataFrame, b: pd.DataFrame) -> tuple[list[str], str]:
    """The test images both sides scored, or [] and why they cannot be paired: the same image names in
    every seed's per_image.csv on both sides, and the same true pixels of each class in each image."""
    sets = [set(frame["image"]) for side in (a, b) for _, frame in side.groupby("seed", dropna=False)]
    if any(images != sets[0] for images in sets):
        return [], "the sides scored different test images"
    images = sorted(sets[0])
    truths = [_true_pixels(frame, images) for side in (a, b) for _, frame in side.groupby("seed", dropna=False)]
    if any(not np.array_equal(truth, truths[0]) for truth in truths):
        return [], "same image names, different ground truth"
    return images, ""


def _true_pixels(frame: pd.DataFrame, images: list[str]) -> np.ndarray:
    """Scored pixels of each true class in each of ``images`` (rows of the per-image confusion matrices)."""
    classes = confusion_classes(frame)
    matrices = frame.set_index("image").loc[images, confusion_columns(classes)].to_numpy(dtype=np.float64)
    return matrices.reshape(len(images), classes, classes).sum(-1)


def _by_seed(per_image: pd.DataFrame, images: list[str]) -> np.ndarray:
    """(seeds, images, C, C) confusion matrices of one side's rows (of :func:`_confusions`)."""
    return confusions_by_seed(per_image, "", images)


def _image_intervals(a: list[SeedRun], b: list[SeedRun] | None, n_resamples: int, seed: int,
                     offset: dict[str, float] | None = None, rounding: float = 0.0) -> dict[str, Interval]:
    """Per metric, the percentile interval over ``n_resamples`` test-image resamples of A's split-level
    metric minus B's (paired: the same images drawn on both sides), or minus ``offset`` (a published
    value, widened by its ``rounding``) when ``b`` is None."""
    per_image_a = _confusions(a)
    if b is None:
        images = sorted(set(per_image_a["image"]))
        intervals = split_level_intervals(_by_seed(per_image_a, images), None, METRICS, n_resamples, seed, LEVEL)
        how = f"bootstrap of A's {len(images)} test images, B's rounding ±{rounding}"
        return {metric: Interval(value["low"] - offset[metric] - rounding, value["high"] - offset[metric] + rounding,
                                 how) for metric, value in intervals.items()}
    per_image_b = _confusions(b)
    images, reason = paired_images(per_image_a, per_image_b)
    if not images:
        return dict.fromkeys(METRICS, none(reason))
    intervals = split_level_intervals(_by_seed(per_image_a, images), _by_seed(per_image_b, images), METRICS,
                                      n_resamples, seed, LEVEL)
    how = f"paired bootstrap, {len(images)} images"
    return {metric: Interval(value["low"], value["high"], how) for metric, value in intervals.items()}


def _seed_interval(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int,
                   rounding: float, trivial: bool) -> Interval:
    """Welch's t interval of A's mean minus B's over seeds, widened by B's ``rounding`` (its std taken at
    the top of its rounding too); for the trivial reference, which has no seeds, the difference itself."""
    diff = mean_a - mean_b
    widened = f", B's rounding ±{rounding}" if rounding else ""
    if trivial:
        return Interval(diff - rounding, diff + rounding, f"none needed: no seeds, so no seed noise{widened}")
    if min(n_a, n_b) < 2:
        return none(f"fewer than 2 seeds in {'A' if n_a < 2 else 'B'}")
    interval = welch_interval(mean_a, std_a, n_a, mean_b, std_b + rounding, n_b, LEVEL)
    df = "" if math.isnan(interval["df"]) else f", df {interval['df']:.1f}"
    return Interval(interval["low"] - rounding, interval["high"] + rounding, f"Welch t{df}{widened}")


def verdict(identical: bool, seeds: Interval, images: Interval) -> str:
    """identical; else by the seed interval, or the test-image interval where there is none; else
    undetermined (docs/comparing-runs.md)."""
    if identical:
        return IDENTICAL
    if seeds.exists:
        return SEED_NOISE if seeds.holds_zero() else DIFFERS
    if images.exists:
        return IMAGE_NOISE if images.holds_zero() else DIFFERS
    return UNDETERMINED


def _row(cell: tuple[str, str], metric: str, a: pd.Series, a_seeds: str, b: dict, seeds: Interval,
         images: Interval, identical: bool) -> dict:
    """One output row (:data:`CSV_COLUMNS`); ``a``: A's summary, ``b``: B's seeds, n, mean and std."""
    return {"dataset": cell[0], "method": cell[1], "metric": metric, "a_seeds": a_seeds, "a_n": int(a["n_seeds"]),
            "a_mean": a[f"{metric}_mean"], "a_std": a[f"{metric}_std"], "b_seeds": b["seeds"], "b_n": b["n"],
            "b_mean": b["mean"], "b_std": b["std"], "difference": a[f"{metric}_mean"] - b["mean"],
            "seeds_low": seeds.low, "seeds_high": seeds.high, "seeds_interval": seeds.how,
            "images_low": images.low, "images_high": images.high, "images_interval": images.how,
            "verdict": verdict(identical, seeds, images)}


def _seeds_text(runs: list[SeedRun]) -> str:
    return ",".join("none" if run.seed is None else str(run.seed) for run in runs)


def compare_run_cells(a: list[SeedRun], b: list[SeedRun], cell: tuple[str, str], n_resamples: int,
                      seed: int) -> list[dict]:
    """The rows of one cell of two experiment folders."""
    summary_a, summary_b = _summary(a), _summary(b)
    identical = [(run.seed, run.results) for run in a] == [(run.seed, run.results) for run in b]
    images = _image_intervals(a, b, n_resamples, seed)
    trivial = all(run.seed is None for run in [*a, *b])
    rows = []
    for metric in METRICS:
        seeds = _seed_interval(summary_a[f"{metric}_mean"], summary_a[f"{metric}_std"], len(a),
                               summary_b[f"{metric}_mean"], summary_b[f"{metric}_std"], len(b), 0.0, trivial)
        b_values = {"seeds": _seeds_text(b), "n": len(b), "mean": summary_b[f"{metric}_mean"],
                    "std": summary_b[f"{metric}_std"]}
        rows.append(_row(cell, metric, summary_a, _seeds_text(a), b_values, seeds, images[metric], identical))
    return rows


def compare_published_cell(a: list[SeedRun], b: Published, kind: str, cell: tuple[str, str], n_resamples: int,
                           seed: int) -> list[dict]:
    """The rows of one cell of an experiment folder against a README's (``kind`` readme) or the paper's cell."""
    summary_a = _summary(a)
    trivial = all(run.seed is None for run in a)
    if kind == "paper":
        images = _image_intervals(a, None, n_resamples, seed, b.mean, b.rounding)
    else:
        images = dict.fromkeys(METRICS, none("B has no per-image scores"))
    rows = []
    for metric in METRICS:
        mean_a, std_a = summary_a[f"{metric}_mean"], summary_a[f"{metric}_std"]
        if kind == "paper":
            seeds = _paper_interval(mean_a, std_a, len(a), b.mean[metric], b.rounding)
            identical = False
        else:
            seeds = _seed_interval(mean_a, std_a, len(a), b.mean[metric], b.std[metric], b.n, b.rounding, trivial)
            identical = len(a) == b.n and printed(mean_a, std_a, len(a)) == b.printed[metric]
        b_values = {"seeds": "", "n": b.n, "mean": b.mean[metric], "std": None if b.std is None else b.std[metric]}
        rows.append(_row(cell, metric, summary_a, _seeds_text(a), b_values, seeds, images[metric], identical))
    return rows


def _paper_interval(mean: float, std: float, n: int, value: float, rounding: float) -> Interval:
    """The one-sample t interval of the run's seed mean minus the paper's ``value``, widened by its rounding."""
    if n < 2:
        return none("fewer than 2 seeds in A")
    interval = one_sample_interval(mean, std, n, value, LEVEL)
    return Interval(interval["low"] - rounding, interval["high"] + rounding,
                    f"one-sample t, df {interval['df']:.0f}, B's rounding ±{rounding}")


# The whole comparison.


def compare(path_a: Path, path_b: Path, accept: Sequence[str] = (), n_resamples: int = 10000,
            seed: int = 0) -> Comparison:
    """Compare the experiment folder ``path_a`` with ``path_b`` (module docstring). Two experiment folders whose runs'
    configurations differ in a key that is not hardware and not in or under one in ``accept`` raise
    :class:`InputError` naming every such key, its first cell and both values."""
    a = read_experiment_folder(Path(path_a), "A")
    b = read_side_b(Path(path_b))
    common = [cell for cell in a if cell in b.cells]
    if not common:
        raise InputError(f"A ({path_a}) and B ({path_b}) have no dataset and method in common: A has "
                         f"{_cells_text(a)}; B has {_cells_text(b.cells)}")
    notes = []
    if b.kind == "experiment":
        differences = configuration_differences(a, b.cells, common)
        refused = {key: where for key, where in differences.items() if not under(key, accept)}
        if refused:
            raise InputError(f"A ({path_a}) and B ({path_b}) differ in configuration, not only in hardware: "
                             + "; ".join(f"{key} ({where})" for key, where in refused.items())
                             + f"; compare runs of one configuration, or give --accept {' '.join(refused)} "
                             "to compare them anyway")
        notes.append(_configuration_note(differences))
        notes += [f"Hardware of {name}: {_hardware_text(cells, common)}." for name, cells in (("A", a), ("B", b.cells))]
    rows = []
    for cell in common:
        if b.kind == "experiment":
            rows += compare_run_cells(a[cell], b.cells[cell], cell, n_resamples, seed)
        else:
            rows += compare_published_cell(a[cell], b.cells[cell], b.kind, cell, n_resamples, seed)
    table = pd.DataFrame(rows, columns=CSV_COLUMNS)
    one_sided = [cell for cell in [*a, *b.cells] if cell not in common]
    if one_sided:
        notes.append(f"Not compared, on one side only: {_cells_text(dict.fromkeys(one_sided))}.")
    notes += [_verdict_counts(table), _intervals_note(b.kind, n_resamples, seed), VERDICT_NOTE]
    return Comparison(f"Comparison: A = {path_a}, B = {path_b}", table, notes, one_sided)


def _cells_text(cells: dict) -> str:
    return ", ".join(f"{dataset} {method}" for dataset, method in cells) or "none"


def _configuration_note(differences: dict[str, str]) -> str:
    if not differences:
        return ("Configuration: every run's run.json and test_metrics.json are the same on both sides but for the "
                f"hardware keys ({', '.join(HARDWARE_KEYS)}).")
    return ("Configuration: the same but for the hardware keys and these accepted differences (--accept): "
            + "; ".join(f"{key} ({where})" for key, where in differences.items()) + ".")


def _hardware_text(cells: dict, common: list[tuple[str, str]]) -> str:
    counts = Counter(run.machine for cell in common for run in cells[cell] if run.seed is not None)
    return "; ".join(f"{count} runs on {label}" for label, count in counts.most_common()) or "no seeded run"


def _verdict_counts(table: pd.DataFrame) -> str:
    counts = table["verdict"].value_counts()
    return "Rows: " + ", ".join(f"{counts[name]} {name}" for name in VERDICTS if name in counts) + "."


def _intervals_note(kind: str, n_resamples: int, seed: int) -> str:
    """How the intervals against B of ``kind`` (experiment, readme, paper) were computed."""
    bootstrap = f"{n_resamples} resamples, numpy seed {seed}"
    if kind == "readme":
        return ("B is a published table: means ± std with three decimals and seed counts, nothing per seed. "
                f"Seeds: Welch's t interval from those, B's std taken {README_ROUNDING} higher and the interval "
                f"widened by {README_ROUNDING} each side for B's rounding. identical: A's cell as the tables print "
                "it (mean ± std, seeds) is B's cell. Configurations are not checked: B records none.")
    if kind == "paper":
        return ("B is the paper's value of each cell (no spread, no seed count; the paper reports the average of "
                "five repetitions). Seeds: the one-sample t interval of A's seed mean minus that value, widened "
                f"by {PAPER_ROUNDING} each side for its rounding; the paper's own seed spread is unknown and not in "
                "it, so `differs` says that A's seeds are unlikely to average to the paper's number, no more. "
                f"Test images: A's split-level metric bootstrapped over its test images ({bootstrap}) minus the "
                "paper's value; it decides where A has one seed.")
    return ("A, B: mean ± std over seeds (ddof=1), n seeds; Δ = A − B. Seeds: Welch's t interval of the "
            "difference of the two seed means (unpaired: a seed on another machine is another training run; "
            "Welch does not assume equal spreads). Test images, where both sides scored the same ones: paired "
            f"percentile bootstrap of the split-level metric ({bootstrap}; the same images drawn on both sides, "
            "each side the mean over its seeds of the metric of its summed confusion matrices).")


VERDICT_NOTE = (f"Verdicts: {IDENTICAL}: every seed's test metrics are bitwise equal (against a README: the "
                f"cell as printed); {SEED_NOISE}: the 95% interval over seeds holds 0; {IMAGE_NOISE}: there is "
                f"none (fewer than 2 seeds) and the one over test images holds 0; {DIFFERS}: the interval that "
                f"decides excludes 0; {UNDETERMINED}: no interval (docs/comparing-runs.md).")


# Output.


def failed(comparison: Comparison, fail_on: str | None) -> bool:
    """Whether ``--fail-on`` (:data:`pathmamba.cli.FAIL_ON`) fails this comparison: a row that differs, or one short of
    identical (a cell on one side only counts too)."""
    verdicts = set(comparison.rows["verdict"])
    if fail_on == "differs":
        return DIFFERS in verdicts
    if fail_on == "not-identical":
        return verdicts != {IDENTICAL} or bool(comparison.one_sided)
    return False


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def _side_cell(mean: float, std: float | None, n: int | None) -> str:
    if n is None:
        return f"{mean:.3f}"
    return f"{mean:.3f}, n {n}" if n == 1 else f"{mean:.3f} ± {std:.3f}, n {n}"


def _interval_cell(low: float, high: float, how: str) -> str:
    return f"— ({how})" if math.isnan(low) else f"[{_signed(low)}, {_signed(high)}] {how}"


def markdown(comparison: Comparison) -> str:
    """The comparison as a Markdown table with its notes."""
    lines = [[row.dataset, row.method, METRIC_LABELS[row.metric], _side_cell(row.a_mean, row.a_std, row.a_n),
              _side_cell(row.b_mean, row.b_std, None if pd.isna(row.b_n) else int(row.b_n)),
              _signed(row.difference), _interval_cell(row.seeds_low, row.seeds_high, row.seeds_interval),
              _interval_cell(row.images_low, row.images_high, row.images_interval), row.verdict]
             for row in comparison.rows.itertuples(index=False)]
    header = ["Dataset", "Method", "Metric", "A", "B", "Δ = A − B", "95% interval of Δ: seeds",
              "95% interval of Δ: test images", "Verdict"]
    notes = "\n".join(f"- {note}" for note in comparison.notes)
    return f"## {comparison.title}\n\n{markdown_grid(header, lines)}\n{notes}\n"


def write_comparison(out: Path, comparison: Comparison) -> None:
    """Write ``comparison`` to ``out`` (``.md``: :func:`markdown`; ``.csv``: one row per line). An existing
    ``out`` is replaced only when it is empty or a comparison this command wrote (a Markdown file
    beginning with :data:`MARKDOWN_SIGNATURE`, a CSV file with :data:`CSV_COLUMNS` as its header)."""
    out = Path(out)
    texts = {".md": lambda: f"{MARKDOWN_SIGNATURE}\n{markdown(comparison)}",
             ".csv": lambda: comparison.rows.to_csv(index=False, float_format="%.17g")}
    if out.suffix not in texts:
        raise InputError(f"--out {out}: expected a .md or .csv file")
    if out.is_symlink() or out.exists():
        first_line = {".md": MARKDOWN_SIGNATURE, ".csv": ",".join(CSV_COLUMNS)}[out.suffix]
        if not _begins_with(out, first_line):
            raise FileSafetyError(f"{out} exists and is not a comparison written by this tool; not overwriting it: "
                                  "give another --out, or remove it yourself")
    atomic_write_text(out, texts[out.suffix]())


def _begins_with(path: Path, first_line: str) -> bool:
    """Whether ``path`` is a plain file that is empty or whose first line is ``first_line``."""
    if path.is_symlink() or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as file:
        return path.stat().st_size == 0 or file.readline().rstrip("\n") == first_line
