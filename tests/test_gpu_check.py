"""`python -m nycdata gpu-check` on the CPU at a toy size: every number of bench.json, the floor, the top
operations, a fine-tune end to end, the study's time and disk; and an out-of-memory error stops it loudly."""

import json
from pathlib import Path

import pytest
import torch

from nycdata.__main__ import main
from nycdata.runs import RunLayout
from nycdata.study import bench
from nycdata.study.bench import VARIANTS

TOY = ["--chips", "6", "--size", "32", "--timesteps", "2", "--rounds", "2", "--steps", "1", "--warmup", "1",
       "--epochs", "1", "--loader-seconds", "0.05", "-p", "model_size", "tiny", "-p", "precision", "32-true",
       "-p", "batch_size", "2", "-p", "num_workers", "0", "-p", "thought_cache_samples", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a busy 2-core machine two threads contend and a toy train step takes 30x longer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    assert main(["gpu-check", "--out", str(out), *TOY]) == 0
    layout = RunLayout(out / "gpu_check")
    return json.loads(layout.bench_json.read_text()), layout.bench_md.read_text()


def test_bench_numbers_ratios_and_floor(checked):
    result, table = checked
    assert result["device_type"] == "cpu" and result["device"] and result["versions"]["terratorch"]
    assert result["versions"]["torch"] == torch.__version__
    assert set(result["variants"]) == set(VARIANTS)
    for numbers in result["variants"].values():
        assert numbers["train_step_s"] > 0 and numbers["infer_s_per_chip"] > 0 and numbers["flops_per_chip_step"] > 0
        assert len(numbers["rounds_train_step_s"]) == 2 and "peak_mem_mb" in numbers and numbers["state_mb"] > 0
    floor = result["floor"]
    assert floor["tokens_per_timestep"] == {"baseline": 12, "tim_cached": 16}  # 32 px: 2 x 2 patches per modality
    assert 0 <= floor["decoder_share"] <= 1 and floor["tim_cached"] > 1 and floor["tim"] > floor["tim_cached"]
    for key, variant in (("tim_over_baseline", "tim"), ("tim_cached_over_baseline", "tim_cached")):
        ratio = result["ratios"][key]
        per_round = [t / b for t, b in zip(result["variants"][variant]["rounds_train_step_s"],
                                           result["variants"]["baseline"]["rounds_train_step_s"])]
        assert ratio["per_round"] == pytest.approx(per_round) and result[key] == ratio["median"]
        assert ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["spread"] >= 0
        assert not ratio["conclusive"] and "too few" in ratio["verdict"]  # 2 rounds
        assert ratio["floor"] == floor[variant] and ratio["measured_over_floor"] == pytest.approx(ratio["median"] / ratio["floor"])
    assert isinstance(result["ratios"]["tim_cached_over_baseline"]["within_floor_tolerance"], bool)
    assert result["loader_chips_per_s"] > 0 and result["thought_cache_s_per_chip"] > 0
    assert "Floor" in table and "floor(tim_cached)" in table and "Top operations of one `tim_cached` train step" in table
    assert set(result["top_ops"]) == set(VARIANTS) and result["top_ops"]["baseline"]["ops"][0]["self_ms"] > 0
    assert "| `aten::" in table


def test_fine_tune_projections_and_disk(checked):
    result, table = checked
    fine_tune = result["fine_tune"]
    assert Path(fine_tune["train_summary"]).is_file() and fine_tune["epochs"] == 1
    assert fine_tune["cell_bytes"] > sum(fine_tune["checkpoint_files"].values()) > 0 and "best.ckpt" in fine_tune["checkpoint_files"]
    assert result["thought_caching"]["chips"] == 6 and result["thought_caching"]["bytes_per_chip"] > 0
    run = result["baseline_run"]  # params/nyc.yaml: 20 epochs
    assert run["epochs"] == 20 and run["from_fine_tune_s"] > 0 and run["from_bench_s"] > 0 and run["pflop"] > 0
    projection, disk = result["projection"], result["disk"]
    assert projection["cells"] == disk["cells"] == 75 and projection["hours"] > 0  # 5 variants x 3 seeds x 5 folds
    assert disk["study_bytes"] > 0 and disk["study_bytes_cached"] > disk["thought_caches_bytes"] > 0
    assert isinstance(disk["fits"], bool) and isinstance(disk["fits_cached"], bool)
    assert "75 cells" in table and "30.00 GB" in table and "Arithmetic limit" in table


def test_out_of_memory_stops_with_a_clear_error(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(bench, "time_train_step", out_of_memory)
    assert main(["gpu-check", "--out", str(tmp_path), *TOY]) == 2
    error = capsys.readouterr().err
    for part in ("error: out of memory while warming up variant baseline", "batch_size 2", "32 px",
                 "smaller batch_size or model_size", "-p batch_size 1"):
        assert part in error
