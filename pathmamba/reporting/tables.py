"""The paper's tables from a run's finished results (docs/design.md §4.5), in one experiment folder or several
(a grid split across machines: a run found in two folders must have the same results in both, and a cell
whose seeds ran on different hardware is marked).

A partial grid gives a partial table: a cell with no finished seed shows "—", and a method with fewer
finished seeds than configured is flagged in the table (``n/N``), never averaged silently. Values are
mean ± std over seeds (ddof=1; 0 for one seed).

Tables written by :func:`write_tables` into ``<out_dir>`` (their names: :mod:`pathmamba.core.layout`):

``table1_comparison.{csv,md,html,tex}``  every configured method, with the paper's value and the difference
``table2_ablation.{csv,md,html,tex}``    PathMamba's variants (paper Table 2), on every dataset
``per_class_iou.{csv,md,html}``          per-class IoU of every method
``sensitivity_with_background.{csv,md,html}``  the 5-class protocol (background kept), for sensitivity only
``statistics.{csv,md,html}``             the reference method (``report.reference_method``) against every
                                         other method, paired over test images
``comparison.{csv,md}``                  the compact mean ± std table, one row per dataset and method
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pathmamba.core.errors import InputError
from pathmamba.core.files import atomic_write_text
from pathmamba.core.layout import (
    COMPARISON_TABLE,
    PER_CLASS_TABLE,
    RUN_RECORD,
    SENSITIVITY_TABLE,
    STATISTICS_TABLE,
    TABLE1,
    TABLE2,
    TEST_METRICS,
    TRIVIAL,
    table_file,
)
from pathmamba.engine.config import report_settings
from pathmamba.engine.metrics import METRICS
from pathmamba.engine.registry import SUPERVISION_KINDS, ablation_methods, get_spec, method_names
from pathmamba.reporting.render import (
    INCONSISTENT_MARK,
    MISSING,
    MIXED_MARK,
    latex_results,
    markdown_grid,
    markdown_per_class,
    markdown_results,
    markdown_statistics,
    write_markdown,
)
from pathmamba.reporting.results import (
    Grid,
    diverged_runs,
    finished_runs,
    load_metrics,
    load_paper_results,
    load_per_class_iou,
    load_per_image,
    read_run_json,
    recorded_dataset_spec,
    run_runtimes,
)
from pathmamba.reporting.stats import compare_split_level, compare_to_reference

#: Half a unit of the paper's last digit: its values have three decimals.
PAPER_ROUNDING = 0.0005
INCONSISTENT_NOTE = (f"{INCONSISTENT_MARK} The paper's mDice and mIoU of this row cannot both come from one "
                     "evaluation: from one confusion matrix, per class IoU = Dice / (2 − Dice), a convex "
                     "function below the identity, so mDice / (2 − mDice) ≤ mIoU ≤ mDice for the means "
                     "over classes (checked allowing for the paper's rounding to three decimals).")
PROTOCOL_NOTES = {
    "ignore_background": ("Test split, primary protocol: one KxK confusion matrix over the whole split (K the "
                          "dataset's tissue classes, 4 in the published datasets), pixels of the background "
                          "(mask value K) ignored; m-metrics are means over the K tissue classes."),
    "with_background": ("Test split, SENSITIVITY protocol (TPRO, PBIP): a (K+1)x(K+1) confusion matrix with the "
                        "background kept as a class of its own; m-metrics are means over the K tissue "
                        "classes. Not comparable with the paper's numbers, which use the primary protocol."),
}
TRIVIAL_NOTE = (f"{TRIVIAL} is a reference, not a method: per test image, the most frequent training class "
                "among the image's TRUE classes (it is given the test image's class set).")
BASELINES_NOTE = ("Baselines: each one's implementation, its differences from the original code with their "
                  "expected effect, and the training budget are in the repository's docs/baselines.md. The "
                  "CAM family's masks hold only classes the method's own image-level prediction keeps.")


#: How a footnote names each aspect of :data:`pathmamba.reporting.results.RUNTIME_ASPECTS` that differs among a
#: cell's seeds, and the words before its label.
MIXED_ASPECTS = {"hardware": ("on different hardware (GPU model, CPU or its pins)", ""),
                 "scan/precision": ("with different selective scans or precisions", "scan/precision ")}


def mixed_runtime_notes(runs: pd.DataFrame, methods: list[str]) -> tuple[set[tuple[str, str]], list[str]]:
    """The (dataset, method) cells of ``methods`` whose seeds ran on different hardware (GPU models, CPUs
    unpinned, CPU pins or none) or with different selective scans or precisions, and a footnote for each
    saying which seeds ran where: their spread then holds that difference too."""
    marked, notes = set(), []
    for (dataset, method), seeds in run_runtimes(runs).items():
        differing = [aspect for aspect in MIXED_ASPECTS if len({labels[aspect] for labels in seeds.values()}) > 1]
        if method not in methods or not differing:
            continue
        marked.add((dataset, method))
        by_label: dict[str, list[str]] = {}
        for seed, labels in sorted(seeds.items()):
            label = ", ".join(MIXED_ASPECTS[aspect][1] + labels[aspect] for aspect in differing)
            by_label.setdefault(label, []).append(str(seed))
        ran = "; ".join(f"seed {', '.join(numbers)}: {label}" for label, numbers in by_label.items())
        how = " and ".join(MIXED_ASPECTS[aspect][0] for aspect in differing)
        notes.append(f"{MIXED_MARK} {dataset}, {method}: its seeds ran {how} ({ran}); the spread includes that "
                     "difference.")
    return marked, notes


def summarise(frame: pd.DataFrame, values: tuple[str, ...] = METRICS,
              keys: tuple[str, ...] = ("dataset", "method")) -> pd.DataFrame:
    """Mean, standard deviation (ddof=1; 0 for one seed) and number of seeds per ``keys``, in the order
    rows first appear. Columns ``<value>_mean``, ``<value>_std`` and ``n_seeds``."""
    grouped = frame.groupby(list(keys), sort=False)[list(values)]
    summary = grouped.agg(["mean", "std"])
    summary.columns = [f"{value}_{stat}" for value, stat in summary.columns]
    for value in values:
        summary[f"{value}_std"] = summary[f"{value}_std"].fillna(0.0)
    summary["n_seeds"] = grouped.size()
    return summary.reset_index()


def dice_iou_inconsistent(mdice: float, miou: float, rounding: float = PAPER_ROUNDING) -> bool:
    """True when no confusion matrix gives both ``mdice`` and ``miou``, even allowing each to be off by
    ``rounding``: per class IoU = Dice / (2 - Dice), which is convex and at most Dice, so by Jensen's
    inequality mDice / (2 - mDice) <= mIoU <= mDice."""
    lowest_dice = max(mdice - rounding, 0.0)
    return miou + rounding < lowest_dice / (2 - lowest_dice) or miou - rounding > mdice + rounding


def supervision_of(method: str) -> str:
    """The Supervision column: from the registry's ``MethodSpec.supervision``."""
    if method == TRIVIAL:
        return "reference (test classes)"
    return SUPERVISION_KINDS[get_spec(method).supervision]


