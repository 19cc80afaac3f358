"""Every private terratorch, Lightning and huggingface_hub detail nycdata relies on, in one place.

nycdata wraps terratorch's TerraMind thinly instead of copying its code, which means reaching past its public API:
module-level functions it patches, attributes of ``TerraMindTiM`` it reads or swaps, the layout of its checkpoint
mapping, and two internals of Lightning's ``CSVLogger``. Each access lives here, behind a small named helper with a
comment saying why it is needed, and ``tests/test_terratorch_compat.py`` checks each one against the installed
libraries, failing with "terratorch X.Y moved/removed <attr>: nycdata.model.terratorch_compat.<helper> needs
updating". The rest of the package calls these helpers; public API (``EncoderDecoderFactory``,
``SemanticSegmentationTask``, ``FULL_MODEL_REGISTRY``) is used directly where it is needed.

Everything here was written against :data:`PINNED_TERRATORCH` (and :data:`PINNED_LIGHTNING`), the versions of
requirements.lock. :func:`check_versions` warns, once per process at the first terratorch access, when other
versions are installed; :func:`check_patch_size` refuses a TerraMind whose patch is not ``chips.PATCH_SIZE``.
terratorch, Lightning and torch are imported inside the helpers: they take seconds to import, and
:mod:`nycdata.model.factory` (which imports this module) must stay cheap for the commands that never build a model.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from importlib.metadata import PackageNotFoundError, version as _installed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from nycdata.data.chips import PATCH_SIZE

if TYPE_CHECKING:
    import torch

PINNED_TERRATORCH = "1.2.11"  # pyproject.toml and requirements.lock pin this; tests/test_terratorch_compat.py checks it
PINNED_LIGHTNING = "2.6.6"  # requirements.lock
COMPAT_TEST = "tests/test_terratorch_compat.py"

# terratorch module paths (internal modules, not re-exported by terratorch's packages)
ENCODER_DECODER_FACTORY = "terratorch.models.encoder_decoder_factory"
TERRAMIND_TIM = "terratorch.models.backbones.terramind.model.terramind_tim"
TERRAMIND = "terratorch.models.backbones.terramind.model.terramind"
TERRAMIND_VIT = "terratorch.models.backbones.terramind.model.terramind_vit"
TERRAMIND_REGISTER = "terratorch.models.backbones.terramind.model.terramind_register"
TOKENIZER_REGISTER = "terratorch.models.backbones.terramind.tokenizer.tokenizer_register"
OPTIMIZER_FACTORY = "terratorch.tasks.optimizer_factory"

# Attribute names of TerraMindTiM (and of the TerraMind encoder-decoder inside it) that nycdata reads.
SAMPLER = "sampler"  # TerraMindTiM.sampler: the GenerationSampler that thinks
GENERATOR = "model"  # GenerationSampler.model: the frozen TerraMind encoder-decoder (the "generator")
ENCODER_EMBEDDINGS = "encoder_embeddings"  # ModuleDict of patch/modality embeddings, in TiM and in its generator
GENERATOR_PREFIX = f"{SAMPLER}.{GENERATOR}."  # where checkpoint_filter_fn_tim puts the checkpoint's encoder-decoder


def moved(attribute: str, helper: str) -> str:
    """The message of a failed check: which terratorch (or Lightning) attribute moved, which helper to update."""
    return (f"terratorch {installed_version('terratorch')} (lightning {installed_version('lightning')}) moved/removed "
            f"{attribute}: nycdata.model.terratorch_compat.{helper} needs updating (written against terratorch "
            f"{PINNED_TERRATORCH}, lightning {PINNED_LIGHTNING}; see {COMPAT_TEST})")


def installed_version(distribution: str) -> str | None:
    try:
        return _installed(distribution)
    except PackageNotFoundError:
        return None


# --- versions and the patch size ------------------------------------------------------------------------------------

def check_versions() -> list[str]:
    """Warn (not fail) when the installed terratorch or Lightning differs from the pin; return the differences."""
    differ = [f"{name} {installed_version(name)} (pinned {pinned})"
              for name, pinned in (("terratorch", PINNED_TERRATORCH), ("lightning", PINNED_LIGHTNING))
              if installed_version(name) != pinned]
    if differ:
        warnings.warn(
            f"{', '.join(differ)}: nycdata.model.terratorch_compat reaches into their internals (terratorch's "
            "_get_backbone, TerraMindTiM's sampler/generate/mod_name_mapping/tim_modalities/encoder_embeddings, "
            "build_tokenizer, checkpoint_filter_fn_tim's key mapping, the weight registries, Lightning's CSV "
            f"ExperimentWriter and CSVLogger._experiment). Re-test them: pytest {COMPAT_TEST} tests/test_tim.py "
            "tests/test_thought_cache.py tests/test_train.py", RuntimeWarning, stacklevel=2)
    return differ


def terramind_patch_sizes() -> dict[str, Any]:
    """The default ``patch_size`` of TerraMind's TiM and plain (ViT) backbones; the ``terramind_v1_*`` builders of
    terratorch's registry pass none, so these are the patch sizes every backbone nycdata builds has."""
    classes = {"TerraMindTiM": getattr(_import(TERRAMIND_TIM), "TerraMindTiM", None),
               "TerraMindViT": getattr(_import(TERRAMIND_VIT), "TerraMindViT", None)}
    return {name: None if cls is None else inspect.signature(cls.__init__).parameters.get("patch_size",
                                                                                          inspect.Parameter.empty).default
            for name, cls in classes.items()}


