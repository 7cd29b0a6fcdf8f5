"""Aggregation of per-run test metrics into the paper's tables (docs/design.md §4.5).

Everything here reads what finished under ``<run_dir>/runs/<dataset>/<method>/seed<N>/`` and never
needs a GPU. A partial grid gives a partial table: a cell with no finished seed shows "—", and a
method with fewer finished seeds than configured is flagged in the table (``n/N``), never averaged
silently. Values are mean ± std over seeds (ddof=1; 0 for one seed).

Tables written by :func:`write_tables` into ``<out_dir>``:

``table1_comparison.{csv,md,html,tex}``  every configured method, with the paper's value and the difference
``table2_ablation.{csv,md,html,tex}``    PathMamba's variants (paper Table 2), on every dataset
``per_class_iou.{csv,md,html}``          per-class IoU of every method
``sensitivity_with_background.{csv,md,html}``  the 5-class protocol (background kept), for sensitivity only
``statistics.{csv,md,html}``             PathMamba against every other method, paired over test images
``comparison.{csv,md}``             the compact mean ± std table (kept for scripts that read it)
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pathmamba.data.specs import get_dataset_spec
from pathmamba.metrics import METRICS, confusion_columns
from pathmamba.registry import get_spec
from pathmamba.runtime import atomic_write_text
from pathmamba.stats import compare_split_level, compare_to_reference

METRIC_LABELS = {"mDice": "mDice", "mIoU": "mIoU", "mPrecision": "mP", "mRecall": "mR"}
# A method trained on its own first stage's pseudo masks (wsss-tissue) has seen image labels only.
SUPERVISION_LABELS = {"image": "weak (image labels)", "pseudo": "weak (image labels)", "pixel": "full (pixel masks)"}
TRIVIAL = "trivial"
REFERENCE_METHOD = "pathmamba"
# Paper Table 2's rows in order, then the control beyond the paper.
ABLATION = ("pathmamba-b", "pathmamba-b-miml", "pathmamba-b-cmb", "pathmamba-b-miml-cmb", "pathmamba",
            "pathmamba-noscan")
MISSING = "—"
#: Marks a row whose seeds ran with different selective scans or precisions (a footnote says which).
MIXED_MARK = "†"
#: Marks a paper value that no evaluation can give together with its row's other value (see
#: :func:`dice_iou_inconsistent`).
INCONSISTENT_MARK = "‡"
#: Half a unit of the paper's last digit: its values have three decimals.
PAPER_ROUNDING = 0.0005
INCONSISTENT_NOTE = (f"{INCONSISTENT_MARK} The paper's mDice and mIoU of this row cannot both come from one "
                     "evaluation: from one confusion matrix, per class IoU = Dice / (2 − Dice), a convex "
                     "function below the identity, so mDice / (2 − mDice) ≤ mIoU ≤ mDice for the means "
                     "over classes (checked allowing for the paper's rounding to three decimals).")
PROTOCOL_NOTES = {
    "ignore_background": ("Test split, primary protocol: one 4x4 confusion matrix over the whole split, "
                          "pixels of white background (mask value 4) ignored; m-metrics are means over "
                          "the four tissue classes."),
    "with_background": ("Test split, SENSITIVITY protocol (TPRO, PBIP): a 5x5 confusion matrix with white "
                        "background kept as a fifth class; m-metrics are means over the four tissue "
                        "classes. Not comparable with the paper's numbers, which use the primary protocol."),
}
METHOD_NOTES = {
    "unet": ("unet is fully supervised: pixel masks exist only for val/test, so it trains on the val "
             "masks (a fixed 80/20 split of val for model selection)."),
    "c-cam": "c-cam's anatomy prior is the tissue / white-background mask (an approximation).",
    "trivial": ("trivial is a reference, not a method: per test image, the most frequent training class "
                "among the image's TRUE classes (it is given the test image's class set)."),
}


@dataclass(frozen=True)
class Grid:
    """The configured experiment: what a complete run holds."""

    datasets: list[str]
    methods: list[str]
    seeds: list[int]


def run_path(run_dir: Path, dataset: str, method: str, seed: int | None) -> Path:
    """Folder of one run; the trivial reference has no seed."""
    base = Path(run_dir) / "runs" / dataset / method
    return base if seed is None else base / f"seed{seed}"


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
        record = json.loads(Path(path).read_text())
        scores = record["protocols"][protocol]
        rows.append({"dataset": record["dataset"], "method": record["method"], "seed": record["seed"],
                     **{metric: scores[metric] for metric in METRICS}})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", *METRICS])


def load_per_class_iou(paths: list[Path], protocol: str = "ignore_background") -> pd.DataFrame:
    """One row per run and tissue class: dataset, method, seed, class (the dataset's name), IoU."""
    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        for name, value in zip(record["classes"], record["protocols"][protocol]["per_class"]["IoU"]):
            rows.append({"dataset": record["dataset"], "method": record["method"], "seed": record["seed"],
                         "class": name, "IoU": value})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", "class", "IoU"])


def load_per_image(runs: pd.DataFrame) -> pd.DataFrame:
    """All ``per_image.csv`` rows of ``runs`` (from :func:`finished_runs`) with dataset, method, seed."""
    frames = []
    for run in runs.itertuples(index=False):
        path = Path(run.path) / "per_image.csv"
        frame = pd.read_csv(path)
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
            environment = json.loads(path.read_text()).get("environment", {}) if path.exists() else {}
            parts.append("/".join(environment.get(key) or "unrecorded" for key in ("scan", "precision")))
        label = "scan/precision " + (parts[0] if parts[0] == parts[1] else f"{parts[0]} (train), {parts[1]} (test)")
        runtimes.setdefault((run.dataset, run.method), {})[int(run.seed)] = label
    return runtimes


def mixed_runtime_notes(runs: pd.DataFrame, methods: list[str]) -> tuple[set[tuple[str, str]], list[str]]:
    """The (dataset, method) cells of ``methods`` whose seeds ran with different selective scans or
    precisions, and a footnote for each: their spread then holds an implementation difference too."""
    marked, notes = set(), []
    for (dataset, method), seeds in run_runtimes(runs).items():
        if method not in methods or len(set(seeds.values())) < 2:
            continue
        marked.add((dataset, method))
        by_label: dict[str, list[str]] = {}
        for seed, label in sorted(seeds.items()):
            by_label.setdefault(label, []).append(str(seed))
        ran = "; ".join(f"seed {', '.join(numbers)}: {label}" for label, numbers in by_label.items())
        notes.append(f"{MIXED_MARK} {dataset}, {method}: its seeds ran with different selective scans or precisions "
                     f"({ran}); the spread includes that difference.")
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
    supervision = get_spec(method).supervision
    return SUPERVISION_LABELS.get(supervision, supervision)


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
    weak = table["supervision"] == SUPERVISION_LABELS["image"]
    best = table[weak].groupby(["dataset", "metric"])["mean"].transform("max")
    table["best"] = False
    table.loc[weak, "best"] = table.loc[weak, "mean"].eq(best) & table.loc[weak, "mean"].notna()
    return table


def _seeds_cell(n_seeds: int, n_expected: int) -> str:
    if n_seeds == 0:
        return MISSING
    return str(n_seeds) if n_seeds >= n_expected else f"{n_seeds}/{n_expected} (incomplete)"


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def _markdown_cell(row) -> str:
    if row.status == "missing":
        return MISSING
    mean = f"**{row.mean:.3f}**" if row.best else f"{row.mean:.3f}"
    cell = mean if row.n_seeds == 1 else f"{mean} ± {row.std:.3f}"  # one seed has no spread to show
    if not math.isnan(row.paper):
        mark = INCONSISTENT_MARK if row.paper_inconsistent else ""
        cell += f" (paper {row.paper:.3f}{mark}, Δ {_signed(row.difference)})"
    return cell


def _markdown_grid(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out) + "\n"


def _footnotes(methods: list[str], protocol: str, paper_source: str | None, has_paper: bool) -> list[str]:
    notes = [PROTOCOL_NOTES[protocol],
             ("Mean ± std over seeds (ddof=1; the mean alone for one seed); Seeds: finished/configured where fewer "
             f"finished than configured; {MISSING}: no finished run. Bold: best weakly supervised mean per column.")]
    if has_paper:
        notes.append(f"paper: the value reported in {paper_source}; Δ = reproduced mean − paper value.")
    notes += [METHOD_NOTES[method] for method in methods if method in METHOD_NOTES]
    return notes


def markdown_results(table: pd.DataFrame, title: str, notes: list[str], labels: dict | None = None,
                     marked: set[tuple[str, str]] | frozenset = frozenset()) -> str:
    """``table`` (from :func:`results_table`) as one markdown table per dataset, then the notes.

    labels: ``{method: row name}`` shown before the method's registry name (e.g. the paper's "a: B").
    marked: (dataset, method) rows whose name gets :data:`MIXED_MARK` (see :func:`mixed_runtime_notes`)."""
    labels = labels or {}
    parts = [f"## {title}\n"]
    if table.empty:
        parts.append("\nNone of this table's methods is configured.\n")
    for dataset, rows in table.groupby("dataset", sort=False):
        parts.append(f"\n### {dataset}\n\n")
        lines = []
        for method, cells in rows.groupby("method", sort=False):
            first = cells.iloc[0]
            name = f"{labels[method]} ({method})" if method in labels else method
            if (dataset, method) in marked:
                name += f" {MIXED_MARK}"
            lines.append([name, first.supervision, _seeds_cell(first.n_seeds, first.n_expected),
                          *[_markdown_cell(cell) for cell in cells.itertuples(index=False)]])
        parts.append(_markdown_grid(["Method", "Supervision", "Seeds", *METRIC_LABELS.values()], lines))
    parts.append("\n" + "\n".join(f"- {note}" for note in notes) + "\n")
    return "".join(parts)


def _latex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text)


