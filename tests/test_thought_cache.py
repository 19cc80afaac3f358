"""Cached thoughts: same encoder outputs as the online TiM forward that generated them; cache layout; training."""

import json
import shutil

import numpy as np
import pytest
import torch

from nycdata.data.chips import read_index
from nycdata.data.fixture import FixtureConfig, make_fixture
from nycdata.data.thoughts import THOUGHTS_KEY, cache_root, tokens_to_map
from nycdata.model.thinking import autocast, thought_stream_seed
from nycdata.model.tim import CachedThoughts, capture_thoughts, tim_backbone
from nycdata.model.variants import get_variant
from nycdata.params import PARAMS_DIR, load_params
from nycdata.seeding import seed_everything
from nycdata.study.train import build_task, cache_thoughts, fine_tune

B, T, SIZE = 2, 2, 32


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    # 4 chips in 3 parents (train 1, val 1, test 2): every split to cache, one of them with more than one chip, and
    # two test chips for the cache check's mIoU
    data = make_fixture(base / "data", FixtureConfig(chips=4, size=SIZE, timesteps=T, seed=1))
    return load_params(PARAMS_DIR / "fixture.yaml", overrides={
        "data_root": str(data), "output_root": str(base / "out"), "run_name": "c", "max_epochs": 1, "cv_folds": 0,
        "thought_cache_samples": 2})


def test_cached_path_gives_identical_encoder_outputs(params):
    online = build_task(params, get_variant("tim"))
    cached = build_task(params, get_variant("tim_cached"))
    assert isinstance(tim_backbone(cached.model).sampler, CachedThoughts)
    assert not any(".sampler." in k for k in cached.state_dict()), "the generator is not kept"
    missing = cached.load_state_dict({k: v for k, v in online.state_dict().items() if ".sampler." not in k}, strict=True)
    assert not missing.missing_keys
    online.eval(), cached.eval()
    g = torch.Generator().manual_seed(0)
    x = {m: torch.randn(B, c, T, SIZE, SIZE, generator=g) for m, c in (("S2L2A", 12), ("S1RTC", 2), ("DEM", 1))}
    with torch.no_grad():
        seed_everything(11)
        with capture_thoughts(online.model) as capture:
            features = online.model.encoder(dict(x))
            logits = online.model(dict(x)).output
        tokens = capture.grid("LULC", B, call=0)
        seed_everything(11)
        reread = cached.model.encoder({**x, THOUGHTS_KEY: tokens_to_map(tokens)[:, None]})
        second = capture.grid("LULC", B, call=1)  # the full forward thought again, with the RNG where it was
        cached_logits = cached.model({**x, THOUGHTS_KEY: tokens_to_map(second)[:, None]}).output
    for a, b in zip(features, reread):
        assert torch.equal(a, b)
    assert torch.equal(logits, cached_logits)


