"""Synthetic raw sources for the builder: manifest, resolutions, S2 offset, S1 scale/nodata, DEM, WorldCover, options."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import rasterio

from nycdata.data.chips import NYC_BBOX, S2L2A_BANDS
from nycdata.data.classes import IGNORE_INDEX, WORLDCOVER_CODES
from nycdata.data.synthetic_scene import S1_SIGNATURES_DB, S2_SIGNATURES
from nycdata.sources.manifest import MANIFEST_COLUMNS
from nycdata.sources.synthetic import S2_BAND_RESOLUTION_M, SyntheticSourcesConfig, make_sources

DEFAULT = SyntheticSourcesConfig()
# Small and different in every option the default leaves alone.
SMALL = SyntheticSourcesConfig(parents=3, parent_size_px=64, dates_per_parent=2, seed=3, s1_scale="db",
                               s2_layout="stacked", missing_dem_parents=("p01",), zone_override={1: "EPSG:32617"},
                               s1_nodata_fraction=0.05)
B02 = S2L2A_BANDS.index("B02")


def _manifest(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _read(path):
    with rasterio.open(path) as src:
        return src.read(), src.profile, src.res, src.bounds


@pytest.fixture(scope="module")
def default_sources(tmp_path_factory):
    manifest = make_sources(tmp_path_factory.mktemp("src") / "default", DEFAULT)
    return manifest.parent, _manifest(manifest)


@pytest.fixture(scope="module")
def small_sources(tmp_path_factory):
    manifest = make_sources(tmp_path_factory.mktemp("src") / "small", SMALL)
    return manifest.parent, _manifest(manifest)


def _truth(root, parent):
    return np.load(root / "truth" / f"{parent}.npz", allow_pickle=False)


# ------------------------------------------------------------------ manifest


def test_manifest_columns_and_row_counts(default_sources):
    root, m = default_sources
    assert (root / "sources.csv").read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    assert tuple(m.columns) == MANIFEST_COLUMNS
    assert len(m) == 3 * (4 * 12 + 4 + 1) + 1
    for parent in ("p00", "p01", "p02"):
        rows = m[m.parent_id == parent]
        assert rows.modality.value_counts().to_dict() == {"S2L2A": 48, "S1RTC": 4, "DEM": 1}
        s2 = rows[rows.modality == "S2L2A"]
        for date, group in s2.groupby("date"):
            assert list(group.band) == list(S2L2A_BANDS), date
            assert group.product_id.nunique() == group.cloud_cover.nunique() == 1
        assert s2.date.nunique() == 4
    wc = m[m.modality == "WORLDCOVER"]
    assert wc[["parent_id", "date", "band", "path"]].values.tolist() == [["*", "", "", "worldcover/worldcover.tif"]]
    assert set(m.date[m.modality.isin(["DEM", "WORLDCOVER"])]) == {""}
    assert set(m.band[m.modality == "S1RTC"]) == {""} and set(m.band[m.modality == "DEM"]) == {"DEM"}
    not_s2 = m[m.modality != "S2L2A"]
    assert set(not_s2.cloud_cover) == {""} and set(not_s2.processing_baseline) == {""}
    assert all((root / p).is_file() for p in m.path)
    assert len(_files(root)) == len(m) + 3 + 1  # + truth/*.npz + sources.csv


def test_s2_metadata(default_sources):
    _, m = default_sources
    s2 = m[m.modality == "S2L2A"]
    cloud = s2.cloud_cover.astype(float)
    assert cloud.between(0, 40).all() and cloud.nunique() > 3
    for row in s2.drop_duplicates(["parent_id", "date"]).itertuples():
        old = row.date < "2022-01-25"
        assert row.processing_baseline == ("03.00" if old else "04.00")
        stamp = row.date.replace("-", "")
        assert row.product_id.startswith(("S2A_MSIL2A_", "S2B_MSIL2A_"))
        assert f"_{stamp}T154911_N{'0300' if old else '0400'}_R054_T18TWL_{stamp}T" in row.product_id
    per_parent = s2.drop_duplicates(["parent_id", "date"]).groupby("parent_id").processing_baseline
    assert per_parent.apply(lambda b: (b == "03.00").sum()).tolist() == [1, 1, 1]


# ------------------------------------------------------------------ S2


def test_per_band_files_have_native_resolutions(default_sources):
    root, m = default_sources
    for parent in ("p00", "p01", "p02"):
        truth = _truth(root, parent)
        rows = m[(m.parent_id == parent) & (m.modality == "S2L2A")]
        for row in rows[rows.date == rows.date.iloc[0]].itertuples():
            array, profile, res, bounds = _read(root / row.path)
            factor = S2_BAND_RESOLUTION_M[row.band] // 10
            assert res == (10.0 * factor, 10.0 * factor), row.band
            assert array.shape == (1, math.ceil(160 / factor), math.ceil(160 / factor)), row.band
            assert profile["dtype"] == "uint16" and profile["nodata"] == 0 and (array > 0).all()
            assert profile["crs"].to_string() == str(truth["crs"]) == "EPSG:32618"
            assert (bounds.left, bounds.top) == (truth["transform"][2], truth["transform"][5])
    assert {b for b, r in S2_BAND_RESOLUTION_M.items() if r == 10} == {"B02", "B03", "B04", "B08"}
    assert {b for b, r in S2_BAND_RESOLUTION_M.items() if r == 60} == {"B01", "B09"}


def test_boa_offset_exactly_on_baseline_04(default_sources):
    root, m = default_sources
    for parent in ("p00", "p01", "p02"):
        water = _truth(root, parent)["classes"] == 0
        assert water.sum() > 100
        rows = m[(m.parent_id == parent) & (m.band == "B02")]
        means = {}
        for row in rows.itertuples():
            b02 = _read(root / row.path)[0][0]
            offset = 1000 if row.processing_baseline == "04.00" else 0
            means[row.processing_baseline, row.date] = b02[water].mean()
            # Plain reflectance x 10000 once the offset is taken off: the water signature +-5 % brightness.
            assert abs(b02[water].mean() - offset - S2_SIGNATURES[0, B02]) < 0.08 * S2_SIGNATURES[0, B02], row.date
        old = [v for (b, _), v in means.items() if b == "03.00"]
        new = [v for (b, _), v in means.items() if b == "04.00"]
        assert len(old) == 1 and len(new) == 3
        assert all(abs(v - old[0] - 1000) < 70 for v in new)


def test_stacked_layout_matches_per_band(small_sources, tmp_path):
    root, m = small_sources
    s2 = m[m.modality == "S2L2A"]
    assert len(s2) == 3 * 2 and set(s2.band) == {""}
    per_band = make_sources(tmp_path / "pb", dataclasses.replace(SMALL, s2_layout="per_band")).parent
    for row in s2.itertuples():
        stack, profile, res, _ = _read(root / row.path)
        assert stack.shape == (12, 64, 64) and res == (10.0, 10.0) and profile["dtype"] == "uint16"
        for b, band in enumerate(S2L2A_BANDS):
            native = _read(per_band / row.path.replace(".tif", f"_{band}.tif"))[0][0]
            f = S2_BAND_RESOLUTION_M[band] // 10
            np.testing.assert_array_equal(stack[b], np.kron(native, np.ones((f, f), native.dtype))[:64, :64])


# ------------------------------------------------------------------ S1


def test_s1_linear_power_with_nodata_zeros(default_sources):
    root, m = default_sources
    s1 = m[m.modality == "S1RTC"]
    for parent, rows in s1.groupby("parent_id"):
        s2_dates = sorted(set(m.date[(m.parent_id == parent) & (m.modality == "S2L2A")]))
        gaps = [abs((pd.Timestamp(a) - pd.Timestamp(b)).days) for a, b in zip(sorted(rows.date), s2_dates)]
        assert all(1 <= g <= 3 for g in gaps), gaps
        water = _truth(root, parent)["classes"] == 0
        for row in rows.itertuples():
            values, profile, res, _ = _read(root / row.path)
            assert values.shape == (2, 160, 160) and profile["dtype"] == "float32" and profile["nodata"] == 0
            zeros = values == 0
            np.testing.assert_array_equal(zeros[0], zeros[1])  # one mask for both bands
            assert zeros[0].sum() == round(0.02 * 160 * 160)
            assert (values[~zeros] > 0).all() and np.isfinite(values).all()
            vv_db = 10 * np.log10(values[0][water & ~zeros[0]])
            assert abs(np.median(vv_db) - S1_SIGNATURES_DB[0, 0]) < 1.5


def test_s1_db_scale_is_negative(small_sources):
    root, m = small_sources
    for row in m[m.modality == "S1RTC"].itertuples():
        values, profile, _, _ = _read(root / row.path)
        valid = values != 0
        assert profile["nodata"] == 0 and valid[0].mean() == pytest.approx(0.95, abs=1e-3)
        assert (values[valid] < 0).mean() > 0.97 and np.median(values[valid]) < -8


# ------------------------------------------------------------------ DEM


def test_dem_in_geographic_crs_covers_parent(default_sources):
    from rasterio.warp import transform_bounds

    root, m = default_sources
    dem_rows = m[m.modality == "DEM"]
    assert sorted(dem_rows.parent_id) == ["p00", "p01", "p02"]
    for row in dem_rows.itertuples():
        dem, profile, res, bounds = _read(root / row.path)
        assert profile["crs"].to_string() == "EPSG:4326" and profile["dtype"] == "float32"
        assert res[0] == pytest.approx(1 / 3600) and res[1] == pytest.approx(1 / 3600)
        assert (dem != profile["nodata"]).all() and -30 < dem.min() < dem.max() < 120
        truth = _truth(root, row.parent_id)
        a, _, c, _, e, f = truth["transform"]
        w, s, east, n = transform_bounds(str(truth["crs"]), "EPSG:4326", c - 200, f + 160 * e - 200, c + 160 * a + 200, f + 200)
        assert bounds.left <= w and bounds.bottom <= s and bounds.right >= east and bounds.top >= n
        assert row.product_id == "Copernicus_DSM_COG_10_N40_00_W075_00_DEM"


def test_missing_dem_parent_has_no_row(small_sources):
    root, m = small_sources
    assert sorted(m.parent_id[m.modality == "DEM"]) == ["p00", "p02"]
    assert not (root / "p01" / "DEM").exists()


# ------------------------------------------------------------------ WorldCover


def test_worldcover_uses_every_code_and_nodata(default_sources):
    root, _ = default_sources
    codes, profile, res, _ = _read(root / "worldcover" / "worldcover.tif")
    assert profile["crs"].to_string() == "EPSG:4326" and profile["dtype"] == "uint8" and profile["nodata"] == 0
    assert res == pytest.approx((1 / 12000, 1 / 12000))
    assert set(np.unique(codes).tolist()) == set(WORLDCOVER_CODES)  # 0 and all 11 land-cover codes


def test_worldcover_matches_truth_and_nodata_corner(default_sources):
    from rasterio.warp import Resampling, reproject

    root, _ = default_sources
    for parent in ("p00", "p01", "p02"):
        truth = _truth(root, parent)
        back = np.zeros((160, 160), np.uint8)
        with rasterio.open(root / "worldcover" / "worldcover.tif") as src:
            reproject(rasterio.band(src, 1), back, dst_transform=rasterio.Affine(*truth["transform"]),
                      dst_crs=str(truth["crs"]), resampling=Resampling.nearest)
        np.testing.assert_array_equal(back, truth["worldcover"])
        ignore = truth["label"] == IGNORE_INDEX
        np.testing.assert_array_equal(ignore, truth["worldcover"] == 0)
        np.testing.assert_array_equal(truth["label"][~ignore], truth["classes"][~ignore])
        corner = ignore[:64, :64].mean()
        if parent == "p00":
            assert 0.65 < corner < 0.75 and ignore[64:].sum() == 0 and ignore[:, 64:].sum() == 0
        else:
            assert not ignore.any()


# ------------------------------------------------------------------ geometry and options


def test_parents_inside_bbox_and_disjoint(default_sources):
    from rasterio.warp import transform_bounds

    root, _ = default_sources
    boxes = []
    for parent in ("p00", "p01", "p02"):
        truth = _truth(root, parent)
        a, _, c, _, e, f = truth["transform"]
        assert c % 60 == 0 and f % 60 == 0
        boxes.append(transform_bounds(str(truth["crs"]), "EPSG:4326", c, f + 160 * e, c + 160 * a, f))
    lon0, lat0, lon1, lat1 = NYC_BBOX
    assert all(lon0 < w and lat0 < s and e < lon1 and n < lat1 for w, s, e, n in boxes)
    assert all(a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1] for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_zone_override_puts_parent_in_other_utm_zone(small_sources):
    root, m = small_sources
    for row in m[m.modality.isin(["S2L2A", "S1RTC"])].itertuples():
        with rasterio.open(root / row.path) as src:
            assert src.crs.to_string() == ("EPSG:32617" if row.parent_id == "p01" else "EPSG:32618"), row.path
    assert str(_truth(root, "p01")["crs"]) == "EPSG:32617"
    assert "_T17T" in m.product_id[(m.parent_id == "p01") & (m.modality == "S2L2A")].iloc[0]
    codes = _read(root / "worldcover" / "worldcover.tif")[0]
    assert set(np.unique(codes).tolist()) == set(WORLDCOVER_CODES)


def test_same_config_gives_byte_identical_files(tmp_path, small_sources):
    root, _ = small_sources
    again = make_sources(tmp_path / "again", SMALL).parent
    files = _files(root)
    assert files == _files(again)
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = make_sources(tmp_path / "other", dataclasses.replace(SMALL, seed=4)).parent
    assert (other / "truth" / "p00.npz").read_bytes() != (root / "truth" / "p00.npz").read_bytes()


def test_refuses_non_empty_out_dir(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_sources(tmp_path / "full", SMALL)
    assert _files(tmp_path / "full") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert make_sources(tmp_path / "empty", SyntheticSourcesConfig(parents=1, parent_size_px=32, dates_per_parent=1)) == tmp_path / "empty" / "sources.csv"


@pytest.mark.parametrize("change, message", [
    ({"s1_scale": "amplitude"}, "s1_scale"),
    ({"s2_layout": "cog"}, "s2_layout"),
    ({"old_baseline_dates": 3, "dates_per_parent": 2}, "old_baseline_dates"),
    ({"missing_dem_parents": ("p07",)}, "missing_dem_parents"),
    ({"zone_override": {5: "EPSG:32617"}}, "zone_override"),
    ({"zone_override": {0: "EPSG:4326"}}, "zone_override"),
])
def test_rejects_bad_config(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        make_sources(tmp_path / "x", dataclasses.replace(SMALL, **change))
    assert not (tmp_path / "x").exists()
