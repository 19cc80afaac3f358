"""Confusion matrices, IoU/F1/accuracy from them, the evaluation gate and the runs table."""

import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

from nycdata.data.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from nycdata.data.metrics import (
    PUBLISH_FROM_PP, STRONG_ABOVE_PP, confusion_matrix, gate, metrics_from_confusion,
    metrics_table, per_chip_confusion,
)

WATER, DEVELOPED, TREES, HERBACEOUS, OTHER = CLASS_NAMES


def cm_of(pairs):
    """A 5x5 matrix from {(true, pred): count}, to write expected matrices readably."""
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for (t, p), n in pairs.items():
        cm[t, p] = n
    return cm


# --- confusion_matrix ------------------------------------------------------------------------

def test_confusion_matrix_2x2_chip_by_hand():
    target = np.array([[0, 1], [1, 2]])
    pred = np.array([[0, 1], [2, 2]])
    cm = confusion_matrix(target, pred)
    assert cm.dtype == np.int64 and cm.shape == (5, 5)
    np.testing.assert_array_equal(cm, cm_of({(0, 0): 1, (1, 1): 1, (1, 2): 1, (2, 2): 1}))


def test_confusion_matrix_rows_are_truth_columns_are_prediction():
    cm = confusion_matrix(np.array([3]), np.array([1]))
    assert cm[3, 1] == 1 and cm.sum() == 1


def test_confusion_matrix_uint8_labels_do_not_overflow():
    # Labels on disk are uint8, so the flat index target * C + pred must be computed wide.
    target = np.array([4, 4, 3], dtype=np.uint8)
    pred = np.array([4, 0, 3], dtype=np.uint8)
    np.testing.assert_array_equal(confusion_matrix(target, pred), cm_of({(4, 4): 1, (4, 0): 1, (3, 3): 1}))
    big = np.full(60, 59, dtype=np.uint8)  # 59 * 60 + 59 = 3599 would wrap in uint8
    assert confusion_matrix(big, big, num_classes=60)[59, 59] == 60


def test_confusion_matrix_accepts_torch_tensors():
    target = torch.tensor([[0, 1], [1, 2]])
    pred = torch.tensor([[0, 1], [2, 2]])
    np.testing.assert_array_equal(
        confusion_matrix(target, pred), confusion_matrix(target.numpy(), pred.numpy()))


def test_ignore_and_out_of_range_targets_are_excluded():
    target = np.array([0, IGNORE_INDEX, 1, 7, -1, 5, 2])
    pred = np.array([0, 3, 1, 4, 4, 0, 1])
    cm = confusion_matrix(target, pred)
    np.testing.assert_array_equal(cm, cm_of({(0, 0): 1, (1, 1): 1, (2, 1): 1}))
    assert cm.sum() == 3


def test_all_ignored_gives_zero_matrix():
    cm = confusion_matrix(np.full((2, 2), IGNORE_INDEX), np.zeros((2, 2), dtype=int))
    np.testing.assert_array_equal(cm, np.zeros((5, 5), dtype=np.int64))


@pytest.mark.parametrize("bad", [7, -1, 5, 255])
def test_bad_prediction_raises_naming_the_value(bad):
    target = np.array([0, 1, 2, 3])
    pred = np.array([0, bad, 2, 3])
    with pytest.raises(ValueError, match=re.escape(f"[{bad}]")):
        confusion_matrix(target, pred)


def test_bad_predictions_message_lists_each_bad_value():
    with pytest.raises(ValueError) as err:
        confusion_matrix(np.array([0, 1, 2, 3]), np.array([7, 9, 7, 3]))
    assert "[7, 9]" in str(err.value)


def test_prediction_under_an_ignored_target_is_not_checked():
    # Pipelines that mask predictions with the label's ignore mask write 255 there; that is harmless.
    cm = confusion_matrix(np.array([0, IGNORE_INDEX]), np.array([0, IGNORE_INDEX]))
    np.testing.assert_array_equal(cm, cm_of({(0, 0): 1}))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), dtype=int), np.zeros((2, 3), dtype=int))


def test_float_predictions_are_refused():
    with pytest.raises(TypeError, match="integer"):
        confusion_matrix(np.zeros(4, dtype=int), np.zeros(4, dtype=np.float32))


# --- per_chip_confusion ------------------------------------------------------------------------

def test_per_chip_confusion_sums_to_batch_confusion():
    rng = np.random.default_rng(1)
    target = rng.integers(0, NUM_CLASSES, size=(6, 16, 16)).astype(np.uint8)
    target[rng.random(target.shape) < 0.1] = IGNORE_INDEX
    pred = rng.integers(0, NUM_CLASSES, size=target.shape)
    per_chip = per_chip_confusion(target, pred)
    assert per_chip.shape == (6, 5, 5) and per_chip.dtype == np.int64
    np.testing.assert_array_equal(per_chip.sum(axis=0), confusion_matrix(target, pred))
    for b in range(6):
        np.testing.assert_array_equal(per_chip[b], confusion_matrix(target[b], pred[b]))