def test_cache_holds_every_chip_transform_and_sample_reproducibly_and_training_reads_it(params):
    run = fine_tune({**params, "variant": "tim_cached", "seed": 3}, log=lambda m: None)
    assert run["epochs_run"] == 1
    root = cache_root(params, get_variant("tim_cached").online)
    files = sorted(root.glob("*.npy"))
    index = read_index(params["data_root"])
    assert index.groupby("split").size().to_dict() == {"train": 1, "val": 1, "test": 2}
    assert {f.stem for f in files} == set(index["chip_id"]), "every chip: with cross-validation each one trains in some fold"
    ids = {f.stem: np.load(f) for f in files}
    first = next(iter(ids.values()))
    assert first.shape == (8, 2, T, SIZE // 16, SIZE // 16) and first.dtype == np.int16  # thought_cache_samples 2
    assert all(len({a[k].tobytes() for k in range(8)}) > 1 for a in ids.values()), "each transform thinks its own thought"
    assert all(a[:, 0].tobytes() != a[:, 1].tobytes() for a in ids.values()), "each sample is another draw"
    done = json.loads((root / "cache.json").read_text())
    assert done["device"] == "cpu" and done["identity"]["samples"] == 2 and done["identity"]["thought_seed"] == 0

    shutil.rmtree(root)  # a rerun writes the same bytes
    cache_thoughts({**params, "variant": "tim_cached"}, get_variant("tim_cached"), log=lambda m: None)
    assert {f.stem: np.load(f).tobytes() for f in root.glob("*.npy")} == {k: v.tobytes() for k, v in ids.items()}
    resumed = fine_tune({**params, "variant": "tim_cached", "seed": 3, "resume": True}, log=lambda m: None)
    assert resumed == run


def test_thought_noise_is_seeded_per_chip_sample_and_thought_seed():
    seeds = {thought_stream_seed(chip, s, t) for chip in ("nyc_a_r0c0", "nyc_a_r0c1", "nyc_b_r0c0") for s in range(4)
             for t in range(2)}
    assert len(seeds) == 24 and all(0 <= x < 2**31 for x in seeds)
    assert thought_stream_seed("nyc_a_r0c0", 1, 0) == thought_stream_seed("nyc_a_r0c0", 1, 0)


def test_a_cache_made_under_other_settings_is_refused_by_name(params):
    cached = get_variant("tim_cached")
    cache_thoughts(params, cached, log=lambda m: None)  # made (or reused) under the module's params
    with pytest.raises(ValueError, match=r"other settings \(tim_top_p: cache 0.8, params 0.5; thought_seed: cache 0, params 2\)"):
        cache_thoughts({**params, "tim_top_p": 0.5, "thought_seed": 2}, cached, log=lambda m: None)
    with pytest.raises(ValueError, match="samples: cache 2, params 6.*Delete .*thought_cache/tim"):
        cache_thoughts({**params, "thought_samples": 6}, cached, log=lambda m: None)


def test_test_pass_k_reads_cached_sample_k(params):
    from nycdata.data.dataset import NYCDataModule

    root = cache_thoughts(params, get_variant("tim_cached"), log=lambda m: None)
    datamodule = NYCDataModule.from_params({**params, "num_workers": 0}, thought_cache=str(root))
    for k in (0, 1):
        batch = next(iter(datamodule.test_dataloader(thought_sample=k)))
        chip = batch["filename"][0]
        expected = tokens_to_map(torch.from_numpy(np.load(root / f"{chip}.npy")[0, k].astype(np.int64)))
        assert torch.equal(batch["image"][THOUGHTS_KEY][0, 0], expected)
    with pytest.raises(ValueError, match="thought sample 2 requested but the cache holds 2"):
        datamodule.test_dataloader(thought_sample=2)


def test_caching_thinks_under_the_training_precision():
    assert isinstance(autocast("bf16-mixed", torch.device("cpu")), torch.autocast)
    assert autocast("bf16-mixed", torch.device("cpu")).fast_dtype == torch.bfloat16
    assert not isinstance(autocast("32-true", torch.device("cpu")), torch.autocast)


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, c, T, SIZE, SIZE, generator=g) for m, c in (("S2L2A", 12), ("S1RTC", 2), ("DEM", 1))}


def test_online_thinking_leaves_the_global_rng_alone_and_every_random_build_shares_one_generator(params):
    builds, thoughts = {}, {}
    for name, global_seed, variant, thought_seed in (("first", 1, "tim", 0), ("second", 2, "tim", 1),
                                                      ("cached", 2, "tim_cached", 0)):
        seed_everything(global_seed)
        builds[name] = build_task({**params, "thought_seed": thought_seed}, get_variant(variant))
    for name in ("first", "second"):
        seed_everything(5)
        before = torch.get_rng_state()
        with torch.no_grad(), capture_thoughts(builds[name].model) as capture:
            builds[name].model.encoder(_inputs())
        assert torch.equal(torch.get_rng_state(), before), "terratorch's torch.manual_seed must not reach the global RNG"
        thoughts[name] = capture.grid("LULC", B)
    assert not torch.equal(thoughts["first"], thoughts["second"]), "another thought_seed thinks another thought"

    first, second, cached = (builds[n].state_dict() for n in ("first", "second", "cached"))
    generator = [k for k in first if ".sampler.model." in k]
    assert generator and all(torch.equal(first[k], second[k]) for k in generator)
    assert not torch.equal(first["model.head.head.2.weight"], second["model.head.head.2.weight"]), "the seed varies the rest"
    assert set(cached) == {k for k in second if ".sampler." not in k}
    assert all(torch.equal(cached[k], second[k]) for k in cached), "a cached twin starts from the online model's weights"


