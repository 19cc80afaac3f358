"""nycdata.sources.majortom and nycdata.sources.worldcover against the real client libraries, served from
127.0.0.1 (tests/local_http.py).

``huggingface_hub`` (``hf_hub_download`` and ``HfFileSystem``) talks to a fake Hugging Face Hub holding the three
Major-TOM Core datasets, and ``requests`` to a fake WorldCover bucket; then the fetched folder is built with
``nycdata.sources.build`` and validated.

What the fake Hub has to answer, read off huggingface_hub 2.x (``file_download.py``: ``get_hf_file_metadata``,
``_get_metadata_or_catch_error``; ``hf_file_system.py``: ``resolve_path``, ``info``, ``HfFileSystemFile``):

* ``HEAD /datasets/<repo>/resolve/<revision>/<file>``: ``X-Repo-Commit`` (40 hex; without it hf_hub_download
  says the endpoint is not a Hub), an ETag (``X-Linked-Etag`` preferred over ``ETag``) and the size
  (``X-Linked-Size``, else ``Content-Length``). Like the real Hub for LFS files (all parquet files here), it
  answers 302 to a CDN on another host (``localhost`` instead of ``127.0.0.1``): huggingface_hub then takes the
  metadata from the redirect itself and downloads from the ``Location``.
* ``GET`` of that CDN location: the bytes, honouring ``Range``.
* ``HfFileSystem`` (``shard_access="range"``) first asks ``GET /api/datasets/<repo>/revision/<revision>``
  (does the repo exist: ``{"id", "sha"}``) and ``GET /api/datasets/<repo>/tree/<revision>/<folder>`` (the
  file's size), then reads byte ranges of the resolve URL (following the redirect).

The served files use the real column names (see the comments at the schemas), so a rename in nycdata.sources.majortom
fails here, and a rename served here must fail with a message naming the column and the file.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.io import MemoryFile
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform

from local_http import LocalServer, allow_only_loopback, running
from nycdata.data import chips
from nycdata.data.chips import S2L2A_BANDS
from nycdata.sources.majortom import fetch_majortom
from nycdata.sources.manifest import read_manifest
from nycdata.sources.worldcover import fetch_worldcover

COMMIT = "0123456789abcdef0123456789abcdef01234567"
UTM = "EPSG:32618"
PX = 48  # stands for Core's 1068 px 10 m side: 48 / 24 / 8 px at 10 / 20 / 60 m, DEM 16 px at 30 m (1068 / 534 / 178 / 356)

# Column names of the real files.
# metadata.parquet: the column lists of a Major-TOM download script (S2L2A_METADATA, S1RTC_METADATA, DEM_METADATA;
# found by code search, repository not named there), consistent with ESA-PhiLab/Major-TOM majortom/metadata.py
# (timestamp, centre_lat/centre_lon, cloud_cover, nodata, crs, parquet_url, parquet_row) and with its
# docs/animations/data/core_meta_451U_946L.json (timestamp "20230415T181919", parquet_url
# "https://huggingface.co/datasets/Major-TOM/Core-S2L2A/resolve/main/images/part_03174.parquet", parquet_row 492).
S2_METADATA = ["grid_cell", "grid_row_u", "grid_col_r", "product_id", "timestamp", "cloud_cover", "nodata", "centre_lat",
               "centre_lon", "crs", "parquet_url", "parquet_row", "geometry"]
S1_METADATA = ["grid_cell", "grid_row_u", "grid_col_r", "product_id", "timestamp", "nodata", "orbit_state", "centre_lat",
               "centre_lon", "crs", "parquet_url", "parquet_row"]
DEM_METADATA = ["grid_cell", "grid_row_u", "grid_col_r", "nodata", "max_val", "min_val", "centre_lat", "centre_lon", "crs",
                "parquet_url", "parquet_row", "__index_level_0__"]
# Image shards: the `dataset_info` features of the dataset cards (huggingface.co/datasets/Major-TOM/Core-S2L2A and
# Core-S1RTC README.md); Core-DEM from its dataset viewer (grid_cell, thumbnail, compressed, DEM; DEM a 356 x 356
# 32-bit GeoTIFF).
S2_SHARD = ["product_id", "grid_cell", "product_datetime", "thumbnail", *S2L2A_BANDS, "cloud_mask"]
S1_SHARD = ["product_id", "grid_cell", "product_datetime", "thumbnail", "vv", "vh"]
DEM_SHARD = ["grid_cell", "thumbnail", "compressed", "DEM"]


def s2_id(day, baseline="0214", tile="T18TWL"):
    return f"S2A_MSIL2A_{day}T154911_N{baseline}_R054_{tile}_{day}T200409"


# NYC cells: (cell, centre lat, lon); S2 products: (cell, day, cloud %, product id, shard)
CELLS = {"451U_624L": (40.54, -73.97), "452U_625L": (40.63, -74.05), "453U_626L": (40.72, -74.13),
         "452U_623L": (40.63, -73.87), "454U_624L": (40.81, -73.97), "460U_625L": (41.35, -74.00)}
S2_PRODUCTS = [
    ("451U_624L", "20190802", 4.0, s2_id("20190802", "0213"), 1),
    ("452U_625L", "20200615", 3.0, s2_id("20200615"), 1),
    ("452U_625L", "20200620", 12.0, s2_id("20200620", tile="T18TWK"), 1),  # tile overlap, cloudier
    ("453U_626L", "20210507", 0.5, s2_id("20210507", "0300"), 2),
    ("452U_623L", "20200901", 8.0, s2_id("20200901", "9999"), 2),  # CloudFerro reprocessing: baseline 99.99
    ("454U_624L", "20190302", 64.0, s2_id("20190302"), 2),  # too cloudy: cell dropped
    ("460U_625L", "20200615", 0.0, s2_id("20200615"), 2),  # outside NYC_BBOX
]
S1_DATES = {"451U_624L": "20190711", "452U_625L": "20200612", "453U_626L": "20180123", "452U_623L": "20210301",
            "460U_625L": "20200612"}
DEM_CELLS = ["451U_624L", "452U_625L", "453U_626L", "460U_625L"]  # 452U_623L has none: logged, kept


def geotiff(array, cell, res):
    lat, lon = CELLS[cell]
    (x,), (y,) = warp_transform("EPSG:4326", UTM, [lon], [lat])
    left, top = round(x / 10) * 10 - PX * 5, round(y / 10) * 10 + PX * 5
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=array.shape[1], height=array.shape[0], count=1, dtype=array.dtype.name,
                      crs=UTM, transform=from_origin(left, top, res, res)) as ds:
            ds.write(array[None])
        return mem.read()


def s2_band(cell, band, rng):
    res = 10 if band in ("B02", "B03", "B04", "B08") else 60 if band in ("B01", "B09") else 20
    side = PX * 10 // res
    return geotiff(rng.integers(40, 3000, (side, side)).astype("uint16"), cell, res)  # dark pixels: no +1000 offset


def parquet_bytes(columns, row_group_size=None):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def shard(rows, names):
    """One row group per product, as Major-TOM's shards are laid out."""
    return parquet_bytes({name: [row[name] for row in rows] for name in names}, row_group_size=1)


