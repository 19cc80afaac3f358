"""Thinking-in-Modalities made visible: capture, decode and score the thoughts.

terratorch's ``TerraMindTiM`` generates the thought tokens inside its forward
and never returns them; its frozen generator stays random unless loaded
through the pretrained path; it shares (and so freezes) the encoder's input
embeddings with that generator; and it builds the LULC tokenizer (~184 M
parameters, trainable) although its forward never uses it. This module wraps
those spots thinly instead of copying terratorch's code.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from nycdata import console
from nycdata.data.chips import PATCH_SIZE
from nycdata.data.classes import IGNORE_INDEX
from nycdata.data.metrics import confusion_matrix, metrics_from_confusion
from nycdata.data.thoughts import THOUGHTS_KEY
from nycdata.model import terratorch_compat as compat
from nycdata.model.factory import tim_untrained_warning_silenced

# TerraMind's LULC modality follows the ESRI / Impact Observatory 10 m annual land cover. The channel order is
# documented on the model card of ibm-esa-geospatial/TerraMind-1.0-Tokenizer-LULC ("No data, water, trees, flooded
# vegetation, crops, built area, bare ground, snow/ice, clouds, rangeland"); IBM/terramind's
# notebooks/plotting_utils.py colour map has the same order.
ESRI_LULC_CLASSES: tuple[str, ...] = (
    "no data", "water", "trees", "flooded vegetation", "crops",
    "built area", "bare ground", "snow/ice", "clouds", "rangeland",
)
ESRI_LULC_COLOURS: tuple[str, ...] = (
    "#000000", "#1a5bab", "#358221", "#87d19e", "#ffdb5c",
    "#ed022a", "#ede9e4", "#f2faff", "#c8c8c8", "#c6ad8d",
)
# ESRI class -> our class, following the WorldCover crosswalk of nycdata.data.classes:
# flooded vegetation ~ herbaceous wetland -> water; crops and rangeland
# (grass-dominated) -> herbaceous; snow/ice -> other; clouds and no data -> ignore.
ESRI_TO_CLASS: dict[int, int] = {0: IGNORE_INDEX, 1: 0, 2: 2, 3: 0, 4: 3, 5: 1, 6: 4, 7: 4, 8: IGNORE_INDEX, 9: 3}


def esri_to_class(lulc: np.ndarray | torch.Tensor) -> np.ndarray:
    """Map decoded ESRI LULC class maps (0..9) to our 5 classes (uint8, 255 = ignore)."""
    lookup = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for esri, ours in ESRI_TO_CLASS.items():
        lookup[esri] = ours
    values = np.asarray(lulc.cpu() if isinstance(lulc, torch.Tensor) else lulc).astype(np.intp)
    return lookup[values]


def tim_backbone(model: torch.nn.Module):
    """The ``TerraMindTiM`` inside a segmentation model, or None for a plain backbone."""
    tim_class = compat.tim_class()
    return next((m for m in model.modules() if isinstance(m, tim_class)), None)


@contextlib.contextmanager
def tokenizers_deferred() -> Iterator[list[dict]]:
    """Build TiM backbones without the tokenizers terratorch builds for them; yield the arguments it built them with.

    ``TerraMindTiM`` builds the LULC tokenizer (~184 M parameters, 85 % of a tiny TiM model) although its forward
    never calls it (generation passes tokenizers on only for text modalities). Every TiM build spent about 1.3 s
    of CPU initialising it, every fine-tune carried it to the GPU and, pretrained, downloaded its 0.7 GB. Only
    decoding thoughts (notebook 05) needs it: :func:`thought_tokenizer` builds it then, from these arguments.
    """
    calls: list[dict] = []

    def defer(**kwargs):
        calls.append(kwargs)
        return {}

    with compat.patch_tim_tokenizer_builder(defer):
        yield calls


def remember_tokenizer(model: torch.nn.Module, deferred: list[dict]) -> None:
    """Keep the deferred tokenizer arguments of a TiM build on its backbone (for :func:`thought_tokenizer`)."""
    backbone = tim_backbone(model)
    if backbone is not None and deferred:
        backbone.deferred_tokenizer_args = deferred[-1]


def thought_tokenizer(model: torch.nn.Module, modality: str) -> torch.nn.Module:
    """The (frozen) tokenizer of one thought modality, built on first use and kept outside the module tree, so it
    is in no parameter list, optimizer or checkpoint."""
    backbone = tim_backbone(model)
    args = getattr(backbone, "deferred_tokenizer_args", None)
    if backbone is None or args is None or modality not in compat.thought_modalities(backbone):
        raise ValueError(f"no {modality} tokenizer for this model: decoding needs a TiM model that thinks {modality}")
    key = compat.thought_domain(backbone, modality)
    built = backbone.__dict__.setdefault("_thought_tokenizers", {})
    if key not in built:
        built[key] = compat.build_tokenizer(**{**args, "input_modalities": [key]})[key].eval().requires_grad_(False)
    return built[key]


def input_embeddings(model: torch.nn.Module) -> torch.nn.ModuleDict:
    """The fine-tuned TerraMind encoder's ``encoder_embeddings`` (patch and modality embeddings, thought embedding for TiM)."""
    embeddings = compat.encoder_embeddings(model)
    if embeddings is None:
        raise ValueError("no TerraMind encoder_embeddings in this model")
    return embeddings


