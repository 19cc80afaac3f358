"""TiM at baseline cost: think once per chip, D4 transform and sample, then train on the cached thoughts.

The frozen generator never changes, yet online TiM re-runs it in every training step. The caching pass runs
the verified online TiM model over every chip x 8 D4 transforms (the thought of a flipped image is generated
from the flipped image) x ``thought_cache_samples`` samples (at least ``thought_samples``, which test pass k
reads), on the training accelerator under the training precision, and stores the token ids as
``<run>/thought_cache/<variant>/<chip_id>.npy`` (``[8, samples, T, h, w]`` int16, a few KB). A ``*_cached``
variant's TiM backbone then reads those ids from the batch (``image["THOUGHTS"]``) instead of calling the
generator, which is not even kept in the model: :class:`CachedThoughts` takes its place. Training reads one
sample per chip and epoch, drawn by :class:`nycdata.data.dataset.EpochDraws`, so the model does not see one frozen
thought for every epoch.

Thought sampling is seeded per (chip, sample, ``thought_seed``), the 8 transforms of one chip being one batch:
no two chips share noise, and a rerun writes the same bytes. The cache is shared by the training seeds and
folds of a run (a fixed population of thoughts each run samples from); its ``cache.json`` records everything
that changes thoughts, and a cache made under other settings is refused, naming the difference.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import random
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from nycdata import console
from nycdata.data import chips
from nycdata.data.chips import PATCH_SIZE
from nycdata.data.dataset import D4_TRANSFORMS, ChipDataset, d4_transform
from nycdata.data.thoughts import CACHE_DONE_FILE, cache_root, write_thoughts
from nycdata.io import replace_dir_atomically, write_json
from nycdata.model import terratorch_compat, weights
from nycdata.model.tim import RANDOM_GENERATOR_SEED, capture_thoughts, tim_backbone
from nycdata.model.variants import get_variant
from nycdata.params import resolve_path

CACHE_FORMAT = "nycdata-thoughts/2"  # 2: all chips, per-(chip, sample, thought_seed) seeding, identity in cache.json


def cached_samples(params: Mapping) -> int:
    """Thought samples cached per chip and transform: enough for training and for every test pass."""
    return max(int(params["thought_cache_samples"]), int(params["thought_samples"]), 1)


def cache_identity(params: Mapping, online) -> dict:
    """Everything that changes the cached thoughts; a cache whose ``cache.json`` says otherwise is refused."""
    data_root = resolve_path(params["data_root"])
    return {
        "format": CACHE_FORMAT, "variant": online.name, "inputs": list(online.modalities), "thinks": list(online.thoughts),
        "model_size": params["model_size"], "generator_weights": generator_identity(params),
        **{k: params[k] for k in ("tim_decoding_steps", "tim_temperature", "tim_top_p", "tim_top_k", "thought_seed",
                                  "precision", "timesteps", "normalization")},
        "chip_size": chips.DatasetSpec.read(data_root).chip_size, "samples": cached_samples(params),
        "dataset_sha256": file_sha256(data_root / chips.SPEC_FILE, data_root / chips.INDEX_FILE),
    }


def generator_identity(params: Mapping) -> dict:
    """The generator's weights: the checkpoint file and its checksum, or the shared random generator."""
    source = None if params["tim_random_generator"] else weights.generator_source(params)
    if source is None:
        identity = {"random_generator_seed": RANDOM_GENERATOR_SEED, "terratorch": _version("terratorch")}
        # the original's defect: random generator, pretrained input embeddings
        return identity | ({"pretrained_embeddings": True} if params["tim_random_generator"] and params["pretrained"] else {})
    return {"file": Path(source).name, "sha256": file_sha256(Path(source))}


def check_identity(root: Path, expected: dict) -> None:
    recorded = json.loads((root / CACHE_DONE_FILE).read_text()).get("identity", {})
    differences = [f"{k}: cache {recorded.get(k)!r}, params {v!r}" for k, v in expected.items() if recorded.get(k) != v]
    if differences:
        raise ValueError(f"thought cache {root} was made under other settings ({'; '.join(differences)}). Delete "
                         f"{root} to regenerate it with these params, or choose another run_name.")


