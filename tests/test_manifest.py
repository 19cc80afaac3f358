"""nycdata.sources.manifest: sources.csv's one writer and one reader (the fetchers' rows, the builder's frame),
and the processing-baseline parsers."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from nycdata.data.chips import S2L2A_BANDS
from nycdata.sources.manifest import (MANIFEST_COLUMNS, SourceError, manifest_frame, normalise_baseline,
                                      parse_processing_baseline, read_manifest, write_manifest)


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
    rows = [row(band=b) for b in S2L2A_BANDS]
    write_manifest(rows, tmp_path)
    first = (tmp_path / "sources.csv").read_text()
    write_manifest(rows, tmp_path)
    assert (tmp_path / "sources.csv").read_text() == first
    assert [r["band"] for r in read_manifest(tmp_path)] == list(S2L2A_BANDS)


@pytest.mark.parametrize("bad", [
    row(modality="LANDSAT"), row(band="B10"), row(date="15/06/2021"), row(modality="DEM", band="DEM", date="2021-01-01"),
    row(path="/abs/file.tif"), row(path="../outside.tif"), {**row(), "extra": 1}, row(parent=""),
])
def test_write_manifest_rejects_bad_rows(tmp_path, bad):
    with pytest.raises(ValueError):
        write_manifest([bad], tmp_path)
    assert not (tmp_path / "sources.csv").exists()


# --------------------------------------------------------------------------- the builder's view

def test_manifest_frame_reads_what_write_manifest_wrote(tmp_path):
    (tmp_path / "c1" / "S2L2A").mkdir(parents=True)
    (tmp_path / "c1" / "S2L2A" / "2021-06-15_B04.tif").write_bytes(b"x")
    write_manifest([row(cloud_cover=12.5, processing_baseline="04.00", product_id="P1")], tmp_path)
    frame = manifest_frame(tmp_path / "sources.csv")
    assert list(frame.columns) == [*MANIFEST_COLUMNS, "file"]
    assert frame.iloc[0]["processing_baseline"] == "04.00" and frame.iloc[0]["cloud_cover"] == "12.5"
    assert frame.iloc[0]["file"] == str((tmp_path / "c1" / "S2L2A" / "2021-06-15_B04.tif").resolve())
    assert frame.drop(columns="file").to_dict("records") == read_manifest(tmp_path)


def test_manifest_frame_takes_a_hand_written_manifest(tmp_path):
    """Optional columns left out, another column order, a byte-order mark (a spreadsheet's CSV export)."""
    (tmp_path / "dem.tif").write_bytes(b"x")
    (tmp_path / "sources.csv").write_text("\ufeffpath,parent_id,modality,date,band\ndem.tif,p1,DEM,,DEM\n", encoding="utf-8")
    frame = manifest_frame(tmp_path / "sources.csv")
    assert [frame.iloc[0][c] for c in ("parent_id", "modality", "date", "band", "cloud_cover", "product_id")] == \
        ["p1", "DEM", "", "DEM", "", ""]


@pytest.mark.parametrize("text, match", [
    ("parent_id,modality,date,path\n", r"columns \['band'\] missing"),
    ("parent_id,modality,date,band,path\np,S3OLCI,,,x.tif\n", "row 2: modality 'S3OLCI'"),
    ("parent_id,modality,date,band,path\np,DEM,,DEM,absent.tif\n", "1 listed files do not exist"),
])
def test_manifest_frame_names_the_problem(tmp_path, text, match):
    (tmp_path / "sources.csv").write_text(text)
    with pytest.raises(SourceError, match=match):
        manifest_frame(tmp_path / "sources.csv")
    with pytest.raises(SourceError, match="not found; write it with `python -m nycdata fetch"):
        manifest_frame(tmp_path / "elsewhere.csv")


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
    assert normalise_baseline(value) == expected