def thought_embedding_keys(model: torch.nn.Module) -> tuple[str, ...]:
    """Keys of ``encoder_embeddings`` that embed thoughts (e.g. ``tok_lulc@224``); empty for a plain backbone."""
    backbone = tim_backbone(model)
    return () if backbone is None else tuple(compat.thought_domain(backbone, m) for m in compat.thought_modalities(backbone))


def embeddings_shared_with_generator(model: torch.nn.Module) -> int:
    """How many parameter tensors the fine-tuned encoder's embeddings share with TiM's generator (0: none)."""
    backbone = tim_backbone(model)
    generator = None if backbone is None else compat.generator_of(backbone)
    if generator is None:
        return 0
    own = {id(p) for p in input_embeddings(model).parameters()}
    return sum(id(p) in own for p in generator.parameters())


def untie_generator_embeddings(model: torch.nn.Module) -> int:
    """Give TiM's frozen generator its own copy of the embeddings it shares with the fine-tuned encoder, and let the
    encoder's train as the baseline's do; return how many tensors were shared (0 for a plain backbone).

    terratorch's TiM (``tim_chained_generations=True``, the default since terratorch PR #1152) builds the generator
    on the encoder's own embedding modules and then freezes the whole generator, so every TiM fine-tune keeps its
    S2/S1/DEM patch embeddings and its thought embedding frozen while the baseline trains them: any difference would
    mix thinking with freezing. ``tim_chained_generations=False`` would separate them too, but its generator then has
    no embedding for the thought modality and silently ignores its own partly decoded tokens when
    ``tim_decoding_steps > 1``. A deep copy of the whole generator keeps it exactly as built and loaded (its internal
    ties, e.g. decoder and encoder modality embeddings, survive ``deepcopy``), equal tensor by tensor to the checkpoint.
    """
    backbone = tim_backbone(model)
    if backbone is None:
        return 0
    shared = embeddings_shared_with_generator(model)
    if shared:
        compat.set_generator(backbone, copy.deepcopy(compat.generator_of(backbone)).requires_grad_(False))
    input_embeddings(model).requires_grad_(True)
    return shared


def freeze_input_embeddings(model: torch.nn.Module) -> int:
    """Freeze the encoder's embeddings the way upstream TiM's sharing does; return how many parameters were frozen."""
    frozen = 0
    for param in input_embeddings(model).parameters():
        frozen += param.numel() if param.requires_grad else 0
        param.requires_grad_(False)
    return frozen


def generator_tensor_count(model: torch.nn.Module) -> int:
    """Number of tensors of the frozen generator (``sampler.model.*``); 0 for a plain backbone."""
    backbone = tim_backbone(model)
    return 0 if backbone is None else len(compat.generator_of(backbone).state_dict())


def frozen_generator_keys(module: torch.nn.Module) -> list[str]:
    """State-dict keys of TiM's frozen generator that no trained part of ``module`` shares: what every build of the
    model restores by itself (TerraMind's weights, or the one shared random generator), so checkpoints can leave
    them out (0.84 GB of a 1.5 GB base TiM checkpoint)."""
    state = module.state_dict(keep_vars=True)
    marker = f".{compat.SAMPLER}."
    elsewhere = {id(t) for key, t in state.items() if marker not in f".{key}"}
    return [key for key, t in state.items()
            if marker in f".{key}" and id(t) not in elsewhere and not t.requires_grad]