def finished_cache(params: Mapping, variant) -> Path | None:
    """The finished thought cache of ``variant`` (a ``*_cached`` variant), or None when it must be made; a cache made
    under other settings is refused, naming the difference."""
    root = cache_root(params, variant.online)
    if not (root / CACHE_DONE_FILE).is_file():
        return None
    check_identity(root, cache_identity(params, get_variant(variant.online)))
    return root


def fill_thought_cache(task, params: Mapping, variant, device: torch.device, log: Callable[[str], None] = print) -> Path:
    """Think once per chip, D4 transform and sample with ``task`` (the verified online TiM twin of ``variant``) and
    write the cache of ``variant``; return its folder."""
    root, online = cache_root(params, variant.online), get_variant(variant.online)
    identity = cache_identity(params, online)
    task.model.eval().to(device)
    data_root = resolve_path(params["data_root"])
    datasets = [ChipDataset(data_root, split, online.modalities, params["normalization"]) for split in chips.SPLITS]
    # the summary line below ends it: no final line of the bar's own
    progress = console.progress(sum(map(len, datasets)), "thought cache", unit="chips", log=log, final=False)
    with replace_dir_atomically(root, overwrite=True) as tmp, progress:
        for dataset in datasets:  # every chip: with cross-validation every chip trains in some fold
            for i in range(len(dataset)):
                sample = dataset[i]
                ids = think_chip(task, sample, identity["samples"], params["thought_seed"], params["precision"])
                write_thoughts(tmp, sample["filename"], ids)
                progress.update()
        write_json(tmp / CACHE_DONE_FILE, {"identity": identity, "chips": progress.done,
                                           "seconds": progress.elapsed(), "device": str(device)})
    log(f"cached thoughts of {progress.done} chips x 8 transforms x {identity['samples']} samples in "
        f"{progress.elapsed():.0f} s into {root}")
    return root


@torch.no_grad()
def think_chip(task, sample: dict, samples: int, thought_seed: int, precision: str = "32-true") -> np.ndarray:
    """Thought ids ``[8, samples, T, h, w]`` of one chip: its 8 D4 transforms in one batch, one generation per sample."""
    device = next(task.model.parameters()).device
    modality = terratorch_compat.thought_modalities(tim_backbone(task.model))[0]
    image = {m: torch.stack([d4_transform(x, k) for k in range(D4_TRANSFORMS)]).to(device)
             for m, x in sample["image"].items()}
    timesteps = next(iter(sample["image"].values())).shape[1]
    ids = np.zeros((D4_TRANSFORMS, samples, timesteps, *_token_grid(sample)), np.int16)
    for s in range(samples):
        # TiM draws its generation seed from Python's random: seed it per (chip, sample, thought_seed), put it back after
        with _python_random_seeded(thought_stream_seed(sample["filename"], s, thought_seed)), \
                capture_thoughts(task.model) as capture, autocast(precision, device):
            task.model.encoder(image)
        ids[:, s] = capture.grid(modality, D4_TRANSFORMS).cpu().numpy()
    return ids


def thought_stream_seed(chip: str, sample: int, thought_seed: int) -> int:
    """A stable 31-bit seed per (chip, sample, thought_seed), the same in every process and on every machine."""
    digest = hashlib.sha256(f"{chip}|{sample}|{thought_seed}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@contextlib.contextmanager
def _python_random_seeded(seed: int) -> Iterator[None]:
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def autocast(precision: str, device: torch.device):
    """The autocast Lightning's ``precision`` runs the forward under (none for 32/64-bit)."""
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(str(precision).split("-")[0])
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def file_sha256(*paths: Path) -> str:
    """sha256 over the files' bytes, remembered per (path, size, mtime) so a 1.4 GB checkpoint is hashed once."""
    digest = hashlib.sha256()
    for path in paths:
        stat = Path(path).stat()
        digest.update(_file_digest(str(path), stat.st_size, stat.st_mtime_ns))
    return digest.hexdigest()


@functools.lru_cache(maxsize=32)
def _file_digest(path: str, size: int, mtime_ns: int) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**24), b""):
            digest.update(block)
    return digest.digest()


def _version(package: str) -> str:
    return metadata.version(package)


def _token_grid(sample: dict) -> tuple[int, int]:
    height, width = next(iter(sample["image"].values())).shape[-2:]
    return height // PATCH_SIZE, width // PATCH_SIZE