def check_patch_size() -> None:
    """Refuse a TerraMind whose patch is not ``nycdata.data.chips.PATCH_SIZE`` (chip sizes, thought maps and cached
    thoughts are laid out on it; the data layer cannot ask the model layer, so the two are compared here)."""
    sizes = terramind_patch_sizes()
    if any(size != PATCH_SIZE for size in sizes.values()):
        raise RuntimeError(f"TerraMind's patch size is {sizes} but nycdata.data.chips.PATCH_SIZE is {PATCH_SIZE}: "
                           + moved("the patch_size default of TerraMindTiM/TerraMindViT", "check_patch_size"))


_checked = False


def _import(name: str):
    return importlib.import_module(name)


def _module(name: str):
    """Import a terratorch module, checking versions and the patch size on the first call of the process."""
    global _checked
    if not _checked:
        _checked = True
        check_versions()
        check_patch_size()
    return _import(name)


def _attribute(owner, name: str, where: str, helper: str):
    try:
        return getattr(owner, name)
    except AttributeError as err:
        raise AttributeError(moved(f"{where}.{name}", helper)) from err


# --- building: the backbone builder and the deferred tokenizer -------------------------------------------------------

def get_backbone_builder() -> Callable:
    """terratorch's ``encoder_decoder_factory._get_backbone(backbone, **kwargs)``: EncoderDecoderFactory builds the
    backbone through this module-level name before the necks, decoder and head, so patching it is the one way to
    build only the backbone under a forked RNG (nycdata.model.factory.backbone_built_outside_global_rng)."""
    return _attribute(_module(ENCODER_DECODER_FACTORY), "_get_backbone", ENCODER_DECODER_FACTORY, "get_backbone_builder")


@contextlib.contextmanager
def patch_get_backbone(replacement: Callable) -> Iterator[None]:
    """Let EncoderDecoderFactory build backbones with ``replacement`` (same signature as :func:`get_backbone_builder`)."""
    from unittest import mock

    get_backbone_builder()  # fails clearly if it moved, instead of patching a name nobody reads
    with mock.patch.object(_module(ENCODER_DECODER_FACTORY), "_get_backbone", replacement):
        yield


def tim_class() -> type:
    """terratorch's ``TerraMindTiM`` class (not exported by a package ``__init__``): how a TiM backbone is recognised."""
    return _attribute(_module(TERRAMIND_TIM), "TerraMindTiM", TERRAMIND_TIM, "tim_class")


def tokenizer_builder_module():
    """The module whose ``build_tokenizer`` name ``TerraMindTiM.__init__`` calls (with keyword arguments only)."""
    module = _module(TERRAMIND_TIM)
    _attribute(module, "build_tokenizer", TERRAMIND_TIM, "tokenizer_builder_module")
    return module


@contextlib.contextmanager
def patch_tim_tokenizer_builder(replacement: Callable[..., dict]) -> Iterator[None]:
    """Let ``TerraMindTiM`` build its tokenizers with ``replacement(**kwargs)``: TiM builds the LULC tokenizer
    although its forward never uses it, and this module-level name is the only way to skip that
    (nycdata.model.tim.tokenizers_deferred)."""
    from unittest import mock

    with mock.patch.object(tokenizer_builder_module(), "build_tokenizer", replacement):
        yield


def build_tokenizer(**kwargs) -> torch.nn.ModuleDict:
    """terratorch's ``terramind.build_tokenizer(tokenizer_dict=, input_modalities=, pretrained=)``: builds the
    tokenizer TiM would have built, from the arguments a deferred build recorded (nycdata.model.tim.thought_tokenizer)."""
    return _attribute(_module(TERRAMIND), "build_tokenizer", TERRAMIND, "build_tokenizer")(**kwargs)


