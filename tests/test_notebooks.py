"""Every notebook executed once with papermill on a fresh fixture (the `run` chain of conftest), from another cwd.

The chain runs once per session (about two minutes on 2 cores); each test then checks one notebook's files.
"""

import json

import nbformat
import pandas as pd
import pytest
import yaml

from nycdata.data.chips import S2L2A_BANDS
from nycdata.data.chips import TERRAMIND_V1_STATS
from nycdata.params import defaults
from nycdata.study.chain import run_pipeline
from nycdata.study.notebooks import NOTEBOOK_DIR, execute_notebook
from nycdata.study.stats import with_gate

from conftest import CHAIN_CHIPS as CHIPS, CHAIN_SIZE as SIZE, CHAIN_TIMESTEPS as T

NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _json(path):
    return json.loads(path.read_text())


def test_committed_notebooks_are_clean_and_have_one_parameters_cell():
    assert len(NOTEBOOKS) >= 5
    nyc = defaults()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        tagged = [c for c in code if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name}: {len(tagged)} parameters cells"
        assert not any("!pip" in c.source or c.source.lstrip().startswith("%") or "sys.path" in c.source for c in code)
        namespace = {}
        exec(tagged[0].source, namespace)  # plain literals only
        values = {k: v for k, v in namespace.items() if not k.startswith("__")}
        assert values and {k: nyc[k] for k in values} == values, f"{path.name}: defaults differ from params/nyc.yaml"
        assert nb.cells[0].cell_type == "markdown" and "Writes" in nb.cells[0].source


def test_01_data_summary(run):
    summary = _json(run / "data_summary.json")
    assert summary["n_chips"] == CHIPS and summary["chip_size"] == SIZE and summary["timesteps"] == T
    assert sum(s["chips"] for s in summary["splits"].values()) == CHIPS
    assert all(s["chips"] > 0 for s in summary["splits"].values())
    for fractions in summary["class_fraction"].values():
        assert sum(fractions.values()) == pytest.approx(1.0, abs=1e-4)
    west, south, east, north = summary["bounds_lonlat"]
    assert -74.30 <= west < east <= -73.65 and 40.45 <= south < north <= 40.95
    assert summary["cv_folds"] == 2 and set(summary["folds"]) == {"0", "1"}
    assert sum(f["test"]["chips"] for f in summary["folds"].values()) == CHIPS, "every chip tested in exactly one fold"
    folds = (run / "folds.csv").read_text().splitlines()
    assert folds[0] == "fold,parent_id,split,chips" and len(folds) - 1 == 2 * summary["n_parents"]
    medians = pd.read_csv(run / "s2_medians.csv", index_col=0)
    assert list(medians.index) == list(S2L2A_BANDS)
    assert medians["pretraining mean"].tolist() == pytest.approx(TERRAMIND_V1_STATS["S2L2A"][0], abs=0.5)
    assert medians["median before 2022-01-25"].notna().all() and medians["median from 2022-01-25"].isna().all()