#: Characters of the notes that LaTeX without extra packages cannot typeset, as LaTeX.
LATEX_SYMBOLS = {INCONSISTENT_MARK: "$^\\ddagger$", "≤": "$\\le$", "−": "-"}


def _latex_text(text: str) -> str:
    text = _latex_escape(text)
    for symbol, latex in LATEX_SYMBOLS.items():
        text = text.replace(symbol, latex)
    return text


def _latex_cell(row) -> str:
    if row.status == "missing":
        return "--"
    mean = f"\\mathbf{{{row.mean:.3f}}}" if row.best else f"{row.mean:.3f}"
    cell = f"${mean}$" if row.n_seeds == 1 else f"${mean} \\pm {row.std:.3f}$"
    if not math.isnan(row.paper):
        mark = "$^\\ddagger$" if row.paper_inconsistent else ""
        cell += f" {{\\scriptsize ({row.paper:.3f}{mark}, ${row.difference:+.3f}$)}}"
    return cell


def latex_results(table: pd.DataFrame, caption: str, notes: list[str] = ()) -> str:
    """``table`` as one LaTeX tabular: Method, Supervision, then per dataset n and the four metrics.

    Needs no package beyond LaTeX itself; a reported value and the difference follow each cell in
    parentheses, in small type."""
    if table.empty:
        return f"% {caption}\n% no rows: none of this table's methods is configured\n"
    datasets = list(dict.fromkeys(table["dataset"]))
    methods = list(dict.fromkeys(table["method"]))
    width = 5
    lines = [f"% {caption}", "\\begin{tabular}{ll" + "|" + "|".join(["r" + "c" * 4] * len(datasets)) + "}",
             "\\hline",
             " & & " + " & ".join(f"\\multicolumn{{{width}}}{{c}}{{{_latex_escape(d)}}}" for d in datasets)
             + " \\\\",
             "Method & Supervision & " + " & ".join(["n", *METRIC_LABELS.values()] * len(datasets)) + " \\\\",
             "\\hline"]
    cells_of = {(row.dataset, row.method, row.metric): row for row in table.itertuples(index=False)}
    for method in methods:
        cells = [_latex_escape(method), _latex_escape(cells_of[(datasets[0], method, METRICS[0])].supervision)]
        for dataset in datasets:
            first = cells_of[(dataset, method, METRICS[0])]
            n_cell = str(first.n_seeds) if first.n_seeds >= first.n_expected else f"{first.n_seeds}/{first.n_expected}"
            cells.append(n_cell)
            cells += [_latex_cell(cells_of[(dataset, method, metric)]) for metric in METRICS]
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\hline", "\\end{tabular}"]
    lines += [f"\n{{\\footnotesize {_latex_text(note)}}}" for note in notes]
    return "\n".join(lines) + "\n"


