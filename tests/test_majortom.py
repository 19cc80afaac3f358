"""nycdata.sources.majortom without a network: cell selection on metadata frames, then fetches from local parquet
shards (tests/test_fetch_hub.py runs the same fetch through the real huggingface_hub against a local server)."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from http_fakes import Sleeps, no_network, quiet  # noqa: F401 - no_network: autouse

from nycdata.data.chips import NYC_BBOX, S2L2A_BANDS
from nycdata.sources import majortom
from nycdata.sources.http import OfflineError
from nycdata.sources.majortom import fetch_majortom, match_majortom_cells, parse_hf_url, select_majortom_cells
from nycdata.sources.manifest import read_manifest


def test_parse_hf_url():
    url = "https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/part_01234.parquet"
    assert parse_hf_url(url) == ("Major-TOM/Core-S2L2A", "main", "images/part_01234.parquet")
    assert parse_hf_url(url + "?download=true")[2] == "images/part_01234.parquet"
    with pytest.raises(ValueError):
        parse_hf_url("https://example.com/part_0.parquet")


# --------------------------------------------------------------------------- Major-TOM selection

# NYC grid cells (Major-TOM rows ~451U-453U, columns ~624L-626L); centres inside NYC_BBOX unless said otherwise
C1, C2, C3, OUT = (40.63, -74.05), (40.72, -73.95), (40.54, -74.12), (41.35, -74.00)


def s2_product(day, baseline="0214", tile="T18TWL"):
    return f"S2A_MSIL2A_{day}T154911_N{baseline}_R054_{tile}_{day}T200409"


def s2_metadata(rows):
    """rows: (cell, (lat, lon), timestamp, cloud, product_id) with Core-S2L2A's metadata column names."""
    return pd.DataFrame({"grid_cell": [r[0] for r in rows], "centre_lat": [r[1][0] for r in rows],
                         "centre_lon": [r[1][1] for r in rows], "timestamp": [r[2] for r in rows],
                         "cloud_cover": [r[3] for r in rows], "product_id": [r[4] for r in rows],
                         "parquet_url": "u", "parquet_row": range(len(rows))})


def test_select_majortom_cells_one_product_per_cell_and_every_drop_logged():
    meta = s2_metadata([
        ("452U_625L", C1, "20200710T154911", 12.0, s2_product("20200710", tile="T18TWK")),  # overlap, cloudier
        ("452U_625L", C1, "20200615T154911", 3.0, s2_product("20200615")),                   # kept
        ("453U_624L", C2, "20190302T154911", 64.0, s2_product("20190302")),                  # too cloudy
        ("451U_626L", C3, "20210801T154911", 30.0, s2_product("20210801", "9999")),          # == max_cloud: kept
        ("451U_625L", (40.45, -74.30), "20180101T000000", 1.0, s2_product("20180101")),      # bbox corner: kept
        ("453U_625L", C2, "20200301T000000", float("nan"), s2_product("20200301")),          # cloud unknown
        ("460U_625L", OUT, "20200615T154911", 0.0, s2_product("20200615")),                  # outside: count only
        ("461U_625L", OUT, "20200615T154911", 0.0, s2_product("20200615")),
    ])
    lines = []
    got = select_majortom_cells(meta, NYC_BBOX, max_cloud=30.0, log=lines.append)
    assert list(got["grid_cell"]) == ["451U_625L", "451U_626L", "452U_625L"]
    assert list(got["date"]) == ["2018-01-01", "2021-08-01", "2020-06-15"]
    assert list(got["processing_baseline"]) == ["02.14", "99.99", "02.14"]
    assert "6 of 8 S2 products (5 cells) have their centre in bbox" in lines[0] and "2 outside it" in lines[0]
    assert "cell 453U_624L: S2 product 2019-03-02 has 64.0 % cloud > 30.0" in lines
    assert "cell 453U_625L: S2 product 2020-03-01 cloud cover unknown" in lines
    assert not any("460U" in line for line in lines)
    (choice,) = [line for line in lines if line.startswith("cell 452U_625L")]
    assert f"2 S2 products (tile overlaps); kept {s2_product('20200615')} (2020-06-15, 3.0 % cloud)" in choice
    assert f"not {s2_product('20200710', tile='T18TWK')} (cloudier)" in choice


