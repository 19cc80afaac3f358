"""TiM made visible: variants build, thoughts are captured without side effects, decoded, crosswalked, reproducible;
the unused tokenizer is frozen, out of the optimizer and out of checkpoints; the generator guard and offline errors."""

import socket

import numpy as np
import pytest
import torch

from nycdata.classes import IGNORE_INDEX, NUM_CLASSES
from nycdata.params import PARAMS_DIR, load_params
from nycdata.tim import ESRI_LULC_CLASSES, ESRI_TO_CLASS, capture_thoughts, decode_lulc, esri_to_class, tim_backbone
from nycdata.train import build_task, seed_everything
from nycdata.variants import VARIANTS, get_variant, variant_model_args
from nycdata.weights import GeneratorNotLoaded, verify_generator

B, T, SIZE = 2, 2, 32


@pytest.fixture(scope="module")
def params():
    return load_params(PARAMS_DIR / "fixture.yaml")


@pytest.fixture(scope="module")
def tim_task(params):
    return build_task(params, get_variant("tim"))


def _batch(modalities, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = {"S2L2A": 12, "S1RTC": 2, "DEM": 1, "LULC": 10}  # LULC: one-hot generated map (tim_input)
    return {m: torch.randn(B, channels[m], T, SIZE, SIZE, generator=g) for m in modalities}


# the other *_cached variants differ from tim_cached only in their table row
@pytest.mark.parametrize("name", [v for v in VARIANTS if not v.endswith("_cached") or v == "tim_cached"])
def test_every_variant_builds_and_trains_one_step(params, name):
    variant = get_variant(name)
    task = build_task(params, variant)
    assert variant_model_args(params, variant)["backbone_modalities"] == list(variant.backbone_modalities)
    x = _batch(variant.backbone_modalities)
    if variant.cached:
        from nycdata.thought_cache import THOUGHTS_KEY, tokens_to_map

        x[THOUGHTS_KEY] = tokens_to_map(torch.randint(0, 4000, (B, 1, T, SIZE // 16, SIZE // 16)))
    logits = task.model(x).output
    assert logits.shape == (B, NUM_CLASSES, SIZE, SIZE)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, NUM_CLASSES, (B, SIZE, SIZE))).backward()
    assert task.model.head.head[-1].weight.grad.abs().sum() > 0
    assert (tim_backbone(task.model) is not None) == variant.is_tim


def test_s1_variants_have_no_optical_input():
    for name in ("baseline_s1", "tim_s1"):
        assert "S2L2A" not in get_variant(name).modalities and "S1RTC" in get_variant(name).modalities


def test_tim_knobs_reach_the_backbone(params):
    task = build_task({**params, "tim_top_p": 0.5, "tim_temperature": 0.7, "tim_top_k": 3, "tim_decoding_steps": 2},
                      get_variant("tim"))
    backbone = tim_backbone(task.model)
    assert (backbone.tim_top_p, backbone.tim_temps, backbone.tim_top_k, backbone.tim_decoding_steps) == (0.5, 0.7, 3, 2)


def test_capture_returns_the_tokens_and_changes_nothing(tim_task):
    x = _batch(get_variant("tim").modalities)
    tim_task.model.eval()
    seed_everything(3)
    plain = tim_task.model(x).output
    seed_everything(3)
    sampler = tim_backbone(tim_task.model).sampler
    before = sampler.generate  # nycdata.tim.isolate_thought_rng's wrapper
    with capture_thoughts(tim_task.model) as capture:
        captured = tim_task.model(x).output
    assert torch.equal(plain, captured)
    tokens = capture.grid("LULC", B)
    assert tokens.shape == (B, T, SIZE // 16, SIZE // 16) and tokens.dtype == torch.int64
    assert sampler.generate is before, "capture must put back the generator it wrapped"


def test_same_seed_same_thoughts_and_logits(tim_task):
    x = _batch(get_variant("tim").modalities)
    tim_task.model.eval()
    runs = []
    for seed in (7, 7, 8):
        seed_everything(seed)
        with capture_thoughts(tim_task.model) as capture:
            logits = tim_task.model(x).output
        runs.append((capture.grid("LULC", B), logits))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0]), "another seed should draw another thought"


def test_decoded_thoughts_are_lulc_class_maps(tim_task):
    tokens = torch.randint(0, 4000, (B, T, 2, 2))
    maps = decode_lulc(tim_task.model, tokens)
    assert maps.shape == (B, T, 32, 32) and int(maps.min()) >= 0 and int(maps.max()) < len(ESRI_LULC_CLASSES)


def test_crosswalk_covers_every_terramind_class():
    assert set(ESRI_TO_CLASS) == set(range(len(ESRI_LULC_CLASSES)))
    assert ESRI_TO_CLASS[0] == IGNORE_INDEX and ESRI_TO_CLASS[8] == IGNORE_INDEX  # no data, clouds
    assert set(ESRI_TO_CLASS.values()) == set(range(NUM_CLASSES)) | {IGNORE_INDEX}
    np.testing.assert_array_equal(esri_to_class(np.arange(10)), [255, 0, 2, 0, 3, 1, 4, 4, 255, 3])


def test_tokenizer_frozen_out_of_optimizer_and_checkpoint(tim_task):
    backbone = tim_backbone(tim_task.model)
    tokenizer = {id(p) for p in backbone.tokenizer.parameters()}
    assert tokenizer and not any(p.requires_grad for p in backbone.tokenizer.parameters())
    optimizer = tim_task.configure_optimizers()["optimizer"]
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not (in_groups & tokenizer)
    assert in_groups == {id(p) for p in tim_task.parameters() if p.requires_grad}
    checkpoint = {"state_dict": dict(tim_task.state_dict())}
    tim_task.on_save_checkpoint(checkpoint)
    assert not any(".tokenizer." in k for k in checkpoint["state_dict"])
    assert any(k.startswith("model.encoder.encoder.sampler.") for k in checkpoint["state_dict"]), "generator stays"
    tim_task.on_load_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == set(tim_task.state_dict())


def test_random_generator_needs_explicit_permission(params, tim_task):
    with pytest.raises(ValueError, match="random generator weights.*allow_random_generator"):
        build_task({**params, "allow_random_generator": False}, get_variant("tim_s1"))
    assert tim_task.generator_report["verified"] == 0 and "RANDOM" in tim_task.generator_report["warning"]


@pytest.fixture(scope="module")
def raw_checkpoint(tim_task, tmp_path_factory):
    """A TerraMind-style checkpoint (encoder-decoder keys without prefix) whose weights differ from any new build."""
    path = tmp_path_factory.mktemp("weights") / "TerraMind_v1_tiny.pt"
    state = tim_backbone(tim_task.model).sampler.model.state_dict()  # every random build shares this generator: shift it
    torch.save({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, path)  # (keeps shared tensors equal)
    return path


def test_raw_ckpt_path_leaves_generator_random_and_is_refused(params, raw_checkpoint):
    with pytest.raises(GeneratorNotLoaded, match="generator tensors .* differ .*pretrained=true"):
        build_task({**params, "backbone_ckpt_path": str(raw_checkpoint), "allow_random_generator": False},
                   get_variant("tim"))


def test_generator_loaded_through_terratorch_mapping_verifies(params, raw_checkpoint):
    from terratorch.models.backbones.terramind.model.terramind_register import checkpoint_filter_fn_tim

    donor = torch.load(raw_checkpoint, weights_only=True)
    raw = raw_checkpoint
    task = build_task(params, get_variant("tim"))
    backbone = tim_backbone(task.model)
    with pytest.raises(GeneratorNotLoaded):
        verify_generator(task.model, str(raw))
    backbone.load_state_dict(checkpoint_filter_fn_tim(dict(donor), backbone), strict=True)
    assert verify_generator(task.model, str(raw)) == len(donor) > 100


def test_offline_cache_miss_names_repo_file_and_command(params, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    def no_network(*args, **kwargs):
        raise AssertionError("a test must never touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", hf_constants.HF_HUB_CACHE)
    with pytest.raises(RuntimeError) as err:
        build_task({**params, "pretrained": True, "hf_cache_dir": str(tmp_path / "empty")}, get_variant("tim"))
    message = str(err.value)
    assert "ibm-esa-geospatial/TerraMind-1.0-tiny/TerraMind_v1_tiny.pt" in message
    assert "TerraMind-1.0-Tokenizer-LULC/TerraMind_Tokenizer_LULC.pt" in message
    assert "python -m nycdata download-weights" in message and str(tmp_path / "empty") in message


def test_tim_input_generates_lulc_once_and_reads_it_as_a_fourth_input(params, tmp_path):
    from nycdata.fixture import FixtureConfig, make_fixture
    from nycdata.generated import DONE_FILE, generated_root
    from nycdata.train import variant_datamodule

    data = make_fixture(tmp_path / "data", FixtureConfig(chips=9, size=32, timesteps=T, seed=4))
    run_params = {**params, "data_root": str(data), "output_root": str(tmp_path / "out"), "run_name": "g"}
    variant = get_variant("tim_input")
    with pytest.raises(ValueError, match="allow_random_generator"):
        variant_datamodule({**run_params, "allow_random_generator": False}, variant, log=lambda m: None)
    datamodule = variant_datamodule(run_params, variant, log=lambda m: None)
    root = generated_root(run_params)
    assert (root / DONE_FILE).is_file() and len(list(root.glob("*_LULC.tif"))) == 9
    stamp = (root / DONE_FILE).stat().st_mtime_ns
    variant_datamodule(run_params, variant, log=lambda m: None)
    assert (root / DONE_FILE).stat().st_mtime_ns == stamp, "a finished generation is reused"
    batch = next(iter(datamodule.train_dataloader()))
    lulc = batch["image"]["LULC"]
    assert lulc.shape[1:] == (10, T, 32, 32) and torch.equal(lulc.sum(1), torch.ones_like(lulc.sum(1)))
    assert set(batch["image"]) == {"S2L2A", "S1RTC", "DEM", "LULC"}