def test_per_chip_confusion_keeps_chips_apart_by_hand():
    target = np.array([[[0, 0]], [[1, 255]]])
    pred = np.array([[[0, 1]], [[1, 4]]])
    per_chip = per_chip_confusion(target, pred)
    np.testing.assert_array_equal(per_chip[0], cm_of({(0, 0): 1, (0, 1): 1}))
    np.testing.assert_array_equal(per_chip[1], cm_of({(1, 1): 1}))


def test_per_chip_confusion_rejects_bad_predictions():
    with pytest.raises(ValueError, match="7"):
        per_chip_confusion(np.zeros((2, 2, 2), dtype=int), np.full((2, 2, 2), 7))


# --- metrics_from_confusion --------------------------------------------------------------------

def test_three_present_classes_by_hand():
    # water: TP2 FP1 FN1 -> IoU 2/4, F1 4/6; developed: TP1 FP1 FN1 -> 1/3, 2/4; trees: TP2 FP1 FN1 -> 2/4, 4/6
    target = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    m = metrics_from_confusion(confusion_matrix(target, pred))
    assert m["iou"][WATER] == pytest.approx(0.5)
    assert m["iou"][DEVELOPED] == pytest.approx(1 / 3)
    assert m["iou"][TREES] == pytest.approx(0.5)
    assert m["f1"][WATER] == pytest.approx(2 / 3)
    assert m["f1"][DEVELOPED] == pytest.approx(0.5)
    assert m["f1"][TREES] == pytest.approx(2 / 3)
    assert m["miou"] == pytest.approx(4 / 9)
    assert m["macro_f1"] == pytest.approx(11 / 18)
    assert m["pixel_accuracy"] == pytest.approx(5 / 8)
    assert m["support"] == {WATER: 3, DEVELOPED: 2, TREES: 3, HERBACEOUS: 0, OTHER: 0}
    assert m["n_pixels"] == 8


def test_absent_class_is_nan_even_when_predicted_and_miou_skips_it():
    # herbaceous (3) never occurs in the target but is predicted once.
    # water: TP1 FN1 -> IoU 1/2, F1 2/3; developed: TP2 -> 1, 1. mIoU = 3/4 (not 1.5/3 or 1.5/5).
    m = metrics_from_confusion(confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 3, 1, 1])))
    assert math.isnan(m["iou"][HERBACEOUS]) and math.isnan(m["f1"][HERBACEOUS])
    assert math.isnan(m["iou"][TREES]) and math.isnan(m["iou"][OTHER])
    assert m["iou"][WATER] == pytest.approx(0.5)
    assert m["iou"][DEVELOPED] == pytest.approx(1.0)
    assert m["miou"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["pixel_accuracy"] == pytest.approx(0.75)
    assert m["support"][HERBACEOUS] == 0


def test_perfect_prediction_scores_one():
    target = np.array([0, 1, 2, 3, 4, 4])
    m = metrics_from_confusion(confusion_matrix(target, target))
    assert m["miou"] == 1.0 and m["macro_f1"] == 1.0 and m["pixel_accuracy"] == 1.0


def test_empty_matrix_is_all_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = metrics_from_confusion(np.zeros((5, 5), dtype=np.int64))
    assert math.isnan(m["miou"]) and math.isnan(m["pixel_accuracy"]) and math.isnan(m["macro_f1"])
    assert all(math.isnan(v) for v in m["iou"].values())
    assert m["n_pixels"] == 0


def test_results_are_plain_python_and_json_serialisable():
    m = metrics_from_confusion(confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 3, 1, 1])))
    assert type(m["miou"]) is float and type(m["pixel_accuracy"]) is float and type(m["macro_f1"]) is float
    assert all(type(v) is float for v in [*m["iou"].values(), *m["f1"].values()])
    assert all(type(v) is int for v in m["support"].values()) and type(m["n_pixels"]) is int
    assert set(m["iou"]) == set(CLASS_NAMES)
    back = json.loads(json.dumps(m))
    assert back["miou"] == pytest.approx(0.75) and math.isnan(back["iou"][HERBACEOUS])


def test_wrong_matrix_shape_raises():
    with pytest.raises(ValueError, match="square"):
        metrics_from_confusion(np.zeros((4, 4), dtype=np.int64))


# --- agreement with torchmetrics ---------------------------------------------------------------

@pytest.fixture(scope="module")
def random_batch():
    """Seeded target/pred with ignore pixels and 'other' (4) absent from the target but predicted."""
    rng = np.random.default_rng(0)
    target = rng.integers(0, NUM_CLASSES - 1, size=(4, 32, 32))  # classes 0..3 only
    target[rng.random(target.shape) < 0.15] = IGNORE_INDEX
    pred = np.where(rng.random(target.shape) < 0.6, target, rng.integers(0, NUM_CLASSES, size=target.shape))
    pred = np.where(pred == IGNORE_INDEX, 4, pred)
    assert (pred == 4).any() and not (target == 4).any()
    return target, pred


