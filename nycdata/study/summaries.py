"""Tables and JSON summaries the notebooks show and write (data summary, smoke test)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import rasterio
import torch

from nycdata.data import chips
from nycdata.data.chips import TERRAMIND_V1_STATS
from nycdata.data.classes import CLASS_NAMES, IGNORE_INDEX
from nycdata.model.terratorch_compat import ENCODER_EMBEDDINGS, SAMPLER
from nycdata.model.tim import thought_embedding_keys
from nycdata.sources.manifest import OFFSET_DATE


def split_sizes(index) -> pd.DataFrame:
    """Chips and parents per split."""
    table = index.groupby("split").agg(chips=("chip_id", "size"), parents=("parent_id", "nunique"))
    return table.reindex(list(chips.SPLITS)).fillna(0).astype(int)


def class_pixels(index) -> pd.DataFrame:
    """Label pixels per split (rows) and class (columns), ignore included."""
    columns = {f"count_{name}": name for name in (*CLASS_NAMES, "ignore")}
    table = index.groupby("split")[list(columns)].sum().rename(columns=columns)
    return table.reindex(list(chips.SPLITS)).fillna(0).astype(int)


def fold_overview(roles: pd.DataFrame) -> pd.DataFrame:
    """Parents (rows) x folds (columns): each parent's split in each fold, and its chips."""
    table = roles.pivot(index="parent_id", columns="fold", values="split").rename(columns=lambda f: f"fold {f}")
    return table.join(roles.groupby("parent_id")["chips"].first())


def fold_sizes(roles: pd.DataFrame) -> pd.DataFrame:
    """Per fold and split: chips and parents."""
    table = roles.groupby(["fold", "split"]).agg(chips=("chips", "sum"), parents=("parent_id", "size"))
    return table.unstack("split").reindex(columns=list(chips.SPLITS), level=1).fillna(0).astype(int)


def data_summary(index, spec: chips.DatasetSpec, roles: pd.DataFrame | None = None) -> dict:
    """The dataset in numbers; with cross-validation ``roles`` (:func:`nycdata.data.chips.fold_roles`), the folds too."""
    pixels = class_pixels(index)
    fractions = pixels[list(CLASS_NAMES)].div(pixels[list(CLASS_NAMES)].sum(axis=1), axis=0)
    sizes = None if roles is None else fold_sizes(roles)
    return {
        "n_chips": int(len(index)), "n_parents": int(index["parent_id"].nunique()),
        "chip_size": spec.chip_size, "timesteps": spec.timesteps, "modalities": list(spec.modalities),
        "splits": split_sizes(index).to_dict(orient="index"),
        "class_pixels": pixels.to_dict(orient="index"),
        "class_fraction": fractions.round(6).to_dict(orient="index"),
        "bounds_lonlat": [float(v) for v in index.total_bounds],
        "cv_folds": 0 if sizes is None else len(sizes),
        "folds": None if sizes is None else {
            str(fold): {split: {n: int(sizes.loc[fold, (n, split)]) for n in ("chips", "parents")} for split in chips.SPLITS}
            for fold in sizes.index},
    }

PARAMETER_GROUPS = ("input embeddings", "thought embedding", "encoder blocks", "decoder and head", "generator", "tokenizer")


def parameter_groups(model: torch.nn.Module) -> pd.DataFrame:
    """Trainable and frozen parameters per group, and how many the fine-tuned model shares with TiM's generator.

    A tensor shared between the fine-tuned encoder and the generator (terratorch's ``tim_chained_generations``)
    is counted once, in the encoder's group, with ``shared_with_generator`` saying so. Every row is present
    (zeros for a plain backbone), so tables of different variants line up.
    """
    thought_keys = thought_embedding_keys(model)
    generator = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if f".{SAMPLER}." in n}
    table = pd.DataFrame(0, index=list(PARAMETER_GROUPS), columns=["trainable", "frozen", "shared_with_generator"])
    for name, param in model.named_parameters():  # shared tensors once, under their first (the encoder's) name
        group = _group_of(name, thought_keys)
        table.loc[group, "trainable" if param.requires_grad else "frozen"] += param.numel()
        if group != "generator" and id(param) in generator:
            table.loc[group, "shared_with_generator"] += param.numel()
    table.loc["total"] = table.sum()
    return table


