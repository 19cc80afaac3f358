"""validate_dataset / read_chip: every failure mode names the chip and the file, and only them."""

import shutil

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine

from nycdata.data import chips
from nycdata.data.validate import ChipError, Problem, inspect_chip, read_chip, validate_dataset

INDEX = chips.INDEX_FILE


# ---------------------------------------------------------------- helpers


def _record(data_dir, cid=None):
    index = chips.read_index(data_dir)
    row = index.iloc[0] if cid is None else index[index["chip_id"] == cid].iloc[0]
    return row.to_dict()


def _path(data_dir, cid, modality):
    return data_dir / chips.chip_relpath(cid, modality)


def _rewrite(path, array=None, crs=None, transform=None):
    """Rewrite a GeoTIFF with ``nycdata.data.chips.write_raster``, keeping what is not given."""
    with rasterio.open(path) as src:
        old, old_crs, old_transform = src.read(), src.crs, src.transform
    array = old if array is None else array
    path.unlink()
    chips.write_raster(path, array, old_crs if crs is None else crs, old_transform if transform is None else transform)


def _read(path):
    with rasterio.open(path) as src:
        return src.read()


def _names_file(problem, path):
    """The problem names ``path`` by its full path, in its ``path`` and in its text."""
    return problem.path == str(path) and str(path) in str(problem)


def _assert_only_chip(problems, cid, path, message=None):
    """Problems exist, all concern ``cid``, at least one names ``path`` (and ``message``)."""
    assert problems, "damage went unreported"
    assert {p.chip_id for p in problems} == {cid}, [str(p) for p in problems]
    hits = [p for p in problems if _names_file(p, path)]
    assert hits, f"no problem names {path}: {[str(p) for p in problems]}"
    for p in hits:
        assert str(p).startswith(f"{cid}: ")
    if message is not None:
        assert any(message in p.message for p in hits), [p.message for p in hits]


def _assert_index_problem(problems, message):
    assert len(problems) == 1, [str(p) for p in problems]
    (problem,) = problems
    assert problem.chip_id is None
    assert problem.path == INDEX
    assert message in problem.message
    assert str(problem).startswith(f"<dataset>: {INDEX}: ")


def _write_index(data_dir, frame):
    gpd.GeoDataFrame(frame, geometry="geometry", crs=chips.INDEX_CRS).to_parquet(data_dir / INDEX, index=False)


@pytest.fixture
def victim(pristine_index):
    """The chip these tests damage: the last val chip (not the first row)."""
    return pristine_index.loc[pristine_index["split"] == "val", "chip_id"].iloc[-1]


# ---------------------------------------------------------------- clean


def test_clean_fixture_has_no_problems(pristine_fixture_dir):
    assert validate_dataset(pristine_fixture_dir) == []


def test_progress_callback_not_called_for_small_dataset(pristine_fixture_dir):
    messages = []
    assert validate_dataset(pristine_fixture_dir, progress=messages.append) == []
    assert messages == []  # progress is reported every 50 chips; the fixture has 12


def test_read_chip_returns_all_arrays(pristine_fixture_dir, pristine_index):
    spec = chips.DatasetSpec.read(pristine_fixture_dir)
    record = pristine_index.iloc[3].to_dict()
    arrays = read_chip(pristine_fixture_dir, spec, record)
    assert {m: (a.shape, a.dtype.name) for m, a in arrays.items()} == {
        "S2L2A": ((24, 32, 32), "int16"), "S1RTC": ((4, 32, 32), "float32"),
        "DEM": ((1, 32, 32), "float32"), "LULC": ((1, 32, 32), "uint8")}
    np.testing.assert_array_equal(arrays["LULC"], _read(pristine_fixture_dir / record["path_LULC"]))


# ---------------------------------------------------------------- per-file damage


@pytest.mark.parametrize("modality", list(chips.MODALITIES))
def test_missing_modality_file(fixture_copy, victim, modality):
    path = _path(fixture_copy, victim, modality)
    path.unlink()
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, victim, path, f"missing {modality} file")
    assert len(problems) == 1


