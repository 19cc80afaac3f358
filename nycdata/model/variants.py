"""The variant table: which backbone, which inputs, which thoughts.

One table used by params (``variant``), the notebooks and the CLI. TiM
variants use ``terramind_v1_<size>_tim``: a frozen copy of TerraMind first
generates ("thinks") tokens of the ``thoughts`` modalities from the inputs,
and the fine-tuned encoder reads them next to the image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from nycdata.data.chips import INPUT_MODALITIES
from nycdata.model.factory import model_args

S1_INPUTS = ("S1RTC", "DEM")


@dataclass(frozen=True)
class Variant:
    name: str
    modalities: tuple[str, ...]
    thoughts: tuple[str, ...]  # TiM modalities; empty for a plain backbone
    description: str
    generated: tuple[str, ...] = ()  # inputs generated once by TerraMind's generate model (see nycdata.model.generated)
    cached: bool = False  # reads thoughts cached once per chip x D4 transform (see nycdata.model.thinking)
    frozen_embeddings: bool = False  # input embeddings frozen, as upstream TiM's sharing with its generator freezes them

    @property
    def online(self) -> str:
        """The TiM variant whose generator thinks the thoughts a cached variant reads."""
        return self.name.removesuffix("_cached")

    @property
    def is_tim(self) -> bool:
        return bool(self.thoughts)

    @property
    def uses_generator(self) -> bool:
        """Thinks (TiM) or reads generated inputs: either way TerraMind's generator must hold real weights."""
        return bool(self.thoughts or self.generated)

    @property
    def backbone_modalities(self) -> tuple[str, ...]:
        return (*self.modalities, *self.generated)


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("baseline", INPUT_MODALITIES, (), "S2L2A + S1RTC + DEM, plain TerraMind (the original Phase 2 model)"),
    Variant("tim", INPUT_MODALITIES, ("LULC",), "same inputs, thinks LULC first (the original Phase 3 TiM model)"),
    Variant("tim_ndvi", INPUT_MODALITIES, ("NDVI",), "same inputs, thinks NDVI: TiM without a self-referential LULC thought"),
    Variant("baseline_frozen_embed", INPUT_MODALITIES, (), "baseline with its input embeddings frozen, as terratorch's "
            "TiM freezes them (tim_share_embeddings: true): separates freezing from thinking", frozen_embeddings=True),
    Variant("baseline_s1", S1_INPUTS, (), "radar + DEM only, plain TerraMind"),
    Variant("tim_s1", S1_INPUTS, ("LULC",), "radar + DEM only, thinks LULC: where TiM should help most"),
    Variant("tim_input", INPUT_MODALITIES, (), "the seed's fallback: LULC generated once by TerraMind, read as a 4th input",
            generated=("LULC",)),
    Variant("tim_cached", INPUT_MODALITIES, ("LULC",), "tim reading thoughts cached once per chip and D4 transform", cached=True),
    Variant("tim_ndvi_cached", INPUT_MODALITIES, ("NDVI",), "tim_ndvi with cached thoughts", cached=True),
    Variant("tim_s1_cached", S1_INPUTS, ("LULC",), "tim_s1 with cached thoughts", cached=True),
)}

# The comparison each TiM variant answers: (TiM variant, its baseline). A TiM variant is compared with
# baseline_frozen_embed too, the matched control when tim_share_embeddings reproduces upstream's frozen embeddings.
COMPARISONS: tuple[tuple[str, str], ...] = (("tim", "baseline"), ("tim_ndvi", "baseline"), ("tim_s1", "baseline_s1"),
                                             ("tim_input", "baseline"), ("tim_cached", "baseline"),
                                             ("tim_ndvi_cached", "baseline"), ("tim_s1_cached", "baseline_s1"),
                                             ("tim", "baseline_frozen_embed"), ("tim_cached", "baseline_frozen_embed"))
# Controls: what freezing alone does, no thinking involved (no gate, never published).
CONTROLS: tuple[tuple[str, str], ...] = (("baseline_frozen_embed", "baseline"),)


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"variant {name!r} unknown; valid variants: {', '.join(VARIANTS)}")
    return VARIANTS[name]


def cached_twin(name: str) -> str | None:
    """The ``*_cached`` variant reading thoughts cached for the online TiM variant ``name``; None if it has none."""
    twin = f"{name}_cached"
    return twin if twin in VARIANTS else None


def variant_model_args(params: Mapping, variant: Variant) -> dict:
    """EncoderDecoderFactory ``model_args`` for one variant under ``params``."""
    args = model_args(params["model_size"], variant.backbone_modalities, params["timesteps"], params["pretrained"],
                      tim_modalities=variant.thoughts or None, decoder_channels=params["decoder_channels"])
    if params["backbone_ckpt_path"]:
        args["backbone_ckpt_path"] = str(params["backbone_ckpt_path"])
    if variant.is_tim:
        args.update(backbone_tim_decoding_steps=params["tim_decoding_steps"], backbone_tim_temps=float(params["tim_temperature"]),
                    backbone_tim_top_p=float(params["tim_top_p"]), backbone_tim_top_k=params["tim_top_k"])
    return args
