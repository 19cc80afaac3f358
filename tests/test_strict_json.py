"""Every JSON the package writes is strict JSON: no NaN/Infinity, which strict parsers (JS, jq) reject."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from nycdata.io import write_json


def refuse(constant):
    """parse_constant is called only for NaN, Infinity and -Infinity: none may appear."""
    raise ValueError(f"non-strict JSON constant {constant}")


def strict_load(path: Path):
    return json.loads(Path(path).read_text(), parse_constant=refuse)


def test_refuse_really_catches_nan():
    with pytest.raises(ValueError, match="NaN"):
        json.loads('{"a": NaN}', parse_constant=refuse)


def test_non_finite_values_at_any_depth_become_null(tmp_path):
    payload = {
        "nan": float("nan"), "inf": math.inf, "ninf": -math.inf, "ok": 1.5, "int": 3, "flag": True, "none": None,
        "nested": {"list": [1.0, float("nan"), {"deep": [np.float64("inf")]}], "tuple": (np.nan, 2)},
        "np_scalars": [np.float32("nan"), np.float64(0.25), np.int64(7), np.bool_(False)],
        "array": np.array([[1.0, np.nan], [-np.inf, 4.0]]), "tensor": torch.tensor([float("nan"), 1.0]),
        "path": tmp_path,
    }
    path = write_json(tmp_path / "out" / "x.json", payload)
    back = strict_load(path)
    assert back["nan"] is None and back["inf"] is None and back["ninf"] is None and back["none"] is None
    assert back["ok"] == 1.5 and back["int"] == 3 and back["flag"] is True
    assert back["nested"] == {"list": [1.0, None, {"deep": [None]}], "tuple": [None, 2]}
    assert back["np_scalars"] == [None, 0.25, 7, False]
    assert back["array"] == [[1.0, None], [None, 4.0]] and back["tensor"] == [None, 1.0]
    assert back["path"] == str(tmp_path)
    text = path.read_text()
    assert list(back) == sorted(back) and text.endswith("\n") and "NaN" not in text and "Infinity" not in text
    assert not list(path.parent.glob(".*.tmp"))           # the atomic write left no temporary file


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = write_json(tmp_path / "x.json", {"a": 1})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json(path, {"a": object()})
    assert strict_load(path) == {"a": 1}


def test_every_json_of_the_run_chain_is_strict(run):
    """The whole notebook chain's run folder (comparison.json with one test parent included)."""
    files = sorted(Path(run).rglob("*.json"))
    assert len(files) >= 5, f"only {len(files)} JSON files under {run}: the test would pass vacuously"
    for path in files:
        try:
            strict_load(path)
        except ValueError as err:             # json.JSONDecodeError is a ValueError too
            pytest.fail(f"{path.relative_to(run)} is not strict JSON: {err}")