@pytest.mark.parametrize("damage", ["garbage", "truncate", "empty"])
@pytest.mark.parametrize("modality", ["S2L2A", "LULC"])
def test_corrupt_geotiff(fixture_copy, victim, modality, damage):
    path = _path(fixture_copy, victim, modality)
    if damage == "garbage":
        path.write_bytes(b"this is not a tiff" * 100)
    elif damage == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"")
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, victim, path, "unreadable or corrupt GeoTIFF")
    assert len(problems) == 1


def test_wrong_band_count(fixture_copy, victim):
    path = _path(fixture_copy, victim, "S2L2A")
    _rewrite(path, _read(path)[:12])  # one timestep of two
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, victim, path, "S2L2A has 12 bands, expected 24")
    assert len(problems) == 1


@pytest.mark.parametrize("modality", ["S2L2A", "LULC"])
def test_wrong_size(fixture_copy, victim, modality):
    path = _path(fixture_copy, victim, modality)
    _rewrite(path, _read(path)[:, :16, :16])
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, victim, path, "size 16x16, expected 32x32")
    assert len(problems) == 1


def test_wrong_dtype(fixture_copy, victim):
    path = _path(fixture_copy, victim, "S1RTC")
    _rewrite(path, _read(path).astype(np.float64))
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, victim, path, "dtype float64")


def test_crs_mismatch_between_modalities(fixture_copy, victim):
    path = _path(fixture_copy, victim, "S1RTC")
    _rewrite(path, crs="EPSG:32617")
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, victim, path)
    messages = [p.message for p in problems if _names_file(p, path)]
    assert any("CRS EPSG:32617 does not match the index (EPSG:32618)" in m for m in messages), messages
    assert any("CRS/transform differ from" in m and chips.chip_relpath(victim, "S2L2A") in m for m in messages), messages
    # both problems give the same full path (the grid mismatch once gave the path relative to DATA_DIR)
    assert len(problems) == 2 and all(_names_file(p, path) for p in problems)


def test_transform_mismatch_between_modalities(fixture_copy, victim):
    path = _path(fixture_copy, victim, "S1RTC")
    with rasterio.open(path) as src:
        shifted = src.transform * Affine.translation(1, 0)  # origin one pixel (10 m) east
    _rewrite(path, transform=shifted)
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, victim, path, "CRS/transform differ from")
    assert len(problems) == 1


def test_nan_in_imagery(fixture_copy, victim):
    path = _path(fixture_copy, victim, "S1RTC")
    array = _read(path)
    array[1, 5, 7] = np.nan
    array[3, 0, 0] = np.nan
    _rewrite(path, array)
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, victim, path, "2 NaN values in S1RTC")
    assert len(problems) == 1


def test_nan_in_dem(fixture_copy, victim):
    path = _path(fixture_copy, victim, "DEM")
    array = _read(path)
    array[0, 31, 31] = np.nan
    _rewrite(path, array)
    _assert_only_chip(validate_dataset(fixture_copy), victim, path, "1 NaN values in DEM")


@pytest.mark.parametrize("bad", [7, 5, 254])
def test_label_values_outside_classes(fixture_copy, victim, bad):
    path = _path(fixture_copy, victim, "LULC")
    array = _read(path)
    array[0, 10:12, 10:12] = bad
    _rewrite(path, array)
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, victim, path, f"label values [{bad}] outside 0..4 and 255")
    assert len(problems) == 1


# ---------------------------------------------------------------- index-level damage


def test_empty_split(fixture_copy):
    index = gpd.read_parquet(fixture_copy / INDEX)
    assert (index["split"] == "val").any()
    index.loc[index["split"] == "val", "split"] = "train"
    index.to_parquet(fixture_copy / INDEX, index=False)
    _assert_index_problem(validate_dataset(fixture_copy), "split 'val' has no chips")