def test_02_smoke(run):
    smoke = _json(run / "smoke.json")
    assert smoke["batch_shapes"]["S2L2A"][1:] == [12, T, SIZE, SIZE]
    tim = smoke["tim"]
    assert tim["thought_tokens_shape"][1:] == [T, SIZE // 16, SIZE // 16]
    generator = tim["generator"]
    assert generator["tensors"] > 100 and generator["verified"] == 0 and "RANDOM" in generator["warning"]
    assert tim["parameters"]["tokenizer"] == {"trainable": 0, "frozen": 0, "shared_with_generator": 0}, "built to decode only"
    assert tim["parameters"]["generator"]["trainable"] == 0 and tim["parameters"]["generator"]["frozen"] > 0
    arms = smoke["parameter_groups"]
    embeddings = {arm: groups["input embeddings"] for arm, groups in arms.items()}
    assert embeddings["tim"] == embeddings["baseline"] and embeddings["baseline"]["trainable"] > 0
    upstream = embeddings["tim_shared_embed"]
    assert upstream["trainable"] == 0 and upstream == embeddings["baseline_frozen_embed"]
    assert arms["tim"]["thought embedding"]["trainable"] > 0 and arms["baseline"]["thought embedding"]["trainable"] == 0
    for variant in ("baseline", "tim"):
        assert smoke[variant]["logits_shape"][1:] == [5, SIZE, SIZE] and smoke[variant]["forward_s"] > 0


@pytest.mark.parametrize("variant", ["baseline", "tim"])
@pytest.mark.parametrize("fold", [0, 1])
def test_03_finetune(run, variant, fold):
    seed_dir = run / variant / f"fold{fold}" / "seed42"
    summary = _json(seed_dir / "train_summary.json")
    assert summary["variant"] == variant and summary["epochs_run"] == 2 and summary["best_epoch"] in (0, 1)
    assert summary["fold"] == fold and summary["parameters"]["input embeddings"]["trainable"] > 0
    assert 0 <= summary["best_val"]["val/mIoU"] <= 1 and summary["wall_time_s"] > 0
    assert sorted(p.name for p in (seed_dir / "checkpoints").iterdir()) == ["best.ckpt"], "finished: no last.ckpt"
    epochs = [line.split(",")[0] for line in (seed_dir / "metrics.csv").read_text().splitlines()[1:]]
    assert set(epochs) == {"0", "1"}


def test_04_evaluate(run):
    comparison = _json(run / "comparison.json")["tim_vs_baseline"]
    assert comparison["n_seeds"] == 1 and comparison["n_test_chips"] == CHIPS, "folds pooled: every chip tested once"
    assert comparison["n_parents"] == 4 and comparison["few_parents"] and comparison["matched"]
    assert None not in comparison["ci95_pp"] and None not in comparison["parent_t_ci95_pp"], "every parent tested: intervals"
    assert set(comparison["per_fold_delta_pp"]) == {"0", "1"} and comparison["sign_flip_min_p"] == 2 / 16
    gated = with_gate({k: v for k, v in comparison.items()}, comparison["publish_rule"])
    assert {k: comparison[k] for k in ("verdict", "publish")} == {k: gated[k] for k in ("verdict", "publish")}
    assert comparison["delta_miou_pp"] == pytest.approx((comparison["tim_miou"] - comparison["baseline_miou"]) * 100)
    tested = 0
    for fold in (0, 1):
        for variant in ("baseline", "tim"):
            metrics = _json(run / variant / f"fold{fold}" / "seed42" / "test_metrics.json")
            assert 0 <= metrics["miou"] <= 1 and metrics["fold"] == fold
        tested += metrics["n_test_chips"]
    assert tested == CHIPS
    per_chip = (run / "per_chip.csv").read_text().splitlines()
    assert per_chip[0].startswith("chip_id,parent_id,fold,variant,seed,cm_0_0")
    assert len(per_chip) - 1 == 2 * comparison["n_test_chips"]


def test_05_thoughts(run):
    thoughts = _json(run / "thoughts.json")
    assert thoughts["generator"] == "random" and thoughts["meaningful"] is False
    n = _json(run / "data_summary.json")["folds"]["0"]["test"]["chips"]  # the fold-0 tim run's test chips
    assert thoughts["fold"] == 0 and thoughts["tokens_shape"] == [n, T, SIZE // 16, SIZE // 16]
    assert 0 <= thoughts["pixel_agreement"] <= 1 and len(thoughts["confusion"]) == 5
    assert "meaningless" in (run / "html" / "05_visualise_tim_seed42.html").read_text()


def test_chain_writes_html_and_summary(run):
    html = sorted(p.name for p in (run / "html").glob("*.html"))
    assert html == ["01_load_data.html", "02_smoke.html", "03_finetune_baseline_seed42_fold0.html",
                    "03_finetune_baseline_seed42_fold1.html", "03_finetune_tim_seed42_fold0.html",
                    "03_finetune_tim_seed42_fold1.html", "04_evaluate.html", "05_visualise_tim_seed42.html"]
    summary = (run / "summary.md").read_text()
    assert "| tim_vs_baseline | 1 |" in summary and "html/04_evaluate.html" in summary
    assert yaml.safe_load((run / "params.yaml").read_text())["run_name"] == "nb"
    executed = nbformat.read(run / "notebooks" / "01_load_data.ipynb", as_version=4)
    assert any(c.get("outputs") for c in executed.cells if c.cell_type == "code")


def test_second_run_into_same_folder_fails_but_the_study_resumes_without_redoing(run):
    import time

    params = yaml.safe_load((run / "params.yaml").read_text())
    with pytest.raises(FileExistsError, match="already exists"):
        run_pipeline(params, log=lambda message: None)
    before = (run / "comparison.json").stat().st_mtime_ns
    lines, started = [], time.monotonic()
    run_pipeline(params, resume=True, log=lines.append)
    assert time.monotonic() - started < 60, "a finished study must not redo any notebook"
    assert sum("already done, skipped" in line for line in lines) == 8
    assert (run / "comparison.json").stat().st_mtime_ns == before


@pytest.fixture
def kernel(shared_kernel):
    return shared_kernel


def test_a_shared_kernel_gives_each_notebook_a_clean_namespace_and_warning_memory(kernel, tmp_path):
    import papermill

    (tmp_path / "warner.py").write_text("import warnings\n\ndef warn():\n    warnings.warn('shown in every notebook')\n")
    load = f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport warner\n"  # a module warns: once per location
    first = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(load + "left_over = 1\nwarner.warn()")])
    second = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        load + "assert 'left_over' not in globals()\nwarner.warn()")])
    for name, notebook in (("first", first), ("second", second)):
        nbformat.write(notebook, tmp_path / f"{name}.ipynb")
        papermill.execute_notebook(str(tmp_path / f"{name}.ipynb"), str(tmp_path / f"{name}.out.ipynb"),
                                   km=kernel.reset(), kernel_name="python3", progress_bar=False)
    cell = nbformat.read(tmp_path / "second.out.ipynb", as_version=4).cells[0]
    assert cell.execution_count == 1, "cell numbers restart"
    assert any("shown in every notebook" in output.get("text", "") for output in cell.outputs), "warned again"


