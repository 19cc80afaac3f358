"""`python -m nycdata run` front end: parameter errors and missing data fail before any notebook runs."""

from nycdata.__main__ import main
from nycdata.params import PARAMS_DIR, load_params
from nycdata.pipeline import notebook_steps


def test_run_rejects_misspelt_parameter(tmp_path, capsys):
    assert main(["run", "-f", str(PARAMS_DIR / "fixture.yaml"), "-p", "batchsize", "2",
                 "-p", "output_root", str(tmp_path / "out")]) == 2
    assert "did you mean 'batch_size'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_without_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["run", "-p", "data_root", str(tmp_path / "none"), "-p", "output_root", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds no chip dataset" in err and "params/fixture.yaml" in err


def test_list_overrides_are_parsed_as_yaml_and_variants_checked_first(tmp_path, capsys):
    assert main(["run", "-p", "variants", "[baseline, timm]", "-p", "data_root", str(tmp_path),
                 "-p", "output_root", str(tmp_path / "out")]) == 2
    assert "variant 'timm' unknown; valid variants: baseline, tim" in capsys.readouterr().err


def test_chain_runs_each_variant_then_evaluates():
    params = load_params(overrides={"variants": ["baseline", "tim_s1", "tim"]})
    assert notebook_steps(params) == [
        ("01_load_data", {}), ("02_smoke", {}), ("03_finetune", {"variant": "baseline"}),
        ("03_finetune", {"variant": "tim_s1"}), ("03_finetune", {"variant": "tim"}), ("04_evaluate", {}),
        ("05_visualise_tim", {})]
    assert ("05_visualise_tim", {}) not in notebook_steps({**params, "variants": ["baseline"]})