def per_class_table(runs: pd.DataFrame, methods: list[str], protocol: str = "ignore_background") -> pd.DataFrame:
    """Per-class IoU, mean ± std over seeds: dataset, method, class, IoU_mean, IoU_std, n_seeds."""
    paths = [Path(path) / "test_metrics.json" for path in runs["path"]]
    per_class = load_per_class_iou(paths, protocol)
    per_class = per_class[per_class["method"].isin(methods)]
    return summarise(per_class, values=("IoU",), keys=("dataset", "method", "class"))


def markdown_per_class(table: pd.DataFrame, datasets: list[str], methods: list[str]) -> str:
    """One markdown table per dataset: rows methods, columns the dataset's classes (IoU mean ± std)."""
    parts = ["## Per-class IoU\n"]
    indexed = table.set_index(["dataset", "method", "class"])
    for dataset in datasets:
        classes = list(get_dataset_spec(dataset).classes)
        lines = []
        for method in methods:
            cells = [method]
            for name in classes:
                key = (dataset, method, name)
                if key not in indexed.index:
                    cells.append(MISSING)
                elif indexed.loc[key, "n_seeds"] == 1:
                    cells.append(f"{indexed.loc[key, 'IoU_mean']:.3f}")
                else:
                    cells.append(f"{indexed.loc[key, 'IoU_mean']:.3f} ± {indexed.loc[key, 'IoU_std']:.3f}")
            lines.append(cells)
        parts.append(f"\n### {dataset}\n\n" + _markdown_grid(["Method", *classes], lines))
    parts.append(f"\n- {PROTOCOL_NOTES['ignore_background']} IoU per class, mean ± std over finished seeds.\n")
    return "".join(parts)


