"""The builder on synthetic raw sources: two UTM zones, S2 per band at 10/20/60 m, S1 linear with nodata,
DEM at 30 m and WorldCover in EPSG:4326 with every code."""

import numpy as np
import pandas as pd
import pytest
import rasterio

from nycdata.data import chips
import random

from nycdata.sources.build import (Grid, OffsetDecision, _dem, build_dataset, choose_dates, grouped_split, harmonise,
                                   match_s1_dates)
from nycdata.sources.manifest import SourceError, needs_offset
from nycdata.data.chips import TERRAMIND_V1_STATS
from nycdata.params import PARAMS_DIR, load_params
from nycdata.sources.synthetic import SyntheticSourcesConfig, make_sources
from nycdata.data.validate import validate_dataset

SIZE, T = 32, 2
PARENT_PX, GRID = 96, 3  # 96 px parents: 3 x 3 chips of 32 px each


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    config = SyntheticSourcesConfig(parents=3, parent_size_px=PARENT_PX, zone_override={1: "EPSG:32617"},
                                    missing_dem_parents=())
    return make_sources(tmp_path_factory.mktemp("src") / "sources", config)


def _params(**overrides):
    return load_params(PARAMS_DIR / "fixture.yaml", overrides={"chip_size": SIZE, "timesteps": T,
                                                               "max_cloud_cover": 100.0, **overrides})


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory):
    return build_dataset(sources, tmp_path_factory.mktemp("b") / "data", _params(), log=lambda m: None)


def _manifest(sources):
    return pd.read_csv(sources, dtype=str, keep_default_na=False)


def _read(path, band=None):
    with rasterio.open(path) as src:
        return (src.read(band) if band else src.read()), src.crs, src.transform


def test_chip_counts_grid_alignment_and_validation(built, sources):
    index = chips.read_index(built)
    assert validate_dataset(built) == []
    assert len(index) == 3 * GRID**2 - 2  # p00's no-data corner drops 2
    chip = index[index.chip_id == "nyc_p01_r1c2"].iloc[0]
    assert chip["crs"] == "EPSG:32617"
    b02 = _manifest(sources).query("parent_id == 'p01' and band == 'B02'").iloc[0]
    _, _, source_transform = _read(sources.parent / b02["path"])
    _, crs, transform = _read(built / chip["path_S2L2A"], 1)
    assert crs.to_string() == "EPSG:32617"
    assert (transform.c, transform.f) == (source_transform.c + 2 * SIZE * 10, source_transform.f - 1 * SIZE * 10)
    assert transform.a == 10 and transform.e == -10


def test_s2_offset_removed_exactly_from_new_baseline_scenes(built, sources):
    """The default convention, without_offset: baseline >= 04.00 scenes lose their +1000, older ones stay."""
    chip = chips.read_index(built).query("chip_id == 'nyc_p02_r0c0'").iloc[0]
    dates = chip["dates"].split("|")
    manifest = _manifest(sources).query("parent_id == 'p02' and band == 'B02'").set_index("date")
    s2, _, _ = _read(built / chip["path_S2L2A"])
    for t, date in enumerate(dates):
        source = _read(sources.parent / manifest.loc[date, "path"], 1)[0][:SIZE, :SIZE].astype(int)
        offset = 0 if needs_offset(date, manifest.loc[date, "processing_baseline"]) else 1000
        np.testing.assert_array_equal(s2[t * 12 + 1].astype(int), np.where(source > 0, np.maximum(source - offset, 0), 0))
    delivered = ["absent" if needs_offset(d, manifest.loc[d, "processing_baseline"]) else "present" for d in dates]
    assert set(delivered) == {"absent", "present"} and chip["s2_offset"].split("|") == delivered
    assert [f"s2_offset_removed_{d}" in chip["fixes"] for d in dates] == [d == "present" for d in delivered]


@pytest.mark.parametrize("convention, absent_shift, present_shift, actions", [
    ("without_offset", 0, -1000, ("", "removed")), ("with_offset", 1000, 0, ("added", "")), ("as_delivered", 0, 0, ("", ""))])
def test_each_convention_moves_only_the_other_convention(convention, absent_shift, present_shift, actions):
    stack = np.full((12, 4, 4), 1500.0)
    stack[:, 0, 0] = 0  # nodata stays nodata
    for (date, baseline), shift, action in zip([("2021-06-01", "03.00"), ("2023-06-01", "05.09")],
                                               (absent_shift, present_shift), actions):
        out, decision = harmonise(stack, date, baseline, convention, "scene")
        assert out[0, 1, 1] == 1500 + shift and out[0, 0, 0] == 0 and decision.action == action


