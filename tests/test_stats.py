"""Parent-level paired bootstrap of the TiM-minus-baseline mIoU delta, on synthetic per_chip tables."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from nycdata.classes import CLASS_NAMES, NUM_CLASSES
from nycdata.metrics import metrics_from_confusion
from nycdata.stats import (
    CM_COLUMNS, iou_from_confusions, miou_from_confusions, paired_bootstrap, parent_confusions, with_gate,
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
    json.dumps(r)


def test_one_test_parent_gives_no_interval_instead_of_a_zero_width_one():
    per_chip = make_per_chip(n_parents=1, chips=4, seeds=(0, 1), effect=0.05)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=200, seed=0)
    assert all(math.isnan(v) for v in r["ci95_pp"]) and r["ci_excludes_zero"] is False and r["n_parents"] == 1


def test_seed_noise_widens_the_interval():
    calm = paired_bootstrap(make_per_chip(n_parents=8, chips=4, seeds=(0, 1, 2), effect=0.02, seed_sd=0.0), TIM, BASE,
                            n_boot=1000, seed=0)
    noisy = paired_bootstrap(make_per_chip(n_parents=8, chips=4, seeds=(0, 1, 2), effect=0.02, seed_sd=0.05), TIM, BASE,
                             n_boot=1000, seed=0)
    width = lambda r: r["ci95_pp"][1] - r["ci95_pp"][0]  # noqa: E731
    assert width(noisy) > 1.5 * width(calm)


def test_single_seed_has_nan_spread():
    per_chip = make_per_chip(n_parents=4, chips=3, seeds=(5,), effect=0.02)
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=200)
    assert r["n_seeds"] == 1 and r["seeds"] == [5]
    assert math.isnan(r["seed_std_pp"])
    assert r["delta_miou_pp"] == pytest.approx(hand_deltas(per_chip, (5,))[0], abs=1e-10)


def test_only_common_seeds_count():
    per_chip = make_per_chip(n_parents=4, chips=3, seeds=(0, 1, 2), effect=0.02, seed_sd=0.01)
    per_chip = per_chip[~((per_chip.variant == BASE) & (per_chip.seed == 2))]
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=100)
    assert r["seeds"] == [0, 1]
    assert r["delta_miou_pp"] == pytest.approx(hand_deltas(per_chip, (0, 1)).mean(), abs=1e-10)


def test_absent_class_is_nan_per_class_and_skipped_in_miou():
    per_chip = make_per_chip(n_parents=4, chips=3, seeds=(0, 1), effect=0.03, absent=(0,))
    r = paired_bootstrap(per_chip, TIM, BASE, n_boot=200)
    assert math.isnan(r["per_class_delta_iou_pp"]["water"])
    assert not any(math.isnan(r["per_class_delta_iou_pp"][c]) for c in CLASS_NAMES[1:])
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


# --- with_gate -----------------------------------------------------------------------------------

@pytest.mark.parametrize("delta, verdict, publish", [
    (0.0, "acceptable", False), (0.99, "acceptable", False), (1.0, "acceptable", True),
    (2.0, "acceptable", True), (2.5, "strong", True), (-0.1, "negative", False),
])
def test_with_gate_boundaries(delta, verdict, publish):
    result = {"delta_miou_pp": delta, "ci95_pp": [-1.0, 3.0], "ci_excludes_zero": False}
    gated = with_gate(result)
    assert gated["verdict"] == verdict and gated["publish"] is publish
    assert gated["ci95_pp"] == [-1.0, 3.0] and gated["ci_excludes_zero"] is False
    assert "verdict" not in result      # the input is left alone


def test_with_gate_on_a_real_result():
    per_chip = make_per_chip(n_parents=6, chips=3, effect=0.05)
    gated = with_gate(paired_bootstrap(per_chip, TIM, BASE, n_boot=200))
    assert gated["delta_miou_pp"] > 2 and gated["verdict"] == "strong" and gated["publish"] is True
