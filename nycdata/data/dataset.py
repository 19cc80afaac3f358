"""Dataset and Lightning DataModule over the chip format.

A thin Dataset over rasterio rather than terratorch's
``GenericMultiModalDataModule``: the static DEM must be repeated over T
(the generic module's ``expand_temporal_dimension`` cannot), splits come from
the chip index rather than split text files, and every read goes through
:func:`nycdata.data.validate.read_chip`, so a bad chip raises one error naming the
chip and file instead of a rasterio or collate traceback.

Batches: ``{"image": {mod: [B, C, T, H, W] float32}, "mask": [B, H, W] int64
(255 = ignore), "filename": [chip_id, ...]}``. terratorch's task passes any
other batch key to the model as a keyword, so there are no others.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from nycdata.data import chips
from nycdata.data.chips import NORMALIZATIONS
from nycdata.data.fixture import FixtureConfig, ensure_fixture
from nycdata.data.thoughts import THOUGHTS_KEY, cached_sample_count, read_generated, read_thoughts
from nycdata.data.validate import read_chip, validate_dataset
from nycdata.io import atomic_write_text
from nycdata.params import resolve_path
from nycdata.runs import RunLayout

AUGMENTATIONS = ("d4", "none")
D4_TRANSFORMS = 8


def d4_transform(x: torch.Tensor, k: int) -> torch.Tensor:
    """Element ``k`` (0..7) of the dihedral group on the last two axes: rotate k%4 quarter turns, then flip if k >= 4."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


def normalization_stats(name: str) -> dict:
    if name not in NORMALIZATIONS:
        raise ValueError(f"normalization {name!r} unknown; choose one of {sorted(NORMALIZATIONS)}")
    return NORMALIZATIONS[name]


class ChipDraw(NamedTuple):
    """What the sampler decided for one chip of one epoch: its position in the split, D4 transform and thought sample."""
    index: int
    transform: int = 0
    sample: int = 0


class ChipDataset(Dataset):
    """One split of a chip dataset. Holds only paths and plain records, so it pickles to spawned workers.

    It draws nothing at random: an item is a :class:`ChipDraw` (or a plain index: no transform, sample 0)
    decided by :class:`EpochDraws` in the main process.
    """

    def __init__(self, data_root: str | Path, split: str, modalities: Sequence[str] = chips.INPUT_MODALITIES,
                 normalization: str = "terramind_v1", generated_root: str | Path | None = None,
                 thought_cache: str | Path | None = None, splits: chips.SplitSpec = chips.SplitSpec()):
        self.data_root = Path(data_root)
        self.generated_root = Path(generated_root) if generated_root else None  # LULC made by nycdata.model.generated
        self.thought_cache = Path(thought_cache) if thought_cache else None  # ids made by nycdata.model.thinking
        self.thought_samples = cached_sample_count(self.thought_cache) if self.thought_cache else 0
        self.spec = chips.DatasetSpec.read(self.data_root)
        missing = [m for m in modalities if m not in self.spec.modalities]
        if missing:
            raise ValueError(f"modalities {missing} requested but {self.data_root} only has {list(self.spec.modalities)}")
        self.modalities = tuple(modalities)
        self.stats = {m: _as_tensors(normalization_stats(normalization)[m]) for m in self.modalities}
        index = chips.read_index(self.data_root)
        if split not in chips.SPLITS:
            raise ValueError(f"split {split!r} unknown; choose one of {list(chips.SPLITS)}")
        self.records = index.loc[splits.assign(index) == split].drop(columns="geometry").to_dict("records")
        if not self.records:
            raise ValueError(f"split {split!r} of {self.data_root} has no chips; check the split column of chips.parquet")
        self.split = split

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | ChipDraw) -> dict:
        i, k, sample = item if isinstance(item, tuple) else (item, 0, 0)
        record = self.records[i]
        arrays = read_chip(self.data_root, self.spec, record, (*self.modalities, self.spec.label))
        image = {m: self._to_tensor(m, arrays[m]) for m in self.modalities}
        if self.generated_root is not None:
            image["LULC"] = read_generated(self.generated_root, record["chip_id"], self.spec.timesteps)
        mask = torch.from_numpy(arrays[self.spec.label][0].astype(np.int64))
        if k:
            image = {m: d4_transform(x, k) for m, x in image.items()}
            mask = d4_transform(mask, k)
        if self.thought_cache is not None:  # thoughts were generated from the transformed image, not transformed after
            image[THOUGHTS_KEY] = read_thoughts(self.thought_cache, record["chip_id"], k, sample)
        return {"image": image, "mask": mask, "filename": record["chip_id"]}

    def _to_tensor(self, modality: str, array: np.ndarray) -> torch.Tensor:
        """(T*C or C, H, W) on disk -> normalised (C, T, H, W) float32."""
        T = self.spec.timesteps
        x = torch.from_numpy(array.astype(np.float32))
        if chips.MODALITIES[modality].per_timestep:
            x = x.reshape(T, -1, *x.shape[-2:]).transpose(0, 1)
        else:
            x = x.unsqueeze(1).expand(-1, T, -1, -1)
        mean, std = self.stats[modality]
        return ((x - mean) / std).contiguous()


