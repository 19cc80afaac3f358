"""nycdata.fetch without a network: fake HTTP sessions, local parquet shards, local rasters, a fake STAC client."""

from __future__ import annotations

import csv
import socket
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

from nycdata import fetch
from nycdata.fetch import (MANIFEST_COLUMNS, NYC_BBOX, S2_BANDS, DownloadError, OfflineError, clip_to_bbox, download,
                           fetch_majortom, fetch_stac, fetch_worldcover, parse_hf_url, parse_processing_baseline,
                           read_manifest, select_majortom_rows, select_stac_records, stac_item_record,
                           worldcover_tiles, write_manifest)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any Python-level socket connection fails loudly: these tests must never reach the network."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"test tried to open a network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_network_guard_is_active():
    with pytest.raises(AssertionError, match="network"):
        socket.socket().connect(("198.51.100.1", 80))


def quiet(_message):
    pass


# --------------------------------------------------------------------------- fakes for download()

class FakeResponse:
    def __init__(self, status, body=b"", headers=None, cut_after=None):
        self.status_code = status
        self.body = body
        self.headers = dict(headers or {})
        self.cut_after = cut_after  # raise ConnectionError after this many bytes
        self.closed = False

    def iter_content(self, chunk_size=1):
        chunk_size = 3  # small chunks, so a cut can happen mid-body
        sent = 0
        for i in range(0, len(self.body), chunk_size):
            if self.cut_after is not None and sent >= self.cut_after:
                raise ConnectionError("connection reset by peer")
            piece = self.body[i:i + chunk_size]
            sent += len(piece)
            yield piece

    def raise_for_status(self):
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}")

    def close(self):
        self.closed = True