def test_select_majortom_cells_date_window_and_no_filters():
    meta = s2_metadata([("452U_625L", C1, "20190615T154911", 3.0, "P1"), ("453U_624L", C2, "20200615T154911", 80.0, "P2"),
                        ("451U_626L", C3, "20200301T000000", float("nan"), "P3")])
    lines = []
    got = select_majortom_cells(meta, NYC_BBOX, start="2020-01-01", end="2025-12-31", max_cloud=None, log=lines.append)
    assert list(got["grid_cell"]) == ["451U_626L", "453U_624L"]  # no cloud filter: 80 % and unknown cloud stay
    assert "cell 452U_625L: S2 product dated 2019-06-15 outside 2020-01-01..2025-12-31" in lines
    assert list(select_majortom_cells(meta, NYC_BBOX)["grid_cell"]) == ["451U_626L", "452U_625L", "453U_624L"]
    assert "outside 2020-01-01.." in select_and_log(meta, start="2020-01-01")


def select_and_log(meta, **kwargs):
    lines = []
    select_majortom_cells(meta, NYC_BBOX, log=lines.append, **kwargs)
    return "\n".join(lines)


def test_match_majortom_cells_by_grid_cell_without_centres():
    cells = pd.DataFrame({"grid_cell": ["451U_626L", "452U_625L"], "date": ["2021-08-01", "2020-06-15"]})
    s1 = pd.DataFrame({"grid_cell": ["452U_625L", "452U_625L", "460U_625L"],  # no centre_lat / centre_lon at all
                       "timestamp": ["20200901T225002", "20200612T225002", "20200612T225002"],
                       "product_id": ["far", "near", "elsewhere"], "parquet_url": "u", "parquet_row": [0, 1, 2]})
    lines = []
    got = match_majortom_cells(s1, cells, "Core-S1RTC", log=lines.append)
    assert list(zip(got["grid_cell"], got["product_id"], got["gap_days"])) == [("452U_625L", "near", -3)]
    assert "cell 451U_626L: no product in Major-TOM/Core-S1RTC" in lines
    assert any("cell 452U_625L: 2 products in Major-TOM/Core-S1RTC" in line for line in lines)
    dem = pd.DataFrame({"grid_cell": ["451U_626L"], "parquet_url": "u", "parquet_row": [0]})
    got = match_majortom_cells(dem, cells, "Core-DEM", log=lines.append)
    assert list(got["grid_cell"]) == ["451U_626L"] and list(got["date"]) == [""]
    assert "cell 452U_625L: no product in Major-TOM/Core-DEM" in lines


def test_read_majortom_metadata_names_a_missing_column(tmp_path):
    path = tmp_path / "metadata.parquet"
    s2_metadata([("452U_625L", C1, "20200615T154911", 3.0, "P1")]).rename(columns={"grid_cell": "cell"}).to_parquet(path)
    with pytest.raises(ValueError, match=r"Major-TOM/Core-S2L2A metadata.parquet .*lacks column\(s\) \['grid_cell'\]"):
        majortom.read_majortom_metadata(path, "Core-S2L2A")


def test_majortom_file_sizes_follow_the_core_product_shapes():
    sizes = majortom.MAJORTOM_FILE_BYTES
    assert sizes[("S2L2A", "B04")] == 1068 * 1068 * 2 and sizes[("S2L2A", "B05")] == 534 * 534 * 2
    assert sizes[("S2L2A", "B01")] == 178 * 178 * 2 and sizes[("S1RTC", "VV")] == 1068 * 1068 * 4
    assert sizes[("DEM", "DEM")] == 356 * 356 * 4