def test_misspelt_parameter_fails_loudly(run, tmp_path, kernel):
    import papermill

    params = yaml.safe_load((run / "params.yaml").read_text())
    with pytest.raises(papermill.PapermillExecutionError, match="did you mean 'variant'"):
        execute_notebook("01_load_data", tmp_path, {**params, "varaint": "tim"}, kernel=kernel)


def test_00_builds_from_synthetic_sources_that_01_then_reads(tmp_path, kernel):
    """Sources that are not the tests' own (the package's generator), built by notebook 00, read by notebook 01."""
    params = {**yaml.safe_load((NOTEBOOK_DIR.parent / "params" / "fixture.yaml").read_text()),
              "output_root": str(tmp_path / "out"), "run_name": "b", "sources_manifest": str(tmp_path / "src" / "sources.csv"),
              "build_root": str(tmp_path / "built")}
    execute_notebook("00_build_dataset", tmp_path / "nb", params, kernel=kernel)
    summary = _json(tmp_path / "out" / "b" / "build_summary.json")
    assert summary["n_chips"] == 4 * 16 - 2 and summary["n_parents"] == 4 and summary["dem_missing"] == 0
    assert all("s1_db" in fixes and "s2_offset_" in fixes for fixes in summary["fixes"].values())
    execute_notebook("01_load_data", tmp_path / "nb", {**params, "fixture": False, "data_root": str(tmp_path / "built")},
                     kernel=kernel)
    data = _json(tmp_path / "out" / "b" / "data_summary.json")
    assert data["n_chips"] == 62 and data["chip_size"] == 32 and data["timesteps"] == 2
    medians = pd.read_csv(tmp_path / "out" / "b" / "s2_medians.csv", index_col=0)
    shift = medians["median from 2022-01-25"] - medians["median before 2022-01-25"]
    assert shift.abs().max() < 500, "without_offset: scenes from 2022 on were brought down to the older convention"


def test_tim_evaluation_draws_k_thoughts_and_reports_their_spread(run, tmp_path):
    import shutil

    from nycdata.study.evaluate import FinishedRun, test_run
    from nycdata.study.train import variant_datamodule
    from nycdata.model.variants import get_variant

    params = {**yaml.safe_load((run / "params.yaml").read_text()), "thought_samples": 3, "fold": 0}
    copy = tmp_path / "tim"
    shutil.copytree(run / "tim" / "fold0" / "seed42", copy)
    rows = test_run(FinishedRun("tim", 42, copy, fold=0), params,
                    variant_datamodule(params, get_variant("tim"), log=lambda m: None))
    metrics = _json(copy / "test_metrics.json")
    assert metrics["thought_samples"] == 3 and len(metrics["miou_per_thought_sample"]) == 3
    assert metrics["thought_spread_pp"] >= 0 and 0 <= metrics["miou"] <= 1
    single = _json(run / "tim" / "fold0" / "seed42" / "test_metrics.json")
    assert rows.filter(like="cm_").to_numpy().sum() == 3 * sum(map(sum, single["confusion"])), "pixels of 3 thoughts pooled"


