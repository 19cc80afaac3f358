"""Segmentation metrics for the NYC land-cover study, all derived from confusion matrices.

Confusion matrices (rows = true class, columns = predicted class, int64) are
the only thing worth storing per chip or per run: they add up across chips and
batches, whereas IoU and F1 do not. Every score here is computed from them.

A class absent from the target has no defined IoU or F1: it is NaN, never 0,
and macro means skip it, so a test split that happens to lack ``water`` does
not drag mIoU down (nor does a stray ``water`` prediction make it count).
Results are plain Python floats so they go straight into ``json.dumps``.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from nycdata.data.classes import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES

# Column names of a flattened confusion matrix in per_chip.csv: cm_<true>_<predicted>.
CM_COLUMNS = [f"cm_{t}_{p}" for t in range(NUM_CLASSES) for p in range(NUM_CLASSES)]

# The seed's gate: Strong > +2 pp, Acceptable 0..+2 pp, Negative < 0; publish only if >= +1 pp
# (decided on the delta rounded to 2 decimals, as printed; see gate).
# (Deltas are mIoU of TiM minus baseline, in percentage points.)
STRONG_ABOVE_PP = 2.0
ACCEPTABLE_FROM_PP = 0.0
PUBLISH_FROM_PP = 1.0


def _as_int_array(x, what: str) -> np.ndarray:
    """Accept torch tensors as well as arrays; refuse floats, which would hide an un-argmaxed logit map."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if not (np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_):
        raise TypeError(f"{what} must hold integer class labels, got dtype {x.dtype}")
    return x.astype(np.int64)  # uint8 labels would overflow in target * num_classes + pred


def _counted(target, pred, num_classes: int, ignore_index: int):
    """Validated int64 (target, pred) plus the mask of pixels that count.

    Only counted pixels must carry a valid prediction: a pipeline that writes
    255 into predictions under ignored targets is fine, but a 7 where the
    target is real would silently land in the wrong bincount cell.
    """
    t, p = _as_int_array(target, "target"), _as_int_array(pred, "pred")
    if t.shape != p.shape:
        raise ValueError(f"target shape {t.shape} != pred shape {p.shape}")
    keep = (t != ignore_index) & (t >= 0) & (t < num_classes)
    bad = keep & ((p < 0) | (p >= num_classes))
    if bad.any():
        values = sorted(int(v) for v in np.unique(p[bad]))
        raise ValueError(f"predictions outside 0..{num_classes - 1}: {values}")
    return t, p, keep


def confusion_matrix(target, pred, num_classes: int = NUM_CLASSES,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted.

    Targets equal to ``ignore_index`` or outside ``0..num_classes-1`` are dropped
    (they count in no metric); a counted prediction outside that range raises
    ValueError naming the values, since it means the model or its argmax is wrong.
    """
    t, p, keep = _counted(target, pred, num_classes, ignore_index)
    flat = t[keep] * num_classes + p[keep]
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_chip_confusion(target, pred, num_classes: int = NUM_CLASSES,
                       ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(B, C, C) matrices for a batch [B, ...], so per-chip scores and any regrouping stay possible later."""
    t, p, keep = _counted(target, pred, num_classes, ignore_index)
    if t.ndim < 1:
        raise ValueError("per_chip_confusion needs a leading batch axis")
    batch = np.broadcast_to(np.arange(t.shape[0]).reshape(-1, *([1] * (t.ndim - 1))), t.shape)
    flat = (batch[keep] * num_classes + t[keep]) * num_classes + p[keep]
    cells = t.shape[0] * num_classes**2
    return np.bincount(flat, minlength=cells).reshape(t.shape[0], num_classes, num_classes)


def _mean_or_nan(values: np.ndarray) -> float:
    """Mean over non-NaN entries without numpy's empty-slice warning; NaN if none."""
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def metrics_from_confusion(cm, class_names=CLASS_NAMES) -> dict:
    """mIoU, per-class IoU and F1, pixel accuracy, macro F1 and support from one matrix.

    Classes with no target pixels get NaN IoU/F1 and are left out of the macro
    means; see the module docstring for why.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"need a square ({len(class_names)}, {len(class_names)}) matrix, got {cm.shape}")
    if (cm < 0).any():
        raise ValueError("confusion matrix has negative counts")
    cm = cm.astype(np.float64)
    tp, support, predicted = np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)
    fp, fn = predicted - tp, support - tp
    has = support > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(has, tp / (tp + fp + fn), np.nan)
        f1 = np.where(has, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = cm.sum()
    return {
        "miou": _mean_or_nan(iou),
        "iou": {n: float(v) for n, v in zip(class_names, iou)},
        "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
        "f1": {n: float(v) for n, v in zip(class_names, f1)},
        "macro_f1": _mean_or_nan(f1),
        "support": {n: int(v) for n, v in zip(class_names, support)},
        "n_pixels": int(total),
    }


def gate(delta_pp: float) -> dict:
    """The study's pre-registered verdict on a mIoU delta (TiM minus baseline, in pp).

    Fixed in constants so no notebook can move the goalposts after seeing results.
    The delta is decided as printed, rounded to 2 decimals (``:+.2f``): a report
    saying "+1.00 pp" must not say "do not publish" because the float underneath
    is 0.9999999999999898 ((0.57 - 0.56) * 100 in binary). So 0.996 -> +1.00 publishes,
    2.004 -> +2.00 is acceptable, not strong, and -0.004 -> 0.00 is acceptable.
    """
    delta = float(delta_pp)
    if math.isnan(delta):
        raise ValueError("mIoU delta is NaN; cannot gate")
    delta = round(delta, 2)  # correctly rounded, like format(delta, ".2f")
    if delta > STRONG_ABOVE_PP:
        verdict = "strong"
    elif delta >= ACCEPTABLE_FROM_PP:
        verdict = "acceptable"
    else:
        verdict = "negative"
    return {"verdict": verdict, "publish": delta >= PUBLISH_FROM_PP}


def metrics_table(cm_by_name: Mapping[str, np.ndarray], class_names=CLASS_NAMES):
    """One row per run/split name, flat columns, for comparing runs side by side."""
    import pandas as pd

    rows = {}
    for name, cm in cm_by_name.items():
        m = metrics_from_confusion(cm, class_names)
        rows[name] = {
            "miou": m["miou"], "pixel_accuracy": m["pixel_accuracy"], "macro_f1": m["macro_f1"],
            **{f"iou_{c}": m["iou"][c] for c in class_names},
            **{f"f1_{c}": m["f1"][c] for c in class_names},
        }
    columns = ["miou", "pixel_accuracy", "macro_f1",
               *(f"iou_{c}" for c in class_names), *(f"f1_{c}" for c in class_names)]
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns).rename_axis("name")