def statistics_table(runs: pd.DataFrame, datasets: list[str], methods: list[str], n_resamples: int,
                     seed: int, reference: str = REFERENCE_METHOD) -> pd.DataFrame:
    """Per dataset, ``reference`` against each other method: :func:`pathmamba.stats.compare_split_level`
    (Table 1's split-level mIoU) and :func:`pathmamba.stats.compare_to_reference` (per-image mIoU, seeds
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


def _interval(diff: float, low: float, high: float) -> str:
    return f"{_signed(diff)} [{_signed(low)}, {_signed(high)}]"


def markdown_statistics(table: pd.DataFrame, n_resamples: int, seed: int, reference: str = REFERENCE_METHOD) -> str:
    """The statistics table in markdown: the split-level view (Table 1's metric) first, then the
    per-image view, each with what it tests."""
    text = "## Paired statistics: " + reference + " against each other method\n\n"
    if table.empty:
        return text + f"No finished run of {reference} to compare.\n"
    rows = list(table.itertuples(index=False))
    text += "### Table 1's metric: split-level mIoU\n\n"
    text += _markdown_grid(
        ["Dataset", "Comparison", "Images", "Δ mIoU (Table 1) [95% CI]", "Bootstrap p", "Holm p", "Seeds"],
        [[row.dataset, f"{row.reference} − {row.other}", str(row.n_images),
          _interval(row.split_diff, row.split_ci_low, row.split_ci_high), f"{row.split_p:.3g}",
          f"{row.split_holm_p:.3g}", f"{row.reference_seeds} vs {row.other_seeds}"] for row in rows])
    text += ("\n- Δ: the difference of Table 1's means (over seeds) of each method's mIoU from one confusion "
             "matrix over the split; pairs are the test images every seed of both methods scored.\n"
             f"- 95% CI: paired percentile bootstrap, {n_resamples} resamples (numpy seed {seed}) of the test "
             "images, the same draw for both methods and all seeds, each seed's split confusion matrix summed "
             "again from its per-image matrices. It covers the sampling of test images, not the spread over "
             "seeds (Table 1's ± shows that).\n"
             "- Bootstrap p: two-sided, twice the share of resampled differences on the far side of zero; "
             "Holm correction across the comparisons of each dataset.\n")
    text += "\n### Second view: per-image mIoU\n\n"
    text += _markdown_grid(
        ["Dataset", "Comparison", "Images", "Δ mean per-image mIoU [95% CI]", "Wilcoxon p", "Holm p",
         "Cohen dz", "Rank-biserial"],
        [[row.dataset, f"{row.reference} − {row.other}", str(row.per_image_n),
          _interval(row.per_image_diff, row.per_image_ci_low, row.per_image_ci_high), f"{row.wilcoxon_p:.3g}",
          f"{row.wilcoxon_holm_p:.3g}", f"{row.cohen_dz:.2f}", f"{row.rank_biserial:.2f}"] for row in rows])
    text += ("\n- Per test image, each method's per-image mIoU is averaged over its finished seeds (seeds "
             "pooled, never best-of); pairs are test images scored by both methods (images without a "
             "scored pixel dropped). Every image weighs the same, whatever its number of scored pixels, so "
             "Δ here is not Table 1's difference.\n"
             f"- 95% CI: percentile bootstrap over images, {n_resamples} resamples, numpy seed {seed}; "
             "Wilcoxon signed-rank test (two-sided, zero differences dropped); Holm correction across the "
             "comparisons of each dataset.\n"
             "- Cohen dz = mean / std of the paired differences; rank-biserial = matched-pairs rank-biserial "
             "correlation (−1..1).\n")
    return text


def markdown_to_html(markdown: str, title: str) -> str:
    """A standalone HTML page of the markdown this module writes (## / ### headings, pipe tables,
    ``- `` bullets, ``**bold**``), for the Snakemake report, which shows HTML but not markdown."""
    body, rows = [], []

    def inline(text: str) -> str:
        text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)

    def flush_table() -> None:
        if rows:
            header, *cells = rows
            body.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in header) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in cells)
                        + "</table>")
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
            continue
        flush_table()
        if line.startswith("### "):
            body.append(f"<h3>{inline(line[4:])}</h3>")
        elif line.startswith("## "):
            body.append(f"<h2>{inline(line[3:])}</h2>")
        elif line.startswith("- "):
            body.append(f"<p class='note'>{inline(line[2:])}</p>")
        elif line.strip():
            body.append(f"<p>{inline(line)}</p>")
    flush_table()
    style = ("body{font-family:sans-serif;font-size:13px} table{border-collapse:collapse;margin:8px 0}"
             "td,th{border:1px solid #bbb;padding:3px 8px;text-align:left} th{background:#eee}"
             ".note{color:#444;margin:2px 0}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{inline(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _write_markdown(path: Path, markdown: str, title: str) -> None:
    """``markdown`` to ``path`` (.md) and its HTML page beside it (.html)."""
    atomic_write_text(path, markdown)
    atomic_write_text(path.with_suffix(".html"), markdown_to_html(markdown, title))


def write_comparison(paths: list[Path], out_csv: Path, out_md: Path) -> pd.DataFrame:
    """Aggregate ``paths`` (test_metrics.json files) into the compact ``out_csv`` and ``out_md``."""
    summary = summarise(load_metrics(paths))
    atomic_write_text(out_csv, summary.to_csv(index=False, float_format="%.6f"))
    note = ("Test split, primary protocol (pixels of white background, mask value 4, ignored); "
            "mean ± std over seeds. `trivial` predicts, per test image, the most frequent training "
            "class among the image's true classes.\n\n")
    lines = [[row.dataset, row.method,
              *[f"{getattr(row, f'{m}_mean'):.3f} ± {getattr(row, f'{m}_std'):.3f}" for m in METRICS],
              str(row.n_seeds)] for row in summary.itertuples(index=False)]
    atomic_write_text(out_md, note + _markdown_grid(["Dataset", "Method", *METRICS, "Seeds"], lines))
    return summary


def ablation_weights_notes(runs: pd.DataFrame, methods: list[str]) -> list[str]:
    """Table 2's notes on what each variant starts from, read from its runs' ``run.json`` (hparams
    ``pretrained``), and on the variant that computes its CMB network twice."""
    starts: dict[str, set[str]] = {}
    for run in runs[runs["method"].isin(methods)].itertuples(index=False):
        path = Path(run.path) / "run.json"
        if not path.exists():  # evaluated without a training record (hand-made run folders)
            continue
        weights = json.loads(path.read_text()).get("hparams", {}).get("pretrained", "none")
        starts.setdefault(run.method, set()).add("random" if weights == "none" else Path(weights).name)
    pretrained = [f"{method} ({', '.join(sorted(starts[method] - {'random'}))})" for method in methods
                  if starts.get(method, {"random"}) != {"random"}]
    notes = [("Initial weights: the CMB branch always trains from random weights (none are published); "
              + (f"the MIML branch's ResNet starts from ImageNet weights in {', '.join(pretrained)}, so the "
                 "a → b and c → d steps add MIML and ImageNet features together; config/ablation_scratch.yaml "
                 "trains every variant from random weights to separate the two."
                 if pretrained else "every variant of this run started from random weights."))]
    if "pathmamba-b-cmb" in methods:
        notes.append("c (pathmamba-b-cmb) has no MIML branch to give the CMB its saliency map: it runs its CMB "
                     "network twice per image, a first pass without modulation (no gradient) whose class maps "
                     "give the saliency, then the modulated pass that is trained and scored.")
    return notes


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
    _write_markdown(stem.with_suffix(".md"), markdown_results(table, title, notes, labels, marked), title)
    if latex:
        inconsistent = [note for note in notes if note.startswith(INCONSISTENT_MARK)]
        atomic_write_text(stem.with_suffix(".tex"), latex_results(table, title, inconsistent))


def write_tables(run_dir: Path, grid: Grid, paper_path: Path, out_dir: Path, n_resamples: int = 10000,
                 bootstrap_seed: int = 0) -> dict[str, pd.DataFrame]:
    """Write every table of the module docstring from what finished under ``run_dir``; returns them."""
    out_dir = Path(out_dir)
    paper = load_paper_results(paper_path)
    runs = finished_runs(run_dir, grid)
    paths = [Path(path) / "test_metrics.json" for path in runs["path"]]
    n_expected = len(grid.seeds)
    rows = [*grid.methods, TRIVIAL]
    source = paper.get("source", str(paper_path))
    primary = load_metrics(paths)
    tables = {}

    tables["table1"] = results_table(primary, rows, grid.datasets, n_expected, paper["table1"])
    has_paper = tables["table1"]["paper"].notna().any()
    _write_results(tables["table1"], out_dir / "table1_comparison", "Table 1: comparison on the test split",
                   _footnotes(rows, "ignore_background", source, has_paper), latex=True, runs=runs)

    ablation = [method for method in ABLATION if method in grid.methods]
    tables["table2"] = results_table(primary, ablation, grid.datasets, n_expected, paper["table2"])
    notes = _footnotes(ablation, "ignore_background", source, tables["table2"]["paper"].notna().any())
    notes.append("Rows in the paper's order a, b, c, d, f (B = baseline); pathmamba-noscan is a control beyond "
                 "the paper (selective scan replaced by a depthwise convolution). The paper reports the "
                 "ablation on LUAD-HistoSeg only.")
    notes += ablation_weights_notes(runs, ablation)
    labels = {method: entry["label"] for method, entry in paper["table2"].get("luad-histoseg", {}).items()}
    _write_results(tables["table2"], out_dir / "table2_ablation", "Table 2: ablation of PathMamba's components",
                   notes, latex=True, labels=labels, runs=runs)

    tables["per_class"] = per_class_table(runs, rows)
    atomic_write_text(out_dir / "per_class_iou.csv", tables["per_class"].to_csv(index=False, float_format="%.6f"))
    _write_markdown(out_dir / "per_class_iou.md", markdown_per_class(tables["per_class"], grid.datasets, rows),
                    "Per-class IoU")

    tables["sensitivity"] = results_table(load_metrics(paths, "with_background"), rows, grid.datasets, n_expected)
    _write_results(tables["sensitivity"], out_dir / "sensitivity_with_background",
                   "Sensitivity: 5-class protocol (background kept)",
                   _footnotes(rows, "with_background", None, False), latex=False)

    tables["statistics"] = statistics_table(runs, grid.datasets, rows, n_resamples, bootstrap_seed)
    atomic_write_text(out_dir / "statistics.csv", tables["statistics"].to_csv(index=False, float_format="%.6g"))
    _write_markdown(out_dir / "statistics.md", markdown_statistics(tables["statistics"], n_resamples, bootstrap_seed),
                    "Paired statistics")

    tables["comparison"] = write_comparison(paths, out_dir / "comparison.csv", out_dir / "comparison.md")
    return tables


def splice_readme(readme: Path, table_md: Path, start: str = "<!-- results:start -->",
                  end: str = "<!-- results:end -->", check: bool = False) -> list[str]:
    """Replace the text between the ``start`` and ``end`` markers of ``readme`` with ``table_md``'s text
    (its first heading dropped: the README has its own). With ``check``, change nothing; return the
    unified diff from the README to what it would become (empty when they agree)."""
    text = Path(readme).read_text()
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{readme}: expected one {start!r} followed by one {end!r}")
    body = Path(table_md).read_text()
    body = re.sub(r"\A## [^\n]*\n", "", body).lstrip("\n")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    spliced = f"{head}{start}\n{body}{end}{tail}"
    if check:
        return list(difflib.unified_diff(text.splitlines(), spliced.splitlines(), str(readme),
                                         f"{readme} with {table_md}", lineterm=""))
    atomic_write_text(readme, spliced)
    return []
