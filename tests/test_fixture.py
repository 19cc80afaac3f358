"""The synthetic fixture: determinism, index, chip files, learnable signal, errors, atomic writes."""

import json
import os

import numpy as np
import pytest
import rasterio

from nycdata.data import chips, fixture
from nycdata.data.classes import CLASS_NAMES, IGNORE_INDEX, class_counts
from nycdata.data.fixture import FixtureConfig, ensure_fixture, make_fixture

NYC_BBOX = (-74.30, 40.45, -73.65, 40.95)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _read(data_dir, rel):
    with rasterio.open(data_dir / rel) as src:
        return src.read()


def _labels_and(data_dir, index, modality):
    """(label, modality array) pairs for every chip of the index."""
    for record in index.to_dict("records"):
        yield _read(data_dir, record["path_LULC"])[0], _read(data_dir, record[chips.path_column(modality)])


# ---------------------------------------------------------------- determinism


def test_same_config_gives_byte_identical_files(tmp_path, small_fixture_config):
    a = make_fixture(tmp_path / "a", small_fixture_config)
    b = make_fixture(tmp_path / "b", small_fixture_config)
    files = _files(a)
    assert files == _files(b)
    assert "chips.parquet" in files and "dataset.json" in files
    assert len(files) == 2 + 4 * small_fixture_config.chips
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_matches_session_fixture_bytes(tmp_path, small_fixture_config, pristine_fixture_dir):
    again = make_fixture(tmp_path / "again", small_fixture_config)
    for rel in _files(pristine_fixture_dir):
        assert (again / rel).read_bytes() == (pristine_fixture_dir / rel).read_bytes(), rel


def test_different_seed_gives_different_imagery(tmp_path, small_fixture_config, pristine_fixture_dir):
    cfg = FixtureConfig(**{**fixture._config_dict(small_fixture_config), "seed": 1})
    other = make_fixture(tmp_path / "seed1", cfg)
    s2_a = {p.name: p.read_bytes() for p in (pristine_fixture_dir / "S2L2A").glob("*.tif")}
    s2_b = {p.name: p.read_bytes() for p in (other / "S2L2A").glob("*.tif")}
    assert len(s2_a) == len(s2_b) == small_fixture_config.chips
    assert s2_a != s2_b
    for name in set(s2_a) & set(s2_b):
        assert s2_a[name] != s2_b[name], name
    assert json.loads((other / "dataset.json").read_text())["source"]["config"]["seed"] == 1


# ---------------------------------------------------------------- manifest and index


def test_dataset_json_records_spec_and_config(pristine_fixture_dir, small_fixture_config):
    spec = chips.DatasetSpec.read(pristine_fixture_dir)
    assert spec.chip_size == 32 and spec.timesteps == 2
    assert spec.modalities == ("S2L2A", "S1RTC", "DEM") and spec.label == "LULC"
    assert spec.format == chips.FORMAT_VERSION
    assert spec.source == {"generator": "nycdata.data.fixture",
                           "config": {"chips": 12, "size": 32, "timesteps": 2, "seed": 0, "chips_per_parent": 4}}


def test_index_chip_count_and_unique_ids(pristine_index, small_fixture_config):
    assert len(pristine_index) == small_fixture_config.chips
    assert pristine_index["chip_id"].is_unique
    assert list(pristine_index["chip_id"]) == sorted(pristine_index["chip_id"])
    for record in pristine_index.to_dict("records"):
        assert record["chip_id"] == chips.chip_id(record["parent_id"], record["row"], record["col"])
        assert record["crs"] == "EPSG:32618"
        for modality in chips.MODALITIES:
            assert record[chips.path_column(modality)] == chips.chip_relpath(record["chip_id"], modality)


def test_index_splits_grouped_by_parent_and_non_empty(pristine_index):
    assert set(pristine_index["split"]) == set(chips.SPLITS)
    per_parent = pristine_index.groupby("parent_id")["split"].nunique()
    assert (per_parent == 1).all(), per_parent.to_dict()
    for split in chips.SPLITS:
        assert (pristine_index["split"] == split).sum() > 0, split


def test_index_dates_one_per_timestep(pristine_index):
    for dates in pristine_index["dates"]:
        parsed = chips.split_dates(dates)
        assert len(parsed) == 2
        assert parsed == sorted(parsed) and len(set(parsed)) == 2


def test_index_crs_and_footprints_inside_nyc_bbox(pristine_index):
    assert pristine_index.crs.to_epsg() == 4326
    lon0, lat0, lon1, lat1 = NYC_BBOX
    for geom in pristine_index.geometry:
        minx, miny, maxx, maxy = geom.bounds
        assert lon0 <= minx < maxx <= lon1
        assert lat0 <= miny < maxy <= lat1


def test_footprints_match_raster_bounds(pristine_fixture_dir, pristine_index):
    utm = pristine_index.to_crs("EPSG:32618")
    for record, geom in zip(pristine_index.to_dict("records"), utm.geometry):
        with rasterio.open(pristine_fixture_dir / record["path_LULC"]) as src:
            bounds = src.bounds
        np.testing.assert_allclose(geom.bounds, tuple(bounds), atol=0.01)