def test_cache_check_reuses_study_cells_trains_the_rest_aside_and_reports_agreement(params, capsys):
    from nycdata.__main__ import main
    from nycdata.study.cache_agreement import check_agreement
    from nycdata.runs import RunLayout

    checked = {**params, "variant": "tim_cached", "seed": 3, "fixture": False}  # data_root holds a smaller fixture
    study_cell = fine_tune({**checked, "resume": True}, log=lambda m: None)  # the study's tim_cached cell (seed 3)
    result = check_agreement(checked, thought_seeds=(0, 1), log=lambda m: None)
    assert (result["online_variant"], result["cached_variant"]) == ("tim", "tim_cached")
    assert len(set(result["online_miou"])) == 2, "thought seeds must change the online runs, or the spread is no yardstick"
    assert result["thought_spread_sd"] > 0 and result["agree"]
    low, high = result["interval"]
    assert low < result["online_mean"] < high and low <= result["cached_miou"] <= high
    run = cache_root(params, get_variant("tim_cached").online).parents[1]
    reused = json.loads((run / "tim_cached" / "seed3" / "test_metrics.json").read_text())
    assert reused["miou"] == result["cached_miou"] and study_cell["seed"] == 3
    assert not (run / "tim").exists(), "the check must not add cells to the study's grid"
    assert {p.relative_to(RunLayout(run).cache_agreement).as_posix() for p in (RunLayout(run).cache_agreement).glob("*/*/seed3")} == {
        "thought_seed0/tim/seed3", "thought_seed1/tim/seed3"}
    assert json.loads((RunLayout(run).cache_agreement / "tim_cached_seed3.json").read_text()) == result

    overrides = [a for k, v in checked.items() if k in ("data_root", "output_root", "run_name", "max_epochs", "variant", "seed", "fixture", "cv_folds")
                 for a in ("-p", k, str(v))]
    assert main(["cache-check", "-f", str(PARAMS_DIR / "fixture.yaml"), *overrides, "--thought-seeds", "0", "1",
                 "--level", "0"]) == 1
    assert "DISAGREE" in capsys.readouterr().out  # nothing retrained: the verdict follows the new level


def test_cache_check_names_the_variants_it_can_compare(params):
    from nycdata.study.cache_agreement import cached_pair, check_agreement

    with pytest.raises(ValueError, match="no cached twin.*tim, tim_ndvi, tim_s1"):
        cached_pair("baseline")
    with pytest.raises(ValueError, match="at least 2 distinct seeds"):
        check_agreement({**params, "variant": "tim"}, thought_seeds=(1, 1))


def test_prediction_interval_is_the_student_t_interval_for_one_more_draw():
    from nycdata.study.cache_agreement import prediction_interval

    result = prediction_interval([0.1, 0.2, 0.3], 0.95)
    half = 4.302652729911275 * 0.1 * (4 / 3) ** 0.5  # t(0.975, 2 df) * sd * sqrt(1 + 1/n)
    assert result["online_mean"] == pytest.approx(0.2) and result["thought_spread_sd"] == pytest.approx(0.1)
    assert result["interval"] == pytest.approx([0.2 - half, 0.2 + half])
    assert prediction_interval([0.1, 0.3], 0.0)["interval"] == pytest.approx([0.2, 0.2])
    with pytest.raises(ValueError, match="level 1.*0.95"):
        prediction_interval([0.1, 0.3], 1.0)