# --------------------------------------------------------------------------- Major-TOM end to end, local files

HF = "https://huggingface.co/datasets/Major-TOM/{coll}/resolve/main/images/part_00001.parquet"


def write_majortom(root, coll, records, band_columns):
    """metadata.parquet and one shard (one row group per product) for a fake Major-TOM collection; the band
    columns hold text instead of GeoTIFF bytes (tests/test_fetch_hub.py serves real rasters)."""
    shard = root / coll / "images" / "part_00001.parquet"
    shard.parent.mkdir(parents=True)
    columns = {"grid_cell": [r["grid_cell"] for r in records]}
    if "product_id" in records[0]:
        columns["product_id"] = [r["product_id"] for r in records]
    for col in band_columns:
        columns[col] = [f"{r['grid_cell']}|{r.get('timestamp', '')}|{col}".encode() for r in records]
    pq.write_table(pa.table(columns), shard, row_group_size=1)
    meta = pd.DataFrame([{**r, "parquet_url": HF.format(coll=coll), "parquet_row": i} for i, r in enumerate(records)])
    meta.to_parquet(root / coll / "metadata.parquet")


@pytest.fixture
def fake_majortom(tmp_path):
    root = tmp_path / "hub"
    centre = lambda lat_lon: dict(centre_lat=lat_lon[0], centre_lon=lat_lon[1])  # noqa: E731
    write_majortom(root, "Core-S2L2A", [
        dict(grid_cell="452U_625L", timestamp="20200615T154911", cloud_cover=3.0, **centre(C1),
             product_id=s2_product("20200615")),
        dict(grid_cell="453U_624L", timestamp="20190302T154911", cloud_cover=64.0, **centre(C2),
             product_id=s2_product("20190302")),
        dict(grid_cell="451U_626L", timestamp="20210801T154911", cloud_cover=1.0, **centre(C3),
             product_id=s2_product("20210801", "9999")),
        dict(grid_cell="460U_625L", timestamp="20200615T154911", cloud_cover=0.0, **centre(OUT),
             product_id=s2_product("20200615")),
    ], S2L2A_BANDS)
    write_majortom(root, "Core-S1RTC", [  # no centre columns: S1 rows are matched by grid_cell
        dict(grid_cell="452U_625L", timestamp="20200618T225002", product_id="S1A_IW_GRDH_1SDV_20200618T225002"),
        dict(grid_cell="460U_625L", timestamp="20200618T225002", product_id="S1A_IW_GRDH_1SDV_20200618T225002"),
    ], ["vv", "vh"])
    write_majortom(root, "Core-DEM", [dict(grid_cell="452U_625L", **centre(C1)),
                                      dict(grid_cell="451U_626L", **centre(C3))], ["DEM"])

    class Hub:
        downloads, opened = [], []

        def hf_download(self, repo_id, repo_type, filename, revision=None, endpoint=None, cache_dir=None):
            assert repo_type == "dataset" and repo_id.startswith("Major-TOM/")
            self.downloads.append((repo_id, filename))
            return str(root / repo_id.split("/")[1] / filename)

        def open_shard(self, url):
            repo_id, revision, filename = parse_hf_url(url)
            self.opened.append(url)
            return open(root / repo_id.split("/")[1] / filename, "rb")

    return Hub()


