"""Paired statistics: Holm, bootstrap intervals, Wilcoxon, effect sizes, seed pooling; known values."""

import math

import numpy as np
import pandas as pd
import pytest

from pathmamba.reporting.stats import compare_to_reference, effect_sizes, holm, paired_bootstrap, wilcoxon_p


def test_holm_on_known_p_values():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> monotone 0.06.
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=0, atol=1e-15)
    np.testing.assert_allclose(holm([0.6, 0.7]), [1.0, 1.0])
    adjusted = holm([0.02, math.nan, 0.04])
    assert adjusted[0] == pytest.approx(0.04) and adjusted[2] == pytest.approx(0.04) and math.isnan(adjusted[1])
    assert holm([]).shape == (0,)


def test_bootstrap_interval_contains_the_true_difference_and_is_reproducible():
    rng = np.random.default_rng(7)
    b = rng.uniform(0.3, 0.7, size=200)
    a = b + 0.1 + rng.normal(0, 0.05, size=200)
    first = paired_bootstrap(a, b, n_resamples=2000, seed=11)
    assert first["mean_diff"] == pytest.approx(float(np.mean(a - b)), abs=1e-15)
    assert first["low"] < 0.1 < first["high"]
    assert first["high"] - first["low"] < 0.03
    assert paired_bootstrap(a, b, n_resamples=2000, seed=11) == first
    assert paired_bootstrap(a, b, n_resamples=2000, seed=12) != first


def test_bootstrap_of_a_constant_difference_is_that_constant():
    result = paired_bootstrap([0.5, 0.75, 1.0], [0.25, 0.5, 0.75], n_resamples=100, seed=0)
    assert result == {"mean_diff": 0.25, "low": 0.25, "high": 0.25}
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([], [], n_resamples=10)


def test_wilcoxon_exact_p_values():
    # Five positive differences: the exact two-sided p is 2 / 2**5.
    assert wilcoxon_p([1, 2, 3, 4, 5]) == pytest.approx(2 / 32)
    assert wilcoxon_p([0, 0, 0]) == 1.0


def test_effect_sizes_on_known_differences():
    sizes = effect_sizes([1, 2, 3, -1])
    assert sizes["cohen_dz"] == pytest.approx(1.25 / math.sqrt(8.75 / 3))
    # |d| ranks 1.5, 3, 4, 1.5; positive 8.5, negative 1.5.
    assert sizes["rank_biserial"] == pytest.approx(0.7)
    assert effect_sizes([0, 0]) == {"cohen_dz": pytest.approx(float("nan"), nan_ok=True), "rank_biserial": 0.0}


def test_compare_to_reference_pools_seeds_per_image_and_applies_holm():
    rows = []
    for seed, shift in ((0, -0.1), (1, 0.1)):  # pathmamba's seeds average to 0.6 + 0.1 i
        rows += [{"method": "pathmamba", "seed": seed, "image": f"i{i}", "mIoU": 0.6 + 0.1 * i + shift}
                 for i in range(5)]
    rows += [{"method": "cam", "seed": 0, "image": f"i{i}", "mIoU": 0.2 + 0.01 * i} for i in range(5)]
    # unet: the same scores as pathmamba (a zero difference), but no scored pixel on image i4.
    rows += [dict(row, method="unet", mIoU=math.nan if row["image"] == "i4" else row["mIoU"])
             for row in rows if row["method"] == "pathmamba"]
    table = compare_to_reference(pd.DataFrame(rows), "pathmamba", ["cam", "unet", "absent"], n_resamples=200)
    cam, unet = table.set_index("other").loc["cam"], table.set_index("other").loc["unet"]
    assert cam["n_images"] == 5 and unet["n_images"] == 4
    assert cam["mean_diff"] == pytest.approx(np.mean([0.4 + 0.09 * i for i in range(5)]), abs=1e-12)
    assert cam["wilcoxon_p"] == pytest.approx(2 / 32)
    assert cam["rank_biserial"] == pytest.approx(1.0)
    assert unet["mean_diff"] == pytest.approx(0.0, abs=1e-12) and unet["wilcoxon_p"] == 1.0
    np.testing.assert_allclose(table["holm_p"], holm(table["wilcoxon_p"]))
    assert list(table["other"]) == ["cam", "unet"]


