"""``python -m nycdata fixture|validate``: exit codes and messages (in-process, plus one real subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nycdata.__main__ import main
from nycdata.data import chips

FIXTURE_ARGS = ["--chips", "12", "--size", "32", "--timesteps", "2", "--seed", "0"]


def _damage_one_chip(data_dir):
    """Delete the DEM of one chip; return its chip id."""
    cid = chips.read_index(data_dir)["chip_id"].iloc[5]
    (data_dir / chips.chip_relpath(cid, "DEM")).unlink()
    return cid


def test_fixture_command_writes_dataset(tmp_path, capsys, pristine_fixture_dir):
    out = tmp_path / "fx"
    assert main(["fixture", str(out), *FIXTURE_ARGS]) == 0
    assert (out / "chips.parquet").is_file() and (out / "dataset.json").is_file()
    assert len(chips.read_index(out)) == 12
    spec = chips.DatasetSpec.read(out)
    assert (spec.chip_size, spec.timesteps) == (32, 2)
    # same settings as the session fixture, so the same bytes
    assert (out / "chips.parquet").read_bytes() == (pristine_fixture_dir / "chips.parquet").read_bytes()
    captured = capsys.readouterr()
    assert "wrote 12 chips (32 px, 2 timesteps, seed 0)" in captured.out
    assert captured.err == ""


def test_validate_command_on_clean_dataset(pristine_fixture_dir, capsys):
    assert main(["validate", str(pristine_fixture_dir)]) == 0
    captured = capsys.readouterr()
    assert f"{pristine_fixture_dir} is a valid chip dataset" in captured.out
    assert captured.err == ""


def test_validate_command_on_damaged_dataset(fixture_copy, capsys):
    cid = _damage_one_chip(fixture_copy)
    assert main(["validate", str(fixture_copy)]) == 1
    captured = capsys.readouterr()
    assert cid in captured.err
    assert str(fixture_copy / chips.chip_relpath(cid, "DEM")) in captured.err
    assert "1 problem(s) in 1 chip(s)" in captured.err
    assert "valid chip dataset" not in captured.out
    others = set(chips.read_index(fixture_copy)["chip_id"]) - {cid}
    assert not any(other in captured.err for other in others)


def test_validate_command_on_missing_dir(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere")]) == 1
    assert "dataset.json" in capsys.readouterr().err


def test_fixture_into_non_empty_dir_returns_2(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["fixture", str(out), *FIXTURE_ARGS]) == 2
    captured = capsys.readouterr()
    assert "already exists" in captured.err and captured.err.startswith("error: ")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_fixture_overwrite_flag(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("old")
    assert main(["fixture", str(out), "--chips", "3", "--size", "16", "--timesteps", "1", "--overwrite"]) == 0
    assert not (out / "notes.txt").exists()
    assert len(chips.read_index(out)) == 3


@pytest.mark.parametrize("args, word", [(["--size", "40"], "--size 40"), (["--chips", "2"], "--chips 2")])
def test_fixture_bad_config_returns_2(tmp_path, capsys, args, word):
    out = tmp_path / "fx"
    assert main(["fixture", str(out), *args]) == 2
    assert word in capsys.readouterr().err
    assert not out.exists()


def test_subprocess_validate_exit_code_and_stderr(fixture_copy):
    cid = _damage_one_chip(fixture_copy)
    src_root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src_root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "nycdata", "validate", str(fixture_copy)],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1, result.stderr
    assert cid in result.stderr
    assert "1 problem(s) in 1 chip(s)" in result.stderr
