"""TiM made visible: variants build, thoughts are captured without side effects, decoded, crosswalked, reproducible;
the unused tokenizer is frozen, out of the optimizer and out of checkpoints; the generator guard and offline errors."""

import socket

import numpy as np
import pytest
import torch

from nycdata import console
from nycdata.data.classes import IGNORE_INDEX, NUM_CLASSES
from nycdata.model.tim import ESRI_LULC_CLASSES, ESRI_TO_CLASS, capture_thoughts, decode_lulc, esri_to_class, tim_backbone
from nycdata.model.variants import VARIANTS, get_variant, variant_model_args
from nycdata.model.weights import GeneratorNotLoaded, verify_generator
from nycdata.params import PARAMS_DIR, load_params
from nycdata.seeding import seed_everything
from nycdata.study.train import build_task

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
        from nycdata.data.thoughts import THOUGHTS_KEY, tokens_to_map

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
    before = sampler.generate  # nycdata.model.tim.isolate_thought_rng's wrapper
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


def test_the_unused_tokenizer_is_built_only_to_decode_and_never_trains_or_checkpoints(tim_task):
    from nycdata.model.tim import thought_tokenizer

    task = tim_task  # the module's model: its tokenizer (10^8 parameters) is built once, here or by decoding
    assert not any("tokenizer" in n for n, _ in task.named_parameters()), "no tokenizer in the model"
    optimizer = task.configure_optimizers()["optimizer"]
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_groups == {id(p) for p in task.parameters() if p.requires_grad}
    assert not any(".sampler." in n for n, p in task.named_parameters() if p.requires_grad), "generator frozen"
    tokenizer = thought_tokenizer(task.model, "LULC")
    assert thought_tokenizer(task.model, "LULC") is tokenizer, "built once"
    assert sum(p.numel() for p in tokenizer.parameters()) > 1e8 and not any(p.requires_grad for p in tokenizer.parameters())
    assert not any("tokenizer" in k for k in task.state_dict()), "kept outside the module tree: not checkpointed"
    with pytest.raises(ValueError, match="no NDVI tokenizer"):
        thought_tokenizer(task.model, "NDVI")


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


def test_the_originals_random_generator_is_reproduced_only_when_asked_for(params, tim_task, raw_checkpoint):
    """tim_random_generator: a pretrained encoder whose generator stays random, except its input embeddings."""
    original = {**params, "backbone_ckpt_path": str(raw_checkpoint), "tim_random_generator": True}
    with pytest.raises(ValueError, match="tim_random_generator=true reproduces the original's defect.*allow_random_generator"):
        build_task({**original, "allow_random_generator": False}, get_variant("tim"))
    console.forget_warnings()  # shown once per process: another test may have shown it already
    with pytest.warns(UserWarning, match="RANDOM generator on purpose"):
        task = build_task(original, get_variant("tim"))
    generator = tim_backbone(task.model).sampler.model.state_dict()
    encoder = tim_backbone(task.model).state_dict()  # what the checkpoint filled
    reference = tim_backbone(tim_task.model).sampler.model.state_dict()  # the one random generator of every build
    checkpoint = torch.load(raw_checkpoint, weights_only=True)
    embeddings = [k for k in generator if k.startswith("encoder_embeddings.")]
    rest = [k for k in generator if k not in embeddings and generator[k].is_floating_point()]
    assert len(embeddings) == 12 and len(rest) > 200
    assert all(torch.equal(generator[k], encoder[k]) for k in embeddings)
    assert sum(torch.equal(generator[k], checkpoint[k]) for k in embeddings) >= 9  # S2, S1, DEM patch embeddings
    assert all(torch.equal(generator[k], reference[k]) and not torch.equal(generator[k], checkpoint[k]) for k in rest)
    assert task.generator_report["source"] == "random initialisation" and "on purpose" in task.generator_report["warning"]


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
    from nycdata.data.chips import read_index
    from nycdata.data.fixture import FixtureConfig, make_fixture
    from nycdata.data.thoughts import GENERATED_DONE_FILE as DONE_FILE, generated_root
    from nycdata.study.train import variant_datamodule

    data = make_fixture(tmp_path / "data", FixtureConfig(chips=4, size=32, timesteps=T, seed=4))  # 3 parents, every split
    run_params = {**params, "data_root": str(data), "output_root": str(tmp_path / "out"), "run_name": "g", "cv_folds": 0}
    variant = get_variant("tim_input")
    with pytest.raises(ValueError, match="allow_random_generator"):
        variant_datamodule({**run_params, "allow_random_generator": False}, variant, log=lambda m: None)
    datamodule = variant_datamodule(run_params, variant, log=lambda m: None)
    root = generated_root(run_params)
    assert (root / DONE_FILE).is_file()
    assert {p.name for p in root.glob("*_LULC.tif")} == {f"{c}_LULC.tif" for c in read_index(data)["chip_id"]}
    stamp = (root / DONE_FILE).stat().st_mtime_ns
    variant_datamodule(run_params, variant, log=lambda m: None)
    assert (root / DONE_FILE).stat().st_mtime_ns == stamp, "a finished generation is reused"
    batch = next(iter(datamodule.train_dataloader()))
    lulc = batch["image"]["LULC"]
    assert lulc.shape[1:] == (10, T, 32, 32) and torch.equal(lulc.sum(1), torch.ones_like(lulc.sum(1)))
    assert set(batch["image"]) == {"S2L2A", "S1RTC", "DEM", "LULC"}