# --- TerraMindTiM's attributes ---------------------------------------------------------------------------------------

def sampler_of(backbone: torch.nn.Module):
    """``TerraMindTiM.sampler``, the GenerationSampler its forward thinks with (``sampler.generate``)."""
    return _attribute(backbone, SAMPLER, "TerraMindTiM", "sampler_of")


def set_sampler(backbone: torch.nn.Module, sampler: torch.nn.Module) -> None:
    """Swap TiM's sampler, e.g. for the cached thoughts of a ``*_cached`` variant: its forward calls
    ``self.sampler.generate`` and nothing else of it."""
    sampler_of(backbone)
    setattr(backbone, SAMPLER, sampler)


def generator_of(backbone: torch.nn.Module) -> torch.nn.Module | None:
    """The frozen TerraMind encoder-decoder that thinks (``sampler.model``); None when the sampler is a stand-in
    without one (cached thoughts)."""
    return getattr(sampler_of(backbone), GENERATOR, None)


def set_generator(backbone: torch.nn.Module, generator: torch.nn.Module) -> None:
    """Replace ``sampler.model`` (nycdata.model.tim.untie_generator_embeddings gives it its own embeddings)."""
    setattr(sampler_of(backbone), GENERATOR, generator)


def sampler_generate(backbone: torch.nn.Module) -> Callable[..., dict]:
    """``sampler.generate(mod_dict, schedule, ..., seed=..., ...)``: the only place TiM's thought tokens exist; TiM's
    forward calls it with ``seed=random.randint(...)`` and generation reseeds torch's global RNG from it."""
    return _attribute(sampler_of(backbone), "generate", "TerraMindTiM.sampler", "sampler_generate")


def set_sampler_generate(backbone: torch.nn.Module, generate: Callable[..., dict]) -> None:
    """Shadow ``sampler.generate`` on the instance (TiM's forward looks it up there on every call)."""
    sampler_generate(backbone)
    sampler_of(backbone).generate = generate


@contextlib.contextmanager
def sampler_generate_replaced(backbone: torch.nn.Module, generate: Callable[..., dict]) -> Iterator[None]:
    """Shadow ``sampler.generate`` for a while, then put back what was there (an instance wrapper, e.g.
    nycdata.model.tim.isolate_thought_rng's, or the class method)."""
    sampler = sampler_of(backbone)
    original = sampler_generate(backbone)
    own_wrapper = "generate" in vars(sampler)
    sampler.generate = generate
    try:
        yield
    finally:
        if own_wrapper:
            sampler.generate = original
        else:
            del sampler.generate  # back to the class method


def generated_tokens(output: dict, domain: str) -> torch.Tensor:
    """The token ids of ``domain`` in what ``sampler.generate`` returns (``{domain: {"tensor": ids, ...}}``)."""
    return output[domain]["tensor"]


def generation_output(domain: str, tokens: torch.Tensor) -> dict:
    """What a stand-in for ``sampler.generate`` must return for TiM's forward to read ``tokens`` as the thought."""
    return {domain: {"tensor": tokens}}


def thought_modalities(backbone: torch.nn.Module) -> list[str]:
    """``TerraMindTiM.tim_modalities``: the modalities it thinks (e.g. ``["LULC"]``)."""
    return _attribute(backbone, "tim_modalities", "TerraMindTiM", "thought_modalities")


def thought_domain(backbone: torch.nn.Module, modality: str) -> str:
    """``TerraMindTiM.mod_name_mapping[modality]``: the generator's (and encoder_embeddings') key of a modality,
    e.g. ``LULC -> tok_lulc@224``."""
    return _attribute(backbone, "mod_name_mapping", "TerraMindTiM", "thought_domain")[modality]


def encoder_embeddings(model: torch.nn.Module) -> torch.nn.ModuleDict | None:
    """The fine-tuned TerraMind encoder's ``encoder_embeddings`` ModuleDict (plain or TiM backbone), not the
    generator's (under ``sampler.``); None when the model has none."""
    import torch

    for name, module in model.named_modules():
        if (name.endswith(ENCODER_EMBEDDINGS) and f".{SAMPLER}." not in name
                and isinstance(module, torch.nn.ModuleDict)):
            return module
    return None


def register_input_pre_hook(backbone: torch.nn.Module, hook: Callable[[torch.nn.Module, dict], None]):
    """Call ``hook(backbone, inputs)`` before every TiM forward with its input dict (the first positional argument,
    or the keyword ``d`` of ``TerraMindTiM.forward(d)``), which the hook may edit."""

    def pre_hook(module, args, kwargs):
        hook(module, args[0] if args else kwargs.get("d"))

    return backbone.register_forward_pre_hook(pre_hook, with_kwargs=True)


