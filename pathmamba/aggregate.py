"""Aggregation of per-run test metrics into the comparison table (mean +- std over seeds)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pathmamba.metrics import METRICS
from pathmamba.runtime import atomic_write_text


def load_metrics(paths: list[Path], protocol: str = "ignore_background") -> pd.DataFrame:
    """One row per ``test_metrics.json``: dataset, method, seed and the four m-metrics of ``protocol``."""
    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        scores = record["protocols"][protocol]
        rows.append({"dataset": record["dataset"], "method": record["method"], "seed": record["seed"],
                     **{metric: scores[metric] for metric in METRICS}})
    return pd.DataFrame(rows, columns=["dataset", "method", "seed", *METRICS])


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation (ddof=1; 0 for one seed) and number of seeds per dataset and method,
    in the order rows first appear."""
    grouped = frame.groupby(["dataset", "method"], sort=False)[list(METRICS)]
    summary = grouped.agg(["mean", "std", "count"])
    summary.columns = [f"{metric}_{stat}" for metric, stat in summary.columns]
    for metric in METRICS:
        summary[f"{metric}_std"] = summary[f"{metric}_std"].fillna(0.0)
    summary["n_seeds"] = grouped.size()
    summary = summary.drop(columns=[f"{metric}_count" for metric in METRICS])
    return summary.reset_index()


def markdown_table(summary: pd.DataFrame) -> str:
    """One line per (dataset, method): each metric as ``mean ± std``."""
    header = ["Dataset", "Method", *METRICS, "Seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.itertuples(index=False):
        cells = [row.dataset, row.method]
        cells += [f"{getattr(row, f'{m}_mean'):.3f} ± {getattr(row, f'{m}_std'):.3f}" for m in METRICS]
        cells.append(str(row.n_seeds))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(paths: list[Path], out_csv: Path, out_md: Path) -> pd.DataFrame:
    """Aggregate ``paths`` (test_metrics.json files) into ``out_csv`` and ``out_md``."""
    summary = summarise(load_metrics(paths))
    atomic_write_text(out_csv, summary.to_csv(index=False, float_format="%.6f"))
    note = ("Test split, primary protocol (pixels of white background, mask value 4, ignored); "
            "mean ± std over seeds. `trivial` predicts, per test image, the most frequent training "
            "class among the image's true classes.\n\n")
    atomic_write_text(out_md, note + markdown_table(summary))
    return summary
