"""`python -m nycdata run` front end: parameter errors and missing data fail before any notebook runs."""

from nycdata.__main__ import main
from nycdata.params import PARAMS_DIR, load_params
from nycdata.study.chain import notebook_steps


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


def test_chain_runs_each_fold_seed_and_variant_then_evaluates():
    params = load_params(overrides={"variants": ["baseline", "tim_s1", "tim"], "seeds": [3, 4], "cv_folds": 2})
    steps = notebook_steps(params)
    assert [(s.notebook, s.parameters) for s in steps] == [
        ("01_load_data", {}), ("02_smoke", {}),
        *[("03_finetune", {"variant": v, "seed": seed, "fold": fold}) for fold in (0, 1) for seed in (3, 4)
          for v in ("baseline", "tim_s1", "tim")],
        ("04_evaluate", {}), ("05_visualise_tim", {"seed": 3})]
    assert steps[2].output == "baseline/fold0/seed3/train_summary.json" and steps[2].label == "03_finetune_baseline_seed3_fold0"
    fixed = notebook_steps({**params, "cv_folds": 0})
    assert fixed[2].parameters == {"variant": "baseline", "seed": 3} and fixed[2].output == "baseline/seed3/train_summary.json"
    assert len(fixed) == 2 + 6 + 2
    assert "05_visualise_tim" not in [s.notebook for s in notebook_steps({**params, "variants": ["baseline"]})]


def test_seeds_must_be_distinct():
    import pytest

    with pytest.raises(ValueError, match="no repeats"):
        notebook_steps(load_params(overrides={"seeds": [1, 1]}))
