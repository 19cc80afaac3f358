"""Params: defaults from nyc.yaml, overrides, unknown and mistyped keys fail loudly, paths from the repo root."""

import pytest

from nycdata.params import DEFAULTS_FILE, PARAMS_DIR, REPO_ROOT, ParamError, load_params, resolve_path


def test_defaults_are_the_real_study():
    params = load_params()
    assert params["model_size"] == "base" and params["timesteps"] == 4 and params["batch_size"] == 8
    assert params["seed"] == 42 and "modalities" not in params  # a variant's inputs are the variant's, not a parameter
    assert params["pretrained"] is True and params["fixture"] is False


def test_fixture_file_overrides_a_subset():
    params = load_params(PARAMS_DIR / "fixture.yaml")
    assert params["fixture"] is True and params["model_size"] == "tiny" and params["timesteps"] == 2
    assert params["normalization"] == "terramind_v1"  # inherited from nyc.yaml


def test_overrides_win_and_keep_types():
    params = load_params(PARAMS_DIR / "fixture.yaml", overrides={"batch_size": 2, "run_name": "x"})
    assert params["batch_size"] == 2 and params["run_name"] == "x"


def test_misspelt_parameter_fails_with_suggestion():
    with pytest.raises(ParamError, match=r"'batchsize' \(did you mean 'batch_size'\?\)"):
        load_params(overrides={"batchsize": 4})


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model_sise: tiny\n")
    with pytest.raises(ParamError, match="mine.yaml.*model_sise"):
        load_params(path)


@pytest.mark.parametrize("key, value", [("batch_size", "eight"), ("fixture", 1), ("timesteps", 2.5), ("modalities", "S2L2A")])
def test_mistyped_values_fail(key, value):
    with pytest.raises(ParamError, match=key):
        load_params(overrides={key: value})


def test_int_is_accepted_for_a_float_parameter_but_not_the_reverse():
    assert load_params(overrides={"lr": 1})["lr"] == 1
    with pytest.raises(ParamError, match="max_epochs"):
        load_params(overrides={"max_epochs": 1.5})
    with pytest.raises(ParamError, match="resume"):
        load_params(overrides={"resume": 1})


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ParamError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_relative_paths_resolve_against_the_repo_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("outputs") == REPO_ROOT / "outputs"
    assert resolve_path(tmp_path / "x") == tmp_path / "x"
    assert DEFAULTS_FILE.is_file()


def test_an_unquoted_yaml_date_is_a_date_string(tmp_path):
    (tmp_path / "dates.yaml").write_text("fetch_start: 2021-05-01\n")
    assert load_params(tmp_path / "dates.yaml")["fetch_start"] == "2021-05-01"


def test_original_params_mark_every_defect_with_its_fix():
    """Every DEFECT line of params/original.yaml names the fix, a value the defaults differ from."""
    from nycdata.params import PARAMS_DIR, defaults

    lines = [line for line in (PARAMS_DIR / "original.yaml").read_text().splitlines() if "# DEFECT" in line]
    original, nyc = load_params(PARAMS_DIR / "original.yaml"), defaults()
    keys = [line.split(":")[0].strip() for line in lines]
    assert len(keys) >= 9 and all("Fix:" in line for line in lines)
    assert [k for k in keys if original[k] == nyc[k]] == []


def test_parameters_are_a_typed_frozen_object():
    from nycdata.params import Params

    params = load_params(PARAMS_DIR / "fixture.yaml")
    assert isinstance(params, Params) and params.model_size == params["model_size"] == "tiny"
    with pytest.raises(ParamError, match="frozen.*replace"):
        params.seed = 1
    changed = params.replace(seed=7, lr=1e-3)
    assert (changed.seed, changed.lr, params.seed) == (7, 1e-3, 42)
    with pytest.raises(ParamError, match=r"'sede' \(did you mean 'seed'\?\)"):
        params.replace(sede=7)
    with pytest.raises(ParamError, match="max_epochs"):
        params.replace(max_epochs="many")
    with pytest.raises(ParamError, match="max_epochs"):
        Params({**params, "max_epochs": "many"})  # a dict turned back into parameters is checked again
    assert type({**params}) is dict and dict(params) == {**params}


def test_params_file_parameter_reads_that_file_under_explicit_overrides():
    fixture = load_params(PARAMS_DIR / "fixture.yaml")
    chosen = load_params(overrides={"params_file": "params/fixture.yaml", "max_epochs": 20})
    assert chosen["params_file"] == "params/fixture.yaml" and chosen["max_epochs"] == 20  # the explicit value wins
    assert {k: v for k, v in chosen.items() if k not in ("params_file", "max_epochs")} == \
        {k: v for k, v in fixture.items() if k not in ("params_file", "max_epochs")}
    with pytest.raises(ParamError, match=r"parameter params_file: .*nope\.yaml not found.*'params/fixture\.yaml'"):
        load_params(overrides={"params_file": "params/nope.yaml"})


def test_non_default_is_what_a_run_changed_and_keeps_unknown_names_for_the_notebook():
    from nycdata.params import non_default

    params = load_params(PARAMS_DIR / "fixture.yaml", overrides={"run_name": "x"})
    changed = non_default({**params, "varaint": "tim"})
    assert changed["run_name"] == "x" and changed["model_size"] == "tiny" and changed["varaint"] == "tim"
    assert "split_seed" not in changed and "normalization" not in changed  # fixture.yaml keeps nyc's values
    del changed["varaint"]
    assert dict(load_params(overrides=changed)) == dict(params)  # injecting only the changes gives the same run