@dataclass
class ThoughtCapture:
    """Thought tokens of every TiM forward inside :func:`capture_thoughts`, in call order."""

    domains: dict[str, str]  # TiM modality -> generator domain, e.g. LULC -> tok_lulc@224
    calls: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def grid(self, modality: str, batch_size: int, call: int = -1) -> torch.Tensor:
        """Token ids of one forward as ``[B, T, h/16, w/16]`` (the temporal wrapper folds T into the batch)."""
        tokens = self.calls[call][self.domains[modality]]
        side = int(round(tokens.shape[-1] ** 0.5))
        return tokens.reshape(batch_size, -1, side, side)


@contextlib.contextmanager
def capture_thoughts(model: torch.nn.Module) -> Iterator[ThoughtCapture]:
    """Record the thought tokens the TiM backbone generates, exactly as its encoder then reads them.

    Wraps ``sampler.generate`` (the only place the tokens exist) and copies its
    output; the model's computation and random draws are unchanged.
    """
    backbone = tim_backbone(model)
    if backbone is None:
        raise ValueError("this model has no TiM backbone, so it has no thoughts to capture")
    domains = {m: compat.thought_domain(backbone, m) for m in compat.thought_modalities(backbone)}
    capture = ThoughtCapture(domains)
    original = compat.sampler_generate(backbone)  # e.g. isolate_thought_rng's wrapper, which must survive the capture

    def generate_and_record(*args, **kwargs):
        out = original(*args, **kwargs)
        capture.calls.append({d: compat.generated_tokens(out, d).detach().clone() for d in domains.values()})
        return out

    with compat.sampler_generate_replaced(backbone, generate_and_record):
        yield capture


# The seed every build's random (untrained) generator is drawn with; see share_random_generator.
RANDOM_GENERATOR_SEED = 0
_random_generators: dict[str, dict[str, torch.Tensor]] = {}


def share_random_generator(model: torch.nn.Module, model_args: dict, force: bool = False) -> bool:
    """Give a TiM model built without weights the one random generator every such build gets; False otherwise.

    With TerraMind's weights every TiM run and the thought cache think with the same generator. Without
    them (``allow_random_generator``: tests, fixture, timing) each build would draw its own from the global
    RNG, so an online run and the cache built for its ``*_cached`` twin would think with different
    generators. The generator (with the input embeddings terratorch shares with it) is therefore taken from
    a reference build under :data:`RANDOM_GENERATOR_SEED`, made once per process under ``fork_rng``, so the
    global RNG, and with it the rest of the model's initialisation, is left as it was.

    ``force`` (``tim_random_generator``, the original's defect) does it to a pretrained build too, except for the
    input embeddings (``encoder_embeddings.*``): a raw checkpoint fills those, since they are the encoder's own.
    """
    backbone = tim_backbone(model)
    if backbone is None or (not force and (model_args.get("backbone_pretrained") or model_args.get("backbone_ckpt_path"))):
        return False
    model_args = {k: v for k, v in model_args.items() if k != "backbone_ckpt_path"} | {"backbone_pretrained": False}
    key = repr(sorted(model_args.items()))
    if key not in _random_generators:
        from terratorch.models import EncoderDecoderFactory

        with torch.random.fork_rng(devices=[]), tokenizers_deferred(), tim_untrained_warning_silenced():
            torch.manual_seed(RANDOM_GENERATOR_SEED)
            reference = EncoderDecoderFactory().build_model(task="segmentation", **model_args)
        _random_generators[key] = compat.generator_of(tim_backbone(reference)).state_dict()
    state = _random_generators[key]
    if force:
        state = {k: v for k, v in state.items() if not k.startswith(f"{compat.ENCODER_EMBEDDINGS}.")}
    compat.generator_of(backbone).load_state_dict(state, strict=not force)
    return True


# Thought streams of different ``thought_seed`` values start this far apart (generation adds its step index).
THOUGHT_SEED_STRIDE = 1_000_003


