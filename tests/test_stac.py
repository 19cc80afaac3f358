"""nycdata.sources.stac against a fake Planetary Computer on 127.0.0.1, through the real pystac-client, odc-stac and GDAL.

The scene (UTM 18N, parent cells of 128 px = 1.28 km in a row P0..P3 over Brooklyn):

* S2 days (cloud %): 04-10 (5) and 05-20 (20) cover P0-P2; 06-20 is two tiles, A (10) over P0 and the
  west of P1, B (14) over the east of P1 and part of P2, so only the mosaic covers P1 and nothing covers
  P2; 07-15 (50) covers all but is above max_cloud; 09-05 (12) and 10-01 (2) cover all.
  With 3 timesteps (windows Apr 1-Jun 10, Jun 11-Aug 20, Aug 21-Oct 31): P0 and P1 get 04-10, 06-20,
  10-01; P2's middle window is empty, filled with the least cloudy day left, 09-05; P3 has only 2 days
  and is dropped.
* S1 days: 04-08, 04-14, 06-23 (descending, two slices that only together cover P1, -32768 outside each
  slice's data), 08-01, 09-04, 09-28; and a VV-only scene on 06-21 that must be ignored.
* DEM: one GLO-30 item, 12.5 m everywhere. WorldCover 2021 v200: class 10 west of lon -73.9565, 50 east
  of it; a 2020 v100 item of class 80 that must never be used.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from local_http import LocalServer, allow_only_loopback, running
from stac_fakes import (S1Slice, S2Tile, FakeStacApi, add_dem_item, add_s1_item, add_s2_item, add_worldcover_item)

from nycdata.data.chips import S2L2A_BANDS
from nycdata.sources import stac
from nycdata.sources.http import OfflineError
from nycdata.sources.manifest import read_manifest

CELL_PX, CELL = 128, 1280
X0, Y0 = 457 * CELL, 3520 * CELL  # lower-left corner of P0
PARENTS = [f"E{(X0 + i * CELL) // 1000:04d}N{Y0 // 1000:04d}" for i in range(4)]  # E0584N4505 ... E0588N4505
ROWS = (4504800, 4507680)
W, F = (583800, ROWS[0], 589440, ROWS[1]), (583800, ROWS[0], 590700, ROWS[1])
A, B = (584340, ROWS[0], 587040, ROWS[1]), (586740, ROWS[0], 588240, ROWS[1])
S2_SCENES = {  # day -> [(tile bounds, MGRS tile, cloud %)]
    "2021-04-10": [(W, "18TWL", 5.0)], "2021-05-20": [(W, "18TWL", 20.0)],
    "2021-06-20": [(A, "18TWL", 10.0), (B, "18TXL", 14.0)], "2021-07-15": [(F, "18TWL", 50.0)],
    "2021-09-05": [(F, "18TWL", 12.0)], "2021-10-01": [(F, "18TWL", 2.0)]}
S1_DAYS = ["2021-04-08", "2021-04-14", "2021-06-23", "2021-08-01", "2021-09-04", "2021-09-28"]
EXPECTED_S2 = {PARENTS[0]: ["2021-04-10", "2021-06-20", "2021-10-01"],
               PARENTS[1]: ["2021-04-10", "2021-06-20", "2021-10-01"],
               PARENTS[2]: ["2021-04-10", "2021-09-05", "2021-10-01"]}
EXPECTED_S1 = {PARENTS[0]: ["2021-04-08", "2021-06-23", "2021-09-28"],
               PARENTS[1]: ["2021-04-08", "2021-06-23", "2021-09-28"],
               PARENTS[2]: ["2021-04-08", "2021-09-04", "2021-09-28"]}
TIMESTEPS, MAX_CLOUD, DEM_HEIGHT, WC_SPLIT_LON = 3, 30.0, 12.5, -73.9565


def s2_value(day: str, band: str) -> int:
    return 1000 + 100 * list(S2_SCENES).index(day) + 5 * S2L2A_BANDS.index(band)


def s1_values(day: str) -> tuple[float, float]:
    i = S1_DAYS.index(day)
    return 0.02 * (1 + i), 0.004 * (1 + i)


def study_bbox() -> tuple[float, float, float, float]:
    """Lon/lat bounds of the four cells shrunk by 200 m: the grid over it is exactly P0..P3."""
    from rasterio.warp import transform_bounds

    return transform_bounds("EPSG:32618", "EPSG:4326", X0 + 200, Y0 + 200, X0 + 4 * CELL - 200, Y0 + CELL - 200)


def serve_scene(api: FakeStacApi, rename: dict[str, str] | None = None) -> None:
    for day, tiles in S2_SCENES.items():
        for bounds, mgrs, cloud in tiles:
            add_s2_item(api, S2Tile(f"{day}T15:48:09.024000Z", mgrs, bounds, cloud),
                        {b: s2_value(day, b) for b in S2L2A_BANDS}, rename=rename)
    for day in S1_DAYS:
        vv, vh = s1_values(day)
        if day == "2021-06-23":  # descending pass, two consecutive slices
            add_s1_item(api, S1Slice(f"{day}T10:55:00Z", (F[0], F[1], 587040, F[3]), F, "descending", 1), vv, vh)
            add_s1_item(api, S1Slice(f"{day}T10:55:25Z", (586740, F[1], F[2], F[3]), F, "descending", 2), vv, vh)
        else:
            add_s1_item(api, S1Slice(f"{day}T22:52:10Z", F, F), vv, vh)
    # a VV-only scene 1 d from S2 06-20: nearer than 06-23, but without VH it must not count (nor fail the fetch)
    add_s1_item(api, S1Slice("2021-06-21T22:52:10Z", F, F, polarizations=("VV",)), 9.0, 9.0)
    add_dem_item(api, -74.02, 40.69, -73.90, 40.73, DEM_HEIGHT)
    add_worldcover_item(api, 2021, -74.02, 40.69, -73.90, 40.73, lambda lon: np.where(lon < WC_SPLIT_LON, 10, 50))
    add_worldcover_item(api, 2020, -74.02, 40.69, -73.90, 40.73, lambda lon: np.full(lon.shape, 80))


def run_kwargs(api: FakeStacApi, lines: list) -> dict:
    return dict(bbox=study_bbox(), start="2021-04-01", end="2021-10-31", timesteps=TIMESTEPS, max_cloud=MAX_CLOUD,
                parent_px=CELL_PX, s1_max_days=12, catalog=api.url, log=lines.append, retries=0)


def tif_gets(server: LocalServer, since: int = 0) -> list[str]:
    return [r.path for r in server.requests[since:] if r.method == "GET" and r.path.endswith((".tif", ".tiff"))]


@pytest.fixture(scope="module")
def served():
    """One fake Planetary Computer for the module (only loopback connections while it runs)."""
    with pytest.MonkeyPatch.context() as mp:
        allow_only_loopback(mp)
        with running(LocalServer()) as server:
            api = FakeStacApi(server)
            serve_scene(api)
            yield server, api


@pytest.fixture(scope="module")
def fetched(served, tmp_path_factory):
    server, api = served
    out, lines = tmp_path_factory.mktemp("stac") / "sources", []
    manifest = stac.fetch_stac(out, **run_kwargs(api, lines))
    return manifest, lines


# --------------------------------------------------------------------------- pure choices

def test_choose_s2_days_one_per_window_and_fills_empty_windows():
    clouds = {"2021-04-10": 5, "2021-05-20": 1, "2021-09-05": 12, "2021-10-01": 2, "2021-10-02": 3}
    # windows Apr 1-Jun 10, Jun 11-Aug 20, Aug 21-Oct 31: the middle one is empty -> least cloudy spare, 10-02
    assert stac.choose_s2_days(clouds, "2021-04-01", "2021-10-31", 3) == ["2021-05-20", "2021-10-01", "2021-10-02"]
    assert stac.choose_s2_days(clouds, "2021-04-01", "2021-10-31", 6) == []


def test_match_s1_days_nearest_distinct_within_limit():
    s2 = ["2021-06-01", "2021-06-03"]
    # both S2 days are nearest to 06-02; the closer pair wins it, the other takes the next nearest
    assert stac.match_s1_days(s2, ["2021-06-02", "2021-06-08", "2021-07-30"], 12) == {
        "2021-06-01": "2021-06-02", "2021-06-03": "2021-06-08"}
    assert stac.match_s1_days(s2, ["2021-06-02"], 12) == {"2021-06-01": "2021-06-02"}  # one left without
    assert stac.match_s1_days(["2021-06-01"], ["2021-06-20"], 12) == {}


def test_parent_grid_ids_and_alignment():
    parents = stac.parent_grid(study_bbox(), CELL_PX)
    assert [p.id for p in parents] == PARENTS
    assert [(p.x0 % CELL, p.y0 % CELL) for p in parents] == [(0, 0)] * 4
    with pytest.raises(ValueError, match="multiple of 16"):
        stac.parent_grid(study_bbox(), 64)


# --------------------------------------------------------------------------- against the fake API

def test_dry_run_prints_the_plan_and_writes_nothing(served, tmp_path):
    server, api = served
    lines, before = [], len(server.requests)
    out = tmp_path / "never"
    plan = stac.fetch_stac(out, dry_run=True, **run_kwargs(api, lines))
    assert not out.exists() and not tif_gets(server, before)
    log = "\n".join(lines)
    table = next(line for line in lines if line.startswith("source")).splitlines()
    assert table[0].split() == ["source", "parent", "modality", "date", "product", "cloud", "%", "est.", "size", "note"]
    got = {(f.parent_id, f.modality): [] for f in plan}
    for f in plan:
        got[(f.parent_id, f.modality)].append(f.date)
    for parent in EXPECTED_S2:
        assert got[(parent, "S2L2A")] == EXPECTED_S2[parent]
        assert got[(parent, "S1RTC")] == EXPECTED_S1[parent]
        assert got[(parent, "DEM")] == [""] and got[(parent, "WORLDCOVER")] == [""]
        assert parent in log
    s2 = {(f.parent_id, f.date): f for f in plan if f.modality == "S2L2A"}
    mosaic = s2[(PARENTS[1], "2021-06-20")]
    assert mosaic.cloud_cover == pytest.approx(12.0) and "2 tile(s)" in mosaic.note  # mean of A (10) and B (14)
    assert "T18TWL" in mosaic.product_id and "T18TXL" in mosaic.product_id and "+" in mosaic.product_id
    assert s2[(PARENTS[0], "2021-06-20")].cloud_cover == pytest.approx(10.0)  # B does not touch P0
    assert s2[(PARENTS[2], "2021-09-05")].note.startswith("window 3/3")  # the fill for the empty window 2
    assert mosaic.est_bytes == 128 * 128 * 12 * 2
    assert "12.0" in log and "S1 3 d after S2 2021-06-20, descending" in log
    assert f"dropped {PARENTS[3]}: 2 S2 days" in log
    assert "total: 24 files" in log and "nothing was written" in log


def test_search_uses_the_query_and_pages(served):
    server, api = served
    bodies = [r.body for r in server.requests if r.path.endswith("/search") and r.method == "POST"]
    assert any(b'"eo:cloud_cover": {"lte": 30.0}' in b for b in bodies)
    assert any(b'"token"' in b for b in bodies), "pystac-client should have followed a next link"


def test_fetch_writes_manifest_with_distinct_matched_dates(fetched):
    manifest, lines = fetched
    rows = read_manifest(manifest.parent)
    assert {r["parent_id"] for r in rows} == set(EXPECTED_S2)
    for parent, s2_days in EXPECTED_S2.items():
        mine = [r for r in rows if r["parent_id"] == parent]
        s2 = sorted(r["date"] for r in mine if r["modality"] == "S2L2A")
        s1 = sorted(r["date"] for r in mine if r["modality"] == "S1RTC")
        assert s2 == s2_days and s1 == EXPECTED_S1[parent]
        assert len(set(s2)) == TIMESTEPS and len(set(s1)) == TIMESTEPS
        assert all(min(abs(np.datetime64(a) - np.datetime64(d)).astype(int) for d in s2) <= 12 for a in s1)
        modalities = [r["modality"] for r in mine]
        assert modalities.count("DEM") == 1 and modalities.count("WORLDCOVER") == 1
        assert all(r["band"] == "" for r in mine)
    s2_row = next(r for r in rows if (r["parent_id"], r["modality"], r["date"]) == (PARENTS[1], "S2L2A", "2021-06-20"))
    assert s2_row["processing_baseline"] == "03.00" and float(s2_row["cloud_cover"]) == 12.0
    assert s2_row["product_id"].count("+") == 1 and ".SAFE" not in s2_row["product_id"]
    s1_row = next(r for r in rows if r["parent_id"] == PARENTS[1] and r["date"] == "2021-06-23")
    assert s1_row["product_id"].count("+") == 1 and s1_row["product_id"].endswith("_rtc")
    assert any(line.startswith(f"[1/24] {PARENTS[0]} S2L2A 2021-04-10: wrote ") for line in lines)
    assert any(line.startswith("parent") and "on disk" in line for line in lines)  # the fetched table
    assert any(f"dropped {PARENTS[3]}" in line for line in lines)




def test_files_sit_on_the_parent_grid_with_the_served_values(fetched):
    manifest, _ = fetched
    root = manifest.parent
    for row in read_manifest(root):
        i = PARENTS.index(row["parent_id"])
        with rasterio.open(root / row["path"]) as src:
            assert src.crs.to_epsg() == 32618 and (src.height, src.width) == (CELL_PX, CELL_PX)
            assert src.transform == Affine(10, 0, X0 + i * CELL, 0, -10, Y0 + CELL)
            data = src.read()
            if row["modality"] == "S2L2A":
                assert src.dtypes[0] == "uint16" and src.descriptions == S2L2A_BANDS and src.nodata == 0
                expected = np.array([s2_value(row["date"], b) for b in S2L2A_BANDS])[:, None, None]
                np.testing.assert_array_equal(data, np.broadcast_to(expected, data.shape))
            elif row["modality"] == "S1RTC":
                assert src.descriptions == ("VV", "VH") and src.dtypes[0] == "float32"
                expected = np.array(s1_values(row["date"]), "float32")[:, None, None]
                np.testing.assert_allclose(data, np.broadcast_to(expected, data.shape), rtol=1e-6)  # no -32768 leaks
            elif row["modality"] == "DEM":
                np.testing.assert_allclose(data, DEM_HEIGHT, rtol=1e-6)
            else:
                assert src.dtypes[0] == "uint8" and set(np.unique(data)) <= {10, 50}  # never the 2020 map's 80
                if i < 2:
                    assert (data == 10).all()
                else:
                    assert {10, 50} <= set(np.unique(data))


def test_built_dataset_validates_with_distinct_dates(fetched, tmp_path):
    from nycdata.data import chips
    from nycdata.sources.build import build_dataset
    from nycdata.params import load_params
    from nycdata.data.validate import validate_dataset

    manifest, _ = fetched
    params = load_params(overrides={"chip_size": 64, "timesteps": TIMESTEPS, "temporal_mode": "distinct",
                                    "max_cloud_cover": MAX_CLOUD, "min_valid_fraction": 0.5})
    out = build_dataset(manifest, tmp_path / "ds", params, log=lambda m: None)
    assert validate_dataset(out) == []
    index = chips.read_index(out)
    assert len(index) == 3 * 4 and set(index["split"]) == {"train", "val", "test"}
    for _, chip in index.iterrows():
        assert chip["dates"].split("|") == EXPECTED_S2[chip["parent_id"]]
        assert chip["s1_dates"].split("|") == EXPECTED_S1[chip["parent_id"]]
        assert len(set(chip["s1_dates"].split("|"))) == TIMESTEPS


def test_resume_loads_nothing_and_keeps_the_manifest(fetched, served):
    server, api = served
    manifest, _ = fetched
    before, text, lines = len(server.requests), manifest.read_bytes(), []
    assert stac.fetch_stac(manifest.parent, **run_kwargs(api, lines)) == manifest
    assert tif_gets(server, before) == []
    assert manifest.read_bytes() == text
    assert sum(line.endswith(": already there") for line in lines) == 24


def test_plan_stac_lists_the_dropped_parent(served):
    _, api = served
    lines = []
    files, dropped = stac.plan_stac(**run_kwargs(api, lines))
    assert len(files) == 24 and {f.source for f in files} == {"planetary-computer"}
    assert dropped == [f"{PARENTS[3]}: 2 S2 days with cloud <= 30 % cover it (2021-09-05, 2021-10-01), 3 needed"]
    assert f"dropped parent {dropped[0]}" in lines
    capped, _ = stac.plan_stac(**run_kwargs(api, []), max_parents=2)
    assert sorted({f.parent_id for f in capped}) == PARENTS[:2] and len(capped) == 16


def test_renamed_asset_key_fails_clearly(monkeypatch, tmp_path):
    allow_only_loopback(monkeypatch)
    with running(LocalServer()) as server:
        api = FakeStacApi(server)
        serve_scene(api, rename={"B8A": "B8a"})
        with pytest.raises(ValueError, match=r"lacks asset\(s\) \['B8A'\]; it has \[.*'B8a'") as err:
            stac.fetch_stac(tmp_path / "out", **run_kwargs(api, []))
        assert "S2B_MSIL2A_20210410T154809" in str(err.value)
        assert not (tmp_path / "out").exists() and tif_gets(server) == []


def test_search_answering_503_is_retried_with_backoff(served, monkeypatch):
    server, api = served
    failures = []

    def flaky(method, path, query, body):
        if len(failures) < 2:
            failures.append(path)
            return server.json(503, {"code": "ServiceUnavailable"})
        return None  # on to the real /search

    monkeypatch.setattr(server, "routes", [(r"/api/stac/v1/search", flaky), *server.routes])
    lines, sleeps = [], []
    files, dropped = stac.plan_stac(**{**run_kwargs(api, lines), "retries": 3, "sleep": sleeps.append})
    assert len(files) == 24 and len(failures) == 2 and sleeps == [1.0, 2.0]
    assert any("attempt 1/4 failed (HTTP 503" in line for line in lines)


def test_unreachable_catalog_is_offline_error(monkeypatch):
    import socket

    allow_only_loopback(monkeypatch)
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OfflineError, match="offline"):
        stac.plan_stac(catalog=f"http://127.0.0.1:{port}/api/stac/v1", retries=1, sleep=lambda s: None,
                       log=lambda m: None)


def test_s1_nodata_outside_a_slice_is_nan_not_minus_32768(served):
    _, api = served
    client = stac._open_client(api.url)
    slices = stac._search(client, "sentinel-1-rtc", study_bbox(), dict(retries=0), datetime="2021-06-23/2021-06-23")
    assert len(slices) == 2
    west = stac.Scene(stac.parent_grid(study_bbox(), CELL_PX)[1], "S1RTC", "2021-06-23", slices[:1])
    values = stac._load(west, dict(retries=0))  # slice 1 holds data only west of x = 587040, P1 ends at 587520
    vv, vh = s1_values("2021-06-23")
    assert np.isnan(values[:, :, -45:]).all() and not (values == -32768).any()
    expected = np.broadcast_to(np.array([vv, vh], "float32")[:, None, None], values[:, :, :75].shape)
    np.testing.assert_allclose(values[:, :, :75], expected, rtol=1e-6)


def test_cli_dry_run_against_the_local_catalog_prints_the_plan(served, tmp_path, capsys):
    """`python -m nycdata fetch stac DIR --dry-run`, pointed at the fake catalogue through parameters."""
    from nycdata.__main__ import main
    from nycdata.params import PARAMS_DIR

    server, api = served
    before, out = len(server.requests), tmp_path / "never"
    overrides = dict(stac_catalog=api.url, fetch_bbox=str(list(study_bbox())), parent_size_px="128", timesteps="3",
                     fetch_start="2021-04-01", fetch_end="2021-10-31")
    argv = ["fetch", "stac", str(out), "--dry-run", "-f", str(PARAMS_DIR / "fixture.yaml")]
    assert main(argv + [x for kv in overrides.items() for x in ("-p", *kv)]) == 0
    printed = capsys.readouterr().out
    assert not out.exists() and not tif_gets(server, before)
    assert all(parent in printed for parent in EXPECTED_S2) and "total: 24 files" in printed
    assert "fetch: dry run, nothing written" in printed