def test_reprocessed_baseline_9999_is_judged_from_its_darkest_pixels():
    dark_water = np.concatenate([np.full(50, 120.0), np.full(950, 2500.0)])
    scene = np.broadcast_to(dark_water.reshape(1, 1, -1), (12, 1, 1000)).copy()
    assert harmonise(scene, "2019-06-01", "99.99", "without_offset", "s")[1] == OffsetDecision("absent (pixels)", "")
    out, decision = harmonise(scene + 1000, "2019-06-01", "99.99", "without_offset", "s")
    assert decision == OffsetDecision("present (pixels)", "removed") and np.array_equal(out, scene)
    with pytest.raises(SourceError, match=r"S2 2019.*99\.99.*650 DN.*processing_baseline in sources.csv"):
        harmonise(scene + 530, "2019-06-01", "99.99", "with_offset", "S2 2019-06-01")


def test_original_split_is_the_scripts_shuffle_of_sorted_parents():
    parents = [f"45{i % 6}U_62{i // 6}L" for i in range(21)]
    split = grouped_split(parents[::-1], (0.7, 0.15, 0.15), 42, method="original")
    order = sorted(parents)
    random.Random(42).shuffle(order)
    assert [split[p] for p in order] == ["train"] * 14 + ["val"] * 3 + ["test"] * 4  # x 16 chips = 224 / 48 / 64
    with pytest.raises(SourceError, match="2/0/1 of 3 parents.*would be empty"):
        grouped_split(parents[:3], (0.7, 0.15, 0.15), 42, method="original")


def test_s1_dates_are_distinct_per_timestep_in_distinct_mode():
    s2 = ["2021-05-01", "2021-05-04", "2021-08-01"]
    s1 = ["2021-05-02", "2021-05-20", "2021-07-30"]
    assert match_s1_dates(s2, s1, distinct=False, parent="p") == ["2021-05-02", "2021-05-02", "2021-07-30"]
    assert match_s1_dates(s2, s1, distinct=True, parent="p") == ["2021-05-02", "2021-05-20", "2021-07-30"]
    with pytest.raises(SourceError, match="parent p: 2 S1 dates for 3 distinct S2 dates.*fetch stac"):
        match_s1_dates(s2, s1[:2], distinct=True, parent="p")


def test_s1_linear_power_becomes_db_and_nodata_is_filled(built, sources):
    chip = chips.read_index(built).query("chip_id == 'nyc_p00_r2c2'").iloc[0]
    s1_date = chip["s1_dates"].split("|")[0]
    row = _manifest(sources).query("parent_id == 'p00' and modality == 'S1RTC' and date == @s1_date").iloc[0]
    linear, _, _ = _read(sources.parent / row["path"])
    window = linear[:, 2 * SIZE:3 * SIZE, 2 * SIZE:3 * SIZE]
    s1, _, _ = _read(built / chip["path_S1RTC"])
    valid = window > 0
    np.testing.assert_allclose(s1[:2][valid], 10 * np.log10(window[valid]), rtol=1e-5)
    fill = np.array(TERRAMIND_V1_STATS["S1RTC"][0], dtype=np.float32)[:, None, None]
    assert np.allclose(np.where(valid, 0, s1[:2]), np.where(valid, 0, np.broadcast_to(fill, s1[:2].shape)))
    assert (~valid).any() and chip["s1_nodata_fraction"] > 0 and "s1_db" in chip["fixes"]


def test_labels_dem_and_the_50_percent_rule(built):
    index = chips.read_index(built)
    assert {"nyc_p00_r0c0", "nyc_p00_r1c0"}.isdisjoint(index.chip_id) and "nyc_p00_r0c1" in set(index.chip_id)
    counts = index[[f"count_{c}" for c in ("water", "developed", "trees", "herbaceous", "other")]].sum()
    assert (counts > 0).all()
    dem, _, _ = _read(built / index.iloc[0]["path_DEM"])
    assert dem.shape == (1, SIZE, SIZE) and np.isfinite(dem).all() and not index["dem_missing"].any()


def test_grouped_split_and_index_contents(built):
    index = chips.read_index(built)
    assert index.groupby("parent_id")["split"].nunique().max() == 1
    assert set(index["split"]) == {"train", "val", "test"}
    for column in ("dates", "s1_dates", "product_ids", "cloud_cover", "fixes", "s1_nodata_fraction", "label_nodata_fraction"):
        assert column in index.columns
    assert all(len(d.split("|")) == T for d in index["dates"])
    assert index["product_ids"].str.contains("MSIL2A").all()


def test_distinct_and_replicate_dates():
    rows = pd.DataFrame({"date": ["2021-05-01", "2021-06-01", "2021-07-01", "2021-08-01", "2021-09-01"],
                         "cloud_cover": ["5", "50", "10", "20", "0"]})
    assert choose_dates(rows, 3, "distinct", 30.0, "p") == ["2021-05-01", "2021-08-01", "2021-09-01"]
    assert choose_dates(rows, 3, "replicate", 30.0, "p") == ["2021-05-01"] * 3
    with pytest.raises(SourceError, match="4 cloud-filtered S2 dates, 5 timesteps needed"):
        choose_dates(rows, 5, "distinct", 30.0, "p")


