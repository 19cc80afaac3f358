"""A LightningCLI config equal to what notebook 03 trains, for ``terratorch fit/test --config``.

The seed's reproduction path: ``terratorch fit --config config.yaml`` and
``terratorch test --config config.yaml --ckpt_path ...``. The configuration is
:func:`nycdata.study.config.training_config`, the one ``fine_tune`` runs, so the same
data, model, loss, optimiser, scheduler and callbacks are used; it writes into
``<cell folder>-cli`` so it never mixes with a notebook run. (The TiM
generator-weight check of ``nycdata.study.train.build_task`` does not run on this path.)
"""

from __future__ import annotations

from typing import Mapping

import yaml

from nycdata.runs import cell_dir
from nycdata.study.config import training_config


def lightning_config(params: Mapping) -> dict:
    return training_config(params, str(cell_dir(params)) + "-cli")


def config_yaml(params: Mapping) -> str:
    header = (f"# terratorch fit --config <this file>   (variant {params['variant']}, seed {params['seed']})\n"
              "# written by `python -m nycdata export-config`; equivalent to notebooks/03_finetune.ipynb\n")
    return header + yaml.safe_dump(lightning_config(params), sort_keys=False)
