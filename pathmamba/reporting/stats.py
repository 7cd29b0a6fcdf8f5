"""Paired statistics over test images: bootstrap intervals, Wilcoxon tests, Holm correction, effect sizes.

Unit of resampling: the test image; two methods are paired by image name. Two views:

- split level (:func:`compare_split_level`), Table 1's metric: a method's score is the mean over its
  seeds of the mIoU of the confusion matrix summed over the split's images. A resample draws the images
  again and sums their per-image confusion matrices again, so the difference it intervals is Table 1's
  difference.
- per image (:func:`compare_to_reference`): a method's score on an image is its per-image mIoU averaged
  over its seeds (seeds pooled, never best-of); Wilcoxon tests and effect sizes on those pairs. A
  per-image mean weighs a small image as much as a large one, so it is not Table 1's number.

For ``python -m pathmamba compare`` (:mod:`pathmamba.reporting.compare`): the same split-level bootstrap for every
m-metric, between two evaluations of the same images or of one alone (:func:`split_level_intervals`), and
t intervals over seeds from summary statistics (:func:`welch_interval`, :func:`one_sample_interval`).

All randomness comes from a ``numpy.random.Generator`` seeded by the caller: same seed, same interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from pathmamba.engine.metrics import confusion_classes, confusion_columns

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


#: Each m-metric's per-class score from a confusion matrix's true positives, true pixels (row sums) and
#: predicted pixels (column sums), as a (numerator, denominator) pair; see :mod:`pathmamba.engine.metrics`.
SCORE_TERMS = {
    "mIoU": lambda tp, true, predicted: (tp, true + predicted - tp),
    "mDice": lambda tp, true, predicted: (2 * tp, true + predicted),
    "mPrecision": lambda tp, true, predicted: (tp, predicted),
    "mRecall": lambda tp, true, predicted: (tp, true),
}


def mean_score(confusion, metric: str = "mIoU", num_tissue: int | None = None) -> np.ndarray:
    """The m-metric ``metric`` (mIoU, mDice, mPrecision, mRecall) of confusion matrices (..., C, C) (rows
    truth, columns prediction): the mean over the first ``num_tissue`` classes (None: all C) of the per-class score,
    skipping classes with an empty denominator, as :func:`pathmamba.engine.metrics.scores_from_confusion`; nan
    where no class has one. Shape (...)."""
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    numerator, denominator = SCORE_TERMS[metric](tp, cm.sum(-1), cm.sum(-2))
    with np.errstate(invalid="ignore", divide="ignore"):
        score = (numerator / denominator)[..., :num_tissue]
    valid = np.isfinite(score)
    count = valid.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(valid, score, 0.0).sum(-1) / count, np.nan)


def split_scores(confusions: np.ndarray, counts: np.ndarray, metrics: tuple[str, ...]) -> np.ndarray:
    """Split-level ``metrics`` of image samples, each the mean over seeds, as Table 1 computes them.

    confusions (S, N, C, C): per-image confusion matrices of S seeds on N images; counts (R, N): how often
    each image is in each of R samples (all ones: the split itself). Each seed's split matrix is the
    count-weighted sum of its per-image matrices. Returns (R, len(metrics))."""
    seeds, n_images, classes, _ = confusions.shape
    # (images, seeds * C * C): the samples' split matrices are one product with their image counts.
    flat = np.moveaxis(confusions, 1, 0).reshape(n_images, -1)
    split = (counts @ flat).reshape(len(counts), seeds, classes, classes)
    return np.stack([mean_score(split, metric).mean(-1) for metric in metrics], axis=-1)


def resampled(statistic, n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """``statistic`` on ``n_resamples`` resamples of ``n_images`` images drawn with replacement from
    ``numpy.random.default_rng(seed)``. ``statistic`` maps image counts (R, n_images), how often each image
    was drawn in each of R resamples, to an array (R, ...); returns (n_resamples, ...)."""
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, n_resamples, BOOTSTRAP_CHUNK):
        size = min(BOOTSTRAP_CHUNK, n_resamples - start)
        picks = rng.integers(0, n_images, size=(size, n_images))
        counts = np.bincount((np.arange(size)[:, None] * n_images + picks).ravel(), minlength=size * n_images)
        draws.append(statistic(counts.reshape(size, n_images).astype(np.float64)))
    return np.concatenate(draws)


def _split_difference_draws(a, b, metrics: tuple[str, ...], n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The split-level ``metrics`` of ``a`` minus those of ``b`` (None: of nothing), on the split itself
    (len(metrics),) and on each image resample (n_resamples, len(metrics)); the same draw of images for
    both and every seed. a, b: (seeds, N, C, C) per-image confusion matrices of the same N images."""
    a = np.asarray(a, dtype=np.float64)
    shapes = [a.shape] if b is None else [a.shape, np.shape(b)]
    if any(len(shape) != 4 or shape[1] != a.shape[1] for shape in shapes) or a.shape[1] == 0:
        raise ValueError("the split-level bootstrap needs (seeds, images, C, C) confusion matrices of the same "
                         f"images, got shapes {' and '.join(str(shape) for shape in shapes)}")
    b = None if b is None else np.asarray(b, dtype=np.float64)

    def statistic(counts: np.ndarray) -> np.ndarray:
        scores = split_scores(a, counts, metrics)
        return scores if b is None else scores - split_scores(b, counts, metrics)

    return statistic(np.ones((1, a.shape[1])))[0], resampled(statistic, a.shape[1], n_resamples, seed)


