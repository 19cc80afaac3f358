"""nycdata.sources.worldcover without a network: tile names, then fetches from a fake tile bucket."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from http_fakes import FakeResponse, FakeSession, Sleeps, no_network, quiet  # noqa: F401 - no_network: autouse
from rasterio.transform import from_origin

from nycdata.data.chips import NYC_BBOX
from nycdata.sources import worldcover
from nycdata.sources.manifest import read_manifest
from nycdata.sources.worldcover import fetch_worldcover, worldcover_tiles


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
    assert [c[0] for c in session.calls] == [worldcover.WORLDCOVER_URL.format(tile="N39W075")]
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


def test_fetch_worldcover_dry_run_plans_without_writing(tmp_path):
    lines, out = [], tmp_path / "raw"
    plan = fetch_worldcover(out, log=lines.append, dry_run=True, session=FakeSession([]))  # no get(), no head()
    assert not out.exists()
    (only,) = plan
    assert (only.parent_id, only.modality, only.product_id, only.est_bytes) == (
        "*", "WORLDCOVER", "ESA_WorldCover_10m_2021_v200_N39W075", None)
    assert "nothing was written (dry run)" in lines[-1] and "(some sizes unknown)" in lines[-1]