# --- matched arms: what trains, what stays frozen, what starts equal

def _embedding_names(task, trainable: bool) -> set[str]:
    from nycdata.model.tim import input_embeddings

    return {n for n, p in input_embeddings(task.model).named_parameters() if p.requires_grad == trainable}


def _thought_names(task) -> set[str]:
    from nycdata.model.tim import thought_embedding_keys

    return {n for n in _embedding_names(task, True) | _embedding_names(task, False)
            if n.split(".")[0] in thought_embedding_keys(task.model)}


def test_tim_trains_the_baseline_input_embeddings_and_adds_only_the_thought_embedding(params, tim_task):
    baseline = build_task(params, get_variant("baseline"))
    thought = _thought_names(tim_task)
    assert thought == {"tok_lulc@224.mod_emb", "tok_lulc@224.token_emb.weight"}
    assert _embedding_names(tim_task, True) == _embedding_names(baseline, True) | thought
    assert len(_embedding_names(baseline, True)) == 6 and not _embedding_names(tim_task, False)
    from nycdata.model.tim import embeddings_shared_with_generator

    assert embeddings_shared_with_generator(tim_task.model) == 0, "the generator holds its own copy"


def test_upstream_sharing_and_baseline_frozen_embed_freeze_exactly_what_terratorch_freezes(params):
    from terratorch.models import EncoderDecoderFactory

    from nycdata.model.tim import embeddings_shared_with_generator

    upstream = EncoderDecoderFactory().build_model(task="segmentation", **variant_model_args(params, get_variant("tim")))
    upstream_frozen = {n.split("encoder_embeddings.", 1)[1] for n, p in upstream.named_parameters()
                       if ".encoder_embeddings." in n and ".sampler." not in n and not p.requires_grad}
    assert len(upstream_frozen) == 8, "terratorch 1.2.11 freezes the 6 input and 2 thought embedding tensors"
    shared = build_task({**params, "tim_share_embeddings": True}, get_variant("tim"))
    assert _embedding_names(shared, False) == upstream_frozen and not _embedding_names(shared, True)
    assert embeddings_shared_with_generator(shared.model) > 0, "upstream: one set of tensors for encoder and generator"
    cached = build_task({**params, "tim_share_embeddings": True}, get_variant("tim_cached"))
    assert _embedding_names(cached, False) == upstream_frozen, "a cached twin freezes what its online variant freezes"
    frozen_baseline = build_task(params, get_variant("baseline_frozen_embed"))
    assert _embedding_names(frozen_baseline, False) == upstream_frozen - _thought_names(shared)
    assert not _embedding_names(frozen_baseline, True)


def test_the_generator_keeps_its_copy_equal_to_the_checkpoint_while_the_encoder_trains(params, raw_checkpoint):
    from terratorch.models.backbones.terramind.model.terramind_register import checkpoint_filter_fn_tim

    from nycdata.model.tim import input_embeddings

    task = build_task(params, get_variant("tim"))
    backbone = tim_backbone(task.model)
    backbone.load_state_dict(checkpoint_filter_fn_tim(torch.load(raw_checkpoint, weights_only=True), backbone), strict=True)
    checked = set(backbone.sampler.model.state_dict())
    assert {"encoder_embeddings.untok_sen2l2a@224.proj.weight", "encoder_embeddings.tok_lulc@224.token_emb.weight"} <= checked
    assert verify_generator(task.model, str(raw_checkpoint)) > 100
    before = {n: p.detach().clone() for n, p in input_embeddings(task.model).named_parameters()}
    optimizer = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=1.0)
    logits = task.model(_batch(get_variant("tim").modalities)).output
    torch.nn.functional.cross_entropy(logits, torch.randint(0, NUM_CLASSES, (B, SIZE, SIZE))).backward()
    optimizer.step()
    moved = [n for n, p in input_embeddings(task.model).named_parameters() if not torch.equal(p, before[n])]
    assert "untok_sen2l2a@224.proj.weight" in moved, "the encoder's input embeddings train"
    assert verify_generator(task.model, str(raw_checkpoint)) > 100, "the generator's copy is untouched"


def test_every_arm_starts_with_the_same_decoder_and_head_for_one_seed(params):
    from nycdata.model.terratorch_compat import get_backbone_builder

    assert callable(get_backbone_builder()), "nycdata.model.factory patches this terratorch function"
    heads = []
    for name in ("baseline", "tim", "tim_cached", "baseline_frozen_embed"):
        seed_everything(4)
        state = build_task(params, get_variant(name)).model.state_dict()
        heads.append({k: v for k, v in state.items() if not k.startswith("encoder.")})
    assert len(heads[0]) > 20 and all(h.keys() == heads[0].keys() for h in heads)
    assert all(torch.equal(h[k], heads[0][k]) for h in heads[1:] for k in heads[0])
    seed_everything(5)
    other = build_task(params, get_variant("baseline")).model.state_dict()
    assert not torch.equal(other["head.head.2.weight"], heads[0]["head.head.2.weight"]), "the seed still varies them"
