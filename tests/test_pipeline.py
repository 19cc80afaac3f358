"""`python -m nycdata run`: fixture on first use, validation, loading pass, run folders never silently overwritten."""

import json

import pytest

from nycdata.__main__ import main
from nycdata.params import PARAMS_DIR


def _run(tmp_path, *extra):
    return main(["run", "-f", str(PARAMS_DIR / "fixture.yaml"), "-p", "output_root", str(tmp_path / "out"),
                 "-p", "data_root", str(tmp_path / "data"), "-p", "fixture_size", "32", "-p", "fixture_chips", "9",
                 "-p", "run_name", "r1", *extra])


def test_run_generates_fixture_and_writes_data_check(tmp_path, capsys):
    assert _run(tmp_path) == 0
    check = json.loads((tmp_path / "out" / "r1" / "data_check.json").read_text())
    assert sum(check["splits"][s]["chips"] for s in ("train", "val", "test")) == 9
    assert check["splits"]["train"]["image_shapes_CTHW"]["S2L2A"] == [12, 2, 32, 32]
    assert (tmp_path / "data" / "chips.parquet").is_file()
    assert str(tmp_path / "out" / "r1") in capsys.readouterr().out

    before = (tmp_path / "out" / "r1" / "data_check.json").stat().st_mtime_ns
    assert _run(tmp_path) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "r1" / "data_check.json").stat().st_mtime_ns == before
    assert _run(tmp_path, "--overwrite") == 0


def test_run_rejects_misspelt_parameter(tmp_path, capsys):
    assert _run(tmp_path, "-p", "batchsize", "2") == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_without_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["run", "-p", "data_root", str(tmp_path / "none"), "-p", "output_root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds no chip dataset" in err and "params/fixture.yaml" in err