def test_compare_to_reference_with_no_common_image_gives_nan_not_an_error():
    per_image = pd.DataFrame([{"method": "pathmamba", "seed": 0, "image": "a", "mIoU": 0.5},
                              {"method": "cam", "seed": 0, "image": "b", "mIoU": 0.4}])
    row = compare_to_reference(per_image, "pathmamba", ["cam"], n_resamples=10).iloc[0]
    assert row["n_images"] == 0 and math.isnan(row["mean_diff"]) and math.isnan(row["holm_p"])


def _slow_split_level(reference, other, n_resamples, seed):
    """The split-level bootstrap one resample at a time with the same draws, from metrics' own scores."""
    from pathmamba.engine.metrics import scores_from_confusion

    rng = np.random.default_rng(seed)
    n_images = reference.shape[1]
    draws = []
    for _ in range(n_resamples):
        picks = rng.integers(0, n_images, size=n_images)
        means = [np.mean([scores_from_confusion(seed_cms[picks].sum(0))["mIoU"] for seed_cms in cms])
                 for cms in (reference, other)]
        draws.append(means[0] - means[1])
    return np.array(draws)


def test_split_level_bootstrap_equals_a_resample_by_resample_reference():
    from pathmamba.engine.metrics import scores_from_confusion
    from pathmamba.reporting.stats import split_level_bootstrap

    rng = np.random.default_rng(3)
    reference = rng.integers(0, 50, size=(3, 7, 4, 4)).astype(float)
    other = rng.integers(0, 50, size=(2, 7, 4, 4)).astype(float)
    other[:, :, 2] = 0  # class 2 never in the truth of `other`'s images: nan-mean as in Table 1
    result = split_level_bootstrap(reference, other, n_resamples=1200, seed=5)
    table1 = (np.mean([scores_from_confusion(cms.sum(0))["mIoU"] for cms in reference])
              - np.mean([scores_from_confusion(cms.sum(0))["mIoU"] for cms in other]))
    assert result["diff"] == pytest.approx(table1, abs=1e-12)
    draws = _slow_split_level(reference, other, 1200, 5)
    low, high = np.percentile(draws, [2.5, 97.5])
    assert result["low"] == pytest.approx(low, abs=1e-12) and result["high"] == pytest.approx(high, abs=1e-12)
    far_side = min(np.sum(draws <= 0), np.sum(draws >= 0))
    assert result["p"] == pytest.approx(min(1.0, 2 * (far_side + 1) / 1201))


def test_split_level_bootstrap_of_a_method_against_itself_is_zero_with_p_one():
    from pathmamba.reporting.stats import split_level_bootstrap

    cms = np.random.default_rng(0).integers(0, 9, size=(2, 5, 4, 4)).astype(float)
    assert split_level_bootstrap(cms, cms, n_resamples=200) == {"diff": 0.0, "low": 0.0, "high": 0.0, "p": 1.0}
    with pytest.raises(ValueError, match="same images"):
        split_level_bootstrap(cms, cms[:, :3], n_resamples=10)


def test_mean_scores_match_the_metrics_module_including_empty_classes():
    from pathmamba.engine.metrics import METRICS, scores_from_confusion
    from pathmamba.reporting.stats import mean_score

    cms = np.random.default_rng(1).integers(0, 20, size=(6, 4, 4)).astype(float)
    cms[1, 3, :] = cms[1, :, 3] = 0
    cms[2] = 0
    cms[3, :, 1] = 0  # class 1 never predicted: no precision for it, recall 0
    for metric in METRICS:
        expected = [scores_from_confusion(cm)[metric] for cm in cms]
        np.testing.assert_allclose(mean_score(cms, metric), expected, atol=1e-15, err_msg=metric)
        assert math.isnan(mean_score(cms, metric)[2])


