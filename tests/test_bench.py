"""`python -m nycdata bench` writes bench.json with every number the performance issue asks for."""

import json

import pytest

from nycdata.__main__ import main
from nycdata.data import chips
from nycdata.params import PARAMS_DIR
from nycdata.study.bench import VARIANTS


def test_bench_writes_every_number(tmp_path, capsys):
    args = ["bench", "-f", str(PARAMS_DIR / "fixture.yaml"), "--device", "cpu", "--warmup", "0", "--repeats", "1",
            "-p", "data_root", str(tmp_path / "data"), "-p", "output_root", str(tmp_path / "out"), "-p", "run_name", "b",
            "-p", "fixture_size", "32", "-p", "fixture_chips", "16", "-p", "thought_cache_samples", "1"]
    assert main(args) == 0
    result = json.loads((tmp_path / "out" / "b" / "bench.json").read_text())
    assert set(result["variants"]) == set(VARIANTS)
    for numbers in result["variants"].values():
        assert numbers["train_step_s"] > 0 and numbers["infer_s_per_chip"] > 0 and "peak_mem_mb" in numbers
    assert result["loader_chips_per_s"] > 0 and result["thought_cache_s_per_chip"] > 0
    assert result["tim_cached_over_baseline"] == result["variants"]["tim_cached"]["train_step_s"] / result["variants"]["baseline"]["train_step_s"]
    table = (tmp_path / "out" / "b" / "bench.md").read_text()
    assert "| tim_cached |" in table and "chips/s" in table and "| tim_cached |" in capsys.readouterr().out

    projection, v = result["projection"], result["variants"]  # fixture.yaml: baseline + tim, 1 seed, 2 folds, 2 epochs, batch 4
    roles = chips.fold_roles(chips.read_index(tmp_path / "data"), chips.SplitSpec(cv_folds=2, seed=42))
    per_fold = roles.groupby("split")["chips"].sum() / 2  # 4 parents of 4 chips: 2 test, 1 val, 1 train per fold
    train, val, test = per_fold["train"], per_fold["val"], per_fold["test"]
    assert (train, val, test) == (4, 4, 8)

    def cell(name):
        return 2 * (-(-train // 4) * v[name]["train_step_s"] + val * v[name]["infer_s_per_chip"]) + test * v[name]["infer_s_per_chip"]

    assert projection["train_chips"] == train and projection["folds"] == 2
    assert projection["variants_cached"] == ["baseline", "tim_cached"]
    assert projection["hours"] * 3600 == pytest.approx(2 * (cell("baseline") + cell("tim")))
    caching = 16 * result["thought_cache_s_per_chip"]  # every chip once, all transforms and samples
    assert projection["hours_cached"] * 3600 == pytest.approx(2 * (cell("baseline") + cell("tim_cached")) + caching)
    assert "Projected study (2 variants x 1 seeds x 2 folds x 2 epochs" in table