def test_params_file_switches_a_notebook_with_one_edit_and_explicit_values_win(capsys):
    from nycdata.notebook import notebook_params
    from nycdata.params import PARAMS_DIR, load_params

    nyc, fixture = defaults(), dict(load_params(PARAMS_DIR / "fixture.yaml"))
    cell = {k: nyc[k] for k in ("data_root", "run_name", "max_epochs", "model_size", "fixture", "lr")}
    history = ["", "from nycdata.notebook import notebook_params", "params_file: str = ''\n..."]

    def collect(namespace):
        return dict(notebook_params({"In": list(history), **namespace}, before={"In"}))

    one_edit = collect({**cell, "params_file": "params/fixture.yaml"})
    assert {k: v for k, v in one_edit.items() if k != "params_file"} == {k: v for k, v in fixture.items() if k != "params_file"}
    assert collect({**cell, "params_file": "params/fixture.yaml", "model_size": "small"})["model_size"] == "small"
    # papermill's injected cell (`-p max_epochs 20`) is explicit although 20 is also the cell's printed default
    history.append("# Parameters\nparams_file = \"params/fixture.yaml\"\nmax_epochs = 20\n")
    injected = collect({**cell, "params_file": "params/fixture.yaml"})
    assert injected["max_epochs"] == 20 and injected["model_size"] == "tiny"
    assert collect(cell)["data_root"] == "data/nyc"  # without params_file the cell's values are the parameters


def test_missing_dataset_stops_the_first_data_cell_with_one_sentence(tmp_path, kernel):
    import papermill

    with pytest.raises(papermill.PapermillExecutionError, match="DatasetMissing"):
        execute_notebook("01_load_data", tmp_path, {"data_root": str(tmp_path / "none"),
                                                   "output_root": str(tmp_path / "out")}, kernel=kernel)
    cells = nbformat.read(tmp_path / "01_load_data.ipynb", as_version=4).cells
    failed = [c for c in cells if c.cell_type == "code" and any(o.output_type == "error" for o in c.outputs)]
    assert len(failed) == 1 and "prepare_dataset(" in failed[0].source
    (error,) = [o for o in failed[0].outputs if o.output_type == "error"]
    assert len(error.traceback) == 1, "one message, not a traceback through the package"
    assert error.traceback[0].startswith(f"DatasetMissing: data_root {tmp_path / 'none'} holds no chip dataset")
    assert "params_file = 'params/fixture.yaml'" in error.traceback[0] and "notebook 00" in error.traceback[0]


def test_injected_parameters_are_only_what_the_run_set(run):
    params = yaml.safe_load((run / "params.yaml").read_text())
    changed = {k for k, v in params.items() if v != defaults()[k]}
    for path in sorted((run / "notebooks").glob("*.ipynb")):
        (cell,) = [c for c in nbformat.read(path, as_version=4).cells if "injected-parameters" in c.metadata.get("tags", [])]
        names = {line.split(" = ")[0] for line in cell.source.splitlines()[1:]}
        assert names - {"variant", "seed", "fold", "resume"} == changed, path.name
        assert "split_seed" not in names and "normalization" not in names  # left at their defaults by this run


def test_kernels_talk_over_private_sockets_without_the_transport_warning_or_a_frontend(capfd, monkeypatch):
    from jupyter_core.utils import run_sync

    from nycdata.study.notebooks import kernel_manager, shutdown

    monkeypatch.setenv("JPY_SESSION_NAME", "notebooks/04_evaluate.ipynb")  # as when a chain runs inside JupyterLab
    km = kernel_manager()
    folder = __import__("pathlib").Path(km.connection_file).parent
    assert km.transport == "ipc" and folder.stat().st_mode & 0o077 == 0  # only this user can reach the sockets
    run_sync(km.start_kernel)()
    client = km.client()
    client.start_channels()
    try:
        run_sync(client.wait_for_ready)(timeout=60)
        client.execute("import os; print(repr(os.environ.get('JPY_SESSION_NAME')))")
        outputs = []
        while not outputs:
            message = run_sync(client.get_iopub_msg)(timeout=30)
            if message["msg_type"] == "stream":
                outputs.append(message["content"]["text"])
        assert outputs == ["None\n"], "the kernel must not believe a JupyterLab frontend is attached"
    finally:
        client.stop_channels()
        shutdown(km)
    assert not folder.exists()
    assert "without encryption" not in capfd.readouterr().err