def isolate_thought_rng(model: torch.nn.Module, thought_seed: int = 0) -> bool:
    """Let TiM's generator sample from its own random stream, shifted by ``thought_seed``; False without a generator.

    terratorch's TiM forward calls ``sampler.generate(seed=random.randint(...))`` and generation calls
    ``torch.manual_seed(seed + step)``: every TiM step reseeds torch's global RNG, so a TiM run's dropout,
    shuffling and D4 draws depend on its thoughts and differ from a baseline or cached-thought run with the
    same seed. Under ``torch.random.fork_rng`` the global stream is left as it was: runs with one seed then
    differ only in their thoughts, which stay a function of the seed (through ``random``) and ``thought_seed``.
    """
    backbone = tim_backbone(model)
    if backbone is None or isinstance(compat.sampler_of(backbone), CachedThoughts):
        return False
    generate = compat.sampler_generate(backbone)
    parameter = next(compat.sampler_of(backbone).parameters(), None)

    def generate_in_own_stream(*args, seed=None, **kwargs):
        device = parameter.device if parameter is not None else torch.device("cpu")
        devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        if seed is not None:
            seed += thought_seed * THOUGHT_SEED_STRIDE
        with torch.random.fork_rng(devices=devices):
            return generate(*args, seed=seed, **kwargs)

    compat.set_sampler_generate(backbone, generate_in_own_stream)
    return True