def test_fetch_majortom_writes_files_and_manifest(tmp_path, fake_majortom):
    out = tmp_path / "raw"
    lines = []
    manifest = fetch_majortom(out, max_cloud=30.0, log=lines.append, hf_download=fake_majortom.hf_download,
                              open_shard=fake_majortom.open_shard, sleep=Sleeps())
    assert manifest == out / "sources.csv"
    rows = read_manifest(out)
    s2 = [r for r in rows if r["modality"] == "S2L2A"]
    assert len(s2) == 2 * 12 and {r["parent_id"] for r in rows} == {"451U_626L", "452U_625L"}
    assert (out / "452U_625L/S2L2A/2020-06-15_B8A.tif").read_bytes() == b"452U_625L|20200615T154911|B8A"
    first = next(r for r in s2 if r["parent_id"] == "452U_625L" and r["band"] == "B04")
    assert first == dict(parent_id="452U_625L", modality="S2L2A", date="2020-06-15", band="B04",
                         path="452U_625L/S2L2A/2020-06-15_B04.tif", cloud_cover="3.0", processing_baseline="02.14",
                         product_id=s2_product("20200615"))
    assert {r["processing_baseline"] for r in s2 if r["parent_id"] == "451U_626L"} == {"99.99"}
    s1 = [r for r in rows if r["modality"] == "S1RTC"]
    assert [(r["parent_id"], r["date"], r["band"], r["cloud_cover"], r["processing_baseline"]) for r in s1] == \
        [("452U_625L", "2020-06-18", "VV", "", ""), ("452U_625L", "2020-06-18", "VH", "", "")]
    assert (out / "452U_625L/S1RTC/2020-06-18_VH.tif").read_bytes() == b"452U_625L|20200618T225002|vh"
    dem = [(r["parent_id"], r["date"], r["band"], r["path"]) for r in rows if r["modality"] == "DEM"]
    assert dem == [("451U_626L", "", "DEM", "451U_626L/DEM/DEM.tif"), ("452U_625L", "", "DEM", "452U_625L/DEM/DEM.tif")]
    assert all((out / r["path"]).exists() for r in rows)
    # the log tells what Core is, what was dropped and why, and what was fetched
    assert lines[0].startswith("Major-TOM Core is single-date") and "temporal_mode: replicate" in lines[0]
    assert "cell 453U_624L: S2 product 2019-03-02 has 64.0 % cloud > 30.0" in lines
    assert "cell 451U_626L: no product in Major-TOM/Core-S1RTC" in lines
    assert any(line.startswith("cell 452U_625L: S1 product 2020-06-18 is 3 d after the S2 product 2020-06-15")
               for line in lines)
    assert any("cell 451U_626L" in line and "processing baseline 99.99 (reprocessed)" in line
               and "decided from the pixels when building" in line for line in lines)
    assert any("[1/2] S2L2A cell 451U_626L 2021-08-01: wrote 12 of 12 files, 348 B" in line for line in lines)
    assert any("temporal_mode: replicate" in line and "S1-to-S2 gaps 3..3 d" in line for line in lines[-3:])
    assert lines[-1].startswith("parent") and "total: 28 files" in lines[-1]
    assert [d for d in fake_majortom.downloads] == [(f"Major-TOM/{c}", "metadata.parquet")
                                                    for c in ("Core-S2L2A", "Core-S1RTC", "Core-DEM")]


def test_fetch_majortom_date_window_drops_cells_with_a_reason(tmp_path, fake_majortom):
    lines = []
    fetch_majortom(tmp_path / "raw", start="2020-01-01", end="2020-12-31", collections=("Core-S2L2A",),
                   log=lines.append, hf_download=fake_majortom.hf_download, open_shard=fake_majortom.open_shard)
    assert "cell 451U_626L: S2 product dated 2021-08-01 outside 2020-01-01..2020-12-31" in lines
    assert {r["parent_id"] for r in read_manifest(tmp_path / "raw")} == {"452U_625L"}