def _tm(metric_cls, target, pred, **kwargs):
    metric = metric_cls(num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX, **kwargs)
    return metric(torch.from_numpy(pred), torch.from_numpy(target)).numpy()


def test_confusion_matrix_matches_torchmetrics(random_batch):
    from torchmetrics.classification import MulticlassConfusionMatrix

    target, pred = random_batch
    np.testing.assert_array_equal(confusion_matrix(target, pred), _tm(MulticlassConfusionMatrix, target, pred))


def test_iou_matches_torchmetrics_on_supported_classes(random_batch):
    from torchmetrics.classification import MulticlassJaccardIndex

    target, pred = random_batch
    m = metrics_from_confusion(confusion_matrix(target, pred))
    theirs = _tm(MulticlassJaccardIndex, target, pred, average=None)
    ours = np.array([m["iou"][c] for c in CLASS_NAMES])
    supported = np.array([m["support"][c] > 0 for c in CLASS_NAMES])
    assert supported.tolist() == [True, True, True, True, False]
    np.testing.assert_allclose(ours[supported], theirs[supported], rtol=1e-6)
    assert math.isnan(m["iou"][OTHER])  # torchmetrics would say 0 here; we deliberately do not
    assert m["miou"] == pytest.approx(float(theirs[supported].mean()), rel=1e-6)


def test_pixel_accuracy_matches_torchmetrics(random_batch):
    from torchmetrics.classification import MulticlassAccuracy

    target, pred = random_batch
    m = metrics_from_confusion(confusion_matrix(target, pred))
    theirs = float(_tm(MulticlassAccuracy, target, pred, average="micro"))
    assert m["pixel_accuracy"] == pytest.approx(theirs, rel=1e-6)
    assert m["n_pixels"] == int((target != IGNORE_INDEX).sum())


def test_f1_matches_torchmetrics_on_supported_classes(random_batch):
    from torchmetrics.classification import MulticlassF1Score

    target, pred = random_batch
    m = metrics_from_confusion(confusion_matrix(target, pred))
    theirs = _tm(MulticlassF1Score, target, pred, average=None)
    ours = np.array([m["f1"][c] for c in CLASS_NAMES])
    supported = np.array([m["support"][c] > 0 for c in CLASS_NAMES])
    np.testing.assert_allclose(ours[supported], theirs[supported], rtol=1e-6)
    assert m["macro_f1"] == pytest.approx(float(theirs[supported].mean()), rel=1e-6)


# --- gate --------------------------------------------------------------------------------------

@pytest.mark.parametrize("delta, verdict, publish", [
    (-5.0, "negative", False),
    (-0.006, "negative", False),       # printed -0.01
    (-0.004, "acceptable", False),     # printed -0.00: zero, not negative
    (0, "acceptable", False),
    (0.5, "acceptable", False),
    (0.994, "acceptable", False),      # printed +0.99
    (0.9999999, "acceptable", True),   # printed +1.00
    (1, "acceptable", True),
    (1.5, "acceptable", True),
    (2, "acceptable", True),
    (2.0000001, "acceptable", True),   # printed +2.00: not above +2
    (2.006, "strong", True),           # printed +2.01
    (7.3, "strong", True),
])
def test_gate_decides_on_the_delta_as_printed(delta, verdict, publish):
    assert gate(delta) == {"verdict": verdict, "publish": publish}


def test_gate_publishes_0_57_minus_0_56():
    delta = (0.57 - 0.56) * 100
    assert delta < PUBLISH_FROM_PP and f"{delta:+.2f}" == "+1.00"
    assert gate(delta)["publish"] is True and gate(np.float32(delta))["publish"] is True


def test_gate_publish_is_a_plain_bool():
    assert type(gate(1.0)["publish"]) is bool and type(gate(np.float64(0.0))["publish"]) is bool


def test_gate_constants_are_the_seeds():
    assert STRONG_ABOVE_PP == 2.0 and PUBLISH_FROM_PP == 1.0


@pytest.mark.parametrize("nan", [float("nan"), np.nan, np.float32("nan")])
def test_gate_nan_raises(nan):
    with pytest.raises(ValueError, match="NaN"):
        gate(nan)


# --- metrics_table -----------------------------------------------------------------------------

def test_metrics_table_columns_and_values():
    cms = {
        "baseline": confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 3, 1, 1])),
        "tim": confusion_matrix(np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])),
    }
    table = metrics_table(cms)
    assert list(table.columns) == [
        "miou", "pixel_accuracy", "macro_f1",
        *(f"iou_{c}" for c in CLASS_NAMES), *(f"f1_{c}" for c in CLASS_NAMES),
    ]
    assert list(table.index) == ["baseline", "tim"]
    assert table.loc["baseline", "miou"] == pytest.approx(0.75)
    assert table.loc["tim", "miou"] == pytest.approx(1.0)
    assert table.loc["baseline", f"iou_{WATER}"] == pytest.approx(0.5)
    assert table.loc["baseline", f"f1_{WATER}"] == pytest.approx(2 / 3)
    assert math.isnan(table.loc["baseline", f"iou_{HERBACEOUS}"])