def results_table(metrics: pd.DataFrame, methods: list[str], datasets: list[str], n_expected: int,
                  paper: dict | None = None) -> pd.DataFrame:
    """The long-form results table: one row per (dataset, method, metric), in the order given.

    metrics: rows of :func:`load_metrics`. paper: ``{dataset: {method: {metric: value}}}``. Columns:
    dataset, method, supervision, metric, mean, std, n_seeds, n_expected (1 for trivial), status
    ("complete", "incomplete" or "missing"), paper, difference (mean - paper), paper_inconsistent (the
    paper's mDice and mIoU of the row contradict each other: :func:`dice_iou_inconsistent`), best (the
    highest mean among weakly supervised methods for that dataset and metric).
    """
    paper = paper or {}
    summary = summarise(metrics).set_index(["dataset", "method"]) if len(metrics) else None
    rows = []
    for dataset in datasets:
        for method in methods:
            expected = 1 if method == TRIVIAL else n_expected
            found = summary is not None and (dataset, method) in summary.index
            n_seeds = int(summary.loc[(dataset, method), "n_seeds"]) if found else 0
            status = "missing" if n_seeds == 0 else ("incomplete" if n_seeds < expected else "complete")
            for metric in METRICS:
                mean = float(summary.loc[(dataset, method), f"{metric}_mean"]) if found else math.nan
                std = float(summary.loc[(dataset, method), f"{metric}_std"]) if found else math.nan
                reported = paper.get(dataset, {}).get(method, {})
                inconsistent = (metric in ("mDice", "mIoU") and "mDice" in reported
                                and dice_iou_inconsistent(reported["mDice"], reported["mIoU"]))
                rows.append({"dataset": dataset, "method": method, "supervision": supervision_of(method),
                             "metric": metric, "mean": mean, "std": std, "n_seeds": n_seeds,
                             "n_expected": expected, "status": status,
                             "paper": float(reported.get(metric, math.nan)),
                             "difference": mean - float(reported.get(metric, math.nan)),
                             "paper_inconsistent": inconsistent})
    table = pd.DataFrame(rows, columns=["dataset", "method", "supervision", "metric", "mean", "std", "n_seeds",
                                        "n_expected", "status", "paper", "difference", "paper_inconsistent"])
    weak = table["supervision"] == SUPERVISION_KINDS["image"]
    best = table[weak].groupby(["dataset", "metric"])["mean"].transform("max")
    table["best"] = False
    table.loc[weak, "best"] = table.loc[weak, "mean"].eq(best) & table.loc[weak, "mean"].notna()
    return table


