"""Tables and JSON summaries the notebooks show and write (data summary, smoke test)."""

from __future__ import annotations

import time
from typing import Mapping

import pandas as pd
import torch

from nycdata import chips
from nycdata.classes import CLASS_NAMES


def split_sizes(index) -> pd.DataFrame:
    """Chips and parents per split."""
    table = index.groupby("split").agg(chips=("chip_id", "size"), parents=("parent_id", "nunique"))
    return table.reindex(list(chips.SPLITS)).fillna(0).astype(int)


def class_pixels(index) -> pd.DataFrame:
    """Label pixels per split (rows) and class (columns), ignore included."""
    columns = {f"count_{name}": name for name in (*CLASS_NAMES, "ignore")}
    table = index.groupby("split")[list(columns)].sum().rename(columns=columns)
    return table.reindex(list(chips.SPLITS)).fillna(0).astype(int)


def data_summary(index, spec: chips.DatasetSpec) -> dict:
    pixels = class_pixels(index)
    fractions = pixels[list(CLASS_NAMES)].div(pixels[list(CLASS_NAMES)].sum(axis=1), axis=0)
    return {
        "n_chips": int(len(index)), "n_parents": int(index["parent_id"].nunique()),
        "chip_size": spec.chip_size, "timesteps": spec.timesteps, "modalities": list(spec.modalities),
        "splits": split_sizes(index).to_dict(orient="index"),
        "class_pixels": pixels.to_dict(orient="index"),
        "class_fraction": fractions.round(6).to_dict(orient="index"),
        "bounds_lonlat": [float(v) for v in index.total_bounds],
    }


def parameter_counts(model: torch.nn.Module) -> pd.DataFrame:
    """Trainable and frozen parameters per top-level part (TiM's generator and tokenizer shown apart)."""
    rows: dict[str, list[int]] = {}
    for name, param in model.named_parameters():
        part = _part_of(name)
        counts = rows.setdefault(part, [0, 0])
        counts[0 if param.requires_grad else 1] += param.numel()
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["trainable", "frozen"])
    table.loc["total"] = table.sum()
    return table


def _part_of(name: str) -> str:
    for marker, part in ((".sampler.", "tim generator (frozen copy)"), (".tokenizer.", "tim tokenizer (unused in forward)")):
        if marker in name:
            return part
    return name.split(".")[0]


def time_train_step(task, batch: Mapping, repeats: int = 1) -> dict:
    """Seconds for forward and backward of one batch (median of ``repeats``), and the loss."""
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=255)
    forward, backward, loss = [], [], None
    task.model.train()
    for _ in range(repeats):
        task.model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        logits = task.model(dict(batch["image"])).output
        loss = loss_fn(logits, batch["mask"])
        middle = time.perf_counter()
        loss.backward()
        forward.append(middle - started)
        backward.append(time.perf_counter() - middle)
    return {"forward_s": sorted(forward)[len(forward) // 2], "backward_s": sorted(backward)[len(backward) // 2],
            "loss": float(loss), "logits_shape": list(logits.shape)}