def test_chip_geotiffs_crs_resolution_bands_dtypes(pristine_fixture_dir, pristine_index):
    T, size = 2, 32
    expected = {"S2L2A": (12 * T, "int16"), "S1RTC": (2 * T, "float32"), "DEM": (1, "float32"), "LULC": (1, "uint8")}
    for record in pristine_index.to_dict("records"):
        grids = set()
        for modality, (count, dtype) in expected.items():
            with rasterio.open(pristine_fixture_dir / record[chips.path_column(modality)]) as src:
                assert src.crs.to_epsg() == 32618
                assert src.res == (10.0, 10.0)
                assert (src.count, src.height, src.width) == (count, size, size), modality
                assert set(src.dtypes) == {dtype}, modality
                assert list(src.descriptions) == chips.MODALITIES[modality].band_descriptions(T)
                grids.add(tuple(src.transform))
        assert len(grids) == 1, f"modalities of {record['chip_id']} do not share one grid"


def test_label_values_and_counts_match_index(pristine_fixture_dir, pristine_index):
    allowed = {0, 1, 2, 3, 4, IGNORE_INDEX}
    for record in pristine_index.to_dict("records"):
        label = _read(pristine_fixture_dir, record["path_LULC"])[0]
        assert set(np.unique(label).tolist()) <= allowed
        actual = class_counts(label)
        for name in (*CLASS_NAMES, "ignore"):
            assert record[f"count_{name}"] == actual[name], (record["chip_id"], name)
        assert sum(record[c] for c in chips.count_columns()) == label.size


def test_label_counts_per_class_explicit(pristine_fixture_dir, pristine_index):
    # independent of class_counts: count with np.bincount
    for record in pristine_index.to_dict("records"):
        label = _read(pristine_fixture_dir, record["path_LULC"])[0]
        bins = np.bincount(label.ravel(), minlength=256)
        for k, name in enumerate(CLASS_NAMES):
            assert record[f"count_{name}"] == bins[k]
        assert record["count_ignore"] == bins[255]


def test_every_class_present_in_fixture(pristine_index):
    for name in CLASS_NAMES:
        assert pristine_index[f"count_{name}"].sum() > 0, name


# ---------------------------------------------------------------- learnable signal


def test_nir_water_far_darker_than_trees(pristine_fixture_dir, pristine_index):
    water, trees = [], []
    for label, s2 in _labels_and(pristine_fixture_dir, pristine_index, "S2L2A"):
        nir = s2.reshape(2, 12, *label.shape)[:, 7].astype(np.float64)  # B08 of every timestep
        water.append(nir[:, label == 0].ravel())
        trees.append(nir[:, label == 2].ravel())
    water, trees = np.concatenate(water), np.concatenate(trees)
    assert water.size > 100 and trees.size > 100
    assert water.mean() < 500
    assert trees.mean() > 2000
    assert water.mean() < 0.2 * trees.mean()


def test_vv_water_darker_than_developed(pristine_fixture_dir, pristine_index):
    water, developed = [], []
    for label, s1 in _labels_and(pristine_fixture_dir, pristine_index, "S1RTC"):
        vv = s1.reshape(2, 2, *label.shape)[:, 0].astype(np.float64)
        water.append(vv[:, label == 0].ravel())
        developed.append(vv[:, label == 1].ravel())
    water, developed = np.concatenate(water), np.concatenate(developed)
    assert water.mean() < developed.mean() - 10  # about -21 dB vs -5.5 dB
    assert np.isfinite(water).all() and np.isfinite(developed).all()


def test_labels_are_spatially_coherent(pristine_fixture_dir, pristine_index):
    same_h = same_v = total = 0
    for record in pristine_index.to_dict("records"):
        label = _read(pristine_fixture_dir, record["path_LULC"])[0]
        same_h += int((label[:, 1:] == label[:, :-1]).sum())
        same_v += int((label[1:] == label[:-1]).sum())
        total += label[:, 1:].size
    assert same_h / total > 0.8
    assert same_v / total > 0.8


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("chips_", [0, 1, 2])
def test_too_few_chips_raises(tmp_path, chips_):
    with pytest.raises(ValueError, match=r"--chips"):
        make_fixture(tmp_path / "out", FixtureConfig(chips=chips_, size=32))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", [8, 24, 40, 33, 0])
def test_size_not_multiple_of_16_raises(tmp_path, size):
    with pytest.raises(ValueError, match=r"--size .*multiple of 16"):
        make_fixture(tmp_path / "out", FixtureConfig(chips=3, size=size))
    assert not (tmp_path / "out").exists()


def test_zero_timesteps_raises(tmp_path):
    with pytest.raises(ValueError, match=r"--timesteps"):
        make_fixture(tmp_path / "out", FixtureConfig(chips=3, size=16, timesteps=0))


def test_minimum_config_gives_one_chip_per_split(tmp_path):
    out = make_fixture(tmp_path / "min", FixtureConfig(chips=3, size=16, timesteps=1))
    index = chips.read_index(out)
    assert len(index) == 3
    assert sorted(index["split"]) == ["test", "train", "val"]
    assert index["parent_id"].nunique() == 3