def _footnotes(methods: list[str], protocol: str, paper_source: str | None, has_paper: bool) -> list[str]:
    notes = [PROTOCOL_NOTES[protocol],
             ("Mean ± std over seeds (ddof=1; the mean alone for one seed); Seeds: finished/configured where fewer "
             f"finished than configured; {MISSING}: no finished run. Bold: best weakly supervised mean per column.")]
    if has_paper:
        notes.append(f"paper: the value reported in {paper_source}; Δ = reproduced mean − paper value.")
    specs = {method: get_spec(method) for method in methods if method != TRIVIAL}
    references = [f"{method} ({spec.reference})" for method, spec in specs.items() if spec.reference]
    if references:
        notes.append(f"Reference rows beyond the paper, whose Table 1 does not report them: {'; '.join(references)}.")
    notes += [spec.note for spec in specs.values() if spec.note]
    if TRIVIAL in methods:
        notes.append(TRIVIAL_NOTE)
    if any(spec.baseline for spec in specs.values()):
        notes.append(BASELINES_NOTE)
    return notes


def per_class_table(runs: pd.DataFrame, methods: list[str], protocol: str = "ignore_background") -> pd.DataFrame:
    """Per-class IoU, mean ± std over seeds: dataset, method, class, IoU_mean, IoU_std, n_seeds."""
    paths = [Path(path) / TEST_METRICS for path in runs["path"]]
    per_class = load_per_class_iou(paths, protocol)
    per_class = per_class[per_class["method"].isin(methods)]
    return summarise(per_class, values=("IoU",), keys=("dataset", "method", "class"))


def statistics_table(runs: pd.DataFrame, datasets: list[str], methods: list[str], n_resamples: int,
                     seed: int, reference: str) -> pd.DataFrame:
    """Per dataset, ``reference`` against each other method: :func:`pathmamba.reporting.stats.compare_split_level`
    (Table 1's split-level mIoU) and :func:`pathmamba.reporting.stats.compare_to_reference` (per-image mIoU, seeds
    pooled), side by side; Holm corrections across the comparisons of each dataset. Empty when
    ``reference`` has no run."""
    frames = []
    for dataset in datasets:
        selected = runs[(runs["dataset"] == dataset) & (runs["method"].isin(methods))]
        per_image = load_per_image(selected)
        others = [method for method in methods if method != reference]
        split = compare_split_level(per_image, reference, others, n_resamples, seed)
        per_image_view = compare_to_reference(per_image, reference, others, "mIoU", n_resamples, seed)
        frame = split.merge(per_image_view.drop(columns="metric").rename(columns=PER_IMAGE_COLUMNS),
                            on=["reference", "other"], how="outer", sort=False)
        seeds = selected.groupby("method")["seed"].apply(
            lambda s: ",".join(str(int(v)) for v in sorted(s.dropna())) or "none")
        frame.insert(0, "dataset", dataset)
        frame["reference_seeds"] = seeds.get(reference, "")
        frame["other_seeds"] = [seeds.get(other, "") for other in frame["other"]]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


