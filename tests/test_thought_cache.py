"""Cached thoughts: same encoder outputs as the online TiM forward that generated them; cache layout; training."""

import numpy as np
import pytest
import torch

from nycdata.fixture import FixtureConfig, make_fixture
from nycdata.params import PARAMS_DIR, load_params
from nycdata.thought_cache import THOUGHTS_KEY, CachedThoughts, cache_root, tokens_to_map
from nycdata.tim import capture_thoughts, tim_backbone
from nycdata.train import build_task, fine_tune, seed_everything
from nycdata.variants import get_variant

B, T, SIZE = 2, 2, 32


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    data = make_fixture(base / "data", FixtureConfig(chips=9, size=SIZE, timesteps=T, seed=6))
    return load_params(PARAMS_DIR / "fixture.yaml", overrides={
        "data_root": str(data), "output_root": str(base / "out"), "run_name": "c", "max_epochs": 1})


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


def test_cache_holds_every_transform_of_training_chips_and_training_reads_it(params):
    run = fine_tune({**params, "variant": "tim_cached", "seed": 3}, log=lambda m: None)
    assert run["epochs_run"] == 1
    root = cache_root(params, get_variant("tim_cached"))
    files = sorted(root.glob("*.npy"))
    assert len(files) == 9
    ids = np.load(files[0])
    assert ids.shape == (8, 1, T, SIZE // 16, SIZE // 16) and ids.dtype == np.int16

    from nycdata import chips

    index = chips.read_index(params["data_root"]).set_index("chip_id")
    train_chip = next(f.stem for f in files if index.loc[f.stem, "split"] == "train")
    cached_ids = np.load(root / f"{train_chip}.npy")
    assert len({cached_ids[k].tobytes() for k in range(8)}) > 1, "each transform thinks its own thought"
    resumed = fine_tune({**params, "variant": "tim_cached", "seed": 3, "resume": True}, log=lambda m: None)
    assert resumed == run