def hf_url(repo, part):
    return f"https://huggingface.co/datasets/Major-TOM/{repo}/resolve/main/images/part_{part:05d}.parquet"


def grid(cell):
    row, col = re.fullmatch(r"(\d+)U_(\d+)L", cell).groups()
    return dict(grid_cell=cell, grid_row_u=int(row), grid_col_r=-int(col), centre_lat=CELLS[cell][0],
                centre_lon=CELLS[cell][1], crs=UTM, nodata=0.0)


def table(rows, names):
    return parquet_bytes({name: [row[name] for row in rows] for name in names})


def majortom_repos():
    """{repo_id: {path: bytes}} of the three Core datasets over CELLS."""
    from shapely.geometry import Point

    rng = np.random.default_rng(0)
    s2_shards, s2_meta = {1: [], 2: []}, []
    for cell, day, cloud, product, part in S2_PRODUCTS:
        row = {"product_id": product, "grid_cell": cell, "product_datetime": f"{day}T154911", "thumbnail": b"\x89PNG",
               "cloud_mask": b"", **{band: s2_band(cell, band, rng) for band in S2L2A_BANDS}}
        s2_meta.append({**grid(cell), "product_id": product, "timestamp": f"{day}T154911", "cloud_cover": cloud,
                        "parquet_url": hf_url("Core-S2L2A", part), "parquet_row": len(s2_shards[part]),
                        "geometry": Point(CELLS[cell][::-1]).wkb})
        s2_shards[part].append(row)
    s1_rows = [{"product_id": f"S1A_IW_GRDH_1SDV_{day}T225002", "grid_cell": cell, "product_datetime": f"{day}T225002",
                "thumbnail": b"\x89PNG", **{p: geotiff(rng.uniform(0.005, 0.5, (PX, PX)).astype("float32"), cell, 10)
                                            for p in ("vv", "vh")}} for cell, day in S1_DATES.items()]
    s1_meta = [{**grid(row["grid_cell"]), "product_id": row["product_id"], "timestamp": row["product_datetime"],
                "orbit_state": "ASCENDING", "parquet_url": hf_url("Core-S1RTC", 1), "parquet_row": i}
               for i, row in enumerate(s1_rows)]
    dem_rows = [{"grid_cell": cell, "thumbnail": b"\x89PNG", "compressed": b"\x89PNG",
                 "DEM": geotiff(rng.uniform(0, 60, (PX // 3, PX // 3)).astype("float32"), cell, 30)} for cell in DEM_CELLS]
    dem_meta = [{**grid(cell), "max_val": 60.0, "min_val": 0.0, "parquet_url": hf_url("Core-DEM", 1), "parquet_row": i,
                 "__index_level_0__": i} for i, cell in enumerate(DEM_CELLS)]
    return {
        "Major-TOM/Core-S2L2A": {"metadata.parquet": table(s2_meta, S2_METADATA),
                                 **{f"images/part_{p:05d}.parquet": shard(rows, S2_SHARD) for p, rows in s2_shards.items()}},
        "Major-TOM/Core-S1RTC": {"metadata.parquet": table(s1_meta, S1_METADATA),
                                 "images/part_00001.parquet": shard(s1_rows, S1_SHARD)},
        "Major-TOM/Core-DEM": {"metadata.parquet": table(dem_meta, DEM_METADATA),
                               "images/part_00001.parquet": shard(dem_rows, DEM_SHARD)},
    }


@pytest.fixture(scope="module")
def repos():
    return majortom_repos()


def worldcover_tile():
    """N39W075 (lat 39..42, lon -75..-72) at 0.01 degree, random WorldCover codes."""
    codes = np.random.default_rng(1).choice([10, 20, 30, 40, 50, 60, 80, 90], (300, 300)).astype("uint8")
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=300, height=300, count=1, dtype="uint8", crs="EPSG:4326",
                      transform=from_origin(-75, 42, 0.01, 0.01), nodata=0, compress="deflate") as ds:
            ds.write(codes[None])
        return mem.read()


class FakeHub:
    """Serves ``{repo_id: {path: bytes}}`` dataset repos the way huggingface_hub expects (see the module docstring)."""

    def __init__(self, server: LocalServer, repos: dict):
        self.server, self.repos = server, repos
        server.route(r"/datasets/[^/]+/[^/]+/resolve/[^/]+/.+", self.resolve)
        server.route(r"/api/datasets/[^/]+/[^/]+/revision/[^/]+", self.revision)
        server.route(r"/api/datasets/[^/]+/[^/]+/tree/.+", self.tree)
        for files in repos.values():
            for content in files.values():
                server.add_file(f"/cdn/{hashlib.sha256(content).hexdigest()}", content)

    def resolve(self, method, path, query, body):
        repo, revision, name = re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path).groups()
        content = self.repos.get(repo, {}).get(name)
        if content is None:
            return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"not found"
        sha = hashlib.sha256(content).hexdigest()
        port = self.server.base_url.rsplit(":", 1)[1]
        return 302, {"Location": f"http://localhost:{port}/cdn/{sha}", "X-Repo-Commit": COMMIT,
                     "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(content)), "ETag": '"git-pointer-oid"'}, b""

    def revision(self, method, path, query, body):
        repo = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/.+", path).group(1)
        return self.server.json(200, {"id": repo, "sha": COMMIT}) if repo in self.repos else \
            (404, {"X-Error-Code": "RepoNotFound"}, b"")

    def tree(self, method, path, query, body):
        repo, folder = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/[^/]+/?(.*)", path).groups()
        prefix = f"{folder}/" if folder else ""
        entries = [{"type": "file", "path": name, "size": len(content), "oid": "0" * 40,
                    "lfs": {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}}
                   for name, content in self.repos.get(repo, {}).items()
                   if name.startswith(prefix) and "/" not in name[len(prefix):]]
        return self.server.json(200, entries)


@pytest.fixture(autouse=True)
def offline_but_loopback(tmp_path, monkeypatch):
    """Only 127.0.0.1 is reachable; Hugging Face settings point into tmp_path (each fetch also gets hf_cache_dir)."""
    allow_only_loopback(monkeypatch)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def hub(repos):
    server = LocalServer()
    with running(server):
        FakeHub(server, repos)
        server.add_file("/v200/2021/map/ESA_WorldCover_10m_2021_v200_N39W075_Map.tif", worldcover_tile())
        yield server


def fetch_kwargs(server, tmp_path, lines, **extra):
    return dict(max_cloud=30.0, log=lines.append, hf_endpoint=server.base_url, hf_cache_dir=tmp_path / "hf_cache",
                sleep=lambda s: None, **extra)


def wc_template(server):
    return server.base_url + "/v200/2021/map/ESA_WorldCover_10m_2021_v200_{tile}_Map.tif"


def test_fixture_files_carry_the_real_column_names(repos):
    def names(repo, name):
        return pq.ParquetFile(pa.BufferReader(repos[repo][name])).schema_arrow.names

    assert names("Major-TOM/Core-S2L2A", "metadata.parquet") == S2_METADATA
    assert names("Major-TOM/Core-S1RTC", "metadata.parquet") == S1_METADATA
    assert names("Major-TOM/Core-DEM", "metadata.parquet") == DEM_METADATA
    assert names("Major-TOM/Core-S2L2A", "images/part_00001.parquet") == S2_SHARD
    assert names("Major-TOM/Core-DEM", "images/part_00001.parquet") == DEM_SHARD


def test_hf_hub_download_accepts_the_fake_hub(hub, repos, tmp_path):
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo_id="Major-TOM/Core-S2L2A", repo_type="dataset", filename="metadata.parquet",
                           endpoint=hub.base_url, cache_dir=tmp_path / "hf_cache")
    assert open(path, "rb").read() == repos["Major-TOM/Core-S2L2A"]["metadata.parquet"]
    assert str(tmp_path / "hf_cache") in path
    assert [(r.method, r.path.split("/")[1]) for r in hub.requests] == [("HEAD", "datasets"), ("GET", "cdn")]


def test_fetch_majortom_and_worldcover_then_build(hub, repos, tmp_path):
    from nycdata.sources.build import build_dataset
    from nycdata.params import load_params
    from nycdata.data.validate import validate_dataset

    raw, lines = tmp_path / "raw", []
    fetch_majortom(raw, **fetch_kwargs(hub, tmp_path, lines, shard_access="range"))
    fetch_worldcover(raw, log=lines.append, url_template=wc_template(hub), sleep=lambda s: None)
    rows = read_manifest(raw)
    assert sorted({r["parent_id"] for r in rows}) == ["*", "451U_624L", "452U_623L", "452U_625L", "453U_626L"]
    by_cell = {r["parent_id"]: r for r in rows if r["modality"] == "S2L2A" and r["band"] == "B02"}
    assert by_cell["452U_623L"]["processing_baseline"] == "99.99"
    assert by_cell["452U_625L"]["product_id"] == s2_id("20200615")  # the less cloudy of the overlapping two
    assert by_cell["451U_624L"]["processing_baseline"] == "02.13"
    assert not any(r["modality"] == "DEM" and r["parent_id"] == "452U_623L" for r in rows)
    # what the log says
    assert "cell 454U_624L: S2 product 2019-03-02 has 64.0 % cloud > 30.0" in lines
    assert "cell 452U_623L: no product in Major-TOM/Core-DEM" in lines
    assert any(line.startswith("cell 453U_626L: S1 product 2018-01-23 is 1200 d before the S2 product 2021-05-07")
               for line in lines)
    assert any("cell 452U_623L" in line and "processing baseline 99.99 (reprocessed)" in line for line in lines)
    assert any(line.startswith("cell 452U_625L: 2 S2 products (tile overlaps); kept") for line in lines)
    assert any(re.search(r"\[\d/4\] S2L2A cell 452U_625L 2020-06-15: wrote 12 of 12 files, \d+\.\d KiB", line)
               for line in lines)
    assert any(line.startswith("  ESA_WorldCover_10m_2021_v200_N39W075_Map.tif: ") and line.endswith(" done")
               for line in lines)
    assert "total: 60 files" in lines[-1]  # 4 x 12 S2 + 4 x 2 S1 + 3 DEM + 1 WorldCover
    # range mode read parts of the image shards: every shard request asked for a byte range
    shard_shas = {hashlib.sha256(c).hexdigest() for files in repos.values() for n, c in files.items() if "images/" in n}
    shard_gets = [r for r in hub.requests if r.method == "GET" and r.path.split("/")[-1] in shard_shas]
    assert shard_gets and all(r.headers.get("range", "").startswith("bytes=") for r in shard_gets)

    params = load_params(overrides=dict(temporal_mode="replicate", timesteps=2, chip_size=16, max_cloud_cover=30.0,
                                        min_valid_fraction=0.5, missing_dem="mean"))
    out = build_dataset(raw / "sources.csv", tmp_path / "chips", params, log=lines.append)
    assert validate_dataset(out) == []
    spec = chips.DatasetSpec.read(out)
    assert spec.source["temporal_mode"] == "replicate" and spec.timesteps == 2
    assert json.loads((out / "dataset.json").read_text())["source"]["temporal_mode"] == "replicate"
    index = chips.read_index(out)
    assert sorted(set(index["parent_id"])) == ["451U_624L", "452U_623L", "452U_625L", "453U_626L"]
    assert set(index["split"]) == {"train", "val", "test"}
    assert set(index.loc[index["parent_id"] == "452U_623L", "dem_missing"]) == {True}
    assert set(index.loc[index["parent_id"] == "452U_623L", "s2_offset"]) == {"absent (pixels)|absent (pixels)"}


def test_fetch_majortom_download_mode_with_s1_and_dem_metadata_without_centres(repos, tmp_path):
    trimmed = {repo: dict(files) for repo, files in repos.items()}
    for repo, names in (("Major-TOM/Core-S1RTC", S1_METADATA), ("Major-TOM/Core-DEM", DEM_METADATA)):
        meta = pq.read_table(pa.BufferReader(repos[repo]["metadata.parquet"]))
        trimmed[repo]["metadata.parquet"] = parquet_bytes(
            {n: meta[n] for n in names if n not in ("centre_lat", "centre_lon")})
    server, lines = LocalServer(), []
    with running(server):
        FakeHub(server, trimmed)
        fetch_majortom(tmp_path / "raw", collections=("Core-S1RTC", "Core-DEM"),
                       **fetch_kwargs(server, tmp_path, lines, shard_access="download"))
    rows = read_manifest(tmp_path / "raw")
    assert sorted((r["parent_id"], r["modality"], r["band"]) for r in rows if r["parent_id"] == "452U_625L") == [
        ("452U_625L", "DEM", "DEM"), ("452U_625L", "S1RTC", "VH"), ("452U_625L", "S1RTC", "VV")]
    assert len(rows) == 4 * 2 + 3 and not any(r["modality"] == "S2L2A" for r in rows)
    with rasterio.open(tmp_path / "raw" / "451U_624L/S1RTC/2019-07-11_VV.tif") as ds:
        assert ds.dtypes == ("float32",) and ds.crs.to_string() == UTM
    cached = list((tmp_path / "hf_cache").rglob("part_00001.parquet"))
    assert len(cached) == 2  # whole shards went to the test's Hugging Face cache (S1RTC, DEM), not the user's


def test_renamed_metadata_column_is_a_clear_error(repos, tmp_path):
    meta = pq.read_table(pa.BufferReader(repos["Major-TOM/Core-S2L2A"]["metadata.parquet"]))
    renamed = {repo: dict(files) for repo, files in repos.items()}
    renamed["Major-TOM/Core-S2L2A"]["metadata.parquet"] = parquet_bytes(
        {("cell_id" if n == "grid_cell" else n): meta[n] for n in meta.column_names})
    server = LocalServer()
    with running(server), pytest.raises(ValueError) as info:
        FakeHub(server, renamed)
        fetch_majortom(tmp_path / "raw", **fetch_kwargs(server, tmp_path, []))
    message = str(info.value)
    assert "['grid_cell']" in message and "Major-TOM/Core-S2L2A metadata.parquet" in message
    assert str(tmp_path / "hf_cache") in message  # the file, where it landed
    assert not (tmp_path / "raw").exists()


def test_renamed_shard_column_is_a_clear_error(repos, tmp_path):
    s1 = pq.read_table(pa.BufferReader(repos["Major-TOM/Core-S1RTC"]["images/part_00001.parquet"]))
    renamed = {repo: dict(files) for repo, files in repos.items()}
    renamed["Major-TOM/Core-S1RTC"]["images/part_00001.parquet"] = parquet_bytes(
        {n.upper() if n in ("vv", "vh") else n: s1[n] for n in s1.column_names}, row_group_size=1)
    server = LocalServer()
    with running(server), pytest.raises(ValueError, match=r"image shard .*Core-S1RTC.*part_00001.parquet has no "
                                                          r"column\(s\) \['vv', 'vh'\]"):
        FakeHub(server, renamed)
        fetch_majortom(tmp_path / "raw", collections=("Core-S1RTC",), **fetch_kwargs(server, tmp_path, []))


def test_dry_runs_write_nothing_and_print_the_plan(hub, tmp_path):
    raw, lines = tmp_path / "raw", []
    plan = fetch_majortom(raw, dry_run=True, **fetch_kwargs(hub, tmp_path, lines))
    wc_plan = fetch_worldcover(raw, log=lines.append, dry_run=True, url_template=wc_template(hub))
    assert not raw.exists()
    assert not any("images/" in r.path for r in hub.requests)  # no image shard was touched
    assert {p.parent_id for p in plan} == {"451U_624L", "452U_623L", "452U_625L", "453U_626L"}
    assert len(plan) == 4 * 12 + 4 * 2 + 3
    b04 = next(p for p in plan if p.parent_id == "452U_625L" and p.modality == "S2L2A" and p.product_id.endswith("200409")
               and p.est_bytes == 1068 * 1068 * 2)
    assert (b04.date, b04.cloud_cover) == ("2020-06-15", 3.0)
    (tile,) = wc_plan
    assert tile.est_bytes == len(worldcover_tile())  # from the bucket's HEAD Content-Length
    plan_text = next(line for line in lines if line.startswith("source"))
    assert "Major-TOM/Core-S2L2A  452U_625L  S2L2A" in plan_text and "nothing was written (dry run)" in plan_text
    assert "WORLDCOVER: 1 files in 1 parents" in lines[-1]
