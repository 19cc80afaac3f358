"""The segmentation model of the original study, built with terratorch's EncoderDecoderFactory.

TerraMind backbone over T timesteps (temporal wrapper, ``concat`` pooling),
necks ``SelectIndices -> ReshapeTokensToImage(remove_cls_token=False) ->
LearnedInterpolateToPyramidal``, ``UNetDecoder [512, 256, 128, 64]``, head
dropout 0.1, 5 classes.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Sequence

from nycdata.data.classes import NUM_CLASSES
from nycdata.model.terratorch_compat import get_backbone_builder, patch_get_backbone

MODEL_SIZES = ("tiny", "small", "base", "large")
NECK_INDICES = {"tiny": [2, 5, 8, 11], "small": [2, 5, 8, 11], "base": [2, 5, 8, 11], "large": [5, 11, 17, 23]}


def backbone_name(model_size: str, tim: bool = False) -> str:
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size {model_size!r} unknown; choose one of {list(MODEL_SIZES)}")
    return f"terramind_v1_{model_size}" + ("_tim" if tim else "")


def model_args(model_size: str, modalities: Sequence[str], timesteps: int, pretrained: bool,
               tim_modalities: Sequence[str] | None = None, decoder_channels: Sequence[int] = (512, 256, 128, 64)) -> dict:
    """``model_args`` for terratorch's EncoderDecoderFactory (and SemanticSegmentationTask)."""
    args = dict(
        backbone=backbone_name(model_size, tim=bool(tim_modalities)),
        backbone_pretrained=pretrained,
        backbone_modalities=list(modalities),
        backbone_use_temporal=True,
        backbone_temporal_pooling="concat",
        backbone_temporal_n_timestamps=timesteps,
        necks=[
            {"name": "SelectIndices", "indices": NECK_INDICES[model_size]},
            {"name": "ReshapeTokensToImage", "remove_cls_token": False},
            {"name": "LearnedInterpolateToPyramidal"},
        ],
        decoder="UNetDecoder",
        decoder_channels=list(decoder_channels),
        head_dropout=0.1,
        num_classes=NUM_CLASSES,
    )
    if tim_modalities:
        args["backbone_tim_modalities"] = list(tim_modalities)
    return args


@contextlib.contextmanager
def backbone_built_outside_global_rng() -> Iterator[None]:
    """Build models whose backbone leaves torch's global RNG as it found it, so the necks, decoder and head that
    EncoderDecoderFactory builds after it start from the same weights in every variant with the same seed.

    A TiM backbone draws far more random numbers while it is built (generator, tokenizer) than a plain one, so
    without this the decoder and head of ``tim`` and ``baseline`` would start from different draws and the paired
    comparison would mix thinking with initialisation. The backbone's own random init is overwritten by the
    checkpoint when ``pretrained`` (and its draws do not matter for matching). Patches terratorch's module-level
    ``_get_backbone`` through nycdata.model.terratorch_compat (tested there, so an upgrade that moves it fails loudly).
    terratorch's warning about an untrained TiM is silenced in there (:func:`tim_untrained_warning_silenced`).
    """
    import torch

    build_backbone = get_backbone_builder()

    def build_in_forked_rng(*args, **kwargs):
        with torch.random.fork_rng(devices=[]), tim_untrained_warning_silenced():
            return build_backbone(*args, **kwargs)

    with patch_get_backbone(build_in_forked_rng):
        yield


@contextlib.contextmanager
def tim_untrained_warning_silenced() -> Iterator[None]:
    """Build TiM backbones without terratorch's "TerraMind TiM model not pre-trained" UserWarning.

    Only this one message is filtered, and only while a backbone is built. Training builds a TiM model without
    TerraMind's weights only when ``nycdata.model.tim.check_generator`` allowed it, and that check says so once and
    prominently (``nycdata.console.warn``), as ``nycdata.notebook`` does for a whole run with ``pretrained=false``;
    terratorch's line would repeat it on stderr for every build (a notebook builds several; loading a checkpoint
    builds the model again).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TerraMind TiM model not pre-trained", category=UserWarning)
        yield
