"""Every private terratorch / Lightning / huggingface_hub detail nycdata relies on still exists and behaves as
nycdata.model.terratorch_compat assumes: one test per attribute, each failing with "terratorch X.Y moved/removed
<attr>: nycdata.model.terratorch_compat.<helper> needs updating" when an upgrade moves it.

One tiny TiM model (``pretrained=False``, no tokenizer) is built and run once for the whole module, as terratorch
builds it: without nycdata's own wrapping (untied generator, isolated RNG), so the checks see terratorch's objects.
"""

import csv
import inspect
import re
import warnings

import pytest
import torch

from nycdata.data.chips import PATCH_SIZE
from nycdata.model import terratorch_compat as compat
from nycdata.model.tim import tim_backbone, tokenizers_deferred
from nycdata.model.variants import get_variant, variant_model_args
from nycdata.params import PARAMS_DIR, REPO_ROOT, load_params

B, T, SIZE = 1, 2, 32
CHANNELS = {"S2L2A": 12, "S1RTC": 2, "DEM": 1}


@pytest.fixture(scope="module")
def built():
    """A raw terratorch TiM segmentation model, with what its build passed through the patched names."""
    from terratorch.models import EncoderDecoderFactory

    args = variant_model_args(load_params(PARAMS_DIR / "fixture.yaml"), get_variant("tim"))
    assert args["backbone_pretrained"] is False
    build_backbone, backbones = compat.get_backbone_builder(), []

    def record(*a, **kw):
        backbones.append(a[0] if a else kw.get("backbone"))
        return build_backbone(*a, **kw)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "TiM model not pre-trained"
        with compat.patch_get_backbone(record), tokenizers_deferred() as tokenizer_calls:
            model = EncoderDecoderFactory().build_model(task="segmentation", **args)
    return {"model": model, "backbone": tim_backbone(model), "backbone_names": backbones,
            "tokenizer_calls": tokenizer_calls, "args": args}


@pytest.fixture(scope="module")
def ran(built):
    """One forward of the raw model, recording what TiM's forward handed its pre-hook and ``sampler.generate``."""
    backbone, seen = built["backbone"], {"inputs": [], "generate": []}
    original = compat.sampler_generate(backbone)

    def generate(*args, **kwargs):
        out = original(*args, **kwargs)
        seen["generate"].append((kwargs, out))
        return out

    handle = compat.register_input_pre_hook(backbone, lambda module, inputs: seen["inputs"].append(dict(inputs)))
    g = torch.Generator().manual_seed(0)
    x = {m: torch.randn(B, c, T, SIZE, SIZE, generator=g) for m, c in CHANNELS.items()}
    try:
        with compat.sampler_generate_replaced(backbone, generate), torch.no_grad():
            seen["output"] = built["model"](x).output
    finally:
        handle.remove()
    seen["class_generate_back"] = "generate" not in vars(compat.sampler_of(backbone))
    return seen


# --- versions and patch size


def test_pins_match_pyproject_and_requirements_lock():
    lock = (REPO_ROOT / "requirements.lock").read_text()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert f'"terratorch=={compat.PINNED_TERRATORCH}"' in pyproject, "update terratorch_compat.PINNED_TERRATORCH"
    assert re.search(rf"^terratorch=={re.escape(compat.PINNED_TERRATORCH)}$", lock, re.M), "PINNED_TERRATORCH"
    assert re.search(rf"^lightning=={re.escape(compat.PINNED_LIGHTNING)}$", lock, re.M), "PINNED_LIGHTNING"


