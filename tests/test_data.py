"""DataModule batches: shapes, dtypes, normalisation, DEM over T, D4 and sample draws of their own, folds, clear chip errors, spawned workers."""

import shutil

import numpy as np
import pytest
import rasterio
import torch

from nycdata.data import chips
from nycdata.data.chips import TERRAMIND_V1_STATS
from nycdata.data.dataset import ChipDataset, ChipDraw, EpochDraws, NYCDataModule, d4_transform
from nycdata.data.validate import ChipError

T, SIZE = 2, 32


@pytest.fixture(scope="module")
def dataset_dir(pristine_fixture_dir, small_fixture_config):
    """The session's read-only fixture (12 chips in 3 parents); a test that damages chips copies it first."""
    assert (small_fixture_config.size, small_fixture_config.timesteps) == (SIZE, T)
    return pristine_fixture_dir


def _raw(data_dir, chip, modality):
    with rasterio.open(data_dir / chips.chip_relpath(chip, modality)) as src:
        return src.read().astype(np.float32)


def test_batch_shapes_dtypes_and_keys(dataset_dir):
    dm = NYCDataModule(str(dataset_dir), batch_size=3, augment="none")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "mask", "filename"}
    assert {m: tuple(x.shape) for m, x in batch["image"].items()} == {
        "S2L2A": (3, 12, T, SIZE, SIZE), "S1RTC": (3, 2, T, SIZE, SIZE), "DEM": (3, 1, T, SIZE, SIZE)}
    assert all(x.dtype == torch.float32 for x in batch["image"].values())
    assert batch["mask"].shape == (3, SIZE, SIZE) and batch["mask"].dtype == torch.int64
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    assert len(batch["filename"]) == 3 and all(f.startswith("nyc_") for f in batch["filename"])


def test_normalisation_time_major_layout_and_dem_repeat(dataset_dir):
    ds = ChipDataset(dataset_dir, "val")
    sample = ds[0]
    chip = sample["filename"]
    s2 = _raw(dataset_dir, chip, "S2L2A")  # (T*12, H, W), time-major
    mean, std = TERRAMIND_V1_STATS["S2L2A"]
    # timestep 1, band B04 (index 3) is on-disk band 1*12 + 3
    expected = (s2[12 + 3] - mean[3]) / std[3]
    np.testing.assert_allclose(sample["image"]["S2L2A"][3, 1].numpy(), expected, rtol=1e-5, atol=1e-5)
    s1 = _raw(dataset_dir, chip, "S1RTC")
    np.testing.assert_allclose(sample["image"]["S1RTC"][1, 0].numpy(), (s1[1] - (-17.329)) / 4.459, rtol=1e-5, atol=1e-5)
    dem = sample["image"]["DEM"]
    assert torch.equal(dem[0, 0], dem[0, 1]), "DEM must be repeated over timesteps"
    np.testing.assert_allclose(dem[0, 0].numpy(), (_raw(dataset_dir, chip, "DEM")[0] - 670.665) / 951.272, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sample["mask"].numpy(), _raw(dataset_dir, chip, "LULC")[0])


def test_splits_cover_the_index_without_overlap(dataset_dir):
    index = chips.read_index(dataset_dir)
    names = {s: {r["chip_id"] for r in ChipDataset(dataset_dir, s).records} for s in chips.SPLITS}
    assert sum(map(len, names.values())) == len(index)
    assert not (names["train"] & names["test"]) and not (names["val"] & names["test"])


def test_d4_is_the_dihedral_group():
    x = torch.arange(16.0).reshape(4, 4)
    images = {tuple(d4_transform(x, k).flatten().tolist()) for k in range(8)}
    assert len(images) == 8
    assert torch.equal(d4_transform(x, 4), x.flip(-1))
    assert torch.equal(d4_transform(x, 1), torch.rot90(x, 1, dims=(-2, -1)))


def test_d4_augmentation_moves_image_and_mask_together(dataset_dir):
    dataset = ChipDataset(dataset_dir, "train")
    plain = dataset[0]
    for k in range(1, 8):
        sample = dataset[ChipDraw(0, k, 0)]
        assert torch.equal(d4_transform(plain["mask"], k), sample["mask"])
        assert torch.equal(d4_transform(plain["image"]["S2L2A"], k), sample["image"]["S2L2A"])


def _epoch(draws, epoch):
    draws.set_epoch(epoch)
    return list(draws)


def test_epoch_draws_come_from_their_own_streams_not_the_global_rng():
    draws = EpochDraws(50, seed=7, split="train", shuffle=True, augment=True)
    torch.manual_seed(0)
    first = _epoch(draws, 0)
    torch.manual_seed(123)  # the global RNG does not matter
    assert _epoch(draws, 0) == first
    assert sorted(d.index for d in first) == list(range(50)), "each chip once per epoch"
    assert len({d.transform for d in first}) == 8 and all(d.sample == 0 for d in first)
    assert _epoch(draws, 1) != first, "every epoch draws anew"
    assert _epoch(EpochDraws(50, seed=8, split="train", shuffle=True, augment=True), 0) != first


def test_drawing_thought_samples_changes_neither_order_nor_transforms():
    plain = _epoch(EpochDraws(40, seed=3, split="train", shuffle=True, augment=True), 2)
    with_samples = _epoch(EpochDraws(40, seed=3, split="train", shuffle=True, augment=True, thought_samples=4), 2)
    assert [(d.index, d.transform) for d in plain] == [(d.index, d.transform) for d in with_samples]
    assert {d.sample for d in with_samples} == {0, 1, 2, 3}
    pinned = _epoch(EpochDraws(40, seed=3, split="test", thought_samples=4, fixed_sample=2), 0)
    assert [d.index for d in pinned] == list(range(40)) and {(d.transform, d.sample) for d in pinned} == {(0, 2)}
    with pytest.raises(ValueError, match="thought sample 4 requested but the cache holds 4"):
        EpochDraws(40, seed=3, thought_samples=4, fixed_sample=4)