#: Columns of the per-image view in the statistics table, renamed beside the split-level ones.
PER_IMAGE_COLUMNS = {"n_images": "per_image_n", "mean_diff": "per_image_diff", "ci_low": "per_image_ci_low", "ci_high": "per_image_ci_high",
                     "holm_p": "wilcoxon_holm_p"}


def write_comparison(paths: list[Path], out_csv: Path, out_md: Path) -> pd.DataFrame:
    """Aggregate ``paths`` (test_metrics.json files) into the compact ``out_csv`` and ``out_md``."""
    summary = summarise(load_metrics(paths))
    atomic_write_text(out_csv, summary.to_csv(index=False, float_format="%.6f"))
    note = ("Test split, primary protocol (pixels of the background, mask value K after the K tissue classes, ignored); "
            "mean ± std over seeds. `trivial` predicts, per test image, the most frequent training "
            "class among the image's true classes.\n\n")
    lines = [[row.dataset, row.method,
              *[f"{getattr(row, f'{m}_mean'):.3f} ± {getattr(row, f'{m}_std'):.3f}" for m in METRICS],
              str(row.n_seeds)] for row in summary.itertuples(index=False)]
    atomic_write_text(out_md, note + markdown_grid(["Dataset", "Method", *METRICS, "Seeds"], lines))
    return summary


def ablation_weights_notes(runs: pd.DataFrame, methods: list[str]) -> list[str]:
    """Table 2's note on what each variant starts from, read from its runs' ``run.json`` (hparams
    ``pretrained``)."""
    starts: dict[str, set[str]] = {}
    for run in runs[runs["method"].isin(methods)].itertuples(index=False):
        path = Path(run.path) / RUN_RECORD
        if not path.exists():  # evaluated without a training record (hand-made experiment folders)
            continue
        weights = read_run_json(path).get("hparams", {}).get("pretrained", "none")
        starts.setdefault(run.method, set()).add("random" if weights == "none" else Path(weights).name)
    pretrained = [f"{method} ({', '.join(sorted(starts[method] - {'random'}))})" for method in methods
                  if starts.get(method, {"random"}) != {"random"}]
    return [("Initial weights: the CMB branch always trains from random weights (none are published); "
             + (f"the MIML branch's ResNet starts from ImageNet weights in {', '.join(pretrained)}, so the "
                "a → b and c → d steps add MIML and ImageNet features together; config/ablation_scratch.yaml "
                "trains every variant from random weights to separate the two."
                if pretrained else "every variant of this run started from random weights."))]


def _write_results(table: pd.DataFrame, stem: Path, title: str, notes: list[str], latex: bool,
                   labels: dict | None = None, runs: pd.DataFrame | None = None) -> None:
    """The table as CSV, Markdown (+ HTML) and optionally LaTeX; ``runs`` (from :func:`finished_runs`)
    marks the cells whose seeds mixed scans or precisions."""
    marked: set[tuple[str, str]] = set()
    if runs is not None:
        marked, mixed = mixed_runtime_notes(runs, list(dict.fromkeys(table["method"])))
        notes = [*notes, *mixed]
    if table["paper_inconsistent"].any():
        notes = [*notes, INCONSISTENT_NOTE]
    atomic_write_text(stem.with_suffix(".csv"), table.to_csv(index=False, float_format="%.6f"))
    write_markdown(stem.with_suffix(".md"), markdown_results(table, title, notes, labels, marked), title)
    if latex:
        inconsistent = [note for note in notes if note.startswith(INCONSISTENT_MARK)]
        atomic_write_text(stem.with_suffix(".tex"), latex_results(table, title, inconsistent))


def diverged_note(experiment_dirs: Path | Sequence[Path], grid: Grid) -> list[str]:
    """A footnote naming the runs left out because their training diverged (none: no footnote)."""
    left_out = diverged_runs(experiment_dirs, grid)
    if not left_out:
        return []
    runs = "; ".join(f"{dataset} {method} seed {seed}" for dataset, method, seed in left_out)
    return [f"Not counted, their training diverged (a nan or infinite loss in history.csv): {runs}."]


