"""The bench's arithmetic, without running a model: ratios over interleaved rounds, the floors, the projections, the
out-of-memory message and the `bench` command's plumbing. (tests/test_gpu_check.py runs the real thing once.)"""

import json

import pytest
import torch

from nycdata.__main__ import main
from nycdata.data import chips
from nycdata.data.fixture import FixtureConfig, make_fixture
from nycdata.params import PARAMS_DIR, load_params
from nycdata.runs import RunLayout
from nycdata.study import bench
from nycdata.study.bench import (VARIANTS, cached_floor, encoder_cost, expected_split_counts, generator_cost,
                                 layer_cost, online_floor, out_of_memory_guard, project_study, ratio_summary, rotation)
from nycdata.study.gpu_check import project_disk


def test_rounds_rotate_the_order_of_the_variants():
    assert rotation(0) == list(VARIANTS) == rotation(3)
    assert rotation(1) == ["tim", "tim_cached", "baseline"] and rotation(2) == ["tim_cached", "baseline", "tim"]


def test_ratio_summary_takes_the_median_of_per_round_ratios_and_judges_the_spread():
    wide = ratio_summary([2.0, 3.0, 2.2], [1.0, 2.0, 2.0])  # per round 2.0, 1.5, 1.1
    assert wide["per_round"] == pytest.approx([2.0, 1.5, 1.1])
    assert (wide["median"], wide["min"], wide["max"]) == pytest.approx((1.5, 1.1, 2.0))
    assert (wide["q1"], wide["q3"]) == pytest.approx((1.3, 1.75))
    assert wide["spread"] == pytest.approx(0.9 / 1.5) and not wide["conclusive"]
    assert wide["verdict"].startswith("spread too wide to conclude")
    tight = ratio_summary([1.0, 1.05, 1.02], [1.0, 1.0, 1.0])
    assert tight["conclusive"] and tight["spread"] == pytest.approx(0.05 / 1.02) and tight["median"] == pytest.approx(1.02)
    few = ratio_summary([1.0, 1.0], [1.0, 1.0])
    assert not few["conclusive"] and "too few" in few["verdict"]


def test_floors_from_dims_and_tokens():
    d = 768  # terramind_v1_base at 256 px: 3 inputs x 256 patches = 768 tokens per timestep, 1024 with the thought
    assert layer_cost(768, d) == 14 * d**3  # N (12 d^2 + 2 N d) with N = d
    assert layer_cost(768, d, 4 * d) == layer_cost(768, d)
    assert encoder_cost(1024, d, 12) / encoder_cost(768, d, 12) == pytest.approx(88 / 63, rel=1e-12)
    assert cached_floor(0.25, 768, 1024, d, 12) == pytest.approx(109 / 84, rel=1e-12)  # 1/4 + 3/4 * 88/63
    assert cached_floor(1.0, 768, 1024, d, 12) == 1.0 and cached_floor(0.0, 768, 1024, d, 12) == pytest.approx(88 / 63)
    # generator: encoder 12 x 14 d^3, context projection d^3, decoder 12 x 68/9 d^3 on 256 thought tokens
    assert generator_cost(768, 256, d, 12, 12) == pytest.approx(779 / 3 * d**3, rel=1e-12)
    g = generator_cost(768, 256, d, 12, 12)
    assert online_floor(0.25, 768, 1024, d, 12, g) == pytest.approx(3395 / 2016, rel=1e-12)  # 109/84 + 3/4 * 779/1512


def test_out_of_memory_names_variant_batch_and_chip_size_and_what_to_lower():
    params = load_params(overrides={"batch_size": 8, "model_size": "base"})
    with pytest.raises(RuntimeError) as caught:
        with out_of_memory_guard("training", "tim", params, 256):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    message = str(caught.value)
    for part in ("out of memory while training variant tim", "batch_size 8", "256 px", "4 timesteps",
                 "-p batch_size 4", "-p model_size small"):
        assert part in message
    with pytest.raises(RuntimeError, match="out of memory while building variant baseline"):
        with out_of_memory_guard("building", "baseline", params, 256):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")
    with pytest.raises(RuntimeError, match="^shape mismatch$"):  # other errors pass through untouched
        with out_of_memory_guard("training", "tim", params, 256):
            raise RuntimeError("shape mismatch")


def _timings(**steps):
    return {"variants": {name: {"train_step_s": s, "infer_s_per_chip": s / 10} for name, s in steps.items()},
            "thought_cache_s_per_chip": 0.5}


