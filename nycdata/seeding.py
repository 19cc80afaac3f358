"""One seed for every random stream of a run: Python ``random`` (TiM draws its generation seed from it), numpy,
torch and the data loader workers."""

import lightning.pytorch as pl


def seed_everything(seed: int) -> None:
    pl.seed_everything(seed, workers=True, verbose=False)
