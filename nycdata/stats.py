"""How sure are we that TiM beats its baseline? A paired bootstrap over parent scenes.

The original study reported +1.3 pp mIoU from one seed on 64 test chips cut
from about four parent scenes. Chips of one parent share its season, light and
land-cover mix, so they are not independent: resampling chips would treat 64
correlated chips as 64 pieces of evidence and give a falsely narrow interval.
Here the unit of resampling is the parent scene. Each replicate draws parents
with replacement, once, and applies that same draw to TiM and baseline and to
every seed (paired), so scene difficulty cancels in the difference, as it does
in the real comparison.

Everything works on ``per_chip.csv`` rows (see :mod:`nycdata.evaluate`): per-chip
confusion matrices add up per parent, and a replicate's confusion is just a
weighted sum of parent confusions, so thousands of replicates are one matrix
product and no model is re-run.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from nycdata.classes import CLASS_NAMES, NUM_CLASSES
from nycdata.metrics import CM_COLUMNS, gate

# Same layout as nycdata.evaluate.CM_COLUMNS (row = true class, column = predicted);
# repeated here so the statistics need neither torch nor the model stack.


def parent_confusions(per_chip: pd.DataFrame, variant: str, seed: int, parents: list[str]) -> np.ndarray:
    """(P, 5, 5) summed confusion per parent, in ``parents`` order; a parent without rows gets zeros.

    Parents are the bootstrap's units, so their order must be the caller's (the
    same for both variants). A row whose parent is not listed would silently
    drop out of every total, so it raises ValueError instead.
    """
    rows = per_chip[(per_chip["variant"] == variant) & (per_chip["seed"] == seed)]
    keys, wanted = rows["parent_id"].astype(str), [str(p) for p in parents]
    unknown = sorted(set(keys) - set(wanted))
    if rows["parent_id"].isna().any() or unknown:
        raise ValueError(f"{variant}/seed{seed}: rows with parent_id outside the given parents: {unknown or 'NaN'}")
    sums = rows[CM_COLUMNS].groupby(keys).sum().reindex(wanted, fill_value=0)
    return sums.to_numpy(dtype=np.int64).reshape(len(parents), NUM_CLASSES, NUM_CLASSES)


def iou_from_confusions(cms: np.ndarray) -> np.ndarray:
    """Per-class IoU (..., 5) of a stack of matrices; NaN where a class has no target pixels.

    Same definition as :func:`nycdata.metrics.metrics_from_confusion`, vectorised
    so a bootstrap's thousands of replicates need no Python loop.
    """
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    support, predicted = cms.sum(axis=-1), cms.sum(axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(support > 0, tp / (support + predicted - tp), np.nan)


def miou_from_confusions(cms: np.ndarray) -> np.ndarray:
    """mIoU (...) of a stack (..., 5, 5): mean IoU over classes with support, NaN if none.

    Equals ``metrics_from_confusion(cm)["miou"]`` matrix by matrix (absent classes
    are skipped, not counted as 0), so bootstrap replicates score like real runs.
    """
    iou = iou_from_confusions(cms)
    present = ~np.isnan(iou)
    count = present.sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, np.where(present, iou, 0.0).sum(axis=-1) / count, np.nan)


def _common_seeds(per_chip: pd.DataFrame, tim: str, baseline: str) -> list[int]:
    """Seeds both variants ran: a delta is only paired within one seed."""
    seeds_of = {v: set(per_chip.loc[per_chip["variant"] == v, "seed"].astype(int)) for v in (tim, baseline)}
    seeds = sorted(seeds_of[tim] & seeds_of[baseline])
    if not seeds:
        raise ValueError(f"no seed was tested for both {tim!r} (seeds {sorted(seeds_of[tim])}) "
                         f"and {baseline!r} (seeds {sorted(seeds_of[baseline])})")
    return seeds


def _check_same_chips(per_chip: pd.DataFrame, tim: str, baseline: str, seeds: list[int]) -> None:
    """A paired delta means nothing if the two variants were scored on different chips."""
    for seed in seeds:
        chips = [sorted(per_chip.loc[(per_chip["variant"] == v) & (per_chip["seed"] == seed), "chip_id"].astype(str))
                 for v in (tim, baseline)]
        if chips[0] != chips[1]:
            only = sorted(set(chips[0]) ^ set(chips[1]))[:5]
            raise ValueError(f"seed {seed}: {tim!r} and {baseline!r} were tested on different chip sets "
                             f"({len(chips[0])} vs {len(chips[1])} chips; e.g. differing: {only})")


def _stacked(per_chip, tim, baseline, seeds, parents) -> np.ndarray:
    """(2, S, P, 25) parent confusions: [tim, baseline] x seeds x parents, flattened for matmul."""
    return np.stack([np.stack([parent_confusions(per_chip, v, s, parents).reshape(len(parents), -1)
                               for s in seeds]) for v in (tim, baseline)])


def _seed_deltas_pp(flat_cms: np.ndarray) -> np.ndarray:
    """Per seed mIoU(tim) - mIoU(baseline), in pp, from (2, S, ..., 25) matrices -> (S, ...)."""
    miou = miou_from_confusions(flat_cms.reshape(*flat_cms.shape[:-1], NUM_CLASSES, NUM_CLASSES))
    return (miou[0] - miou[1]) * 100


def _percentile_ci(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """Central percentile interval, skipping NaN replicates (draws with no labelled pixel); NaNs if none left."""
    ok = replicates[~np.isnan(replicates)]
    if not ok.size:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.percentile(ok, [100 * alpha, 100 * (1 - alpha)])
    return float(lo), float(hi)


def paired_bootstrap(per_chip: pd.DataFrame, tim: str, baseline: str, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """TiM-minus-baseline mIoU delta (pp, mean over common seeds) with a paired two-level bootstrap CI.

    Parents, not chips, are resampled (see the module docstring), and so are the
    seeds; fewer than two test parents give no interval (NaN). The point
    estimate uses all the data; the percentile interval skips NaN replicates
    (a draw with no labelled pixel at all). Deterministic for a given ``seed``.
    """
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got n_boot={n_boot}, level={level}")
    seeds = _common_seeds(per_chip, tim, baseline)
    _check_same_chips(per_chip, tim, baseline, seeds)
    tim_rows = per_chip[per_chip["variant"] == tim]
    if tim_rows["parent_id"].isna().any():
        raise ValueError(f"{tim!r} has chips without parent_id: cannot resample parents")
    parents = sorted(tim_rows["parent_id"].astype(str).unique())
    stacked = _stacked(per_chip, tim, baseline, seeds, parents)           # (2, S, P, 25)
    full = stacked.sum(axis=2)                                            # (2, S, 25)
    miou = miou_from_confusions(full.reshape(2, len(seeds), NUM_CLASSES, NUM_CLASSES))
    per_seed = (miou[0] - miou[1]) * 100                                  # (S,)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(parents), np.full(len(parents), 1 / len(parents)), size=n_boot)  # (B, P), paired
    seed_deltas = _seed_deltas_pp(weights @ stacked)                      # (2, S, B, 25) -> (S, B)
    # Seeds are resampled too (two-level bootstrap): with few seeds, training noise is most of the uncertainty.
    seed_weights = rng.multinomial(len(seeds), np.full(len(seeds), 1 / len(seeds)), size=n_boot)  # (B, S)
    replicates = (seed_deltas.T * seed_weights).sum(axis=1) / len(seeds)
    # One parent gives no parent-level spread at all: report no interval rather than a zero-width one.
    lo, hi = _percentile_ci(replicates, level) if len(parents) > 1 else (math.nan, math.nan)
    iou = iou_from_confusions(full.reshape(2, len(seeds), NUM_CLASSES, NUM_CLASSES))
    class_delta = ((iou[0] - iou[1]) * 100).mean(axis=0)
    return {
        "delta_miou_pp": float(per_seed.mean()), "ci95_pp": [float(lo), float(hi)], "ci_level": float(level),
        "seed_std_pp": float(np.std(per_seed, ddof=1)) if len(seeds) > 1 else float("nan"),
        "n_seeds": len(seeds), "seeds": [int(s) for s in seeds],
        "n_test_chips": int(((per_chip["variant"] == tim) & (per_chip["seed"] == seeds[0])).sum()),
        "n_parents": len(parents), "n_boot": int(n_boot), "ci_excludes_zero": bool(lo > 0 or hi < 0),
        "ci_resamples": "test parents and seeds" if len(seeds) > 1 else "test parents",
        "per_class_delta_iou_pp": {c: float(v) for c, v in zip(CLASS_NAMES, class_delta)},
    }


def with_gate(result: dict) -> dict:
    """``result`` plus the pre-registered ``verdict``/``publish`` for its mean delta.

    The gate sees the point delta unchanged (it was fixed before any CI existed);
    ``ci_excludes_zero`` sits beside it so a reader sees both.
    """
    return {**result, **gate(result["delta_miou_pp"])}