def test_unknown_split(fixture_copy, victim):
    index = gpd.read_parquet(fixture_copy / INDEX)
    parent = index.loc[index["chip_id"] == victim, "parent_id"].iloc[0]
    index.loc[index["parent_id"] == parent, "split"] = "validation"
    index.to_parquet(fixture_copy / INDEX, index=False)
    problems = validate_dataset(fixture_copy)
    bad = [p for p in problems if "unknown split 'validation'" in p.message]
    siblings = set(index.loc[index["parent_id"] == parent, "chip_id"])
    assert {p.chip_id for p in bad} == siblings and all(p.path == INDEX for p in bad)
    assert any("split 'val' has no chips" in p.message for p in problems)


def test_chip_in_index_without_files(fixture_copy, victim):
    index = gpd.read_parquet(fixture_copy / INDEX)
    ghost = "nyc_fx02_r9c9"
    row = index[index["chip_id"] == victim].copy()
    row["chip_id"] = ghost
    for modality in chips.MODALITIES:
        row[chips.path_column(modality)] = chips.chip_relpath(ghost, modality)
    _write_index(fixture_copy, pd.concat([index, row], ignore_index=True))
    problems = validate_dataset(fixture_copy)
    assert {p.chip_id for p in problems} == {ghost}
    assert sorted(p.path for p in problems) == sorted(str(_path(fixture_copy, ghost, m)) for m in chips.MODALITIES)
    assert all(p.message.startswith("missing ") for p in problems)


def test_chip_in_index_without_path_entry(fixture_copy, victim):
    index = gpd.read_parquet(fixture_copy / INDEX)
    index.loc[index["chip_id"] == victim, "path_DEM"] = None
    index.to_parquet(fixture_copy / INDEX, index=False)
    problems = validate_dataset(fixture_copy)
    assert [(p.chip_id, p.message) for p in problems if p.path is None] == [(victim, "index has no path_DEM entry")]
    # the DEM file is still there under an indexed chip id, so it is not reported as an orphan
    assert {p.chip_id for p in problems} == {victim}


@pytest.mark.parametrize("modality", ["S2L2A", "LULC"])
def test_files_without_index_row(fixture_copy, victim, modality):
    orphan_id = "nyc_zz99_r0c0"
    orphan = _path(fixture_copy, orphan_id, modality)
    shutil.copy(_path(fixture_copy, victim, modality), orphan)
    problems = validate_dataset(fixture_copy)
    _assert_only_chip(problems, orphan_id, orphan, "file has no row in the chip index")
    assert len(problems) == 1


def test_duplicate_chip_ids(fixture_copy, victim):
    index = gpd.read_parquet(fixture_copy / INDEX)
    _write_index(fixture_copy, pd.concat([index, index[index["chip_id"] == victim]], ignore_index=True))
    problems = validate_dataset(fixture_copy)
    assert [(p.chip_id, p.path) for p in problems] == [(victim, INDEX)], [str(p) for p in problems]
    assert "appears more than once" in problems[0].message


def test_parent_in_two_splits(fixture_copy, victim):
    index = gpd.read_parquet(fixture_copy / INDEX)
    parent = index.loc[index["chip_id"] == victim, "parent_id"].iloc[0]
    assert (index["parent_id"] == parent).sum() > 1
    index.loc[index["chip_id"] == victim, "split"] = "test"
    index.to_parquet(fixture_copy / INDEX, index=False)
    _assert_index_problem(validate_dataset(fixture_copy), f"parent {parent} has chips in several splits")


@pytest.mark.parametrize("column", ["path_S1RTC", "parent_id", "split"])
def test_index_missing_column_is_one_index_problem(fixture_copy, column):
    index = gpd.read_parquet(fixture_copy / INDEX)
    index.drop(columns=[column]).to_parquet(fixture_copy / INDEX, index=False)
    # reported once for the index, not repeated for every chip
    _assert_index_problem(validate_dataset(fixture_copy), f"index lacks columns ['{column}']")


