"""The seed's fallback TiM (``tim_input``): generate LULC once with TerraMind's generate model, read it as an input.

Instead of thinking inside every forward pass, ``terramind_v1_<size>_generate``
turns each chip's inputs (one timestep at a time, no augmentation) into an
ESRI-style LULC map once, stored as ``<run>/generated_lulc/<chip_id>_LULC.tif``
(T bands, uint8 classes 0..9, the chip's grid). The plain backbone then reads it
as a fourth modality, one-hot over the 10 classes. One generation serves every
seed of the run (seeded with :data:`GENERATION_SEED`), like a dataset would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from nycdata.data import chips
from nycdata.data.dataset import ChipDataset
from nycdata.data.thoughts import GENERATED_DONE_FILE, generated_root, write_generated
from nycdata.io import replace_dir_atomically, write_json
from nycdata.model.tim import check_generator
from nycdata.params import resolve_path
from nycdata.seeding import seed_everything

GENERATION_SEED = 0


def build_generator(params: Mapping, modalities) -> torch.nn.Module:
    from terratorch.registry import FULL_MODEL_REGISTRY

    return FULL_MODEL_REGISTRY.build(
        f"terramind_v1_{params['model_size']}_generate", modalities=list(modalities), output_modalities=["LULC"],
        pretrained=params["pretrained"], standardize=False,  # the data module already normalised the inputs
        decoding_steps=params["tim_decoding_steps"], temps=float(params["tim_temperature"]),
        top_p=float(params["tim_top_p"]), top_k=params["tim_top_k"],
    ).eval()


@torch.no_grad()
def generate_lulc(params: Mapping, variant, log: Callable[[str], None] = print) -> Path:
    """Generate LULC for every chip of the dataset once from ``variant``'s inputs; reuse a finished generation."""
    root = generated_root(params)
    if (root / GENERATED_DONE_FILE).is_file():
        return root
    check_generator(params, variant)  # a random generator only with allow_random_generator
    modalities = variant.modalities
    data_root = resolve_path(params["data_root"])
    generator = build_generator(params, modalities)
    seed_everything(GENERATION_SEED)
    with replace_dir_atomically(root, overwrite=True) as tmp:
        for split in chips.SPLITS:
            dataset = ChipDataset(data_root, split, modalities, normalization=params["normalization"])
            for batch in torch.utils.data.DataLoader(dataset, batch_size=params["batch_size"]):
                maps = _generate_batch(generator, batch["image"])
                for chip, lulc in zip(batch["filename"], maps):
                    write_generated(tmp, data_root, chip, lulc)
            log(f"generated LULC for the {split} chips")
        write_json(tmp / GENERATED_DONE_FILE, {"model": f"terramind_v1_{params['model_size']}_generate",
                                     "pretrained": params["pretrained"], "seed": GENERATION_SEED})
    return root


def _generate_batch(generator, image: dict) -> np.ndarray:
    """``{mod: [B, C, T, H, W]}`` -> uint8 class maps ``[B, T, H, W]``, one generation per timestep."""
    timesteps = next(iter(image.values())).shape[2]
    maps = [generator({m: x[:, :, t] for m, x in image.items()})["LULC"].argmax(1) for t in range(timesteps)]
    return torch.stack(maps, dim=1).to(torch.uint8).numpy()
