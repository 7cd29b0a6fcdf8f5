"""Metrics against an independent computation (scikit-learn) and hand-built cases."""

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score, precision_score, recall_score

from pathmamba.engine.metrics import (
    SegmentationMeter,
    confusion_matrix,
    per_image_confusion,
    scores_from_confusion,
)


def random_batch(seed, batch=3, size=17, absent=()):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, 5, size=(batch, size, size))
    pred = rng.integers(0, 4, size=(batch, size, size))
    for cls in absent:
        target[target == cls] = 4
        pred[pred == cls] = 0
    return torch.from_numpy(pred), torch.from_numpy(target)


@pytest.mark.parametrize("seed", range(4))
def test_confusion_matches_sklearn_with_ignore(seed):
    pred, target = random_batch(seed)
    keep = target.numpy().ravel() != 4
    expected = sk_confusion(target.numpy().ravel()[keep], pred.numpy().ravel()[keep], labels=range(4))
    np.testing.assert_array_equal(confusion_matrix(pred, target, 4, ignore_index=4).numpy(), expected)
    np.testing.assert_array_equal(per_image_confusion(pred, target, 4, ignore_index=4).sum(0).numpy(), expected)


@pytest.mark.parametrize("absent", [(), (2,), (1, 3)])
def test_scores_match_sklearn_including_absent_classes(absent):
    pred, target = random_batch(7, absent=absent)
    y_true, y_pred = target.numpy().ravel(), pred.numpy().ravel()
    keep = y_true != 4
    y_true, y_pred = y_true[keep], y_pred[keep]
    present = [c for c in range(4) if c not in absent]
    scores = scores_from_confusion(confusion_matrix(pred, target, 4, ignore_index=4))
    iou = jaccard_score(y_true, y_pred, labels=present, average=None)
    precision = precision_score(y_true, y_pred, labels=present, average=None, zero_division=np.nan)
    recall = recall_score(y_true, y_pred, labels=present, average=None)
    np.testing.assert_allclose(np.array(scores["per_class"]["IoU"])[present], iou, rtol=1e-12)
    np.testing.assert_allclose(np.array(scores["per_class"]["Precision"])[present], precision, rtol=1e-12)
    np.testing.assert_allclose(scores["mIoU"], iou.mean(), rtol=1e-12)
    np.testing.assert_allclose(scores["mRecall"], recall.mean(), rtol=1e-12)
    dice = 2 * iou / (1 + iou)
    np.testing.assert_allclose(scores["mDice"], dice.mean(), rtol=1e-12)
    for cls in absent:  # never predicted and never true: excluded from the means, not counted as 0
        assert np.isnan(scores["per_class"]["IoU"][cls])


def test_hand_built_masks_both_protocols():
    target = torch.tensor([[[0, 0, 1, 4], [2, 2, 3, 4]]])
    pred = torch.tensor([[[0, 1, 1, 0], [2, 2, 3, 3]]])
    meter = SegmentationMeter(4)
    meter.update(pred, target, ["a.png"])
    primary = meter.summary()["ignore_background"]
    # class 0: TP 1, FN 1 -> IoU 1/2; class 1: TP 1, FP 1 -> 1/2; classes 2, 3: perfect.
    assert primary["per_class"]["IoU"] == [0.5, 0.5, 1.0, 1.0]
    assert primary["mIoU"] == pytest.approx(0.75)
    assert primary["mDice"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 1) / 4)
    secondary = meter.summary()["with_background"]
    # Background kept: the two background pixels predicted 0 and 3 become false positives.
    assert secondary["per_class"]["IoU"] == [pytest.approx(1 / 3), 0.5, 1.0, 0.5]
    assert len(secondary["confusion"]) == 5


def test_three_classes_ignore_index_3_as_background():
    target = torch.tensor([[[0, 0, 1, 3], [2, 2, 3, 3]]])
    pred = torch.tensor([[[0, 1, 1, 0], [2, 2, 2, 1]]])
    meter = SegmentationMeter(3)
    meter.update(pred, target, ["a.png"])
    primary = meter.summary()["ignore_background"]
    assert primary["per_class"]["IoU"] == [0.5, 0.5, 1.0] and primary["mIoU"] == pytest.approx(2 / 3)
    assert len(primary["confusion"]) == 3 and len(meter.summary()["with_background"]["confusion"]) == 4
    assert {"cm_t2_p2", "pixels"} <= set(meter.per_image()[0]) and "cm_t3_p3" not in meter.per_image()[0]


def test_all_ignored_image_gives_nan_row_and_no_counts():
    meter = SegmentationMeter(4)
    meter.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 4), ["white.png"])
    row = meter.per_image()[0]
    assert row["pixels"] == 0 and np.isnan(row["mIoU"])
    assert np.isnan(meter.summary()["ignore_background"]["mIoU"])


def test_meter_accumulates_over_batches_like_one_batch():
    pred, target = random_batch(3, batch=4)
    whole, parts = SegmentationMeter(4), SegmentationMeter(4)
    whole.update(pred, target)
    parts.update(pred[:1], target[:1])
    parts.update(pred[1:], target[1:])
    assert whole.summary() == parts.summary()
    assert len(parts.per_image()) == 4


def test_out_of_range_prediction_is_an_error():
    with pytest.raises(ValueError, match=r"0\.\.3"):
        confusion_matrix(torch.tensor([5]), torch.tensor([0]), 4, ignore_index=4)