def test_installed_versions_are_the_pinned_ones_and_a_difference_only_warns(monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        differ = compat.check_versions()
    assert differ == [], (f"installed {differ}: re-run {compat.COMPAT_TEST}, update the helpers it names, then "
                          "PINNED_TERRATORCH / PINNED_LIGHTNING")
    monkeypatch.setattr(compat, "installed_version", lambda name: "99.0")
    with pytest.warns(RuntimeWarning, match=r"terratorch 99\.0 \(pinned .*Re-test them: pytest tests/test_terratorch_compat"):
        assert len(compat.check_versions()) == 2


def test_terramind_patch_size_is_chips_patch_size(built, monkeypatch):
    sizes = compat.terramind_patch_sizes()
    assert sizes == {"TerraMindTiM": PATCH_SIZE, "TerraMindViT": PATCH_SIZE}, compat.moved(
        f"TerraMind's patch_size default (now {sizes})", "terramind_patch_sizes")
    embeddings = compat.encoder_embeddings(built["model"])
    image = [key for key in embeddings if hasattr(embeddings[key], "patch_size")]
    assert image and all(tuple(embeddings[k].patch_size) == (PATCH_SIZE, PATCH_SIZE) for k in image), compat.moved(
        "encoder_embeddings[...].patch_size", "check_patch_size")
    compat.check_patch_size()
    monkeypatch.setattr(compat, "PATCH_SIZE", PATCH_SIZE * 2)
    with pytest.raises(RuntimeError, match="chips.PATCH_SIZE"):
        compat.check_patch_size()


# --- building


def test_get_backbone_is_the_module_level_builder_the_factory_calls(built):
    from terratorch.models import encoder_decoder_factory

    builder = getattr(encoder_decoder_factory, "_get_backbone", None)
    helper = "get_backbone_builder / patch_get_backbone"
    assert callable(builder), compat.moved("terratorch.models.encoder_decoder_factory._get_backbone", helper)
    assert next(iter(inspect.signature(builder).parameters)) == "backbone", compat.moved(
        "_get_backbone(backbone, **kwargs)'s signature", helper)
    assert built["backbone_names"] == [built["args"]["backbone"]], compat.moved(
        "EncoderDecoderFactory's call of _get_backbone", helper)
    assert compat.get_backbone_builder() is builder, "the patch was put back"


def test_terramind_tim_class_location(built):
    cls = compat.tim_class()
    assert inspect.isclass(cls) and issubclass(cls, torch.nn.Module), compat.moved(
        "terratorch.models.backbones.terramind.model.terramind_tim.TerraMindTiM", "tim_class")
    assert isinstance(built["backbone"], cls), compat.moved("TerraMindTiM (the class terramind_v1_*_tim builds)",
                                                            "tim_class")


def test_build_tokenizer_in_terramind_tim_is_called_with_keywords_and_buildable_later(built):
    module = compat.tokenizer_builder_module()
    assert callable(getattr(module, "build_tokenizer", None)), compat.moved(
        "terramind_tim.build_tokenizer", "tokenizer_builder_module / patch_tim_tokenizer_builder")
    calls = built["tokenizer_calls"]
    assert len(calls) == 1 and {"tokenizer_dict", "input_modalities", "pretrained"} <= set(calls[0]), compat.moved(
        "TerraMindTiM's keyword call of build_tokenizer", "patch_tim_tokenizer_builder")
    assert not getattr(built["backbone"], "tokenizer", None), "the deferred build holds no tokenizer"
    from terratorch.models.backbones.terramind.model import terramind

    later = set(inspect.signature(terramind.build_tokenizer).parameters)
    assert {"tokenizer_dict", "input_modalities", "pretrained"} <= later, compat.moved(
        "terramind.build_tokenizer(tokenizer_dict, input_modalities, pretrained)", "build_tokenizer")
    assert module.build_tokenizer is terramind.build_tokenizer, "the patch was put back"


# --- TerraMindTiM's attributes


def test_tim_has_a_sampler_holding_a_frozen_generator(built):
    backbone = built["backbone"]
    assert isinstance(getattr(backbone, "sampler", None), torch.nn.Module), compat.moved("TerraMindTiM.sampler",
                                                                                          "sampler_of")
    generator = compat.generator_of(backbone)
    assert isinstance(generator, torch.nn.Module), compat.moved("TerraMindTiM.sampler.model", "generator_of")
    assert len(generator.state_dict()) > 100 and not any(p.requires_grad for p in generator.parameters()), (
        compat.moved("the frozen TerraMind encoder-decoder at sampler.model", "generator_of"))


def test_sampler_generate_takes_a_seed_and_returns_tensors_per_domain(built, ran):
    sampler = compat.sampler_of(built["backbone"])
    generate = getattr(type(sampler), "generate", None)
    assert callable(generate) and "seed" in inspect.signature(generate).parameters, compat.moved(
        "TerraMindTiM.sampler.generate(..., seed=...)", "sampler_generate")
    assert len(ran["generate"]) == 1, compat.moved("TiM's forward call of self.sampler.generate",
                                                   "sampler_generate_replaced")
    kwargs, out = ran["generate"][0]
    assert isinstance(kwargs.get("seed"), int), compat.moved("TiM's sampler.generate(seed=random.randint(...))",
                                                             "sampler_generate / nycdata.model.tim.isolate_thought_rng")
    domain = compat.thought_domain(built["backbone"], "LULC")
    tokens = compat.generated_tokens(out, domain)
    assert tokens.shape == (B * T, (SIZE // PATCH_SIZE) ** 2), compat.moved(
        "sampler.generate's output {domain: {'tensor': ids}}", "generated_tokens / generation_output")
    assert compat.generation_output(domain, tokens)[domain]["tensor"] is tokens
    assert ran["class_generate_back"], "sampler_generate_replaced puts the class method back"


def test_tim_modalities_and_mod_name_mapping(built):
    backbone = built["backbone"]
    assert list(getattr(backbone, "tim_modalities", [])) == ["LULC"], compat.moved("TerraMindTiM.tim_modalities",
                                                                                  "thought_modalities")
    assert isinstance(getattr(backbone, "mod_name_mapping", None), dict), compat.moved("TerraMindTiM.mod_name_mapping",
                                                                                      "thought_domain")
    assert compat.thought_domain(backbone, "LULC") == "tok_lulc@224", compat.moved("mod_name_mapping['LULC']",
                                                                                   "thought_domain")


def test_encoder_embeddings_of_the_encoder_and_of_the_generator(built):
    backbone = built["backbone"]
    embeddings = getattr(backbone, "encoder_embeddings", None)
    assert isinstance(embeddings, torch.nn.ModuleDict), compat.moved("TerraMindTiM.encoder_embeddings",
                                                                     "encoder_embeddings")
    assert compat.encoder_embeddings(built["model"]) is embeddings, compat.moved("encoder_embeddings",
                                                                                 "encoder_embeddings")
    assert compat.thought_domain(backbone, "LULC") in embeddings, compat.moved("encoder_embeddings['tok_lulc@224']",
                                                                               "thought_domain")
    generator_keys = compat.generator_of(backbone).state_dict()
    assert any(k.startswith(f"{compat.ENCODER_EMBEDDINGS}.") for k in generator_keys), compat.moved(
        "sampler.model.encoder_embeddings", "ENCODER_EMBEDDINGS (nycdata.model.tim.share_random_generator)")


def test_tim_forward_hands_its_pre_hook_the_input_dict(built, ran):
    params = list(inspect.signature(compat.tim_class().forward).parameters)
    assert params[:2] == ["self", "d"], compat.moved("TerraMindTiM.forward(d)", "register_input_pre_hook")
    assert ran["inputs"] and all(set(CHANNELS) <= set(inputs) for inputs in ran["inputs"]), compat.moved(
        "TiM's input dict in its forward pre-hook", "register_input_pre_hook")
    first = next(iter(ran["inputs"][0].values()))
    assert first.shape[0] == B * T, "the temporal wrapper folds T into the batch (nycdata.model.tim._take_thoughts)"
    assert ran["output"].shape == (B, 5, SIZE, SIZE)


# --- weights


def test_checkpoint_filter_maps_checkpoint_keys_into_sampler_model(built):
    backbone = built["backbone"]
    generator = compat.generator_of(backbone).state_dict()
    checkpoint = {compat.generator_checkpoint_key(k): torch.full_like(v, 0.5) for k, v in generator.items()}
    try:
        mapped = compat.tim_checkpoint_filter()(checkpoint, backbone)
    except AttributeError as err:
        pytest.fail(str(err))
    wrong = [k for k in generator if not torch.equal(mapped.get(compat.GENERATOR_PREFIX + k, generator[k]),
                                                     checkpoint[compat.generator_checkpoint_key(k)])]
    assert not wrong, compat.moved(f"checkpoint_filter_fn_tim's key mapping (e.g. {wrong[0]})",
                                   "generator_checkpoint_key / GENERATOR_PREFIX")


def test_weight_registries_name_hugging_face_files():
    for helper, name in ((compat.backbone_weight_file, "terramind_v1_tiny"),
                         (compat.tokenizer_weight_file, "terramind_v1_tokenizer_lulc")):
        try:
            repo, filename = helper(name)
        except (AttributeError, KeyError, TypeError) as err:
            pytest.fail(compat.moved(f"pretrained_weights[{name!r}]['hf_hub_id'/'hf_hub_filename'] ({err})",
                                     helper.__name__))
        assert repo.startswith("ibm-esa-geospatial/") and filename, compat.moved(name, helper.__name__)


def test_hf_hub_download_reads_the_overridden_cache_at_call_time(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import hf_hub_download

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", hf_constants.HF_HUB_CACHE)  # restored after the test
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    snapshot = tmp_path / "models--org--model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "weights.pt").write_text("x")
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("0" * 40)
    compat.set_hf_hub_cache(tmp_path)
    assert compat.hf_hub_cache() == str(tmp_path)
    try:
        found = hf_hub_download(repo_id="org/model", filename="weights.pt")
    except Exception as err:  # noqa: BLE001 - any failure means the override no longer reaches hf_hub_download
        pytest.fail(compat.moved(f"huggingface_hub.constants.HF_HUB_CACHE as hf_hub_download's default ({err})",
                                 "set_hf_hub_cache"))
    assert found == str(snapshot / "weights.pt"), compat.moved("HF_HUB_CACHE", "set_hf_hub_cache")


# --- training


def test_optimizer_factory_signature():
    params = list(inspect.signature(compat.optimizer_factory()).parameters)
    assert params == ["optimizer", "lr", "params_to_be_optimized", "optimizer_hparams", "scheduler", "monitor",
                      "scheduler_hparams"], compat.moved("terratorch.tasks.optimizer_factory.optimizer_factory",
                                                         "optimizer_factory")


def test_lightning_csv_experiment_writer_and_experiment_attribute(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    writer = compat.csv_experiment_writer()
    assert callable(getattr(writer, "_check_log_dir_exists", None)), compat.moved(
        "lightning's csv_logs.ExperimentWriter._check_log_dir_exists", "appending_csv_logger")
    plain = CSVLogger(save_dir=tmp_path / "plain", name="", version="")
    assert hasattr(plain, "_experiment") and plain._experiment is None, compat.moved("CSVLogger._experiment",
                                                                                     "appending_csv_logger")
    assert isinstance(plain.experiment, writer), compat.moved("CSVLogger.experiment's ExperimentWriter",
                                                              "csv_experiment_writer")
    for attribute in ("_fs", "metrics_file_path", "metrics_keys"):
        assert hasattr(plain.experiment, attribute), compat.moved(f"ExperimentWriter.{attribute}",
                                                                  "appending_csv_logger")
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("epoch,step,val/loss\n0,3,1.5\n")
    logger = compat.appending_csv_logger(tmp_path)
    logger.log_metrics({"val/loss": 1.25, "epoch": 1}, step=7)
    logger.save()
    rows = list(csv.DictReader(metrics.open()))
    assert [r["val/loss"] for r in rows] == ["1.5", "1.25"], compat.moved("ExperimentWriter's metrics.csv handling",
                                                                          "appending_csv_logger")
