"""TerraMind weights: which files a variant needs, where they come from, and proof the TiM generator got them.

terratorch fetches weights with ``hf_hub_download`` and the default cache.
``hf_cache_dir`` points that at a local cache; with ``HF_HUB_OFFLINE=1`` a
missing file becomes an error naming the repository and file and the command
that pre-downloads them (``python -m nycdata download-weights``).

The TiM generator (``sampler.model.*``) is only filled from the checkpoint on
terratorch's ``pretrained=True`` path; with ``pretrained=False`` or a raw
``ckpt_path`` it stays at its random initialisation with nothing but a log
warning. :func:`verify_generator` compares it tensor by tensor with the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from nycdata.model import terratorch_compat as compat
from nycdata.model.tim import generator_tensor_count, tim_backbone
from nycdata.model.variants import Variant
from nycdata.params import resolve_path

DOWNLOAD_COMMAND = "python -m nycdata download-weights -f params/nyc.yaml"


class GeneratorNotLoaded(RuntimeError):
    """The TiM generator would think with weights that are not TerraMind's."""


def backbone_weights(model_size: str) -> tuple[str, str]:
    """(repo, file) of ``terramind_v1_<size>``: one checkpoint serves the plain and the TiM backbone."""
    return compat.backbone_weight_file(f"terramind_v1_{model_size}")


def tokenizer_weights(modality: str) -> tuple[str, str]:
    return compat.tokenizer_weight_file(f"terramind_v1_tokenizer_{modality.lower()}")


def required_files(params: Mapping, variant: Variant) -> list[tuple[str, str]]:
    """Every Hugging Face file building ``variant`` with ``pretrained=true`` reads."""
    return [backbone_weights(params["model_size"]), *(tokenizer_weights(m) for m in variant.thoughts)]


def use_cache_dir(params: Mapping) -> Path | None:
    """Point huggingface_hub's default cache at ``hf_cache_dir`` (terratorch passes no ``cache_dir``)."""
    if not params["hf_cache_dir"]:
        return None
    cache = resolve_path(params["hf_cache_dir"])
    compat.set_hf_hub_cache(cache)
    return cache


def missing_files(params: Mapping, variant: Variant) -> list[tuple[str, str]]:
    from huggingface_hub import try_to_load_from_cache

    return [(repo, name) for repo, name in required_files(params, variant)
            if not isinstance(try_to_load_from_cache(repo, name, cache_dir=compat.hf_hub_cache()), str)]


def offline_error(params: Mapping, variant: Variant, cause: Exception) -> RuntimeError:
    missing = missing_files(params, variant) or required_files(params, variant)
    listing = ", ".join(f"{repo}/{name}" for repo, name in missing)
    return RuntimeError(
        f"TerraMind weights for variant {variant.name!r} (model_size {params['model_size']}) are not in the Hugging Face "
        f"cache {compat.hf_hub_cache()} and downloading is off or failed: missing {listing}. Pre-download them on a "
        f"machine with internet: `{DOWNLOAD_COMMAND} -p model_size {params['model_size']} -p variant {variant.name}`, "
        f"then copy the cache here and set hf_cache_dir (or HF_HUB_CACHE). ({type(cause).__name__}: {cause})"
    )


def download(params: Mapping, variant: Variant) -> list[str]:
    """Fetch every file the variant needs into the cache; return their local paths."""
    from huggingface_hub import hf_hub_download

    use_cache_dir(params)
    return [hf_hub_download(repo_id=repo, filename=name) for repo, name in required_files(params, variant)]


def generator_source(params: Mapping) -> str | None:
    """The file the generator should hold: the backbone checkpoint (from the cache) or ``backbone_ckpt_path``."""
    from huggingface_hub import hf_hub_download

    if params["backbone_ckpt_path"]:
        return str(params["backbone_ckpt_path"])
    if params["pretrained"]:
        repo, name = backbone_weights(params["model_size"])
        return hf_hub_download(repo_id=repo, filename=name)
    return None


def verify_generator(model: torch.nn.Module, weights_file: str) -> int:
    """Check every ``sampler.model.*`` tensor equals TerraMind's checkpoint; return how many were checked.

    The checkpoint stores the encoder-decoder without the ``sampler.model.`` prefix
    (terratorch's ``checkpoint_filter_fn_tim`` maps it the same way: see ``terratorch_compat.generator_checkpoint_key``).
    """
    backbone = tim_backbone(model)
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    key = compat.generator_checkpoint_key
    wrong = [k for k, v in compat.generator_of(backbone).state_dict().items()
             if key(k) not in state or not torch.equal(v.cpu(), state[key(k)])]
    if wrong:
        raise GeneratorNotLoaded(
            f"{len(wrong)} of {generator_tensor_count(model)} TiM generator tensors (sampler.model.*) differ from "
            f"{weights_file}, e.g. {wrong[0]}: the generator would think with random weights. A raw `ckpt_path` does not "
            "fill the generator; use pretrained=true (terratorch maps the checkpoint into sampler.model), "
            "or allow_random_generator=true for tests only."
        )
    return generator_tensor_count(model)