def test_missing_dataset_json(fixture_copy):
    (fixture_copy / chips.SPEC_FILE).unlink()
    problems = validate_dataset(fixture_copy)
    assert len(problems) == 1
    assert problems[0].chip_id is None
    assert str(fixture_copy / chips.SPEC_FILE) in str(problems[0])
    assert "not a chip dataset" in problems[0].message


def test_missing_index(fixture_copy):
    (fixture_copy / INDEX).unlink()
    problems = validate_dataset(fixture_copy)
    assert len(problems) == 1 and problems[0].chip_id is None
    assert str(fixture_copy / INDEX) in str(problems[0])


def test_corrupt_index(fixture_copy):
    (fixture_copy / INDEX).write_bytes(b"not parquet" * 50)
    problems = validate_dataset(fixture_copy)
    assert len(problems) == 1 and problems[0].chip_id is None
    assert str(fixture_copy / INDEX) in str(problems[0])


def test_several_damages_are_all_reported(fixture_copy, pristine_index):
    a, b = pristine_index["chip_id"].iloc[0], pristine_index["chip_id"].iloc[-1]
    _path(fixture_copy, a, "DEM").unlink()
    _path(fixture_copy, b, "LULC").write_bytes(b"junk")
    problems = validate_dataset(fixture_copy)
    assert sorted((p.chip_id, p.path) for p in problems) == sorted(
        [(a, str(_path(fixture_copy, a, "DEM"))), (b, str(_path(fixture_copy, b, "LULC")))])


# ---------------------------------------------------------------- read_chip / ChipError


def test_read_chip_raises_chip_error_naming_chip_and_file(fixture_copy, victim):
    path = _path(fixture_copy, victim, "S1RTC")
    array = _read(path)
    array[0, 0, 0] = np.nan
    _rewrite(path, array)
    spec = chips.DatasetSpec.read(fixture_copy)
    with pytest.raises(ChipError) as info:
        read_chip(fixture_copy, spec, _record(fixture_copy, victim))
    err = info.value
    assert isinstance(err, ValueError)
    assert victim in str(err) and str(path) in str(err)
    assert "python -m nycdata validate" in str(err)
    assert err.problems == [Problem(victim, str(path), "1 NaN values in S1RTC; fill or mask them before building chips")]


def test_read_chip_lists_every_problem_of_the_chip(fixture_copy, victim):
    dem = _path(fixture_copy, victim, "DEM")
    lulc = _path(fixture_copy, victim, "LULC")
    dem.unlink()
    lulc.write_bytes(b"junk")
    spec = chips.DatasetSpec.read(fixture_copy)
    with pytest.raises(ChipError) as info:
        read_chip(fixture_copy, spec, _record(fixture_copy, victim))
    assert [(p.chip_id, p.path) for p in info.value.problems] == [(victim, str(dem)), (victim, str(lulc))]
    assert str(dem) in str(info.value) and str(lulc) in str(info.value)


def test_read_chip_only_checks_requested_modalities(fixture_copy, victim):
    _path(fixture_copy, victim, "DEM").unlink()
    spec = chips.DatasetSpec.read(fixture_copy)
    record = _record(fixture_copy, victim)
    arrays = read_chip(fixture_copy, spec, record, modalities=["S2L2A", "LULC"])
    assert set(arrays) == {"S2L2A", "LULC"}
    with pytest.raises(ChipError, match=victim):
        read_chip(fixture_copy, spec, record, modalities=["DEM"])


def test_inspect_chip_date_count_mismatch(pristine_fixture_dir, victim):
    spec = chips.DatasetSpec.read(pristine_fixture_dir)
    record = _record(pristine_fixture_dir, victim)
    record["dates"] = record["dates"].split("|")[0]
    arrays, problems = inspect_chip(pristine_fixture_dir, spec, record)
    assert set(arrays) == set(chips.MODALITIES)
    assert problems == [Problem(victim, None, "index lists 1 dates, the dataset has 2 timesteps")]