# --- weights ---------------------------------------------------------------------------------------------------------

def backbone_weight_file(name: str) -> tuple[str, str]:
    """(repo, file) of a TerraMind checkpoint, e.g. ``terramind_v1_tiny``, from terratorch's internal registry."""
    table = _attribute(_module(TERRAMIND_REGISTER), "pretrained_weights", TERRAMIND_REGISTER, "backbone_weight_file")
    return table[name]["hf_hub_id"], table[name]["hf_hub_filename"]


def tokenizer_weight_file(name: str) -> tuple[str, str]:
    """(repo, file) of a TerraMind tokenizer, e.g. ``terramind_v1_tokenizer_lulc``."""
    table = _attribute(_module(TOKENIZER_REGISTER), "pretrained_weights", TOKENIZER_REGISTER, "tokenizer_weight_file")
    return table[name]["hf_hub_id"], table[name]["hf_hub_filename"]


def generator_checkpoint_key(name: str) -> str:
    """The key in TerraMind's checkpoint of the generator tensor ``sampler.model.<name>``: the checkpoint stores the
    encoder-decoder without the prefix, and terratorch's ``checkpoint_filter_fn_tim`` copies each key ``k`` to
    ``sampler.model.k`` (nycdata.model.weights.verify_generator compares the same way)."""
    return name


def tim_checkpoint_filter() -> Callable[[dict, torch.nn.Module], dict]:
    """terratorch's ``checkpoint_filter_fn_tim(state_dict, model)``, the mapping its ``pretrained=True`` path loads
    TiM's checkpoint with (tests load raw checkpoints the same way)."""
    return _attribute(_module(TERRAMIND_REGISTER), "checkpoint_filter_fn_tim", TERRAMIND_REGISTER,
                      "tim_checkpoint_filter")


def hf_hub_cache() -> str:
    """huggingface_hub's default cache folder, ``constants.HF_HUB_CACHE``."""
    import huggingface_hub.constants as hf_constants

    return hf_constants.HF_HUB_CACHE


def set_hf_hub_cache(cache: str | Path) -> None:
    """Point huggingface_hub's default cache at ``cache``: terratorch calls ``hf_hub_download`` without a
    ``cache_dir``, and ``hf_hub_download`` reads ``constants.HF_HUB_CACHE`` at call time."""
    import huggingface_hub.constants as hf_constants

    hf_constants.HF_HUB_CACHE = str(cache)


# --- training --------------------------------------------------------------------------------------------------------

def optimizer_factory() -> Callable:
    """terratorch's ``optimizer_factory(optimizer, lr, params, optimizer_hparams, scheduler, monitor,
    scheduler_hparams)`` (an internal module of terratorch.tasks): the task's own optimizer set-up, called with only
    the trainable parameters so TiM's frozen generator stays out of the param groups."""
    return _attribute(_module(OPTIMIZER_FACTORY), "optimizer_factory", OPTIMIZER_FACTORY, "optimizer_factory")


def csv_experiment_writer() -> type:
    """Lightning's ``lightning.pytorch.loggers.csv_logs.ExperimentWriter`` (what ``CSVLogger.experiment`` builds)."""
    from lightning.pytorch.loggers import csv_logs

    return _attribute(csv_logs, "ExperimentWriter", "lightning.pytorch.loggers.csv_logs", "csv_experiment_writer")


def appending_csv_logger(save_dir: str | Path):
    """A Lightning ``CSVLogger`` writing ``save_dir/metrics.csv`` that continues an existing file instead of deleting it.

    Lightning's ExperimentWriter deletes ``metrics.csv`` in ``_check_log_dir_exists``; a resumed run must append.
    The writer overrides that private method (reading the header through its ``_fs``), and the logger builds it
    where ``CSVLogger.experiment`` builds its own, caching it in the private ``_experiment``.
    """
    import csv

    from lightning.pytorch.loggers import CSVLogger

    class AppendingWriter(csv_experiment_writer()):
        def _check_log_dir_exists(self) -> None:
            if self._fs.isfile(self.metrics_file_path):
                with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                    self.metrics_keys = sorted(next(csv.reader(file), []))

    class AppendingCSVLogger(CSVLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._experiment = AppendingWriter(log_dir=self.log_dir)
            return self._experiment

    return AppendingCSVLogger(save_dir=save_dir, name="", version="")