def test_the_loader_order_does_not_depend_on_workers_or_the_global_rng(dataset_dir):
    def names(workers, global_seed):
        dm = NYCDataModule(str(dataset_dir), batch_size=2, num_workers=workers, seed=5)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        torch.manual_seed(global_seed)
        batches = [(tuple(b["filename"]), b["mask"].sum().item()) for b in loader]
        # Lightning's save_hyperparameters keeps this frame alive in a reference cycle: drop the loader now, so its
        # persistent worker stops here, not at a later garbage collection (which can wait 5 s for it)
        del loader
        return batches

    assert names(0, 0) == names(0, 99) == names(1, 7)


def test_corrupt_chip_raises_one_clear_error(dataset_dir, tmp_path):
    damaged = tmp_path / "fx"
    shutil.copytree(dataset_dir, damaged)
    ds = ChipDataset(damaged, "test")
    chip = ds.records[0]["chip_id"]
    (damaged / chips.chip_relpath(chip, "S1RTC")).write_bytes(b"not a tiff")
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    with pytest.raises(ChipError) as err:
        next(iter(loader))
    assert chip in str(err.value) and f"{chip}_S1RTC.tif" in str(err.value)
    assert "nycdata validate" in str(err.value)


def test_bad_arguments_name_the_problem(dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="modalities \\['NDVI'\\]"):
        ChipDataset(dataset_dir, "train", modalities=["S2L2A", "NDVI"])
    with pytest.raises(ValueError, match="split 'holdout'"):
        ChipDataset(dataset_dir, "holdout")
    with pytest.raises(ValueError, match="augment 'flip'"):
        NYCDataModule(str(dataset_dir), augment="flip")
    with pytest.raises(ValueError, match="cv_folds=1"):
        NYCDataModule(str(dataset_dir), cv_folds=1)
    with pytest.raises(ValueError, match="fold=3: with cv_folds=3"):
        NYCDataModule(str(dataset_dir), cv_folds=3, fold=3)
    with pytest.raises(FileNotFoundError, match="not a chip dataset"):
        ChipDataset(tmp_path, "train")


def test_from_params_checks_timesteps(dataset_dir):
    from nycdata.params import load_params

    params = load_params(overrides={"data_root": str(dataset_dir), "timesteps": 4})
    with pytest.raises(ValueError, match="timesteps=4"):
        NYCDataModule.from_params(params)
    dm = NYCDataModule.from_params({**params, "timesteps": T, "num_workers": 0})
    assert dm.hparams.batch_size == params["batch_size"]


def test_spawned_workers_read_chips(dataset_dir):
    dm = NYCDataModule(str(dataset_dir), batch_size=4, num_workers=1, augment="d4", multiprocessing_context="spawn")
    batches = list(dm.val_dataloader())
    assert sum(len(b["filename"]) for b in batches) == len(dm.datasets["val"])
    assert batches[0]["image"]["S2L2A"].shape[1:] == (12, T, SIZE, SIZE)


def test_grouped_folds_test_every_parent_once_and_never_leak(dataset_dir):
    index = chips.read_index(dataset_dir)
    spec = chips.SplitSpec(cv_folds=3, seed=1)
    roles = chips.fold_roles(index, spec)
    parents = sorted(index["parent_id"].unique())
    assert len(parents) == 3
    tested = roles.loc[roles.split == "test"].sort_values("parent_id")
    assert tested["parent_id"].tolist() == parents and sorted(tested["fold"]) == [0, 1, 2], "each parent tested once"
    for fold in range(3):
        dm = NYCDataModule(str(dataset_dir), cv_folds=3, fold=fold, split_seed=1)
        dm.setup()
        by_split = {s: {r["parent_id"] for r in dm.datasets[s].records} for s in chips.SPLITS}
        assert all(by_split.values()) and not (by_split["train"] & by_split["test"]) and not (by_split["val"] & by_split["test"])
        assert by_split["test"] == set(tested.loc[tested.fold == fold, "parent_id"])
    assert chips.fold_roles(index, spec).equals(roles), "deterministic from split_seed"


def test_folds_balance_chips_and_draw_validation_parents_from_training_parents():
    import pandas as pd

    sizes = {f"p{i:02d}": n for i, n in enumerate([16, 16, 12, 9, 16, 5, 16, 14, 16, 8, 16, 3, 16, 16, 11, 16, 7, 16, 16, 13, 16, 10])}
    index = pd.DataFrame({"parent_id": [p for p, n in sizes.items() for _ in range(n)]})
    roles = chips.fold_roles(index, chips.SplitSpec(cv_folds=5, seed=42))
    test_chips = roles[roles.split == "test"].groupby("fold")["chips"].sum()
    assert test_chips.max() - test_chips.min() <= 16, "greedy assignment keeps folds within one parent of each other"
    per_fold = roles.groupby(["fold", "split"]).size().unstack()
    assert (per_fold["val"] == 3).all() and (per_fold.sum(axis=1) == 22).all()  # 0.15 / 0.85 of 17-18 parents
    with pytest.raises(ValueError, match="cv_folds=30 needs at least as many parents"):
        chips.fold_roles(index, chips.SplitSpec(cv_folds=30))