def write_tables(experiment_dirs: Path | Sequence[Path], grid: Grid, paper_path: Path, out_dir: Path,
                 n_resamples: int = 10000, bootstrap_seed: int = 0,
                 reference_method: str | None = None) -> dict[str, pd.DataFrame]:
    """Write every table of the module docstring from what finished under the experiment folder ``experiment_dirs``, or
    several (:func:`pathmamba.reporting.results.finished_runs`: a run in two of them must have one result); returns
    them. ``reference_method``: the registered method the paired statistics compare with every other (a
    grid without it gets a statistics table that says so); None: the config schema's default
    ``report.reference_method``."""
    reference_method = reference_method or report_settings(None)["reference_method"]
    if reference_method not in method_names():
        raise InputError(f"reference method {reference_method!r}: not a registered method; registered methods: "
                         f"{', '.join(method_names())}")
    out_dir = Path(out_dir)
    paper = load_paper_results(paper_path)
    runs = finished_runs(experiment_dirs, grid)
    paths = [Path(path) / TEST_METRICS for path in runs["path"]]
    n_expected = len(grid.seeds)
    rows = [*grid.methods, TRIVIAL]
    source = paper.get("source", str(paper_path))
    # Everything is read before anything is written: a damaged run file stops the command with the
    # previous tables intact.
    primary = load_metrics(paths)
    tables = {"per_class": per_class_table(runs, rows),
              "statistics": statistics_table(runs, grid.datasets, rows, n_resamples, bootstrap_seed,
                                             reference_method)}
    with_background = load_metrics(paths, "with_background")

    tables["table1"] = results_table(primary, rows, grid.datasets, n_expected, paper["table1"])
    has_paper = tables["table1"]["paper"].notna().any()
    _write_results(tables["table1"], out_dir / TABLE1, "Table 1: comparison on the test split",
                   _footnotes(rows, "ignore_background", source, has_paper) + diverged_note(experiment_dirs, grid),
                   latex=True, runs=runs)

    ablation = [method for method in ablation_methods() if method in grid.methods]
    tables["table2"] = results_table(primary, ablation, grid.datasets, n_expected, paper["table2"])
    notes = _footnotes(ablation, "ignore_background", source, tables["table2"]["paper"].notna().any())
    notes.append("Rows in the order of the paper's Table 2 (B = baseline), which reports the ablation on "
                 "LUAD-HistoSeg only.")
    notes += [get_spec(method).ablation.note for method in ablation if get_spec(method).ablation.note]
    notes += ablation_weights_notes(runs, ablation)
    labels = {method: entry["label"] for reported in paper["table2"].values() for method, entry in reported.items()}
    _write_results(tables["table2"], out_dir / TABLE2, "Table 2: ablation of PathMamba's components",
                   notes, latex=True, labels=labels, runs=runs)

    atomic_write_text(out_dir / table_file(PER_CLASS_TABLE, "csv"), tables["per_class"].to_csv(index=False, float_format="%.6f"))
    class_names = {dataset: list(recorded_dataset_spec(experiment_dirs, dataset).classes) for dataset in grid.datasets}
    write_markdown(out_dir / table_file(PER_CLASS_TABLE, "md"),
                   markdown_per_class(tables["per_class"], class_names, rows, PROTOCOL_NOTES["ignore_background"]),
                   "Per-class IoU")

    tables["sensitivity"] = results_table(with_background, rows, grid.datasets, n_expected)
    _write_results(tables["sensitivity"], out_dir / SENSITIVITY_TABLE,
                   "Sensitivity: 5-class protocol (background kept)",
                   _footnotes(rows, "with_background", None, False), latex=False)

    atomic_write_text(out_dir / table_file(STATISTICS_TABLE, "csv"), tables["statistics"].to_csv(index=False, float_format="%.6g"))
    write_markdown(out_dir / table_file(STATISTICS_TABLE, "md"),
                   markdown_statistics(tables["statistics"], reference_method, n_resamples, bootstrap_seed),
                   "Paired statistics")

    tables["comparison"] = write_comparison(paths, out_dir / table_file(COMPARISON_TABLE, "csv"),
                                            out_dir / table_file(COMPARISON_TABLE, "md"))
    return tables
