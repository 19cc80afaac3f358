"""Paired parent bootstrap of the TiM-minus-baseline mIoU delta, few-parent checks and the gate, on synthetic tables."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from nycdata.data.classes import CLASS_NAMES, NUM_CLASSES
from nycdata.data.metrics import metrics_from_confusion
from nycdata.study.stats import (
    CM_COLUMNS, fixed_class_iou, fixed_class_miou, iou_from_confusions, miou_from_confusions, paired_bootstrap,
    parent_confusions, sign_flip_test, with_gate,
)

TIM, BASE = "tim_x", "base_x"
BASE_ACC = np.array([0.90, 0.80, 0.70, 0.60, 0.50])


def chip_cm(acc, counts):
    """Integer 5x5 chip matrix: diag = round(acc * n) per true class, the rest spread over the other classes."""
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    for t, n in enumerate(counts):
        hit = int(round(float(np.clip(acc[t], 0.02, 0.99)) * n))
        q, r = divmod(n - hit, NUM_CLASSES - 1)
        others = [c for c in range(NUM_CLASSES) if c != t]
        cm[t, t] = hit
        cm[t, others] = q
        cm[t, others[:r]] += 1
    return cm


def make_per_chip(n_parents=12, chips=6, seeds=(0, 1, 2), effect=0.0, parent_effect_sd=0.0,
                  parent_effects=None, difficulty_sd=0.08, chip_sd=0.02, seed_sd=0.003,
                  absent=(), pixels=1000, rng_seed=0):
    """per_chip rows (chip_id, parent_id, variant, seed, cm_*) for TIM and BASE.

    Baseline per-class accuracy is BASE_ACC + a per-parent difficulty (shared by all
    chips of that parent, so they are correlated) + chip noise; TiM adds a per-parent
    effect (``effect`` + N(0, parent_effect_sd), or ``parent_effects`` verbatim) and a
    small per-seed shift. Classes in ``absent`` have no target pixels.
    """
    rng = np.random.default_rng(rng_seed)
    difficulty = rng.normal(0, difficulty_sd, n_parents)
    if parent_effects is None:
        parent_effects = effect + rng.normal(0, parent_effect_sd, n_parents)
    seed_shift = {s: rng.normal(0, seed_sd) for s in seeds}
    counts = [0 if c in absent else pixels // NUM_CLASSES for c in range(NUM_CLASSES)]
    rows = []
    for p in range(n_parents):
        for k in range(chips):
            acc = BASE_ACC + difficulty[p] + rng.normal(0, chip_sd, NUM_CLASSES)
            for s in seeds:
                for variant, a in ((BASE, acc), (TIM, acc + parent_effects[p] + seed_shift[s])):
                    rows.append([f"p{p:02d}_c{k:02d}", f"p{p:02d}", variant, s, *chip_cm(a, counts).ravel()])
    return pd.DataFrame(rows, columns=["chip_id", "parent_id", "variant", "seed", *CM_COLUMNS])


def summed(per_chip, variant, seed):
    rows = per_chip[(per_chip.variant == variant) & (per_chip.seed == seed)]
    return rows[CM_COLUMNS].to_numpy().sum(0).reshape(NUM_CLASSES, NUM_CLASSES)


def hand_deltas(per_chip, seeds):
    """Per-seed mIoU delta in pp, straight from metrics_from_confusion on summed matrices."""
    return np.array([(metrics_from_confusion(summed(per_chip, TIM, s))["miou"]
                      - metrics_from_confusion(summed(per_chip, BASE, s))["miou"]) * 100 for s in seeds])


# --- miou_from_confusions / parent_confusions ----------------------------------------------------

def test_miou_from_confusions_equals_metrics_on_random_stacks_with_absent_classes():
    rng = np.random.default_rng(1)
    cms = rng.integers(0, 50, size=(300, NUM_CLASSES, NUM_CLASSES))
    absent = rng.random((300, NUM_CLASSES)) < 0.3
    cms[absent] = 0                     # whole true-class rows empty
    cms[:5] = 0                         # some matrices with no support at all -> NaN
    cms[5:10, :, 2] = 0                 # a class never predicted
    got = miou_from_confusions(cms)
    want = np.array([metrics_from_confusion(cm)["miou"] for cm in cms])
    assert got.shape == (300,)
    np.testing.assert_array_equal(got, want)  # NaN == NaN here; same arithmetic, so exact
    assert np.isnan(got[:5]).all() and not np.isnan(got[10:]).any()


def test_miou_from_confusions_keeps_leading_axes_and_iou_matches_per_class():
    rng = np.random.default_rng(2)
    cms = rng.integers(0, 20, size=(3, 4, NUM_CLASSES, NUM_CLASSES))
    cms[1, 2, 3] = 0
    assert miou_from_confusions(cms).shape == (3, 4)
    m = metrics_from_confusion(cms[1, 2])
    np.testing.assert_array_equal(iou_from_confusions(cms)[1, 2], [m["iou"][c] for c in CLASS_NAMES])
    assert math.isnan(iou_from_confusions(cms)[1, 2, 3])


def test_parent_confusions_order_zeros_and_layout():
    per_chip = make_per_chip(n_parents=3, chips=2, seeds=(0,))
    per_chip = per_chip[per_chip.parent_id != "p01"].copy()
    per_chip.loc[0, CM_COLUMNS] = 0
    per_chip.loc[0, "cm_0_1"] = 7      # true water predicted developed
    out = parent_confusions(per_chip, per_chip.loc[0, "variant"], 0, ["p02", "missing", "p00"])
    assert out.shape == (3, NUM_CLASSES, NUM_CLASSES) and out.dtype == np.int64
    assert (out[1] == 0).all()
    rows = per_chip[(per_chip.variant == per_chip.loc[0, "variant"]) & (per_chip.seed == 0)]
    for i, parent in ((0, "p02"), (2, "p00")):
        want = rows[rows.parent_id == parent][CM_COLUMNS].to_numpy().sum(0).reshape(5, 5)
        np.testing.assert_array_equal(out[i], want)
    lone = parent_confusions(per_chip.loc[[0]], per_chip.loc[0, "variant"], 0, ["p00"])
    assert lone[0, 0, 1] == 7 and lone.sum() == 7


def test_parent_confusions_refuses_rows_of_unlisted_parents():
    per_chip = make_per_chip(n_parents=3, chips=2, seeds=(0,))
    with pytest.raises(ValueError, match="p01"):
        parent_confusions(per_chip, TIM, 0, ["p00", "p02"])


# --- paired_bootstrap ----------------------------------------------------------------------------

def test_known_positive_effect_is_covered_and_excludes_zero():
    per_chip = make_per_chip(n_parents=12, effect=0.05, parent_effect_sd=0.01)
    true_delta = hand_deltas(per_chip, (0, 1, 2)).mean()
    assert 3 < true_delta < 9          # the generator really makes a ~+5 pp IoU-scale effect
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=1000, seed=0)
    lo, hi = r["ci95_pp"]
    assert lo <= true_delta <= hi
    assert lo > 0 and r["ci_excludes_zero"] is True
    assert r["delta_miou_pp"] == pytest.approx(true_delta, abs=1e-10)


def test_no_effect_ci_includes_zero():
    signs = np.tile([1.0, -1.0], 6)
    per_chip = make_per_chip(n_parents=12, parent_effects=0.003 * signs, seed_sd=0.0)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=1000, seed=0)
    lo, hi = r["ci95_pp"]
    assert lo < 0 < hi
    assert r["ci_excludes_zero"] is False
    assert abs(r["delta_miou_pp"]) < 0.3


def test_identical_variants_give_a_zero_width_interval_because_draws_are_paired():
    per_chip = make_per_chip(n_parents=6, chips=3, seeds=(0, 1))
    twin = per_chip[per_chip.variant == BASE].assign(variant=TIM)
    per_chip = pd.concat([per_chip[per_chip.variant == BASE], twin], ignore_index=True)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=300, seed=3)
    assert r["delta_miou_pp"] == 0.0 and r["ci95_pp"] == [0.0, 0.0]
    assert r["ci_excludes_zero"] is False and r["seed_std_pp"] == 0.0
    assert set(r["parent_deltas_pp"].values()) == {0.0} and r["parent_t_ci95_pp"] == [0.0, 0.0]
    assert r["parent_t_excludes_zero"] is False and r["sign_flip_p"] == 1.0


def naive_chip_bootstrap(per_chip, seeds, n_boot, rng_seed, level=0.95):
    """What the study should not do: resample chips as if independent (same draw per variant and seed)."""
    chip_ids = sorted(per_chip[per_chip.variant == TIM].chip_id.unique())

    def stack(variant, seed):
        rows = per_chip[(per_chip.variant == variant) & (per_chip.seed == seed)].set_index("chip_id")
        return rows.loc[chip_ids, CM_COLUMNS].to_numpy()

    weights = np.random.default_rng(rng_seed).multinomial(len(chip_ids), np.full(len(chip_ids), 1 / len(chip_ids)),
                                                          size=n_boot)
    deltas = np.zeros(n_boot)
    for s in seeds:
        t, b = weights @ stack(TIM, s), weights @ stack(BASE, s)
        deltas += np.array([metrics_from_confusion(x.reshape(5, 5))["miou"]
                            - metrics_from_confusion(y.reshape(5, 5))["miou"] for x, y in zip(t, b)]) * 100
    deltas /= len(seeds)
    return np.percentile(deltas, [100 * (1 - level) / 2, 100 * (1 + level) / 2])


def test_grouping_by_parent_widens_the_interval_over_a_naive_chip_bootstrap():
    per_chip = make_per_chip(n_parents=8, chips=8, seeds=(0, 1), effect=0.02, parent_effect_sd=0.05, chip_sd=0.01)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=800, seed=0)
    naive_lo, naive_hi = naive_chip_bootstrap(per_chip, (0, 1), n_boot=400, rng_seed=0)
    grouped = r["ci95_pp"][1] - r["ci95_pp"][0]
    naive = naive_hi - naive_lo
    assert grouped > 1.8 * naive, (grouped, naive)


def test_deterministic_for_a_seed_and_varies_with_it():
    per_chip = make_per_chip(n_parents=10, chips=3, effect=0.01, parent_effect_sd=0.02)
    a = paired_bootstrap(per_chip, TIM, BASE, n_boot=500, seed=7)
    b = paired_bootstrap(per_chip, TIM, BASE, n_boot=500, seed=7)
    c = paired_bootstrap(per_chip, TIM, BASE, n_boot=500, seed=8)
    assert a == b
    assert c["delta_miou_pp"] == a["delta_miou_pp"]
    assert c["ci95_pp"][0] != a["ci95_pp"][0] and c["ci95_pp"][1] != a["ci95_pp"][1]


def test_point_estimate_seed_spread_and_bookkeeping_match_a_hand_computation():
    seeds = (0, 1, 2)
    per_chip = make_per_chip(n_parents=5, chips=4, seeds=seeds, effect=0.02, seed_sd=0.01)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=200, seed=0)
    per_seed = hand_deltas(per_chip, seeds)
    assert r["delta_miou_pp"] == pytest.approx(per_seed.mean(), abs=1e-10)
    assert r["seed_std_pp"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-10)
    assert r["seed_std_pp"] > 0.1      # the per-seed shifts really show
    for c in CLASS_NAMES:
        want = np.mean([(metrics_from_confusion(summed(per_chip, TIM, s))["iou"][c]
                         - metrics_from_confusion(summed(per_chip, BASE, s))["iou"][c]) * 100 for s in seeds])
        assert r["per_class_delta_iou_pp"][c] == pytest.approx(want, abs=1e-10)
    assert r["seeds"] == [0, 1, 2] and r["n_seeds"] == 3
    assert r["n_test_chips"] == 20 and r["n_parents"] == 5 and r["n_boot"] == 200 and r["ci_level"] == 0.95
    assert all(type(v) in (float, int, bool, list, dict, str) for v in r.values())
    assert r["ci_resamples"] == "test parents and seeds"
    assert r["classes"] == list(CLASS_NAMES) and r["few_parents"] is True
    json.dumps(r, allow_nan=False)


def test_one_test_parent_gives_no_interval_instead_of_a_zero_width_one():
    per_chip = make_per_chip(n_parents=1, chips=4, seeds=(0, 1), effect=0.05)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=200, seed=0)
    assert r["ci95_pp"] == [None, None] and r["ci_excludes_zero"] is False and r["n_parents"] == 1
    assert r["parent_t_ci95_pp"] == [None, None] and r["parent_t_excludes_zero"] is False
    assert r["parent_mean_delta_pp"] == pytest.approx(r["parent_deltas_pp"]["p00"]) and r["parent_mean_delta_pp"] > 2
    assert r["sign_flip_p"] == 1.0 and r["sign_flip_min_p"] == 1.0 and r["few_parents"] is True
    json.dumps(r, allow_nan=False)      # None, not NaN: what is in memory is what strict JSON on disk holds
    gated = with_gate(r)
    assert gated["interval_excludes_zero"] is False and gated["publish"] is False
    assert with_gate(r, rule="delta")["publish"] is True


def test_seed_noise_widens_the_interval():
    calm = paired_bootstrap(make_per_chip(n_parents=8, chips=4, seeds=(0, 1, 2), effect=0.02, seed_sd=0.0), TIM, BASE,
                            n_boot=1000, seed=0)
    noisy = paired_bootstrap(make_per_chip(n_parents=8, chips=4, seeds=(0, 1, 2), effect=0.02, seed_sd=0.05), TIM, BASE,
                             n_boot=1000, seed=0)
    width = lambda r: r["ci95_pp"][1] - r["ci95_pp"][0]  # noqa: E731
    assert width(noisy) > 1.5 * width(calm)


def test_single_seed_has_no_spread():
    per_chip = make_per_chip(n_parents=4, chips=3, seeds=(5,), effect=0.02)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=200)
    assert r["n_seeds"] == 1 and r["seeds"] == [5]
    assert r["seed_std_pp"] is None and r["ci_resamples"] == "test parents"
    json.dumps(r, allow_nan=False)
    assert r["delta_miou_pp"] == pytest.approx(hand_deltas(per_chip, (5,))[0], abs=1e-10)


def test_only_common_seeds_count():
    per_chip = make_per_chip(n_parents=4, chips=3, seeds=(0, 1, 2), effect=0.02, seed_sd=0.01)
    per_chip = per_chip[~((per_chip.variant == BASE) & (per_chip.seed == 2))]
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=100)
    assert r["seeds"] == [0, 1]
    assert r["delta_miou_pp"] == pytest.approx(hand_deltas(per_chip, (0, 1)).mean(), abs=1e-10)


def test_absent_class_is_outside_the_class_set_none_per_class_and_skipped_in_miou():
    per_chip = make_per_chip(n_parents=4, chips=3, seeds=(0, 1), effect=0.03, absent=(0,))
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=200)
    assert r["classes"] == list(CLASS_NAMES[1:])
    assert r["per_class_delta_iou_pp"]["water"] is None
    assert all(type(r["per_class_delta_iou_pp"][c]) is float for c in CLASS_NAMES[1:])
    assert r["delta_miou_pp"] == pytest.approx(hand_deltas(per_chip, (0, 1)).mean(), abs=1e-10)
    assert not any(math.isnan(x) for x in r["ci95_pp"])


def test_level_sets_the_interval_width():
    per_chip = make_per_chip(n_parents=8, chips=3, effect=0.02, parent_effect_sd=0.02)
    wide = paired_bootstrap(per_chip, TIM, BASE, n_boot=500, level=0.95)
    narrow = paired_bootstrap(per_chip, TIM, BASE, n_boot=500, level=0.5)
    assert narrow["ci_level"] == 0.5
    assert wide["ci95_pp"][0] < narrow["ci95_pp"][0] < narrow["ci95_pp"][1] < wide["ci95_pp"][1]
    with pytest.raises(ValueError):
        paired_bootstrap(per_chip, TIM, BASE, level=1.0)


def test_no_common_seed_names_both_variants():
    per_chip = make_per_chip(n_parents=3, chips=2, seeds=(0, 1))
    per_chip = per_chip[((per_chip.variant == TIM) & (per_chip.seed == 0))
                        | ((per_chip.variant == BASE) & (per_chip.seed == 1))]
    with pytest.raises(ValueError) as err:
        paired_bootstrap(per_chip, TIM, BASE, n_boot=10)
    assert TIM in str(err.value) and BASE in str(err.value)
    with pytest.raises(ValueError, match="nope"):
        paired_bootstrap(per_chip, "nope", BASE, n_boot=10)


def test_mismatched_chip_sets_raise():
    per_chip = make_per_chip(n_parents=3, chips=2, seeds=(0,))
    dropped = per_chip.drop(index=per_chip[per_chip.variant == BASE].index[0])
    with pytest.raises(ValueError, match="different chip sets"):
        paired_bootstrap(dropped, TIM, BASE, n_boot=10)
    renamed = per_chip.copy()
    renamed.loc[renamed[renamed.variant == BASE].index[0], "chip_id"] = "elsewhere"
    with pytest.raises(ValueError, match="different chip sets"):
        paired_bootstrap(renamed, TIM, BASE, n_boot=10)


def test_missing_parent_id_raises():
    per_chip = make_per_chip(n_parents=3, chips=2, seeds=(0,))
    per_chip.loc[per_chip[per_chip.variant == TIM].index[0], "parent_id"] = None
    with pytest.raises(ValueError, match="parent_id"):
        paired_bootstrap(per_chip, TIM, BASE, n_boot=10)


def test_a_fold_column_is_ignored():
    per_chip = make_per_chip(n_parents=4, chips=3, seeds=(0, 1), effect=0.02)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=200, seed=1)
    with_fold = per_chip.assign(fold=per_chip.parent_id.str[-1].astype(int) % 2)
    folded = paired_bootstrap(with_fold, TIM, BASE, n_boot=200, seed=1)
    assert folded == r


# --- fixed class set -----------------------------------------------------------------------------

def test_fixed_class_miou_keeps_the_denominator_when_a_class_has_no_support():
    cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    cm[0, 0], cm[1, 1], cm[1, 0] = 6, 3, 1     # water IoU 6/7, developed 3/4
    cm[2, 2], cm[3, 3] = 5, 5                  # trees, herbaceous IoU 1
    every = np.ones(NUM_CLASSES, dtype=bool)
    # 'other' has no target pixel: IoU 0, whether nothing (0/0) or something (0/n) was predicted as it
    assert fixed_class_miou(cm, every) == pytest.approx((6 / 7 + 3 / 4 + 1 + 1 + 0) / 5)
    cm[2, 4] = 2                               # 2 trees pixels predicted 'other'
    iou = fixed_class_iou(cm, every)
    assert iou[4] == 0.0 and iou[2] == pytest.approx(5 / 7)
    assert fixed_class_miou(cm, every) == pytest.approx((6 / 7 + 3 / 4 + 5 / 7 + 1 + 0) / 5)
    # classes outside the set are NaN per class and not averaged
    without_other = np.array([True, True, True, True, False])
    assert math.isnan(fixed_class_iou(cm, without_other)[4])
    assert fixed_class_miou(cm, without_other) == pytest.approx((6 / 7 + 3 / 4 + 5 / 7 + 1) / 4)
    # with support for every class of the set it is the ordinary mIoU
    cm[4, 4] = 9
    assert fixed_class_miou(cm, every) == pytest.approx(metrics_from_confusion(cm)["miou"], abs=1e-15)


def two_parent_table():
    """Parent A: water only, both arms right. Parent B: 'other' only, TiM right, baseline calls it water."""
    rows = []
    for variant, b_pred in ((TIM, 4), (BASE, 0)):
        for parent, true, pred in (("A", 0, 0), ("B", 4, b_pred)):
            cm = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
            cm[true, pred] = 100
            rows.append([f"{parent}_c0", parent, variant, 0, *cm.ravel()])
    return pd.DataFrame(rows, columns=["chip_id", "parent_id", "variant", "seed", *CM_COLUMNS])


def test_replicates_average_over_the_fixed_class_set():
    """Pooled: TiM water 1, other 1; baseline water 100/200, other 0 -> delta (1 - 0.25) = +75 pp.

    Replicates (multinomial(2, 1/2): AA 1/4, AB 1/2, BB 1/4):
    AA: both arms water 1, other 0 (no support) -> (1+0)/2 - (1+0)/2 = 0
    AB: the pooled data -> +75
    BB: TiM other 1, water 0 (no support) -> 1/2; baseline other 0, water 0 (200 predicted, none true) -> 0: +50.
    Skipping classes a draw lacks would make BB 1 - 0 = +100 and the upper bound 100.
    """
    r = paired_bootstrap(two_parent_table(), TIM, BASE, n_boot=400, seed=0)
    assert r["classes"] == ["water", "other"]
    assert r["delta_miou_pp"] == pytest.approx(75.0)
    assert r["ci95_pp"] == [pytest.approx(0.0), pytest.approx(75.0)]
    assert r["per_class_delta_iou_pp"] == {"water": pytest.approx(50.0), "developed": None, "trees": None,
                                           "herbaceous": None, "other": pytest.approx(100.0)}
    # per parent: each parent's own classes (standard mIoU): A 1 - 1 = 0, B 1 - 0 = +100
    assert r["parent_deltas_pp"] == {"A": pytest.approx(0.0), "B": pytest.approx(100.0)}
    assert r["parent_mean_delta_pp"] == pytest.approx(50.0)
    assert r["sign_flip_p"] == 1.0 and r["sign_flip_min_p"] == 0.5 and r["sign_flip_method"] == "exact"


# --- per-parent deltas, t-interval, sign-flip ----------------------------------------------------

T_975_DF3 = 3.182446305284263       # Student t quantile 0.975 with 3 degrees of freedom (tables)


def test_parent_deltas_and_t_interval_match_a_hand_computation():
    seeds = (0, 1)
    per_chip = make_per_chip(n_parents=4, chips=3, seeds=seeds, effect=0.02, parent_effect_sd=0.03, seed_sd=0.01)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=200, seed=0)
    want = {}
    for parent in ("p00", "p01", "p02", "p03"):
        part = per_chip[per_chip.parent_id == parent]
        want[parent] = np.mean([(metrics_from_confusion(summed(part, TIM, s))["miou"]
                                 - metrics_from_confusion(summed(part, BASE, s))["miou"]) * 100 for s in seeds])
    assert r["parent_deltas_pp"] == pytest.approx(want, abs=1e-10)
    d = np.array(list(want.values()))
    mean, se = d.mean(), d.std(ddof=1) / 2          # sqrt(4) = 2
    assert r["parent_mean_delta_pp"] == pytest.approx(mean, abs=1e-10)
    assert r["parent_t_ci95_pp"] == pytest.approx([mean - T_975_DF3 * se, mean + T_975_DF3 * se], abs=1e-9)
    assert mean - T_975_DF3 * se < 0 < mean + T_975_DF3 * se and r["parent_t_excludes_zero"] is False
    assert r["delta_miou_pp"] > 2 and r["ci_excludes_zero"] is True   # where the 4-parent bootstrap claims more
    # 4 parents: 16 sign patterns, p can never fall below 2/16
    assert r["sign_flip_method"] == "exact" and r["sign_flip_n_patterns"] == 16
    assert r["sign_flip_min_p"] == 0.125 and r["sign_flip_p"] >= 0.125 and r["few_parents"] is True


def test_sign_flip_exact_on_hand_computable_cases():
    assert sign_flip_test([1.0, 2.0, 3.0]) == {"sign_flip_p": 0.25, "sign_flip_method": "exact",
                                               "sign_flip_n_patterns": 8, "sign_flip_min_p": 0.25}
    # |±1 ±2 ±3 ±4| >= |1 - 2 + 3 + 4| = 6 for 6 of the 16 patterns (sums 10, 8, 6 and their mirrors)
    assert sign_flip_test([1.0, -2.0, 3.0, 4.0])["sign_flip_p"] == 0.375
    assert sign_flip_test([-1.0, -2.0, -3.0])["sign_flip_p"] == 0.25        # two-sided
    assert sign_flip_test([0.0, 0.0])["sign_flip_p"] == 1.0
    assert sign_flip_test([0.1, 0.2, 0.3])["sign_flip_p"] == 0.25           # mirror counts despite rounding
    assert sign_flip_test(np.ones(16))["sign_flip_method"] == "exact"


def test_sign_flip_monte_carlo_beyond_16_parents_agrees_with_full_enumeration():
    d = np.random.default_rng(4).normal(0.3, 1.0, 17)
    r = sign_flip_test(d, seed=0)
    assert r["sign_flip_method"] == "monte_carlo" and r["sign_flip_n_patterns"] >= 20000
    assert r["sign_flip_min_p"] == pytest.approx(1 / (r["sign_flip_n_patterns"] + 1))
    bits = (np.arange(2 ** 17)[:, None] >> np.arange(17)) & 1
    exact = float((np.abs((1 - 2.0 * bits) @ d) >= abs(d.sum()) - 1e-9).mean())
    assert 0.02 < exact < 0.98         # a case where Monte Carlo error is visible, not a p pinned at 0 or 1
    assert r["sign_flip_p"] == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20000))
    assert sign_flip_test(d, seed=0) == r                                    # fixed-seed generator
    assert sign_flip_test(d, seed=1)["sign_flip_p"] != r["sign_flip_p"]


def test_seventeen_parents_switch_paired_bootstrap_to_monte_carlo_and_drop_the_few_parents_flag():
    r = paired_bootstrap(make_per_chip(n_parents=17, chips=1, seeds=(0,), effect=0.01, parent_effect_sd=0.02),
                         TIM, BASE, n_boot=100)
    assert r["sign_flip_method"] == "monte_carlo" and r["few_parents"] is False and len(r["parent_deltas_pp"]) == 17


# --- with_gate -----------------------------------------------------------------------------------

BOTH_ABOVE = {"ci95_pp": [0.2, 1.8], "ci_excludes_zero": True,
              "parent_t_ci95_pp": [0.1, 2.0], "parent_t_excludes_zero": True}


@pytest.mark.parametrize("delta, verdict, publish", [
    (0.0, "acceptable", False), (0.99, "acceptable", False), (1.0, "acceptable", True),
    (2.0, "acceptable", True), (2.5, "strong", True), (-0.1, "negative", False),
    (0.994, "acceptable", False), (0.996, "acceptable", True), (2.004, "acceptable", True), (-0.004, "acceptable", False),
])
def test_with_gate_boundaries_on_the_printed_delta(delta, verdict, publish):
    result = {"delta_miou_pp": delta, **BOTH_ABOVE}
    gated = with_gate(result)
    assert gated["verdict"] == verdict and gated["publish"] is publish
    assert gated["delta_miou_pp_rounded"] == float(f"{delta:.2f}") and gated["interval_excludes_zero"] is True
    assert gated["ci95_pp"] == [0.2, 1.8] and gated["publish_rule"] == "delta_and_interval"
    assert "verdict" not in result      # the input is left alone


def test_a_delta_printed_as_plus_one_publishes():
    delta = (0.57 - 0.56) * 100         # 0.9999999999999898, printed +1.00
    assert delta < 1 and f"{delta:+.2f}" == "+1.00"
    assert with_gate({"delta_miou_pp": delta, **BOTH_ABOVE})["publish"] is True
    assert with_gate({"delta_miou_pp": delta, **BOTH_ABOVE}, rule="delta")["publish"] is True
    assert with_gate({"delta_miou_pp": -0.001, **BOTH_ABOVE})["delta_miou_pp_rounded"] == 0.0
    assert str(with_gate({"delta_miou_pp": -0.001, **BOTH_ABOVE})["delta_miou_pp_rounded"]) == "0.0"   # not -0.0


@pytest.mark.parametrize("ci, parent_t, excludes, publish_both, publish_delta", [
    ([0.2, 1.8], [0.1, 2.0], True, True, True),
    ([-0.2, 1.8], [0.1, 2.0], False, False, True),
    ([0.2, 1.8], [-0.1, 2.0], False, False, True),
    ([0.2, 1.8], [None, None], False, False, True),
    ([None, None], [None, None], False, False, True),
    ([0.2, 1.8], [-3.0, -0.1], True, False, True),   # excludes 0, but on the wrong side: no evidence for TiM
])
def test_publish_needs_both_intervals_above_zero_unless_rule_is_delta(ci, parent_t, excludes, publish_both, publish_delta):
    result = {"delta_miou_pp": (0.57 - 0.56) * 100, "ci95_pp": ci, "parent_t_ci95_pp": parent_t}
    both, delta_only = with_gate(result), with_gate(result, rule="delta")
    assert both["interval_excludes_zero"] is excludes and delta_only["interval_excludes_zero"] is excludes
    assert both["publish"] is publish_both and delta_only["publish"] is publish_delta
    assert both["verdict"] == delta_only["verdict"] == "acceptable" and delta_only["publish_rule"] == "delta"


def test_unknown_publish_rule_names_the_parameter_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"publish_rule.*'delta_and_interval', 'delta'"):
        with_gate({"delta_miou_pp": 1.5, **BOTH_ABOVE}, rule="delta_or_interval")


def test_nyc_params_default_to_the_interval_rule():
    from nycdata.params import load_params

    assert load_params()["publish_rule"] == "delta_and_interval"


def test_with_gate_on_a_real_result():
    per_chip = make_per_chip(n_parents=6, chips=3, effect=0.05)
    gated = with_gate(paired_bootstrap(per_chip, TIM, BASE, n_boot=200))
    assert gated["delta_miou_pp"] > 2 and gated["verdict"] == "strong"
    assert gated["interval_excludes_zero"] is True and gated["publish"] is True
    json.dumps(gated, allow_nan=False)


# --- how a comparison is printed: one phrase for a missing interval everywhere ----------------------

def _comparison(n_parents, **extra):
    per_chip = make_per_chip(n_parents=n_parents, chips=2, seeds=(0,), effect=0.05, parent_effect_sd=0.01)
    gated = with_gate(paired_bootstrap(per_chip, TIM, BASE, n_boot=100), **extra)
    return {f"{TIM}_vs_{BASE}": {"tim": TIM, "baseline": BASE, "tim_miou": 0.5, "baseline_miou": 0.45,
                                 "per_fold_delta_pp": [1.0], **gated}}


def test_markdown_comparison_prints_missing_intervals_in_one_phrase_and_warns_about_few_parents():
    from nycdata.study.report import few_parents_note, markdown_comparison, publish_rule_text

    one = _comparison(1)
    table = markdown_comparison(one)
    assert table.count("no interval (1 test parent)") == 2 and "nan" not in table.lower()
    row = table.splitlines()[2].split(" | ")
    assert row[3] == f"{one[f'{TIM}_vs_{BASE}']['delta_miou_pp']:+.2f}" and row[7:] == ["no", "strong", "no |"]
    assert "Fewer than 10 test parents (1) carry these intervals" in few_parents_note(one)
    four = _comparison(4)
    assert "| 0.125 (min 0.125) |" in markdown_comparison(four)
    assert "smallest attainable p = 0.125" in few_parents_note(four)
    assert few_parents_note(_comparison(10)) is None
    assert "`delta`" in publish_rule_text(_comparison(4, rule="delta"), {})
    with pytest.raises(ValueError, match="publish_rule"):
        publish_rule_text({}, {"publish_rule": "maybe"})


def test_notebook_comparison_table_prints_intervals_as_the_reports_do():
    from nycdata.study.report import COMPARISON_COLUMNS, comparison_frame

    one, four = _comparison(1), _comparison(4)
    frame = comparison_frame({**one, "four": {**next(iter(four.values()))}})
    assert list(frame.columns) == COMPARISON_COLUMNS
    assert list(frame.iloc[0][["ci95_pp", "parent_t_ci95_pp"]]) == ["no interval (1 test parent)"] * 2
    assert frame.iloc[1]["ci95_pp"].startswith("[") and "nan" not in frame[["ci95_pp", "parent_t_ci95_pp"]].to_string()


def test_model_card_verdict_and_forest_handle_missing_intervals():
    import matplotlib

    matplotlib.use("Agg")
    from nycdata.study import plots
    from nycdata.study.supplement import _verdict_text

    (name, c), = _comparison(1).items()
    c = json.loads(json.dumps(c))       # as read back from comparison.json
    text = _verdict_text(name, c)
    assert text.count("no interval (1 test parent)") == 2 and "nan" not in text.lower()
    fig = plots.forest({name: c, "other": {**c, "ci95_pp": [-1.0, 3.0], "parent_t_ci95_pp": [-2.0, 4.0]}})
    ax = fig.axes[0]
    assert sum(t.get_text() == "no interval (1 test parent)" for t in ax.texts) == 2
    fig.canvas.draw()
    box = ax.title.get_window_extent()
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height   # the title fits the figure