def test_projection_from_the_dataset_splits(tmp_path):
    make_fixture(tmp_path / "data", FixtureConfig(chips=16, size=32, timesteps=2))
    params = load_params(PARAMS_DIR / "fixture.yaml", overrides={"data_root": str(tmp_path / "data")})
    result = _timings(baseline=2.0, tim=3.0, tim_cached=2.4)
    projection, v = project_study(params, result), result["variants"]  # baseline + tim, 1 seed, 2 folds, 2 epochs, batch 4
    roles = chips.fold_roles(chips.read_index(tmp_path / "data"), chips.SplitSpec(cv_folds=2, seed=42))
    per_fold = roles.groupby("split")["chips"].sum() / 2  # 4 parents of 4 chips: 2 test, 1 val, 1 train per fold
    train, val, test = per_fold["train"], per_fold["val"], per_fold["test"]
    assert (train, val, test) == (4, 4, 8)

    def cell(name):
        return 2 * (-(-train // 4) * v[name]["train_step_s"] + val * v[name]["infer_s_per_chip"]) + test * v[name]["infer_s_per_chip"]

    assert projection["train_chips"] == train and projection["folds"] == 2 and projection["chips"] == 16
    assert projection["variants_cached"] == ["baseline", "tim_cached"] and projection["cells"] == 4
    assert projection["cell_s"] == pytest.approx({n: cell(n) for n in ("baseline", "tim", "tim_cached")})
    assert projection["hours"] * 3600 == pytest.approx(2 * (cell("baseline") + cell("tim")))
    caching = 16 * result["thought_cache_s_per_chip"]  # every chip once, all transforms and samples
    assert projection["hours_cached"] * 3600 == pytest.approx(2 * (cell("baseline") + cell("tim_cached")) + caching)


def test_projection_of_an_assumed_dataset():
    study = load_params()  # params/nyc.yaml: 5 folds, 70/15/15
    assert expected_split_counts(study, 400) == (264, 56, 80)  # test 400/5, val 320 x 0.15/0.85
    assert expected_split_counts(study.replace(cv_folds=0), 400) == (280, 60, 60)
    result = _timings(baseline=1.0, tim=1.5, tim_cached=1.2)
    projection = project_study(study, result, (264, 56, 80), 400)
    cell = 20 * (33 * 1.0 + 56 * 0.1) + 80 * 0.1  # batch 8: 33 steps per epoch; thought_samples 1
    assert projection["cell_s"]["baseline"] == pytest.approx(cell) and projection["cells"] == 75
    tim = 20 * (33 * 1.5 + 56 * 0.15) + 80 * 0.15
    assert projection["hours"] * 3600 == pytest.approx(15 * (2 * cell + 3 * tim))  # 2 baselines, 3 TiM variants
    assert projection["hours_cached"] * 3600 == pytest.approx(
        15 * (2 * cell + 3 * projection["cell_s"]["tim_cached"]) + 3 * 400 * 0.5)


def test_disk_projection_adds_cells_and_caches():
    study = {"cv_folds": 5, "seeds": [0, 1, 2], "variants": ["baseline", "tim"]}
    weights, optimizer = {"baseline": 100, "tim": 150, "tim_cached": 104}, {"baseline": 200, "tim": 200, "tim_cached": 208}
    disk = project_disk(study, cell_bytes=1000, checkpoint_files=[110], weights=weights, optimizer=optimizer,
                        cache_bytes_per_chip=10, n_chips=400, dataset_bytes_per_chip=5, limit=33000)
    assert disk["checkpoint_files_hold_optimizer"] == [False]  # 110 bytes: a weights-only checkpoint
    assert disk["cells"] == 30 and disk["cell_bytes"] == {"baseline": 1000, "tim": 1050, "tim_cached": 1004}
    assert disk["study_bytes"] == 15 * 2050 and disk["study_bytes_cached"] == 15 * 2004 + 400 * 10
    assert (disk["fits"], disk["fits_cached"], disk["fits_with_dataset"]) == (True, False, False)
    full = project_disk(study, 1000, [110, 290], weights, optimizer, 10, 400, 5)  # + a full one (weights + AdamW)
    assert full["checkpoint_files_hold_optimizer"] == [False, True]
    assert full["cell_bytes"] == {"baseline": 1000, "tim": 1100, "tim_cached": 1016} and full["limit_bytes"] == 30e9


def test_bench_command_passes_rounds_and_writes_json_and_table(tmp_path, monkeypatch, capsys):
    calls = {}

    def fake_run_bench(params, **kwargs):
        calls.update(kwargs)
        return {"device": "test CPU", "torch_threads": 1, "model_size": params["model_size"], "batch_size": 4,
                "chip_size": 64, "timesteps": 2, "precision": "32-true", "loader_chips_per_s": 10.0,
                "loader_over_consumption": 5.0, "thought_cache_s_per_chip": 1.0,
                "variants": {n: {"train_step_s": s, "infer_s_per_chip": 0.01, "peak_mem_mb": 1.0}
                             for n, s in zip(VARIANTS, (1.0, 1.5, 1.2))}}

    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    args = ["bench", "-f", str(PARAMS_DIR / "fixture.yaml"), "--rounds", "3", "--steps", "1", "--warmup", "0",
            "-p", "output_root", str(tmp_path), "-p", "run_name", "b"]
    assert main(args) == 0
    assert calls == {"device": "auto", "warmup": 0, "rounds": 3, "steps": 1, "log": calls["log"]}
    layout = RunLayout(tmp_path / "b")
    assert json.loads(layout.bench_json.read_text())["variants"]["tim"]["train_step_s"] == 1.5
    table = layout.bench_md.read_text()
    assert "| tim_cached | 1.200 | 1.20x |" in table and "| tim_cached |" in capsys.readouterr().out