def _as_tensors(stats) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1, 1, 1) for v in stats)
    return mean, std


def seed_worker(worker_id: int) -> None:
    """Seed Python ``random`` and numpy in a loader worker from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


# Independent random streams of one epoch's draws: shuffling, D4 transforms and cached-thought samples.
ORDER_STREAM, TRANSFORM_STREAM, SAMPLE_STREAM = 0, 1, 2
SPLIT_STREAMS = {split: i for i, split in enumerate(chips.SPLITS)}


class EpochDraws(Sampler[ChipDraw]):
    """Order, D4 transform and cached-thought sample of every chip of one epoch, drawn in the main process.

    Each comes from a generator of its own, seeded by (seed, split, epoch, stream), never from the global RNG.
    So ``baseline``, ``tim`` and ``tim_cached`` with one seed see the same chips in the same order with the same
    transforms (a variant that reads thought samples draws them without shifting anything else); the draws do
    not depend on the number of loader workers; and a run resumed at epoch e draws exactly what an uninterrupted
    one does (Lightning calls :meth:`set_epoch` before every epoch). ``fixed_sample`` pins the thought sample
    (test pass k reads sample k).
    """

    def __init__(self, size: int, seed: int, split: str = "train", shuffle: bool = False, augment: bool = False,
                 thought_samples: int = 0, fixed_sample: int | None = None):
        if fixed_sample is not None and not 0 <= fixed_sample < max(thought_samples, 1):
            raise ValueError(f"thought sample {fixed_sample} requested but the cache holds {thought_samples} per chip; "
                             "raise thought_cache_samples (and delete the cache) or lower thought_samples")
        self.size, self.seed, self.split, self.shuffle, self.augment = size, seed, split, shuffle, augment
        self.thought_samples, self.fixed_sample, self.epoch = thought_samples, fixed_sample, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def _stream(self, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed % 2**32, SPLIT_STREAMS[self.split], self.epoch, stream])

    def __iter__(self):
        n = self.size
        order = self._stream(ORDER_STREAM).permutation(n) if self.shuffle else np.arange(n)
        transforms = self._stream(TRANSFORM_STREAM).integers(D4_TRANSFORMS, size=n) if self.augment else np.zeros(n, int)
        if self.fixed_sample is not None:
            samples = np.full(n, self.fixed_sample)
        elif self.thought_samples > 1:
            samples = self._stream(SAMPLE_STREAM).integers(self.thought_samples, size=n)
        else:
            samples = np.zeros(n, int)
        return iter([ChipDraw(int(i), int(transforms[i]), int(samples[i])) for i in order])


class NYCDataModule(pl.LightningDataModule):
    """Train (augmented), val and test loaders over a chip dataset; fold ``fold`` of ``cv_folds`` when > 0."""

    def __init__(self, data_root: str, modalities: Sequence[str] = chips.INPUT_MODALITIES, batch_size: int = 8,
                 num_workers: int = 0, augment: str = "d4", normalization: str = "terramind_v1",
                 pin_memory: bool = False, multiprocessing_context: str | None = None, generated_root: str | None = None,
                 thought_cache: str | None = None, seed: int = 0, cv_folds: int = 0, fold: int = 0,
                 split_seed: int = 42, split_fractions: Sequence[float] = (0.7, 0.15, 0.15)):
        super().__init__()
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment {augment!r} unknown; choose one of {list(AUGMENTATIONS)}")
        self.save_hyperparameters()
        self.splits = chips.SplitSpec(cv_folds, fold, split_seed, tuple(split_fractions))
        self.splits.check()
        self.datasets: dict[str, ChipDataset] = {}

    @classmethod
    def from_params(cls, params: Mapping, **overrides) -> "NYCDataModule":
        data_root = resolve_path(params["data_root"])
        spec = chips.DatasetSpec.read(data_root)
        if spec.timesteps != params["timesteps"]:
            raise ValueError(f"parameter timesteps={params['timesteps']} but {data_root} has {spec.timesteps} timesteps per chip")
        kwargs = dict(data_root=str(data_root), modalities=list(chips.INPUT_MODALITIES), batch_size=params["batch_size"],
                      num_workers=params["num_workers"], augment=params["augment"], normalization=params["normalization"],
                      pin_memory=torch.cuda.is_available(),  # pinned host memory speeds up copies to a GPU
                      seed=params["seed"], **split_kwargs(params))
        return cls(**{**kwargs, **overrides})

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        for split in chips.SPLITS:
            if split not in self.datasets:
                self.datasets[split] = ChipDataset(hp.data_root, split, hp.modalities, hp.normalization,
                                                   hp.generated_root, hp.thought_cache, self.splits)

    def _loader(self, split: str, thought_sample: int | None = None) -> DataLoader:
        self.setup()
        hp, dataset = self.hparams, self.datasets[split]
        draws = EpochDraws(len(dataset), hp.seed, split, shuffle=split == "train",
                           augment=split == "train" and hp.augment == "d4", thought_samples=dataset.thought_samples,
                           fixed_sample=thought_sample)
        workers = hp.num_workers
        return DataLoader(
            dataset, batch_size=hp.batch_size, sampler=draws, num_workers=workers,
            pin_memory=hp.pin_memory, worker_init_fn=seed_worker, persistent_workers=workers > 0,
            multiprocessing_context=hp.multiprocessing_context if workers > 0 else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self, thought_sample: int = 0) -> DataLoader:
        """Test chips un-augmented; a cached-thought variant reads thought sample ``thought_sample`` of each."""
        return self._loader("test", thought_sample if self.hparams.thought_cache else None)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def split_kwargs(params: Mapping) -> dict:
    """The DataModule arguments that say which chips train, validate and test (see :class:`chips.SplitSpec`)."""
    return dict(cv_folds=params["cv_folds"], fold=params["fold"], split_seed=params["split_seed"],
                split_fractions=list(params["split_fractions"]))


def split_spec(params: Mapping) -> chips.SplitSpec:
    return chips.SplitSpec(params["cv_folds"], params["fold"], params["split_seed"], tuple(params["split_fractions"]))




def record_folds(params: Mapping) -> Path | None:
    """Write every parent's split per fold to ``<run>/folds.csv``; refuse a run folder whose folds were other ones."""
    if not params["cv_folds"]:
        return None
    table = chips.fold_roles(chips.read_index(resolve_path(params["data_root"])), split_spec(params)).to_csv(index=False)
    path = RunLayout.of(params).folds
    if path.is_file() and path.read_text() != table:
        raise ValueError(f"{path} holds other folds than cv_folds={params['cv_folds']}, split_seed={params['split_seed']} "
                         f"and this dataset give: the run folder belongs to other split settings. Choose another "
                         "run_name (or delete the run folder).")
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, table)
    return path