def _percentiles(draws: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval at ``level`` of ``draws`` (R, ...) along the resamples; nan resamples skipped."""
    tail = (1.0 - level) / 2 * 100
    low, high = np.nanpercentile(draws, [tail, 100 - tail], axis=0)
    return low, high


def split_level_bootstrap(reference, other, n_resamples: int = 10000, seed: int = 0, level: float = 0.95) -> dict:
    """Paired bootstrap of Table 1's mIoU difference between two methods.

    reference (S_r, N, C, C), other (S_o, N, C, C): per-image confusion matrices of each method's seeds
    on the same N test images, in the same order. The statistic: the mean over seeds of the split mIoU
    (of the confusion matrix summed over the images) of ``reference`` minus that of ``other``. Each of
    ``n_resamples`` resamples draws N images with replacement from ``numpy.random.default_rng(seed)``,
    the same draw for both methods and every seed. Returns ``{"diff", "low", "high", "p"}``: the
    statistic on the split itself, the percentile interval at ``level``, and the two-sided bootstrap
    p-value: twice the share of resampled differences on the far side of zero, as (k + 1) / (R + 1),
    at most 1.
    """
    diff, draws = _split_difference_draws(reference, other, ("mIoU",), n_resamples, seed)
    draws = draws[:, 0]
    low, high = _percentiles(draws, level)
    far_side = min(np.sum(draws <= 0), np.sum(draws >= 0))
    return {"diff": float(diff[0]), "low": float(low), "high": float(high),
            "p": min(1.0, 2 * (far_side + 1) / (n_resamples + 1))}


def split_level_intervals(a, b=None, metrics: tuple[str, ...] = ("mIoU",), n_resamples: int = 10000,
                          seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Paired image bootstrap of the split-level ``metrics`` of ``a`` minus those of ``b``, or of ``a``
    alone when ``b`` is None (its own test-image sampling interval).

    a (S_a, N, C, C), b (S_b, N, C, C): per-image confusion matrices of two evaluations' seeds on the same
    N test images, in the same order; each side's metric is the mean over its seeds of the split-level
    metric, as :func:`split_level_bootstrap`. Returns ``{metric: {"value", "low", "high"}}``: the statistic
    on the split itself and its percentile interval at ``level``."""
    value, draws = _split_difference_draws(a, b, metrics, n_resamples, seed)
    low, high = _percentiles(draws, level)
    return {metric: {"value": float(value[i]), "low": float(low[i]), "high": float(high[i])}
            for i, metric in enumerate(metrics)}


def welch_interval(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int,
                   level: float = 0.95) -> dict:
    """Welch's t interval of ``mean_a - mean_b`` from two independent samples' means, standard deviations
    (ddof=1) and sizes (each at least 2), with the Welch-Satterthwaite degrees of freedom. Returns
    ``{"diff", "low", "high", "df"}``; two samples without spread give the difference itself (df nan)."""
    if min(n_a, n_b) < 2:
        raise ValueError(f"a Welch interval needs at least 2 values per sample, got {n_a} and {n_b}")
    terms = std_a ** 2 / n_a, std_b ** 2 / n_b
    diff = mean_a - mean_b
    if sum(terms) == 0:
        return {"diff": diff, "low": diff, "high": diff, "df": float("nan")}
    df = sum(terms) ** 2 / (terms[0] ** 2 / (n_a - 1) + terms[1] ** 2 / (n_b - 1))
    half = float(scipy_stats.t.ppf(0.5 + level / 2, df)) * float(np.sqrt(sum(terms)))
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": float(df)}


def one_sample_interval(mean: float, std: float, n: int, reference: float, level: float = 0.95) -> dict:
    """The t interval of ``mean - reference``: a sample's mean, standard deviation (ddof=1) and size (at
    least 2) against a fixed value. Returns ``{"diff", "low", "high", "df"}``."""
    if n < 2:
        raise ValueError(f"a one-sample t interval needs at least 2 values, got {n}")
    diff = mean - reference
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * std / float(np.sqrt(n))
    return {"diff": diff, "low": diff - half, "high": diff + half, "df": float(n - 1)}


def confusions_by_seed(per_image: pd.DataFrame, method: str, images: list[str]) -> np.ndarray:
    """Per-image confusion matrices of ``method``'s seeds on ``images``: (seeds, len(images), C, C).

    per_image: rows with columns method, seed, image and :func:`pathmamba.engine.metrics.confusion_columns`."""
    classes = confusion_classes(per_image)
    columns = confusion_columns(classes)
    rows = per_image[per_image["method"] == method]
    return np.stack([frame.set_index("image").loc[images, columns].to_numpy(dtype=np.float64)
                     .reshape(len(images), classes, classes)
                     for _, frame in rows.groupby("seed", dropna=False, sort=True)])


def compare_split_level(per_image: pd.DataFrame, reference: str, others: list[str], n_resamples: int = 10000,
                        seed: int = 0) -> pd.DataFrame:
    """``reference`` against each of ``others`` on Table 1's metric (:func:`split_level_bootstrap`).

    per_image: one dataset's rows (method, seed, image, confusion columns). Pairs are the images that
    every seed of both methods scored. Returns one row per comparison: reference, other, n_images,
    split_diff, split_ci_low, split_ci_high, split_p and split_holm_p (Holm across these comparisons).
    Methods missing from ``per_image`` are skipped."""
    present = set(per_image["method"])
    images_of = {method: frame.groupby("seed", dropna=False)["image"].agg(set).tolist()
                 for method, frame in per_image.groupby("method")}
    rows = []
    for other in others:
        if reference not in present or other not in present:
            continue
        images = sorted(set.intersection(*images_of[reference], *images_of[other]))
        row = {"reference": reference, "other": other, "n_images": len(images)}
        if images:
            result = split_level_bootstrap(confusions_by_seed(per_image, reference, images),
                                           confusions_by_seed(per_image, other, images), n_resamples, seed)
            row.update(split_diff=result["diff"], split_ci_low=result["low"], split_ci_high=result["high"],
                       split_p=result["p"])
        rows.append(row)
    table = pd.DataFrame(rows, columns=["reference", "other", "n_images", "split_diff", "split_ci_low",
                                        "split_ci_high", "split_p"])
    table["split_holm_p"] = holm(table["split_p"].to_numpy(dtype=np.float64))
    return table