class FakeSession:
    """Answers each get() with the next scripted item: a FakeResponse, an exception, or a callable(headers)."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = []

    def get(self, url, headers=None, stream=False, timeout=None):
        self.calls.append((url, dict(headers or {})))
        assert stream is True and timeout is not None
        if not self.script:
            raise AssertionError("unexpected extra request")
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item(headers or {}) if callable(item) else item


def range_server(content):
    """A callable answering like a server that honours Range."""
    def answer(headers):
        rng = headers.get("Range")
        if not rng:
            return FakeResponse(200, content, {"Content-Length": str(len(content))})
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        return FakeResponse(206, content[start:], {"Content-Range": f"bytes {start}-{len(content) - 1}/{len(content)}",
                                                   "Content-Length": str(len(content) - start)})
    return answer


class Sleeps(list):
    def __call__(self, seconds):
        self.append(seconds)


CONTENT = bytes(range(256)) * 4
URL = "https://example.invalid/data/file.tif"


def test_download_fresh(tmp_path):
    session = FakeSession([range_server(CONTENT)])
    dest = download(URL, tmp_path / "a" / "file.tif", session=session, sleep=Sleeps())
    assert dest.read_bytes() == CONTENT
    assert session.calls == [(URL, {})]
    assert not (tmp_path / "a" / "file.tif.part").exists()


def test_download_resumes_with_range_206(tmp_path):
    dest = tmp_path / "file.tif"
    part = tmp_path / "file.tif.part"
    part.write_bytes(CONTENT[:100])
    session = FakeSession([range_server(CONTENT)])
    download(URL, dest, session=session, sleep=Sleeps())
    assert session.calls[0][1] == {"Range": "bytes=100-"}
    assert dest.read_bytes() == CONTENT
    assert not part.exists()


def test_download_restarts_when_server_ignores_range(tmp_path):
    dest = tmp_path / "file.tif"
    (tmp_path / "file.tif.part").write_bytes(b"GARBAGE-FROM-AN-OLD-ATTEMPT")
    session = FakeSession([FakeResponse(200, CONTENT, {"Content-Length": str(len(CONTENT))})])
    download(URL, dest, session=session, sleep=Sleeps())
    assert session.calls[0][1]["Range"] == "bytes=27-"
    assert dest.read_bytes() == CONTENT


def test_download_retries_503_with_exponential_backoff(tmp_path):
    sleeps = Sleeps()
    session = FakeSession([FakeResponse(503), FakeResponse(503), FakeResponse(502), range_server(CONTENT)])
    download(URL, tmp_path / "file.tif", session=session, sleep=sleeps, retries=5, backoff=1.0)
    assert sleeps == [1, 2, 4]
    assert len(session.calls) == 4
    assert (tmp_path / "file.tif").read_bytes() == CONTENT


def test_download_backoff_scales_and_honours_retry_after(tmp_path):
    sleeps = Sleeps()
    session = FakeSession([FakeResponse(503), FakeResponse(429, headers={"Retry-After": "7"}), range_server(CONTENT)])
    download(URL, tmp_path / "file.tif", session=session, sleep=sleeps, backoff=0.5)
    assert sleeps == [0.5, 7.0]


def test_download_404_fails_at_once(tmp_path):
    sleeps = Sleeps()
    session = FakeSession([FakeResponse(404), range_server(CONTENT)])
    with pytest.raises(DownloadError, match="404"):
        download(URL, tmp_path / "file.tif", session=session, sleep=sleeps)
    assert len(session.calls) == 1 and sleeps == []
    assert not (tmp_path / "file.tif").exists()


def test_download_all_connection_errors_is_offline_error(tmp_path):
    sleeps = Sleeps()
    session = FakeSession([ConnectionError("Name or service not known")] * 4)
    with pytest.raises(OfflineError) as info:
        download(URL, tmp_path / "file.tif", session=session, sleep=sleeps, retries=3)
    message = str(info.value)
    assert URL in message and "offline" in message and "sources.csv" in message
    assert len(session.calls) == 4 and sleeps == [1, 2, 4]
    assert not (tmp_path / "file.tif").exists()


def test_download_5xx_to_the_end_is_not_offline(tmp_path):
    session = FakeSession([FakeResponse(500)] * 3)
    with pytest.raises(DownloadError, match="gave up after 3 attempts"):
        download(URL, tmp_path / "file.tif", session=session, sleep=Sleeps(), retries=2)


def test_download_existing_dest_is_skipped(tmp_path):
    dest = tmp_path / "file.tif"
    dest.write_bytes(b"already here")
    session = FakeSession([])  # any request would raise
    assert download(URL, dest, session=session, sleep=Sleeps()) == dest
    assert session.calls == [] and dest.read_bytes() == b"already here"


def test_download_stream_cut_resumes_from_kept_bytes(tmp_path):
    sleeps = Sleeps()
    cut = FakeResponse(200, CONTENT, {"Content-Length": str(len(CONTENT))}, cut_after=300)
    session = FakeSession([cut, range_server(CONTENT)])
    download(URL, tmp_path / "file.tif", session=session, sleep=sleeps)
    assert session.calls[1][1] == {"Range": "bytes=300-"}
    assert (tmp_path / "file.tif").read_bytes() == CONTENT
    assert sleeps == [1] and cut.closed


def test_download_short_body_is_retried(tmp_path):
    short = FakeResponse(200, CONTENT[:10], {"Content-Length": str(len(CONTENT))})
    session = FakeSession([short, range_server(CONTENT)])
    download(URL, tmp_path / "file.tif", session=session, sleep=Sleeps())
    assert session.calls[1][1] == {"Range": "bytes=10-"}
    assert (tmp_path / "file.tif").read_bytes() == CONTENT


def test_download_416_with_complete_part_finishes(tmp_path):
    (tmp_path / "file.tif.part").write_bytes(CONTENT)
    session = FakeSession([FakeResponse(416, headers={"Content-Range": f"bytes */{len(CONTENT)}"})])
    download(URL, tmp_path / "file.tif", session=session, sleep=Sleeps())
    assert (tmp_path / "file.tif").read_bytes() == CONTENT


# --------------------------------------------------------------------------- manifest

def row(parent="c1", modality="S2L2A", date="2021-06-15", band="B04", path=None, **extra):
    return dict(parent_id=parent, modality=modality, date=date, band=band,
                path=path or f"{parent}/{modality}/{date}_{band}.tif", **extra)


def test_write_manifest_columns_and_text_values(tmp_path):
    path = write_manifest([row(cloud_cover=12.5, processing_baseline="04.00", product_id="P1")], tmp_path)
    assert path == tmp_path / "sources.csv"
    with open(path, newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == MANIFEST_COLUMNS
    (only,) = read_manifest(tmp_path)
    assert only["processing_baseline"] == "04.00" and only["cloud_cover"] == "12.5" and only["product_id"] == "P1"
    assert pd.read_csv(path, dtype=str).shape == (1, 8)


def test_write_manifest_merges_and_replaces(tmp_path):
    write_manifest([row(band="B04", product_id="old"), row(band="B03", product_id="old")], tmp_path)
    write_manifest([row(band="B04", product_id="new"), row(date="2021-07-01", band="B04", product_id="new"),
                    row(parent="*", modality="WORLDCOVER", date="", band="", path="WORLDCOVER/wc.tif")], tmp_path)
    rows = read_manifest(tmp_path)
    keys = [(r["parent_id"], r["modality"], r["date"], r["band"]) for r in rows]
    assert len(keys) == len(set(keys)) == 4
    by_key = {k: r for k, r in zip(keys, rows)}
    assert by_key[("c1", "S2L2A", "2021-06-15", "B04")]["product_id"] == "new"
    assert by_key[("c1", "S2L2A", "2021-06-15", "B03")]["product_id"] == "old"
    # canonical order: parent, modality, date, band order (B03 before B04)
    assert keys[0] == ("*", "WORLDCOVER", "", "")
    assert keys[1:3] == [("c1", "S2L2A", "2021-06-15", "B03"), ("c1", "S2L2A", "2021-06-15", "B04")]


def test_write_manifest_writing_same_rows_twice_is_idempotent(tmp_path):
    rows = [row(band=b) for b in S2_BANDS]
    write_manifest(rows, tmp_path)
    first = (tmp_path / "sources.csv").read_text()
    write_manifest(rows, tmp_path)
    assert (tmp_path / "sources.csv").read_text() == first
    assert [r["band"] for r in read_manifest(tmp_path)] == list(S2_BANDS)


@pytest.mark.parametrize("bad", [
    row(modality="LANDSAT"), row(band="B10"), row(date="15/06/2021"), row(modality="DEM", band="DEM", date="2021-01-01"),
    row(path="/abs/file.tif"), row(path="../outside.tif"), {**row(), "extra": 1}, row(parent=""),
])
def test_write_manifest_rejects_bad_rows(tmp_path, bad):
    with pytest.raises(ValueError):
        write_manifest([bad], tmp_path)
    assert not (tmp_path / "sources.csv").exists()


# --------------------------------------------------------------------------- small parsers

@pytest.mark.parametrize("product, expected", [
    ("S2A_MSIL2A_20210615T154911_N0300_R054_T18TWL_20210615T200409", "03.00"),
    ("S2B_MSIL2A_20230102T154649_N0400_R054_T18TWL_20230102T183523", "04.00"),
    ("S2B_MSIL2A_20230102T154649_N0509_R054_T18TWL_20230102T183523.SAFE", "05.09"),
    ("S1A_IW_GRDH_1SDV_20210615T225002_20210615T225027_038347_048666_1A71", ""),
    ("", ""), (None, ""),
])
def test_parse_processing_baseline(product, expected):
    assert parse_processing_baseline(product) == expected


@pytest.mark.parametrize("value, expected", [("04.00", "04.00"), ("5.09", "05.09"), (4, "04.00"), ("N0300", "03.00"),
                                             (None, ""), ("unknown", "")])
def test_normalise_baseline(value, expected):
    assert fetch.normalise_baseline(value) == expected


def test_parse_hf_url():
    url = "https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/part_01234.parquet"
    assert parse_hf_url(url) == ("Major-TOM/Core-S2L2A", "main", "images/part_01234.parquet")
    assert parse_hf_url(url + "?download=true")[2] == "images/part_01234.parquet"
    with pytest.raises(ValueError):
        parse_hf_url("https://example.com/part_0.parquet")


# --------------------------------------------------------------------------- WorldCover tiles

def test_worldcover_tiles_nyc():
    assert worldcover_tiles(NYC_BBOX) == ["N39W075"]


def test_worldcover_tiles_spanning_two():
    assert worldcover_tiles((-74.5, 41.5, -73.5, 42.5)) == ["N39W075", "N42W075"]
    assert worldcover_tiles((-75.5, 40.0, -74.5, 41.0)) == ["N39W078", "N39W075"]


def test_worldcover_tiles_edges_and_hemispheres():
    assert worldcover_tiles((-74.5, 40.0, -74.0, 42.0)) == ["N39W075"]  # top edge on a tile edge adds nothing
    assert worldcover_tiles((2.0, -1.0, 4.0, 1.0)) == ["S03E000", "S03E003", "N00E000", "N00E003"]
    assert worldcover_tiles((-0.5, 10.0, -0.1, 10.5)) == ["N09W003"]
    with pytest.raises(ValueError):
        worldcover_tiles((-73.0, 40.0, -74.0, 41.0))


# --------------------------------------------------------------------------- Major-TOM selection

def synthetic_metadata():
    inside, outside = (40.7, -74.0), (41.5, -74.0)
    rows = [
        # cell, (lat, lon), timestamp, cloud
        ("A", inside, "20210615T154911", 5.0),     # kept
        ("A", inside, "20210601T154911", 80.0),    # too cloudy
        ("A", inside, "20190301T154911", 1.0),     # before start
        ("A", inside, "20210101T000000", 30.0),    # exactly max_cloud: kept
        ("A", inside, "20210615T170000", 2.0),     # same cell+date as the first, less cloudy: replaces it
        ("B", (40.45, -74.30), "20211231T235959", 10.0),  # on the bbox corner, last day: kept
        ("C", outside, "20210615T154911", 0.0),    # outside the bbox
        ("D", (40.8, -73.0), "20210615T154911", 0.0),  # outside (east)
        ("E", inside, "20220101T000100", 0.0),     # after end
        ("F", inside, "20210301T000000", float("nan")),  # unknown cloud: dropped
    ]
    return pd.DataFrame({
        "grid_cell": [r[0] for r in rows], "centre_lat": [r[1][0] for r in rows],
        "centre_lon": [r[1][1] for r in rows], "timestamp": [r[2] for r in rows], "cloud_cover": [r[3] for r in rows],
        "product_id": [f"P{i}" for i in range(len(rows))], "parquet_url": "u", "parquet_row": range(len(rows)),
    })


def test_select_majortom_rows_filters_space_time_cloud():
    got = select_majortom_rows(synthetic_metadata(), NYC_BBOX, "2020-01-01", "2021-12-31", 30.0)
    assert list(zip(got["grid_cell"], got["date"])) == [("A", "2021-01-01"), ("A", "2021-06-15"), ("B", "2021-12-31")]
    assert got.loc[1, "product_id"] == "P4"  # the less cloudy product of that day
    assert (got["cloud_cover"] <= 30).all()


def test_select_majortom_rows_without_filters_keeps_every_cell_in_bbox():
    meta = synthetic_metadata()
    got = select_majortom_rows(meta.drop(columns=["timestamp", "cloud_cover"]), NYC_BBOX)
    assert list(got["grid_cell"]) == ["A", "B", "E", "F"] and set(got["date"]) == {""}
    got = select_majortom_rows(meta.drop(columns=["cloud_cover"]), NYC_BBOX, "2021-06-15", "2021-06-15")
    assert list(got["grid_cell"]) == ["A"] and list(got["date"]) == ["2021-06-15"]


def test_select_majortom_rows_needs_centres():
    with pytest.raises(ValueError, match="centre_lat"):
        select_majortom_rows(pd.DataFrame({"grid_cell": ["A"]}), NYC_BBOX)


# --------------------------------------------------------------------------- Major-TOM end to end, local files

HF = "https://huggingface.co/datasets/Major-TOM/{coll}/resolve/main/images/part_00000.parquet"


def write_majortom(root, coll, records, band_columns):
    """metadata.parquet and one shard (one row group per product) for a fake Major-TOM collection."""
    shard = root / coll / "images" / "part_00000.parquet"
    shard.parent.mkdir(parents=True)
    columns = {"grid_cell": [r["grid_cell"] for r in records], "product_id": [r["product_id"] for r in records]}
    for col in band_columns:
        columns[col] = [f"{r['grid_cell']}|{r.get('timestamp', '')}|{col}".encode() for r in records]
    pq.write_table(pa.table(columns), shard, row_group_size=1)
    meta = pd.DataFrame([{**r, "parquet_url": HF.format(coll=coll), "parquet_row": i} for i, r in enumerate(records)])
    meta.to_parquet(root / coll / "metadata.parquet")


@pytest.fixture
def fake_majortom(tmp_path):
    root = tmp_path / "hub"
    a, b, out = dict(centre_lat=40.7, centre_lon=-74.0), dict(centre_lat=40.6, centre_lon=-73.9), \
        dict(centre_lat=42.0, centre_lon=-74.0)
    s2 = "S2A_MSIL2A_{}T154911_N{}_R054_T18TWL_{}T200409"
    write_majortom(root, "Core-S2L2A", [
        dict(grid_cell="433U_1055L", timestamp="20210615T154911", cloud_cover=3.0, **a,
             product_id=s2.format("20210615", "0300", "20210615")),
        dict(grid_cell="433U_1055L", timestamp="20220710T154911", cloud_cover=12.0, **a,
             product_id=s2.format("20220710", "0400", "20220710")),
        dict(grid_cell="433U_1055L", timestamp="20220720T154911", cloud_cover=90.0, **a,
             product_id=s2.format("20220720", "0400", "20220720")),
        dict(grid_cell="432U_1056L", timestamp="20230101T154911", cloud_cover=0.0, **b,
             product_id=s2.format("20230101", "0509", "20230101")),
        dict(grid_cell="450U_1055L", timestamp="20210615T154911", cloud_cover=0.0, **out,
             product_id=s2.format("20210615", "0300", "20210615")),
    ], S2_BANDS)
    write_majortom(root, "Core-S1RTC", [
        dict(grid_cell="433U_1055L", timestamp="20210616T225002", **a, product_id="S1A_IW_GRDH_1SDV_20210616"),
        dict(grid_cell="450U_1055L", timestamp="20210616T225002", **out, product_id="S1A_IW_GRDH_1SDV_20210616"),
    ], ["vv", "vh"])
    write_majortom(root, "Core-DEM", [
        dict(grid_cell="433U_1055L", **a, product_id="Copernicus_DSM_30_N40_00_W075_00"),
        dict(grid_cell="432U_1056L", **b, product_id="Copernicus_DSM_30_N40_00_W074_00"),
    ], ["DEM"])

    class Hub:
        downloads, opened = [], []

        def hf_download(self, repo_id, repo_type, filename, revision=None):
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
    manifest = fetch_majortom(out, start="2021-01-01", end="2023-12-31", max_cloud=30.0, log=lines.append,
                              hf_download=fake_majortom.hf_download, open_shard=fake_majortom.open_shard,
                              sleep=Sleeps())
    assert manifest == out / "sources.csv"
    rows = read_manifest(out)
    s2 = [r for r in rows if r["modality"] == "S2L2A"]
    assert len(s2) == 3 * 12  # 3 products inside the bbox and under 30 % cloud
    assert {r["parent_id"] for r in rows} == {"433U_1055L", "432U_1056L"}  # 450U is outside the bbox
    assert (out / "433U_1055L/S2L2A/2021-06-15_B8A.tif").read_bytes() == b"433U_1055L|20210615T154911|B8A"
    first = next(r for r in s2 if r["date"] == "2021-06-15" and r["band"] == "B04")
    assert first == dict(parent_id="433U_1055L", modality="S2L2A", date="2021-06-15", band="B04",
                         path="433U_1055L/S2L2A/2021-06-15_B04.tif", cloud_cover="3.0", processing_baseline="03.00",
                         product_id="S2A_MSIL2A_20210615T154911_N0300_R054_T18TWL_20210615T200409")
    assert {r["processing_baseline"] for r in s2 if r["date"] == "2022-07-10"} == {"04.00"}
    s1 = [r for r in rows if r["modality"] == "S1RTC"]
    assert [(r["date"], r["band"], r["cloud_cover"], r["processing_baseline"]) for r in s1] == \
        [("2021-06-16", "VV", "", ""), ("2021-06-16", "VH", "", "")]
    assert (out / "433U_1055L/S1RTC/2021-06-16_VH.tif").read_bytes() == b"433U_1055L|20210616T225002|vh"
    dem = [r for r in rows if r["modality"] == "DEM"]
    assert [(r["parent_id"], r["date"], r["band"], r["path"]) for r in dem] == [
        ("432U_1056L", "", "DEM", "432U_1056L/DEM/DEM.tif"), ("433U_1055L", "", "DEM", "433U_1055L/DEM/DEM.tif")]
    assert all((out / r["path"]).exists() for r in rows)
    assert any("[1/3] S2L2A cell 432U_1056L 2023-01-01: wrote 12 of 12" in line for line in lines)
    assert any("[3/3] S2L2A cell 433U_1055L 2022-07-10" in line for line in lines)
    assert [d for d in fake_majortom.downloads] == [(f"Major-TOM/{c}", "metadata.parquet")
                                                    for c in ("Core-S2L2A", "Core-S1RTC", "Core-DEM")]


def test_fetch_majortom_resume_reads_only_what_is_missing(tmp_path, fake_majortom):
    out = tmp_path / "raw"
    kwargs = dict(start="2021-01-01", end="2023-12-31", log=quiet, hf_download=fake_majortom.hf_download,
                  sleep=Sleeps())
    fetch_majortom(out, open_shard=fake_majortom.open_shard, **kwargs)
    before = (out / "sources.csv").read_text()

    def refuse(url):
        raise AssertionError("nothing should be read again")

    fetch_majortom(out, open_shard=refuse, **kwargs)
    assert (out / "sources.csv").read_text() == before

    (out / "432U_1056L/S2L2A/2023-01-01_B02.tif").unlink()
    fake_majortom.opened.clear()
    fetch_majortom(out, collections=("Core-S2L2A",), open_shard=fake_majortom.open_shard, **kwargs)
    assert len(fake_majortom.opened) == 1
    assert (out / "432U_1056L/S2L2A/2023-01-01_B02.tif").read_bytes() == b"432U_1056L|20230101T154911|B02"
    assert (out / "sources.csv").read_text() == before


def test_fetch_majortom_checks_row_group_matches_metadata(tmp_path, fake_majortom):
    meta_path = tmp_path / "hub" / "Core-DEM" / "metadata.parquet"
    meta = pd.read_parquet(meta_path)
    meta["parquet_row"] = meta["parquet_row"][::-1].to_numpy()  # rows point at each other's row groups
    meta.to_parquet(meta_path)
    with pytest.raises(ValueError, match="holds grid cell"):
        fetch_majortom(tmp_path / "raw", collections=("Core-DEM",), log=quiet, hf_download=fake_majortom.hf_download,
                       open_shard=fake_majortom.open_shard)


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


# --------------------------------------------------------------------------- STAC

UTM = "EPSG:32618"


def write_utm_raster(path, res=600.0, origin=(540000.0, 4540000.0), size=(120, 150), dtype="uint16"):
    """A raster in UTM 18N over NYC whose pixel values encode (row, col)."""
    rows, cols = size
    data = (np.arange(rows)[:, None] * 1000 + np.arange(cols)[None, :]).astype(dtype)[None]
    with rasterio.open(path, "w", driver="GTiff", width=cols, height=rows, count=1, dtype=dtype, crs=UTM,
                       transform=from_origin(*origin, res, res), nodata=0) as ds:
        ds.write(data)
    return path


def test_clip_to_bbox_reads_the_bbox_window(tmp_path):
    src = write_utm_raster(tmp_path / "src.tif")
    dest = clip_to_bbox(src, NYC_BBOX, tmp_path / "out" / "clip.tif", description="B04")
    left, bottom, right, top = transform_bounds("EPSG:4326", UTM, *NYC_BBOX, densify_pts=21)
    with rasterio.open(dest) as ds, rasterio.open(src) as full:
        b = ds.bounds
        assert b.left <= left and b.bottom <= bottom and b.right >= right and b.top >= top
        assert left - b.left < 600 and b.right - right < 600 and top - b.top > -600 and bottom - b.bottom < 600
        assert ds.crs.to_string() == UTM and ds.res == (600.0, 600.0) and ds.descriptions == ("B04",)
        col0 = round((b.left - full.bounds.left) / 600)
        row0 = round((full.bounds.top - b.top) / 600)
        expected = full.read(1)[row0:row0 + ds.height, col0:col0 + ds.width]
        np.testing.assert_array_equal(ds.read(1), expected)
    assert clip_to_bbox(src, (10.0, 10.0, 10.5, 10.5), tmp_path / "none.tif") is None
    assert not (tmp_path / "none.tif").exists()


def earth_search_item(item_id, tile, when, cloud, baseline, href, bands=fetch.EARTH_SEARCH_S2_ASSETS):
    assets = {key: {"href": href} for key in bands}
    assets["scl"] = {"href": href}
    assets["thumbnail"] = {"href": "https://example.invalid/thumb.jpg"}
    return {"id": item_id, "properties": {"datetime": when, "eo:cloud_cover": cloud, "grid:code": f"MGRS-{tile}",
                                          "s2:processing_baseline": baseline,
                                          "s2:product_uri": f"S2A_MSIL2A_X_N{baseline.replace('.', '')}_R054_T{tile}_Y.SAFE"},
            "assets": assets}


def test_stac_item_record_maps_earth_search_item():
    rec = stac_item_record(earth_search_item("S2A_18TWL_20210615_0_L2A", "18TWL", "2021-06-15T15:59:01.024000Z",
                                             4.2, "03.00", "https://x/B.tif"))
    assert rec["parent_id"] == "18TWL" and rec["date"] == "2021-06-15" and rec["cloud_cover"] == 4.2
    assert rec["processing_baseline"] == "03.00" and rec["product_id"] == "S2A_MSIL2A_X_N0300_R054_T18TWL_Y"
    assert sorted(rec["hrefs"]) == sorted(S2_BANDS)
    item = {"id": "i", "properties": {"datetime": "2022-01-02T00:00:00Z", "mgrs:utm_zone": 18,
                                      "mgrs:latitude_band": "T", "mgrs:grid_square": "WK"}, "assets": {}}
    assert stac_item_record(item)["parent_id"] == "18TWK" and stac_item_record(item)["processing_baseline"] == ""
    with pytest.raises(ValueError, match="MGRS"):
        stac_item_record({"id": "i", "properties": {"datetime": "2022-01-02T00:00:00Z"}, "assets": {}})


def test_select_stac_records_one_per_tile_and_date():
    recs = [dict(parent_id="18TWL", date="2021-06-15", cloud_cover=9.0, hrefs={"B01": "a"}, product_id="x"),
            dict(parent_id="18TWL", date="2021-06-15", cloud_cover=2.0, hrefs={"B01": "b"}, product_id="y"),
            dict(parent_id="18TWL", date="2021-05-01", cloud_cover=50.0, hrefs={}, product_id="z"),
            dict(parent_id="18TWK", date="2021-07-01", cloud_cover=None, hrefs={}, product_id="w")]
    got = select_stac_records(recs, max_cloud=30.0)
    assert [(r["parent_id"], r["date"], r["product_id"]) for r in got] == [
        ("18TWK", "2021-07-01", "w"), ("18TWL", "2021-06-15", "y")]


class FakeClient:
    def __init__(self, items):
        self.items, self.searches = items, []

    def search(self, **kwargs):
        self.searches.append(kwargs)
        items = self.items

        class Result:
            def items(self):
                return iter(items)
        return Result()


def test_fetch_stac_with_fake_client(tmp_path):
    href = str(write_utm_raster(tmp_path / "band.tif"))
    items = [earth_search_item("a", "18TWL", "2021-06-15T15:59:01Z", 4.0, "03.00", href),
             earth_search_item("b", "18TWL", "2022-07-10T15:59:01Z", 10.0, "04.00", href,
                               bands={k: v for k, v in fetch.EARTH_SEARCH_S2_ASSETS.items() if v != "B09"}),
             earth_search_item("c", "18TWL", "2022-07-20T15:59:01Z", 70.0, "04.00", href)]
    client = FakeClient(items)
    out = tmp_path / "raw"
    lines = []
    fetch_stac(out, start="2021-01-01", end="2022-12-31", client=client, log=lines.append, sleep=Sleeps())
    assert client.searches[0]["datetime"] == "2021-01-01/2022-12-31"
    assert client.searches[0]["bbox"] == list(NYC_BBOX) and client.searches[0]["collections"] == ["sentinel-2-l2a"]
    rows = read_manifest(out)
    assert len(rows) == 12 + 11  # the 70 % item is dropped; the second lacks B09
    assert {(r["date"], r["processing_baseline"]) for r in rows} == {("2021-06-15", "03.00"), ("2022-07-10", "04.00")}
    assert all(r["parent_id"] == "18TWL" and (out / r["path"]).exists() for r in rows)
    assert any("lacks bands ['B09']" in line for line in lines)
    with rasterio.open(out / "18TWL/S2L2A/2021-06-15_B8A.tif") as ds:
        assert ds.descriptions == ("B8A",) and ds.width < 120

    # resumed: files are there, so nothing is opened (hrefs now point nowhere)
    for item in items:
        for asset in item["assets"].values():
            asset["href"] = str(tmp_path / "missing.tif")
    before = (out / "sources.csv").read_text()
    fetch_stac(out, start="2021-01-01", end="2022-12-31", client=client, log=quiet, sleep=Sleeps())
    assert (out / "sources.csv").read_text() == before


def test_fetch_stac_without_pystac_client_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pystac_client", None)
    with pytest.raises(ImportError, match="pip install pystac-client"):
        fetch_stac(tmp_path, log=quiet)


def test_retry_classifies_gdal_http_errors():
    from rasterio.errors import RasterioIOError

    sleeps = Sleeps()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RasterioIOError("HTTP response code: 503")
        return "ok"

    assert fetch._retry(flaky, "cog", sleep=sleeps) == "ok" and sleeps == [1, 2]
    with pytest.raises(RasterioIOError):
        fetch._retry(lambda: (_ for _ in ()).throw(RasterioIOError("HTTP response code: 404")), "cog", sleep=sleeps)
    with pytest.raises(OfflineError, match="cog"):
        fetch._retry(lambda: (_ for _ in ()).throw(RasterioIOError("CURL error: Could not resolve host: x")), "cog",
                     retries=1, sleep=Sleeps())


# --------------------------------------------------------------------------- WorldCover fetch

def worldcover_tile_bytes(tmp_path, tile, lat0, lon0, value):
    path = tmp_path / f"src_{tile}.tif"
    with rasterio.open(path, "w", driver="GTiff", width=30, height=30, count=1, dtype="uint8", crs="EPSG:4326",
                       transform=from_origin(lon0, lat0 + 3, 0.1, 0.1), nodata=0) as ds:
        ds.write(np.full((1, 30, 30), value, dtype="uint8"))
    return path.read_bytes()


def tile_server(tiles):
    def answer(headers):
        raise AssertionError("unused")
    session = FakeSession([])

    def get(url, headers=None, stream=False, timeout=None):
        session.calls.append((url, dict(headers or {})))
        name = url.rsplit("_v200_", 1)[1].removesuffix("_Map.tif")
        body = tiles[name]
        return FakeResponse(200, body, {"Content-Length": str(len(body))})
    session.get = get
    return session


def test_fetch_worldcover_one_tile(tmp_path):
    session = tile_server({"N39W075": worldcover_tile_bytes(tmp_path, "N39W075", 39, -75, 50)})
    out = tmp_path / "raw"
    fetch_worldcover(out, log=quiet, session=session, sleep=Sleeps())
    assert [c[0] for c in session.calls] == [fetch.WORLDCOVER_URL.format(tile="N39W075")]
    assert session.calls[0][0] == ("https://esa-worldcover.s3.eu-central-1.amazonaws.com/v200/2021/map/"
                                   "ESA_WorldCover_10m_2021_v200_N39W075_Map.tif")
    (only,) = read_manifest(out)
    assert only == dict(parent_id="*", modality="WORLDCOVER", date="", band="",
                        path="WORLDCOVER/ESA_WorldCover_10m_2021_v200_N39W075_Map.tif", cloud_cover="",
                        processing_baseline="", product_id="ESA_WorldCover_10m_2021_v200_N39W075")
    fetch_worldcover(out, log=quiet, session=FakeSession([]), sleep=Sleeps())  # resumed: no request at all
    assert len(read_manifest(out)) == 1


def test_fetch_worldcover_two_tiles_are_mosaicked(tmp_path):
    bbox = (-74.5, 41.5, -73.5, 42.5)
    session = tile_server({"N39W075": worldcover_tile_bytes(tmp_path, "N39W075", 39, -75, 10),
                           "N42W075": worldcover_tile_bytes(tmp_path, "N42W075", 42, -75, 80)})
    out = tmp_path / "raw"
    fetch_worldcover(out, bbox=bbox, log=quiet, session=session, sleep=Sleeps())
    assert len(session.calls) == 2
    (only,) = read_manifest(out)
    assert only["parent_id"] == "*" and only["product_id"].endswith("N39W075+N42W075")
    with rasterio.open(out / only["path"]) as ds:
        data = ds.read(1)
        assert ds.bounds.left == pytest.approx(-74.5) and ds.bounds.top == pytest.approx(42.5)
        assert data.shape == (10, 10)
        assert (data[:5] == 80).all() and (data[5:] == 10).all()  # north half from N42, south half from N39
