"""How sure are we that TiM beats its baseline? A paired bootstrap over parent scenes, and two few-cluster checks.

The original study reported +1.3 pp mIoU from one seed on 64 test chips cut
from about four parent scenes. Chips of one parent share its season, light and
land-cover mix, so they are not independent: resampling chips would treat 64
correlated chips as 64 pieces of evidence and give a falsely narrow interval.
Here the unit of resampling is the parent scene. Each replicate draws parents
with replacement, once, and applies that same draw to TiM and baseline and to
every seed (paired), so scene difficulty cancels in the difference, as it does
in the real comparison.

Everything works on ``per_chip.csv`` rows (see :mod:`nycdata.study.evaluate`): per-chip
confusion matrices add up per parent, and a replicate's confusion is just a
weighted sum of parent confusions, so thousands of replicates are one matrix
product and no model is re-run.

mIoU over a fixed class set: the point estimate and every replicate average
IoU over the same classes, those with target pixels in the pooled test set of
the comparison. Otherwise a replicate that happens to draw no parent with
``other`` would average over 4 classes instead of 5 and estimate a different
quantity, which widens or shifts the interval for no reason in the data.

A percentile bootstrap over few clusters is too narrow (4 parents allow at most
35 distinct resamples). Next to it come two analyses made for few clusters,
both on per-parent paired deltas (TiM minus baseline on each parent's own
confusion): a Student-t interval of their mean and a sign-flip permutation
test, whose smallest attainable p-value (2 / 2^P) is reported so a reader sees
that 4 parents can never reach p < 0.05.

Missing values are ``None``, never NaN, so a result in memory and its JSON on
disk (strict JSON has no NaN) are the same thing.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from nycdata.data.classes import CLASS_NAMES, NUM_CLASSES
from nycdata.data.metrics import CM_COLUMNS, gate

# CM_COLUMNS comes from nycdata.data.metrics (row = true class, column = predicted), so
# the statistics need neither torch nor the model stack.

FEW_PARENTS = 10                 # below this many test parents the report warns that the bootstrap is too narrow
SIGN_FLIP_MAX_EXACT = 16         # 2^16 sign patterns enumerate in one small matrix product
SIGN_FLIP_DRAWS = 20_000         # Monte Carlo sign patterns beyond that: p resolution ~1/20000
PUBLISH_RULES = {
    "delta_and_interval": "publish needs Δ ≥ +1 pp (as printed) and both intervals (bootstrap CI and parent "
                          "t-interval) above 0",
    "delta": "publish needs Δ ≥ +1 pp (as printed) alone, the original rule; the intervals are reported, not used",
}


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

    Same definition as :func:`nycdata.data.metrics.metrics_from_confusion`, vectorised
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


def fixed_class_iou(cms: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Per-class IoU (..., 5) over a fixed class set (boolean mask ``classes``); NaN outside the set.

    A class of the set with no target pixels in a matrix has IoU 0. Its true
    positives are 0 there, so IoU is already 0 whenever anything was predicted
    as it; when nothing was either (0 / 0) we also say 0. Both arms of a paired
    replicate then give that class 0, so it adds nothing to the delta while the
    denominator stays the set's size: every replicate computes the same statistic
    as the point estimate (where all classes of the set have support).
    """
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    union = cms.sum(axis=-1) + cms.sum(axis=-2) - tp
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
    return np.where(classes, iou, np.nan)


def fixed_class_miou(cms: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """mIoU (...) of a stack (..., 5, 5): the mean over exactly the classes in ``classes`` (see fixed_class_iou)."""
    return fixed_class_iou(cms, classes)[..., np.asarray(classes, dtype=bool)].mean(axis=-1)


def _stacked(per_chip, tim, baseline, seeds, parents) -> np.ndarray:
    """(2, S, P, 25) parent confusions: [tim, baseline] x seeds x parents, flattened for matmul."""
    return np.stack([np.stack([parent_confusions(per_chip, v, s, parents).reshape(len(parents), -1)
                               for s in seeds]) for v in (tim, baseline)])


def _as_matrices(flat_cms: np.ndarray) -> np.ndarray:
    return flat_cms.reshape(*flat_cms.shape[:-1], NUM_CLASSES, NUM_CLASSES)


def _percentile_ci(replicates: np.ndarray, level: float) -> list[float]:
    """Central percentile interval [lo, hi] of the replicates."""
    alpha = (1 - level) / 2
    return [float(x) for x in np.percentile(replicates, [100 * alpha, 100 * (1 - alpha)])]


def _excludes_zero(interval) -> bool:
    """True when both ends exist and lie on one side of 0; a missing interval excludes nothing."""
    lo, hi = interval if interval is not None else (None, None)
    return lo is not None and hi is not None and (lo > 0 or hi < 0)


def _bootstrap_replicates(stacked, classes, n_boot: int, seed: int) -> np.ndarray:
    """(B,) replicate deltas in pp: parents and seeds resampled, one draw shared by both arms (paired)."""
    n_seeds, n_parents = stacked.shape[1], stacked.shape[2]
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_parents, np.full(n_parents, 1 / n_parents), size=n_boot)       # (B, P)
    miou = fixed_class_miou(_as_matrices(weights @ stacked), classes)                            # (2, S, B)
    seed_deltas = (miou[0] - miou[1]) * 100                                                      # (S, B)
    # Seeds are resampled too (two-level bootstrap): with few seeds, training noise is most of the uncertainty.
    seed_weights = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=n_boot)          # (B, S)
    return (seed_deltas.T * seed_weights).sum(axis=1) / n_seeds


