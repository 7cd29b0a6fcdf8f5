"""Rendering of the tables (:mod:`pathmamba.reporting.tables`) as Markdown, LaTeX and HTML.

Markdown is the primary form (the README splices it); the HTML page of each Markdown table is what the
Snakemake report shows; LaTeX needs no package beyond LaTeX itself.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from pathmamba.core.files import atomic_write_text
from pathmamba.engine.metrics import METRICS

METRIC_LABELS = {"mDice": "mDice", "mIoU": "mIoU", "mPrecision": "mP", "mRecall": "mR"}
MISSING = "—"
#: Marks a row whose seeds ran on different hardware or with different selective scans or precisions (a
#: footnote says which seeds ran where).
MIXED_MARK = "†"
#: Marks a paper value that no evaluation can give together with its row's other value (see
#: :func:`dice_iou_inconsistent`).
INCONSISTENT_MARK = "‡"


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


def markdown_grid(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out) + "\n"


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
        parts.append(markdown_grid(["Method", "Supervision", "Seeds", *METRIC_LABELS.values()], lines))
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


def markdown_per_class(table: pd.DataFrame, classes_of: dict[str, list[str]], methods: list[str],
                       protocol_note: str) -> str:
    """One markdown table per dataset of ``classes_of`` (``{dataset: its classes}``): rows methods, columns
    the dataset's classes (IoU mean ± std); the protocol's note below."""
    parts = ["## Per-class IoU\n"]
    indexed = table.set_index(["dataset", "method", "class"])
    for dataset, classes in classes_of.items():
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
        parts.append(f"\n### {dataset}\n\n" + markdown_grid(["Method", *classes], lines))
    parts.append(f"\n- {protocol_note} IoU per class, mean ± std over finished seeds.\n")
    return "".join(parts)


def _interval(diff: float, low: float, high: float) -> str:
    return f"{_signed(diff)} [{_signed(low)}, {_signed(high)}]"


def markdown_statistics(table: pd.DataFrame, reference: str, n_resamples: int, seed: int) -> str:
    """The statistics table in markdown: the split-level view (Table 1's metric) first, then the
    per-image view, each with what it tests."""
    text = "## Paired statistics: " + reference + " against each other method\n\n"
    if table.empty:
        return text + f"No finished run of {reference} to compare.\n"
    rows = list(table.itertuples(index=False))
    text += "### Table 1's metric: split-level mIoU\n\n"
    text += markdown_grid(
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
    text += markdown_grid(
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


def write_markdown(path: Path, markdown: str, title: str) -> None:
    """``markdown`` to ``path`` (.md) and its HTML page beside it (.html)."""
    atomic_write_text(path, markdown)
    atomic_write_text(path.with_suffix(".html"), markdown_to_html(markdown, title))
