"""TiM at baseline cost: think once per chip, timestep and D4 transform, then train on the cached thoughts.

The frozen generator never changes, yet online TiM re-runs it in every
training step. The caching pass runs the verified online TiM model once per
chip x D4 transform (the thought of a flipped image is generated from the
flipped image) x K samples, and stores the token ids as
``<run>/thought_cache/<variant>/<chip_id>.npy`` (``[8, K, T, h, w]`` int16, a few KB).
A ``*_cached`` variant's TiM backbone then reads those ids from the batch
(``image["THOUGHTS"]``) instead of calling the generator, which is not even
kept in the model: :class:`CachedThoughts` takes its place.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from nycdata import chips
from nycdata.io import replace_dir_atomically, write_json
from nycdata.params import resolve_path, run_root

THOUGHTS_KEY = "THOUGHTS"
PATCH = 16
CACHE_DIR = "thought_cache"
DONE_FILE = "cache.json"


class CachedThoughts(torch.nn.Module):
    """Stands in for TiM's ``GenerationSampler``: ``generate`` returns the ids the batch carried."""

    def __init__(self, domain: str):
        super().__init__()
        self.domain = domain
        self.tokens: torch.Tensor | None = None

    def generate(self, *args, **kwargs) -> dict:
        if self.tokens is None:
            raise RuntimeError(f"a cached-thought model needs image['{THOUGHTS_KEY}'] in its input")
        tokens, self.tokens = self.tokens, None
        return {self.domain: {"tensor": tokens}}


def tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids ``[..., h, w]`` -> float map ``[..., 16h, 16w]``, each id over its patch.

    The ids travel through terratorch like an image modality (padded, temporally folded, shaped like the
    inputs), so the backbone receives exactly one id per image patch. float32 holds the ids (< 2**24) exactly.
    """
    return tokens.float().repeat_interleave(PATCH, dim=-2).repeat_interleave(PATCH, dim=-1)


def _take_thoughts(module, args, kwargs):
    """Forward pre-hook of the TiM backbone: move the cached ids out of the input dict into the sampler."""
    inputs = args[0] if args else kwargs.get("d")
    id_map = inputs.pop(THOUGHTS_KEY)  # (B*T, 1, H, W) after the temporal wrapper folded T into the batch
    ids = id_map[:, 0, PATCH // 2::PATCH, PATCH // 2::PATCH]  # one id per 16 x 16 patch
    module.sampler.tokens = ids.reshape(ids.shape[0], -1).round().long()


def use_cached_thoughts(model: torch.nn.Module) -> None:
    """Swap the TiM generator of ``model`` for :class:`CachedThoughts` (one thought modality)."""
    from nycdata.tim import tim_backbone

    backbone = tim_backbone(model)
    if backbone is None or len(backbone.tim_modalities) != 1:
        raise ValueError("cached thoughts need a TiM backbone with exactly one thought modality")
    backbone.sampler = CachedThoughts(backbone.mod_name_mapping[backbone.tim_modalities[0]])
    backbone.register_forward_pre_hook(_take_thoughts, with_kwargs=True)


def cache_root(params: Mapping, variant) -> Path:
    return run_root(params) / CACHE_DIR / variant.online


def cache_thoughts(params: Mapping, variant, log: Callable[[str], None] = print) -> Path:
    """Generate (once) the thoughts a ``*_cached`` variant reads; the generator is freed afterwards."""
    from nycdata.data import D4_TRANSFORMS, ChipDataset
    from nycdata.train import build_task
    from nycdata.variants import get_variant

    root = cache_root(params, variant)
    if (root / DONE_FILE).is_file():
        return root
    online = get_variant(variant.online)
    task = build_task(params, online)  # verifies the generator like any TiM build
    task.model.eval()
    samples, started, n_chips = params["thought_samples"], time.monotonic(), 0
    data_root = resolve_path(params["data_root"])
    with replace_dir_atomically(root, overwrite=True) as tmp, torch.no_grad():
        for split in chips.SPLITS:
            dataset = ChipDataset(data_root, split, online.modalities, "none", params["normalization"])
            transforms = range(D4_TRANSFORMS) if split == "train" else range(1)
            for i in range(len(dataset)):
                sample = dataset[i]
                np.save(tmp / f"{sample['filename']}.npy", think_chip(task, sample, transforms, samples, params["seed"]))
                n_chips += 1
        seconds = time.monotonic() - started
        write_json(tmp / DONE_FILE, {"variant": online.name, "samples": samples, "chips": n_chips,
                                     "seconds": seconds, "seconds_per_chip": seconds / max(n_chips, 1)})
    del task  # the generator is only needed for this pass
    log(f"cached thoughts of {n_chips} chips in {seconds:.0f} s into {root}")
    return root


@torch.no_grad()
def think_chip(task, sample: dict, transforms, samples: int, seed: int) -> np.ndarray:
    """Thought ids ``[8, samples, T, h, w]`` of one chip for the given D4 transforms (others stay 0)."""
    from nycdata.data import D4_TRANSFORMS, d4_transform
    from nycdata.tim import capture_thoughts, tim_backbone
    from nycdata.train import seed_everything

    device = next(task.model.parameters()).device
    modality = tim_backbone(task.model).tim_modalities[0]
    timesteps = next(iter(sample["image"].values())).shape[1]
    ids = np.zeros((D4_TRANSFORMS, samples, timesteps, *_token_grid(sample)), np.int16)
    for k in transforms:
        image = {m: d4_transform(x, k)[None].to(device) for m, x in sample["image"].items()}
        for s in range(samples):
            seed_everything(seed + 1000 * s + k)
            with capture_thoughts(task.model) as capture:
                task.model.encoder(image)
            ids[k, s] = capture.grid(modality, 1)[0].cpu().numpy()
    return ids


def _token_grid(sample: dict) -> tuple[int, int]:
    height, width = next(iter(sample["image"].values())).shape[-2:]
    return height // 16, width // 16


def cached_sample_count(root: Path) -> int:
    """Thought samples per chip and transform in a finished cache."""
    import json

    done = Path(root) / DONE_FILE
    if not done.is_file():
        raise FileNotFoundError(f"{done} missing: the thought cache at {root} is unfinished; delete it to regenerate")
    return json.loads(done.read_text())["samples"]


def read_thoughts(root: Path, chip: str, transform: int, sample: int) -> torch.Tensor:
    """Cached ids of one chip, D4 transform and thought sample, as the map ``[1, T, H, W]`` of :func:`tokens_to_map`."""
    path = Path(root) / f"{chip}.npy"
    if not path.is_file():
        raise FileNotFoundError(f"no cached thoughts for chip {chip} at {path}; delete {root} to regenerate the cache")
    return tokens_to_map(torch.from_numpy(np.load(path)[transform, sample].astype(np.int64)))[None]