def t_interval(deltas, level: float = 0.95) -> list:
    """Student-t interval [lo, hi] of the mean of ``deltas`` (df = n - 1); [None, None] for fewer than 2 values."""
    d = np.asarray(deltas, dtype=np.float64)
    if d.size < 2:
        return [None, None]
    half = scipy_stats.t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return [float(d.mean() - half), float(d.mean() + half)]


def sign_flip_test(deltas, seed: int = 0, max_exact: int = SIGN_FLIP_MAX_EXACT, n_draws: int = SIGN_FLIP_DRAWS) -> dict:
    """Two-sided paired sign-flip permutation test of mean(deltas) = 0 over P paired units (parents).

    Under no effect each unit's TiM-minus-baseline delta is as likely negative
    as positive, so the statistic |mean(s * d)| over sign patterns s is the null
    distribution. P <= ``max_exact``: all 2^P patterns, p = share at least as
    extreme as the observed one; the observed pattern and its mirror always
    count, so the smallest attainable p is 2 / 2^P. Beyond: ``n_draws`` random
    patterns from a generator seeded with ``seed``, p = (hits + 1) / (n_draws + 1),
    whose smallest attainable value is 1 / (n_draws + 1).
    Returns ``sign_flip_p``, ``sign_flip_method`` ("exact" or "monte_carlo"),
    ``sign_flip_n_patterns`` and ``sign_flip_min_p``; all None without any unit.
    """
    d = np.asarray(deltas, dtype=np.float64)
    if d.size == 0:
        return {"sign_flip_p": None, "sign_flip_method": None, "sign_flip_n_patterns": 0, "sign_flip_min_p": None}
    exact = d.size <= max_exact
    if exact:
        bits = (np.arange(2 ** d.size)[:, None] >> np.arange(d.size)) & 1
        signs = 1.0 - 2.0 * bits                            # row 0 is all +1: the observed pattern
    else:                                                   # observed pattern first, then the random ones
        signs = np.vstack([np.ones(d.size), np.random.default_rng(seed).choice([-1.0, 1.0], size=(n_draws, d.size))])
    means = np.abs(signs @ d) / d.size
    # The mirror pattern equals the observed one only up to rounding: compare with a tolerance so it counts.
    hits = int((means >= means[0] - 1e-9 * np.abs(d).mean()).sum())
    return {"sign_flip_p": hits / len(signs), "sign_flip_method": "exact" if exact else "monte_carlo",
            "sign_flip_n_patterns": len(signs) if exact else n_draws,
            "sign_flip_min_p": (2 if exact else 1) / len(signs)}


def _parent_level(stacked, parents: list[str], level: float, seed: int) -> dict:
    """Per-parent paired deltas (mean over seeds, each parent's own standard mIoU) with their t-interval and sign-flip p."""
    miou = miou_from_confusions(_as_matrices(stacked))                   # (2, S, P), NaN: parent without labelled pixel
    deltas = ((miou[0] - miou[1]) * 100).mean(axis=0)                    # (P,)
    usable = deltas[~np.isnan(deltas)]                                   # a parent with no labelled pixel says nothing
    interval = t_interval(usable, level)
    return {"parent_deltas_pp": {p: None if math.isnan(v) else float(v) for p, v in zip(parents, deltas)},
            "parent_mean_delta_pp": float(usable.mean()) if usable.size else None,
            "parent_t_ci95_pp": interval, "parent_t_excludes_zero": _excludes_zero(interval),
            **sign_flip_test(usable, seed)}