def test_split_level_intervals_of_every_metric_equal_a_resample_by_resample_reference():
    from pathmamba.engine.metrics import METRICS, scores_from_confusion
    from pathmamba.reporting.stats import split_level_intervals

    rng = np.random.default_rng(4)
    a = rng.integers(0, 50, size=(3, 6, 4, 4)).astype(float)
    b = rng.integers(0, 50, size=(2, 6, 4, 4)).astype(float)
    result = split_level_intervals(a, b, METRICS, n_resamples=300, seed=2)
    alone = split_level_intervals(a, None, METRICS, n_resamples=300, seed=2)
    draws_rng = np.random.default_rng(2)
    picks = [draws_rng.integers(0, 6, size=6) for _ in range(300)]
    for metric in METRICS:
        def split(cms, images, metric=metric):
            return np.mean([scores_from_confusion(seed_cms[images].sum(0))[metric] for seed_cms in cms])
        everything = np.arange(6)
        assert result[metric]["value"] == pytest.approx(split(a, everything) - split(b, everything), abs=1e-12)
        low, high = np.percentile([split(a, p) - split(b, p) for p in picks], [2.5, 97.5])
        assert (result[metric]["low"], result[metric]["high"]) == (pytest.approx(low, abs=1e-12),
                                                                   pytest.approx(high, abs=1e-12))
        low, high = np.percentile([split(a, p) for p in picks], [2.5, 97.5])
        assert alone[metric]["value"] == pytest.approx(split(a, everything), abs=1e-12)
        assert (alone[metric]["low"], alone[metric]["high"]) == (pytest.approx(low, abs=1e-12),
                                                                 pytest.approx(high, abs=1e-12))


def test_welch_interval_on_known_values():
    from scipy import stats as scipy_stats

    from pathmamba.reporting.stats import welch_interval

    # Samples (1, 2, 3) and (2, 4, 6, 8): variances 1 and 20/3.
    terms = 1 / 3, (20 / 3) / 4
    df = sum(terms) ** 2 / (terms[0] ** 2 / 2 + terms[1] ** 2 / 3)
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(sum(terms))
    result = welch_interval(2.0, 1.0, 3, 5.0, math.sqrt(20 / 3), 4)
    assert result == {"diff": -3.0, "low": pytest.approx(-3 - half), "high": pytest.approx(-3 + half),
                      "df": pytest.approx(df)}
    # scipy's own Welch test gives the same interval.
    welch = scipy_stats.ttest_ind([1, 2, 3], [2, 4, 6, 8], equal_var=False).confidence_interval(0.95)
    assert (result["low"], result["high"]) == (pytest.approx(welch.low), pytest.approx(welch.high))
    assert welch_interval(0.5, 0.0, 3, 0.25, 0.0, 2)["low"] == 0.25
    with pytest.raises(ValueError, match="at least 2 values per sample"):
        welch_interval(0.5, 0.1, 1, 0.5, 0.1, 3)


def test_one_sample_interval_equals_scipys_t_interval():
    from scipy import stats as scipy_stats

    from pathmamba.reporting.stats import one_sample_interval

    values = np.array([0.61, 0.66, 0.58, 0.70])
    result = one_sample_interval(values.mean(), values.std(ddof=1), 4, 0.767)
    expected = scipy_stats.ttest_1samp(values, 0.767).confidence_interval(0.95)
    assert result["diff"] == pytest.approx(values.mean() - 0.767, abs=1e-15)
    assert (result["low"], result["high"]) == (pytest.approx(expected.low - 0.767),
                                               pytest.approx(expected.high - 0.767))
    assert result["df"] == 3.0
