"""Paired statistics over test images: bootstrap intervals, Wilcoxon tests, Holm correction, effect sizes.

Unit of resampling: the test image. A method's score on an image is its per-image score averaged over
the seeds that finished (seeds pooled, never best-of), so two methods are paired by image name. All
randomness comes from a ``numpy.random.Generator`` seeded by the caller: same seed, same interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

BOOTSTRAP_CHUNK = 1000


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down), in the input order.

    ``p_values`` (k,); nan entries stay nan and do not count towards k. The i-th smallest of m valid
    p-values p_(i) (i from 1) becomes max over j <= i of min(1, (m - j + 1) * p_(j)).
    """
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def paired_bootstrap(a, b, n_resamples: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of mean(a - b) over paired observations (images).

    a, b: (n,) scores of two methods on the same n images. Returns ``{"mean_diff", "low", "high"}``.
    Images are resampled with replacement ``n_resamples`` times from ``numpy.random.default_rng(seed)``.
    """
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or len(diff) == 0:
        raise ValueError(f"paired_bootstrap needs two equal-length 1-d score arrays, got shape {diff.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, BOOTSTRAP_CHUNK):
        stop = min(start + BOOTSTRAP_CHUNK, n_resamples)
        means[start:stop] = diff[rng.integers(0, len(diff), size=(stop - start, len(diff)))].mean(1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"mean_diff": float(diff.mean()), "low": float(low), "high": float(high)}


def wilcoxon_p(diff) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test of paired differences ``diff`` (n,).

    Zero differences are dropped (scipy's ``zero_method="wilcox"``); all-zero differences give 1.0.
    """
    diff = np.asarray(diff, dtype=np.float64)
    if not np.any(diff != 0):
        return 1.0
    return float(scipy_stats.wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)


def effect_sizes(diff) -> dict:
    """Effect sizes of paired differences ``diff`` (n,).

    ``cohen_dz`` = mean / std (ddof=1), nan when the std is 0; ``rank_biserial`` = (R+ - R-) / (R+ + R-)
    over the ranks of |diff| with zeros dropped (the matched-pairs rank-biserial correlation, in
    [-1, 1]; 0 when every difference is zero).
    """
    diff = np.asarray(diff, dtype=np.float64)
    std = diff.std(ddof=1) if len(diff) > 1 else 0.0
    nonzero = diff[diff != 0]
    ranks = scipy_stats.rankdata(np.abs(nonzero))
    positive, negative = ranks[nonzero > 0].sum(), ranks[nonzero < 0].sum()
    total = positive + negative
    return {"cohen_dz": float(diff.mean() / std) if std > 0 else float("nan"),
            "rank_biserial": float((positive - negative) / total) if total > 0 else 0.0}


def seed_pooled_scores(per_image: pd.DataFrame, metric: str = "mIoU") -> pd.DataFrame:
    """Per-image ``metric`` averaged over seeds: one column per method, one row per image name.

    per_image: rows with columns method, seed, image and ``metric`` (one dataset). Images on which a
    method scored nan (no scored pixel) stay nan.
    """
    return per_image.pivot_table(index="image", columns="method", values=metric, aggfunc="mean", dropna=False)


def compare_to_reference(per_image: pd.DataFrame, reference: str, others: list[str], metric: str = "mIoU",
                         n_resamples: int = 10000, seed: int = 0) -> pd.DataFrame:
    """``reference`` against each of ``others`` on one dataset, paired over test images.

    Returns one row per comparison: n_images (images scored by both), mean_diff (reference - other) with
    its bootstrap interval, Wilcoxon p, Holm-adjusted p across these comparisons, cohen_dz,
    rank_biserial. Methods missing from ``per_image`` are skipped.
    """
    scores = seed_pooled_scores(per_image, metric)
    rows = []
    for other in others:
        if reference not in scores or other not in scores:
            continue
        pair = scores[[reference, other]].dropna()
        row = {"reference": reference, "other": other, "metric": metric, "n_images": len(pair)}
        if len(pair):  # no image scored by both (e.g. disjoint file names): a row of nan, not an error
            diff = (pair[reference] - pair[other]).to_numpy()
            interval = paired_bootstrap(pair[reference].to_numpy(), pair[other].to_numpy(), n_resamples, seed)
            row.update(mean_diff=interval["mean_diff"], ci_low=interval["low"], ci_high=interval["high"],
                       wilcoxon_p=wilcoxon_p(diff), **effect_sizes(diff))
        rows.append(row)
    table = pd.DataFrame(rows, columns=["reference", "other", "metric", "n_images", "mean_diff", "ci_low",
                                        "ci_high", "wilcoxon_p", "cohen_dz", "rank_biserial"])
    table.insert(8, "holm_p", holm(table["wilcoxon_p"].to_numpy()))
    return table