class DatasetMissing(FileNotFoundError):
    """``data_root`` holds no chip dataset; the message says how to build one or switch to the fixture."""


class DatasetInvalid(ValueError):
    """The chip dataset failed validation; the message lists the problems (chip and file)."""


def prepare_dataset(params: Mapping, log: Callable[[str], None] = print, validate: bool = True) -> Path:
    """Return the dataset directory of ``params`` (validated unless told not to), generating the fixture if asked to."""
    data_root = resolve_path(params["data_root"])
    if params["fixture"]:
        config = FixtureConfig(chips=params["fixture_chips"], size=params["fixture_size"],
                               timesteps=params["timesteps"], seed=params["fixture_seed"])
        ensure_fixture(data_root, config)
        log(f"dataset: fixture at {data_root}")
    elif not (data_root / chips.SPEC_FILE).is_file():
        raise DatasetMissing(
            f"data_root {data_root} holds no chip dataset (no {chips.SPEC_FILE}): build it with notebook 00 or "
            "`python -m nycdata build` (see README), or use the fixture: params_file = 'params/fixture.yaml' in the "
            "parameters cell, `-f params/fixture.yaml` on the command line."
        )
    if not validate:
        return data_root
    problems = validate_dataset(data_root)
    if problems:
        listing = "\n  ".join(map(str, problems[:20]))
        raise DatasetInvalid(f"dataset {data_root} failed validation ({len(problems)} problems):\n  {listing}")
    log(f"dataset: {data_root} validated")
    return data_root