def paired_bootstrap(per_chip: pd.DataFrame, tim: str, baseline: str, n_boot: int = 2000,
                     seed: int = 0, level: float = 0.95) -> dict:
    """TiM-minus-baseline mIoU delta (pp, mean over common seeds), its paired bootstrap CI and few-parent checks.

    The fixed class set (``classes``) is the classes with target pixels in the
    pooled test set of both arms and all common seeds; the point estimate,
    every replicate and ``per_class_delta_iou_pp`` average IoU over exactly that
    set (a set class without support in a draw counts IoU 0 in both arms, see
    :func:`fixed_class_iou`); classes outside it get None per class.

    Bootstrap: parents and seeds resampled, paired (module docstring); fewer than
    two test parents give no interval (``ci95_pp`` [None, None]). Per parent:
    ``parent_deltas_pp`` (mean over seeds of its own mIoU delta), their mean and
    Student-t interval at ``level`` (``parent_t_ci95_pp``) and the sign-flip test
    (:func:`sign_flip_test`). ``few_parents``: fewer than 10 test parents.
    Missing values are None. Deterministic for a given ``seed``.
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
    classes = _as_matrices(stacked).sum(axis=(0, 1, 2)).sum(axis=-1) > 0  # (5,) target pixels in the pooled test set
    if not classes.any():
        raise ValueError(f"{tim!r} vs {baseline!r}: the test chips have no labelled pixel")
    full = _as_matrices(stacked.sum(axis=2))                              # (2, S, 5, 5)
    miou = fixed_class_miou(full, classes)
    per_seed = (miou[0] - miou[1]) * 100                                  # (S,)
    # One parent gives no parent-level spread at all: report no interval rather than a zero-width one.
    ci = _percentile_ci(_bootstrap_replicates(stacked, classes, n_boot, seed), level) if len(parents) > 1 else [None, None]
    iou = fixed_class_iou(full, classes)
    class_delta = ((iou[0] - iou[1]) * 100).mean(axis=0)
    return {
        "delta_miou_pp": float(per_seed.mean()), "ci95_pp": ci, "ci_level": float(level),
        "seed_std_pp": float(np.std(per_seed, ddof=1)) if len(seeds) > 1 else None,
        "n_seeds": len(seeds), "seeds": [int(s) for s in seeds],
        "n_test_chips": int(((per_chip["variant"] == tim) & (per_chip["seed"] == seeds[0])).sum()),
        "n_parents": len(parents), "n_boot": int(n_boot), "ci_excludes_zero": _excludes_zero(ci),
        "ci_resamples": "test parents and seeds" if len(seeds) > 1 else "test parents",
        "classes": [c for c, keep in zip(CLASS_NAMES, classes) if keep],
        "per_class_delta_iou_pp": {c: float(v) if keep else None
                                   for c, v, keep in zip(CLASS_NAMES, class_delta, classes)},
        "few_parents": len(parents) < FEW_PARENTS,
        **_parent_level(stacked, parents, level, seed),
    }


def check_publish_rule(rule: str) -> str:
    """``rule`` if it is a known ``publish_rule``; ValueError naming the parameter and the allowed values otherwise."""
    if rule not in PUBLISH_RULES:
        raise ValueError(f"publish_rule={rule!r} is not allowed: use one of {', '.join(map(repr, PUBLISH_RULES))}")
    return rule


def _above_zero(interval) -> bool:
    return interval is not None and interval[0] is not None and interval[0] > 0


def with_gate(result: dict, rule: str = "delta_and_interval") -> dict:
    """``result`` plus the pre-registered verdict and the publish decision under ``rule`` (a ``publish_rule``).

    The gate sees the delta rounded to 2 decimals, as every report prints it
    (``delta_miou_pp_rounded``): +1.00 pp printed is +1.00 pp decided.
    ``interval_excludes_zero``: the bootstrap CI and the parent t-interval
    both exclude 0 (False when either is missing). ``publish``: rounded delta
    >= +1 pp and, under ``delta_and_interval``, both intervals above 0
    (``intervals_above_zero``; a positive delta whose interval lies below 0
    is no evidence for TiM); under ``delta`` the delta alone (the original rule).
    """
    check_publish_rule(rule)
    rounded = round(float(result["delta_miou_pp"]), 2) + 0.0             # + 0.0: -0.00 prints and decides as +0.00
    decided = gate(rounded)
    intervals = (result.get("ci95_pp"), result.get("parent_t_ci95_pp"))
    above = all(_above_zero(i) for i in intervals)
    return {**result, "delta_miou_pp_rounded": rounded, "verdict": decided["verdict"], "publish_rule": rule,
            "interval_excludes_zero": all(_excludes_zero(i) for i in intervals), "intervals_above_zero": above,
            "publish": decided["publish"] and (rule == "delta" or above)}


# --- shared wording for every place that prints a comparison (summary.md, model card, forest plot)

def no_interval_text(n_parents: int) -> str:
    return f"no interval ({n_parents} test parent{'' if n_parents == 1 else 's'})"


def present_interval(interval) -> tuple[float, float] | None:
    """``(lo, hi)``, or None for a missing interval (None, or NaN in results from older runs)."""
    lo, hi = interval if interval is not None else (None, None)
    return None if lo is None or hi is None or lo != lo or hi != hi else (lo, hi)


def interval_text(interval, n_parents: int) -> str:
    """``[+lo, +hi]`` in pp, or the one phrase for a missing interval."""
    present = present_interval(interval)
    return no_interval_text(n_parents) if present is None else f"[{present[0]:+.2f}, {present[1]:+.2f}]"