def test_fetch_majortom_dry_run_writes_nothing(tmp_path, fake_majortom):
    out = tmp_path / "raw"
    lines = []

    def refuse(url):
        raise AssertionError("a dry run reads no image shard")

    plan = fetch_majortom(out, dry_run=True, log=lines.append, hf_download=fake_majortom.hf_download, open_shard=refuse)
    assert not out.exists()
    assert len(plan) == 2 * 12 + 2 + 2 and {p.parent_id for p in plan} == {"451U_626L", "452U_625L"}
    s1 = next(p for p in plan if p.modality == "S1RTC")
    assert (s1.date, s1.est_bytes, s1.note) == ("2020-06-18", 1068 * 1068 * 4, "S1 3 d after S2 (unrelated)")
    n9999 = next(p for p in plan if p.parent_id == "451U_626L" and p.modality == "S2L2A")
    assert n9999.cloud_cover == 1.0 and "99.99" in n9999.note
    assert any("total: 28 files" in line and "nothing was written (dry run)" in line for line in lines)


def test_fetch_majortom_resume_reads_only_what_is_missing(tmp_path, fake_majortom):
    out = tmp_path / "raw"
    kwargs = dict(log=quiet, hf_download=fake_majortom.hf_download, sleep=Sleeps())
    fetch_majortom(out, open_shard=fake_majortom.open_shard, **kwargs)
    before = (out / "sources.csv").read_text()

    def refuse(url):
        raise AssertionError("nothing should be read again")

    fetch_majortom(out, open_shard=refuse, **kwargs)
    assert (out / "sources.csv").read_text() == before

    (out / "452U_625L/S2L2A/2020-06-15_B02.tif").unlink()
    fake_majortom.opened.clear()
    fetch_majortom(out, collections=("Core-S2L2A",), open_shard=fake_majortom.open_shard, **kwargs)
    assert len(fake_majortom.opened) == 1
    assert (out / "452U_625L/S2L2A/2020-06-15_B02.tif").read_bytes() == b"452U_625L|20200615T154911|B02"
    assert (out / "sources.csv").read_text() == before


def test_fetch_majortom_checks_row_group_matches_metadata(tmp_path, fake_majortom):
    meta_path = tmp_path / "hub" / "Core-DEM" / "metadata.parquet"
    meta = pd.read_parquet(meta_path)
    meta["parquet_row"] = meta["parquet_row"][::-1].to_numpy()  # rows point at each other's row groups
    meta.to_parquet(meta_path)
    with pytest.raises(ValueError, match="holds grid_cell"):
        fetch_majortom(tmp_path / "raw", collections=("Core-DEM",), log=quiet, hf_download=fake_majortom.hf_download,
                       open_shard=fake_majortom.open_shard)


def test_fetch_majortom_retries_a_failed_shard_read_and_reopens(tmp_path, fake_majortom):
    sleeps, calls = Sleeps(), []

    def flaky(url):
        calls.append(url)
        if len(calls) == 1:
            raise ConnectionError("connection reset by peer")
        return fake_majortom.open_shard(url)

    fetch_majortom(tmp_path / "raw", collections=("Core-DEM",), log=quiet, hf_download=fake_majortom.hf_download,
                   open_shard=flaky, sleep=sleeps)
    assert sleeps == [1] and len(calls) == 2
    assert len(read_manifest(tmp_path / "raw")) == 2


def test_fetch_majortom_hf_hub_offline_is_offline_error(tmp_path, monkeypatch, fake_majortom):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="Major-TOM/Core-S2L2A.*offline"):
        fetch_majortom(tmp_path / "raw", log=quiet, hf_download=fake_majortom.hf_download)
    assert fake_majortom.downloads == []


def test_fetch_majortom_unreachable_hub_is_offline_error(tmp_path):
    sleeps = Sleeps()

    def unreachable(**kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    with pytest.raises(OfflineError) as info:
        fetch_majortom(tmp_path / "raw", log=quiet, hf_download=unreachable, retries=2, sleep=sleeps)
    assert "Major-TOM/Core-S2L2A" in str(info.value) and "offline" in str(info.value)
    assert sleeps == [1, 2]


def test_fetch_majortom_unknown_collection(tmp_path):
    with pytest.raises(ValueError, match="Core-S3"):
        fetch_majortom(tmp_path, collections=("Core-S3",), log=quiet)
