"""DataModule batches: shapes, dtypes, normalisation, DEM over T, D4, clear chip errors, spawned workers."""

import shutil

import numpy as np
import pytest
import rasterio
import torch

from nycdata import chips
from nycdata.data import TERRAMIND_V1_STATS, ChipDataset, NYCDataModule, d4_transform
from nycdata.fixture import FixtureConfig, make_fixture
from nycdata.validate import ChipError

T, SIZE = 2, 32


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("data") / "fx", FixtureConfig(chips=12, size=SIZE, timesteps=T, seed=3))


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
    ds = ChipDataset(dataset_dir, "val", augment="none")
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
    plain = ChipDataset(dataset_dir, "train", augment="none")[0]
    torch.manual_seed(0)
    augmented = [ChipDataset(dataset_dir, "train", augment="d4")[0] for _ in range(12)]
    changed = 0
    for sample in augmented:
        k = next(k for k in range(8) if torch.equal(d4_transform(plain["mask"], k), sample["mask"]))
        assert torch.equal(d4_transform(plain["image"]["S2L2A"], k), sample["image"]["S2L2A"])
        changed += k != 0
    assert changed > 0


def test_corrupt_chip_raises_one_clear_error(dataset_dir, tmp_path):
    damaged = tmp_path / "fx"
    shutil.copytree(dataset_dir, damaged)
    ds = ChipDataset(damaged, "test", augment="none")
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
        ChipDataset(dataset_dir, "train", augment="flip")
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