def groups_side_by_side(models: dict[str, torch.nn.Module]) -> pd.DataFrame:
    """Trainable (and frozen) parameters per group, one column pair per model: what each arm trains."""
    tables = {label: parameter_groups(model)[["trainable", "frozen"]] for label, model in models.items()}
    return pd.concat(tables, axis=1)


def _group_of(name: str, thought_keys: tuple[str, ...]) -> str:
    if f".{SAMPLER}." in name:
        return "generator"
    if ".tokenizer." in name:
        return "tokenizer"
    if f".{ENCODER_EMBEDDINGS}." in name:
        key = name.split(f".{ENCODER_EMBEDDINGS}.", 1)[1].split(".", 1)[0]
        return "thought embedding" if key in thought_keys else "input embeddings"
    return "encoder blocks" if name.startswith("encoder.") else "decoder and head"


def time_train_step(task, batch: Mapping, repeats: int = 1, warmup: int = 0, optimizer=None,
                    precision: str = "32-true") -> dict:
    """One training step of ``task`` on ``batch`` (``{"image": {...}, "mask"}`` on the task's device), timed:
    medians over ``repeats`` after ``warmup`` untimed steps of the whole step (``step_s``: zero_grad, forward, loss,
    backward and, with ``optimizer``, its step), of the forward and of the backward, plus the last loss.
    The one timing of a train step: notebook 02 and ``bench`` both use it."""
    device = batch["mask"].device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=str(precision).startswith("bf16"))
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)
    times: dict[str, list[float]] = {"step_s": [], "forward_s": [], "backward_s": []}
    task.model.train()
    for i in range(warmup + repeats):
        sync()
        started = time.perf_counter()
        (optimizer or task.model).zero_grad(set_to_none=True)
        with autocast:
            logits = task.model(dict(batch["image"])).output
            loss = loss_fn(logits, batch["mask"])
        sync()
        middle = time.perf_counter()
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        sync()
        if i >= warmup:
            for key, value in (("step_s", time.perf_counter() - started), ("forward_s", middle - started),
                               ("backward_s", time.perf_counter() - middle)):
                times[key].append(value)
    return {**{k: statistics.median(v) for k, v in times.items()}, "loss": float(loss.detach()), "logits_shape": list(logits.shape)}


def s2_medians_by_period(data_dir, index, max_chips: int = 200, stride: int = 4, seed: int = 0) -> pd.DataFrame:
    """Per S2 band: TerraMind's pretraining mean next to the median DN of the built chips, split by scene date
    before / from 2022-01-25 (processing baseline 04.00 added +1000 then), and the difference.

    A 1000-DN gap between the two periods, or between a period and the pretraining mean, shows a convention
    mismatch at a glance. At most ``max_chips`` chips (a seeded sample) and every ``stride``-th pixel are read;
    nodata (0) is left out.
    """
    sample = index if len(index) <= max_chips else index.sample(max_chips, random_state=seed)
    values: dict[str, list] = {"before": [], "from": []}
    for record in sample.to_dict("records"):
        with rasterio.open(Path(data_dir) / record[chips.path_column("S2L2A")]) as src:
            s2 = src.read()[:, ::stride, ::stride]
        for t, date in enumerate(chips.split_dates(record["dates"])):
            period = "before" if pd.Timestamp(date).date() < OFFSET_DATE else "from"
            values[period].append(s2[t * len(chips.S2L2A_BANDS):(t + 1) * len(chips.S2L2A_BANDS)].reshape(len(chips.S2L2A_BANDS), -1))
    table = pd.DataFrame({"pretraining mean": TERRAMIND_V1_STATS["S2L2A"][0]}, index=list(chips.S2L2A_BANDS))
    for period, label in (("before", f"median before {OFFSET_DATE}"), ("from", f"median from {OFFSET_DATE}")):
        stacked = np.concatenate(values[period], axis=1).astype(float) if values[period] else np.zeros((12, 0))
        table[label] = [np.median(band[band > 0]) if (band > 0).any() else np.nan for band in stacked]
        table[f"{label} - mean"] = table[label] - table["pretraining mean"]
        table.attrs[f"scenes {period}"] = len(values[period])
    return table.round(0)