def test_the_originals_defects_are_reproduced_and_recorded(sources, tmp_path):
    original = load_params(PARAMS_DIR / "original.yaml")
    defects = {k: original[k] for k in ("temporal_mode", "s1_convert_to_db", "s2_offset_convention")}
    out = build_dataset(sources, tmp_path / "rep", _params(**defects), log=lambda m: None)
    index = chips.read_index(out)
    assert all(len(set(d.split("|"))) == 1 for d in index["dates"]) and index["fixes"].str.contains("temporal_replicate").all()
    assert index["fixes"].str.contains("s1_linear_kept").all() and not index["fixes"].str.contains("s2_offset_").any()
    s1 = _read(out / index.iloc[0]["path_S1RTC"])[0]
    assert s1.min() >= 0 and s1.max() < 5  # linear power as stored, which the dB statistics then normalise
    assert {k: chips.DatasetSpec.read(out).source[k] for k in defects} == defects
    assert validate_dataset(out) == []


def test_zero_filled_dem_is_the_originals_and_flagged():
    grid = Grid(crs=None, transform=None, height=3, width=4)
    dem, flags = _dem(pd.DataFrame({"modality": []}), None, "p", grid, {"missing_dem": "zero"})
    assert dem.shape == (1, 3, 4) and not dem.any() and flags == ["dem_missing", "dem_zero_filled"]
    with pytest.raises(SourceError, match="missing_dem 'zeros' unknown"):
        _dem(pd.DataFrame({"modality": []}), None, "p", grid, {"missing_dem": "zeros"})


def test_explicit_test_chip_list(sources, tmp_path):
    listed = [f"nyc_p01_r{r}c{c}" for r in range(GRID) for c in range(GRID)]
    (tmp_path / "test.txt").write_text("\n".join(listed) + "\n")
    out = build_dataset(sources, tmp_path / "listed", _params(test_chips_file=str(tmp_path / "test.txt")), log=lambda m: None)
    index = chips.read_index(out)
    assert set(index.loc[index.split == "test", "chip_id"]) == set(listed)
    assert set(index.loc[index.split != "test", "parent_id"]) == {"p00", "p02"}


# The error paths need whole parents, not many chips: 64 px parents (2 x 2 chips) with the 2 dates that T needs.
SMALL_PARENTS = dict(parents=3, parent_size_px=64, dates_per_parent=2)


def test_missing_dem_is_an_error_unless_allowed(tmp_path):
    sources = make_sources(tmp_path / "src", SyntheticSourcesConfig(**SMALL_PARENTS, missing_dem_parents=("p02",)))
    with pytest.raises(SourceError, match="parent p02: no DEM.*missing_dem: mean"):
        build_dataset(sources, tmp_path / "fail", _params(), log=lambda m: None)
    assert not (tmp_path / "fail").exists(), "nothing half-written"
    index = chips.read_index(build_dataset(sources, tmp_path / "ok", _params(missing_dem="mean"), log=lambda m: None))
    assert index.loc[index.parent_id == "p02", "dem_missing"].all() and not index.loc[index.parent_id != "p02", "dem_missing"].any()
    dem = _read(tmp_path / "ok" / index.loc[index.parent_id == "p02"].iloc[0]["path_DEM"])[0]
    assert np.all(dem == np.float32(TERRAMIND_V1_STATS["DEM"][0][0]))


def test_db_sources_are_not_converted_twice(tmp_path):
    sources = make_sources(tmp_path / "src", SyntheticSourcesConfig(**SMALL_PARENTS, s1_scale="db", s2_layout="stacked"))
    with pytest.warns(UserWarning, match="declared linear but holds negative values"):
        out = build_dataset(sources, tmp_path / "db", _params(), log=lambda m: None)
    s1, _, _ = _read(out / chips.read_index(out).iloc[0]["path_S1RTC"])
    assert -30 < float(np.median(s1[0])) < 0
    assert validate_dataset(out) == []


def test_bad_manifest_names_the_problem(tmp_path, sources):
    bad = tmp_path / "sources.csv"
    frame = _manifest(sources)
    frame.loc[0, "modality"] = "S3OLCI"
    frame.to_csv(bad, index=False)
    with pytest.raises(SourceError, match="row 2: modality 'S3OLCI'"):
        build_dataset(bad, tmp_path / "x", _params(), log=lambda m: None)


def test_validate_refuses_repeated_dates_in_a_distinct_dataset(built, tmp_path):
    import shutil

    copy = shutil.copytree(built, tmp_path / "copy")
    index = chips.read_index(copy)
    first = index.iloc[0]["s1_dates"].split("|")[0]
    index.loc[0, "s1_dates"] = "|".join([first] * T)
    chips.write_index(copy, index)
    problems = validate_dataset(copy)
    assert [(p.chip_id, p.message.split(" repeat")[0]) for p in problems] == [(index.loc[0, "chip_id"], f"s1_dates {'|'.join([first] * T)}")]
