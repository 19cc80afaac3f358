"""The chain behind ``python -m nycdata run`` and ``make demo``.

Today: prepare the dataset (generate the fixture when the params ask for it),
validate it, and make one loading pass over every split, writing
``data_check.json`` into the run folder ``output_root/run_name``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping

import yaml

from nycdata import chips
from nycdata.classes import CLASS_NAMES, IGNORE_INDEX
from nycdata.io import replace_dir_atomically, write_json
from nycdata.params import resolve_path


def prepare_dataset(params: Mapping, log: Callable[[str], None] = print, validate: bool = True) -> Path:
    """Return the dataset directory of ``params`` (validated unless told not to), generating the fixture if asked to."""
    from nycdata.fixture import FixtureConfig, ensure_fixture
    from nycdata.validate import validate_dataset

    data_root = resolve_path(params["data_root"])
    if params["fixture"]:
        config = FixtureConfig(chips=params["fixture_chips"], size=params["fixture_size"],
                               timesteps=params["timesteps"], seed=params["fixture_seed"])
        ensure_fixture(data_root, config)
        log(f"dataset: fixture at {data_root}")
    elif not (data_root / chips.SPEC_FILE).is_file():
        raise FileNotFoundError(
            f"data_root {data_root} holds no chip dataset. Build it from real sources "
            "(`python -m nycdata build`, see README) or run with `-f params/fixture.yaml`."
        )
    if not validate:
        return data_root
    problems = validate_dataset(data_root)
    if problems:
        listing = "\n  ".join(map(str, problems[:20]))
        raise ValueError(f"dataset {data_root} failed validation ({len(problems)} problems):\n  {listing}")
    log(f"dataset: {data_root} validated")
    return data_root


def loading_pass(params: Mapping, log: Callable[[str], None] = print) -> dict:
    """Read every chip of every split once through the DataModule; summarise what came out."""
    import torch

    from nycdata.data import NYCDataModule

    datamodule = NYCDataModule.from_params(params)
    loaders = {"train": datamodule.train_dataloader(), "val": datamodule.val_dataloader(),
               "test": datamodule.test_dataloader()}
    summary = {}
    for split, loader in loaders.items():
        started, counts, n_chips, shapes = time.monotonic(), torch.zeros(256, dtype=torch.long), 0, {}
        for batch in loader:
            n_chips += len(batch["filename"])
            counts += torch.bincount(batch["mask"].flatten(), minlength=256)
            shapes = {m: list(x.shape[1:]) for m, x in batch["image"].items()}
        seconds = time.monotonic() - started
        summary[split] = {
            "chips": n_chips, "chips_per_s": n_chips / max(seconds, 1e-9), "image_shapes_CTHW": shapes,
            "class_pixels": {name: int(counts[i]) for i, name in enumerate(CLASS_NAMES)},
            "ignore_pixels": int(counts[IGNORE_INDEX]),
        }
        log(f"loaded {split}: {n_chips} chips in {seconds:.1f} s")
    return summary


def run_pipeline(params: Mapping, overwrite: bool = False, log: Callable[[str], None] = print) -> Path:
    """Run the chain into ``output_root/run_name``; an existing run folder is an error unless ``overwrite``."""
    run_dir = resolve_path(params["output_root"]) / params["run_name"]
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"run folder {run_dir} already exists; choose another run_name or pass --overwrite")
    data_root = prepare_dataset(params, log)
    summary = loading_pass(params, log)
    with replace_dir_atomically(run_dir, overwrite=True) as tmp:
        (tmp / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=True))
        write_json(tmp / "data_check.json", {"data_root": str(data_root), "splits": summary})
    log(f"wrote {run_dir / 'data_check.json'}")
    return run_dir