# ---------------------------------------------------------------- existing targets and atomicity


def test_existing_non_empty_dir_raises(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        make_fixture(target, FixtureConfig(chips=3, size=16, timesteps=1))
    assert _files(target) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"


def test_existing_empty_dir_is_fine(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    make_fixture(target, FixtureConfig(chips=3, size=16, timesteps=1))
    assert (target / "chips.parquet").is_file()


def test_overwrite_replaces_existing_dir(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    make_fixture(target, FixtureConfig(chips=3, size=16, timesteps=1), overwrite=True)
    files = _files(target)
    assert "stale.txt" not in files
    assert "chips.parquet" in files and "dataset.json" in files
    assert len(chips.read_index(target)) == 3


def test_target_that_is_a_file_raises(tmp_path):
    target = tmp_path / "out"
    target.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        make_fixture(target, FixtureConfig(chips=3, size=16, timesteps=1), overwrite=True)
    assert target.read_text() == "x"


def _failing_write_parent(monkeypatch):
    calls = []
    original = fixture._write_parent

    def write_then_fail(*args, **kwargs):
        calls.append(original(*args, **kwargs))  # real files are written first
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(fixture, "_write_parent", write_then_fail)
    return calls


def _tmp_siblings(target):
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.tmp-"))


def test_failure_while_writing_leaves_no_target(tmp_path, monkeypatch):
    calls = _failing_write_parent(monkeypatch)
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        make_fixture(target, FixtureConfig(chips=6, size=16, timesteps=1))
    assert len(calls) == 1 and len(calls[0]) > 0  # it did write chips before failing
    assert not target.exists()
    assert _tmp_siblings(target) == []
    assert list(tmp_path.iterdir()) == []


def test_failure_with_overwrite_keeps_old_target(tmp_path, monkeypatch, pristine_fixture_dir):
    import shutil

    target = shutil.copytree(pristine_fixture_dir, tmp_path / "out")
    before = {rel: (target / rel).read_bytes() for rel in _files(target)}
    _failing_write_parent(monkeypatch)
    with pytest.raises(RuntimeError, match="disk full"):
        make_fixture(target, FixtureConfig(chips=6, size=16, timesteps=1, seed=5), overwrite=True)
    assert {rel: (target / rel).read_bytes() for rel in _files(target)} == before
    assert _tmp_siblings(target) == []


# ---------------------------------------------------------------- ensure_fixture


def _mtimes(root):
    return {rel: (root / rel).stat().st_mtime_ns for rel in _files(root)}


def test_ensure_fixture_creates_missing(tmp_path):
    cfg = FixtureConfig(chips=3, size=16, timesteps=1)
    out = ensure_fixture(tmp_path / "new", cfg)
    assert out == tmp_path / "new"
    assert len(chips.read_index(out)) == 3


def test_ensure_fixture_reuses_identical(fixture_copy, small_fixture_config):
    # backdate every file so a rewrite would certainly change the mtime
    for rel in _files(fixture_copy):
        os.utime(fixture_copy / rel, ns=(1_000_000_000, 1_000_000_000))
    before = _mtimes(fixture_copy)
    out = ensure_fixture(fixture_copy, small_fixture_config)
    assert out == fixture_copy
    assert _mtimes(fixture_copy) == before
    assert _tmp_siblings(fixture_copy) == []


def test_ensure_fixture_reuses_one_made_before_the_package_got_its_layers(fixture_copy, small_fixture_config):
    """A fixture whose dataset.json names the generator by its old module path, nycdata.fixture, is the same one."""
    spec = chips.DatasetSpec.read(fixture_copy)
    old = {**spec.source, "generator": "nycdata.fixture"}
    chips.DatasetSpec(spec.chip_size, spec.timesteps, source=old).write(fixture_copy)
    before = _mtimes(fixture_copy)
    assert ensure_fixture(fixture_copy, small_fixture_config) == fixture_copy and _mtimes(fixture_copy) == before


@pytest.mark.parametrize("change", [{"seed": 1}, {"chips": 13}, {"size": 48}, {"timesteps": 3}, {"chips_per_parent": 3}])
def test_ensure_fixture_rejects_different_config(fixture_copy, small_fixture_config, change):
    before = _mtimes(fixture_copy)
    cfg = FixtureConfig(**{**fixture._config_dict(small_fixture_config), **change})
    with pytest.raises(FileExistsError, match="not the fixture these params ask for"):
        ensure_fixture(fixture_copy, cfg)
    assert _mtimes(fixture_copy) == before


def test_ensure_fixture_rejects_non_fixture_dataset(fixture_copy, small_fixture_config):
    spec = chips.DatasetSpec.read(fixture_copy)
    chips.DatasetSpec(spec.chip_size, spec.timesteps, source={"generator": "nycdata.sources.build"}).write(fixture_copy)
    with pytest.raises(FileExistsError, match="not the fixture these params ask for"):
        ensure_fixture(fixture_copy, small_fixture_config)
    assert chips.DatasetSpec.read(fixture_copy).source == {"generator": "nycdata.sources.build"}
