"""The builder on synthetic raw sources: two UTM zones, S2 per band at 10/20/60 m, S1 linear with nodata,
DEM at 30 m and WorldCover in EPSG:4326 with every code."""

import numpy as np
import pandas as pd
import pytest
import rasterio

from nycdata import chips
from nycdata.build import SourceError, build_dataset, choose_dates, needs_offset
from nycdata.data import TERRAMIND_V1_STATS
from nycdata.params import PARAMS_DIR, load_params
from nycdata.synthetic_sources import SyntheticSourcesConfig, make_sources
from nycdata.validate import validate_dataset

SIZE, T = 32, 2


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    config = SyntheticSourcesConfig(parents=3, zone_override={1: "EPSG:32617"}, missing_dem_parents=())
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
    assert len(index) == 3 * 25 - 2  # 160 px parents -> 5 x 5 chips; p00's no-data corner drops 2
    chip = index[index.chip_id == "nyc_p01_r1c2"].iloc[0]
    assert chip["crs"] == "EPSG:32617"
    b02 = _manifest(sources).query("parent_id == 'p01' and band == 'B02'").iloc[0]
    _, _, source_transform = _read(sources.parent / b02["path"])
    _, crs, transform = _read(built / chip["path_S2L2A"], 1)
    assert crs.to_string() == "EPSG:32617"
    assert (transform.c, transform.f) == (source_transform.c + 2 * SIZE * 10, source_transform.f - 1 * SIZE * 10)
    assert transform.a == 10 and transform.e == -10


def test_s2_offset_added_exactly_to_old_baseline_scenes(built, sources):
    chip = chips.read_index(built).query("chip_id == 'nyc_p02_r0c0'").iloc[0]
    dates = chip["dates"].split("|")
    manifest = _manifest(sources).query("parent_id == 'p02' and band == 'B02'").set_index("date")
    s2, _, _ = _read(built / chip["path_S2L2A"])
    for t, date in enumerate(dates):
        source, _, _ = _read(sources.parent / manifest.loc[date, "path"], 1)
        offset = 1000 if needs_offset(date, manifest.loc[date, "processing_baseline"]) else 0
        np.testing.assert_array_equal(s2[t * 12 + 1].astype(int), source[:SIZE, :SIZE].astype(int) + offset)
    assert {needs_offset(d, manifest.loc[d, "processing_baseline"]) for d in dates} == {True, False}
    assert f"s2_offset_{dates[0]}" in chip["fixes"]


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


def test_replicate_mode_is_recorded(sources, tmp_path):
    out = build_dataset(sources, tmp_path / "rep", _params(temporal_mode="replicate"), log=lambda m: None)
    index = chips.read_index(out)
    assert all(len(set(d.split("|"))) == 1 for d in index["dates"]) and index["fixes"].str.contains("temporal_replicate").all()


def test_explicit_test_chip_list(sources, tmp_path):
    listed = [f"nyc_p01_r{r}c{c}" for r in range(5) for c in range(5)]
    (tmp_path / "test.txt").write_text("\n".join(listed) + "\n")
    out = build_dataset(sources, tmp_path / "listed", _params(test_chips_file=str(tmp_path / "test.txt")), log=lambda m: None)
    index = chips.read_index(out)
    assert set(index.loc[index.split == "test", "chip_id"]) == set(listed)
    assert set(index.loc[index.split != "test", "parent_id"]) == {"p00", "p02"}


def test_missing_dem_is_an_error_unless_allowed(tmp_path):
    sources = make_sources(tmp_path / "src", SyntheticSourcesConfig(parents=3, missing_dem_parents=("p02",)))
    with pytest.raises(SourceError, match="parent p02: no DEM.*allow_missing_dem"):
        build_dataset(sources, tmp_path / "fail", _params(), log=lambda m: None)
    assert not (tmp_path / "fail").exists(), "nothing half-written"
    index = chips.read_index(build_dataset(sources, tmp_path / "ok", _params(allow_missing_dem=True), log=lambda m: None))
    assert index.loc[index.parent_id == "p02", "dem_missing"].all() and not index.loc[index.parent_id != "p02", "dem_missing"].any()


def test_db_sources_are_not_converted_twice(tmp_path):
    sources = make_sources(tmp_path / "src", SyntheticSourcesConfig(parents=3, s1_scale="db", s2_layout="stacked"))
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