@torch.no_grad()
def decode_lulc(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Decode LULC thought tokens ``[B, T, h, w]`` to ESRI class maps ``[B, T, 16h, 16w]`` (argmax of 10 logits)."""
    device = next(model.parameters()).device
    tokenizer = thought_tokenizer(model, "LULC").to(device)
    B, T, h, w = tokens.shape
    logits = tokenizer.decode_tokens(tokens.reshape(B * T, h, w).to(device))
    return logits.argmax(1).reshape(B, T, h * PATCH_SIZE, w * PATCH_SIZE).cpu()


def random_generator_warning(variant_name: str) -> str:
    return (f"WARNING: variant {variant_name!r} thinks with a RANDOM generator (pretrained=false): its thoughts (or generated "
            "inputs) are noise, and nothing about TiM can be concluded from this run. Use pretrained=true for the study.")


def check_generator(params, variant) -> str | None:
    """Refuse a TiM model whose generator would stay random, unless explicitly allowed; return a warning then.

    The warning is shown through :func:`nycdata.console.warn`, so however many builds check it (a notebook's own
    check, then ``build_task`` inside ``fine_tune``), it appears once.
    """
    if variant.uses_generator and params["tim_random_generator"]:
        if not params["allow_random_generator"]:
            raise ValueError(
                f"tim_random_generator=true reproduces the original's defect: variant {variant.name!r} would think with "
                "a RANDOM generator although the encoder is pretrained. Set allow_random_generator=true to run that "
                "setting on purpose (params/original.yaml does), or tim_random_generator=false for a real TiM.")
        message = (f"WARNING: variant {variant.name!r} thinks with a RANDOM generator on purpose (tim_random_generator, "
                   "the original experiment's defect): its thoughts are noise.")
        console.warn(message, stacklevel=2)
        return message
    if not variant.uses_generator or params["pretrained"] or params["backbone_ckpt_path"]:
        return None  # weights come from a file: build_task verifies them
    if not params["allow_random_generator"]:
        raise ValueError(
            f"variant {variant.name!r} with pretrained=false would think with random generator weights. "
            "Set pretrained=true (weights from the Hugging Face cache) or, for tests and the fixture only, "
            "allow_random_generator=true."
        )
    message = random_generator_warning(variant.name)
    console.warn(message, stacklevel=2)
    return message


@torch.no_grad()
def thought_examples(task, loader, device: str = "cpu") -> dict:
    """Run a LULC-thinking model over a loader; return its predictions, thought tokens and decoded thoughts.

    Arrays are ``[N, ...]`` over all chips: ``tokens [N, T, h, w]``, ``esri [N, T, H, W]`` (decoded thought),
    ``thought_classes`` (ESRI -> our classes), ``pred [N, H, W]``, ``truth [N, H, W]``, ``chip_ids``.
    """
    task.model.eval().to(device)
    parts: dict[str, list] = {"tokens": [], "esri": [], "pred": [], "truth": [], "chip_ids": []}
    for batch in loader:
        image = {m: x.to(device) for m, x in batch["image"].items()}
        with capture_thoughts(task.model) as capture:
            logits = task.model(image).output
        tokens = capture.grid("LULC", len(batch["filename"]))
        parts["tokens"].append(tokens.cpu())
        parts["esri"].append(decode_lulc(task.model, tokens))
        parts["pred"].append(logits.argmax(1).cpu())
        parts["truth"].append(batch["mask"])
        parts["chip_ids"].extend(batch["filename"])
    out = {k: (torch.cat(v).numpy() if k != "chip_ids" else v) for k, v in parts.items()}
    out["thought_classes"] = esri_to_class(out["esri"])
    return out


def thought_agreement(thought_classes: np.ndarray, truth: np.ndarray) -> dict:
    """How well the thought (in our classes) matches the ground truth, where both are defined.

    ``thought_classes [N, T, H, W]`` is compared with ``truth [N, H, W]`` at every timestep.
    """
    truth_t = np.broadcast_to(truth[:, None], thought_classes.shape)
    defined = thought_classes != IGNORE_INDEX
    cm = confusion_matrix(np.where(defined, truth_t, IGNORE_INDEX), np.where(defined, thought_classes, 0))
    metrics = metrics_from_confusion(cm)
    return {"pixel_agreement": metrics["pixel_accuracy"], "miou": metrics["miou"], "iou": metrics["iou"],
            "thought_undefined_fraction": float(1 - defined.mean()), "confusion": cm.tolist()}


def per_chip_agreement(thought_classes: np.ndarray, truth: np.ndarray, chip_ids) -> "pd.DataFrame":
    """Fraction of each chip's pixels (all timesteps, both defined) where the thought equals ground truth."""
    import pandas as pd

    truth_t = np.broadcast_to(truth[:, None], thought_classes.shape)
    defined = (thought_classes != IGNORE_INDEX) & (truth_t != IGNORE_INDEX)
    hits = ((thought_classes == truth_t) & defined).sum(axis=(1, 2, 3))
    counts = defined.sum(axis=(1, 2, 3))
    agreement = np.divide(hits, counts, out=np.full(len(counts), np.nan), where=counts > 0)
    return pd.DataFrame({"chip_id": list(chip_ids), "thought_agreement": agreement})


class CachedThoughts(torch.nn.Module):
    """Stands in for TiM's ``GenerationSampler`` in a ``*_cached`` variant: ``generate`` returns the ids the batch
    carried (see :mod:`nycdata.model.thinking`)."""

    def __init__(self, domain: str):
        super().__init__()
        self.domain = domain
        self.tokens: torch.Tensor | None = None

    def generate(self, *args, **kwargs) -> dict:
        if self.tokens is None:
            raise RuntimeError(f"a cached-thought model needs image['{THOUGHTS_KEY}'] in its input")
        tokens, self.tokens = self.tokens, None
        return compat.generation_output(self.domain, tokens)


def _take_thoughts(module, inputs):
    """Forward pre-hook of the TiM backbone: move the cached ids out of the input dict into the sampler."""
    id_map = inputs.pop(THOUGHTS_KEY)  # (B*T, 1, H, W) after the temporal wrapper folded T into the batch
    ids = id_map[:, 0, PATCH_SIZE // 2::PATCH_SIZE, PATCH_SIZE // 2::PATCH_SIZE]  # one id per 16 x 16 patch
    compat.sampler_of(module).tokens = ids.reshape(ids.shape[0], -1).round().long()


def use_cached_thoughts(model: torch.nn.Module) -> None:
    """Swap the TiM generator of ``model`` for :class:`CachedThoughts` (one thought modality)."""
    backbone = tim_backbone(model)
    if backbone is None or len(compat.thought_modalities(backbone)) != 1:
        raise ValueError("cached thoughts need a TiM backbone with exactly one thought modality")
    compat.set_sampler(backbone, CachedThoughts(compat.thought_domain(backbone, compat.thought_modalities(backbone)[0])))
    compat.register_input_pre_hook(backbone, _take_thoughts)
