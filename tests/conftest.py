"""Shared fixtures: one small synthetic chip dataset per session, plus damageable copies of it."""

import shutil

import pytest

from nycdata.data import chips
from nycdata.data.fixture import FixtureConfig, make_fixture

SMALL_FIXTURE = FixtureConfig(chips=12, size=32, timesteps=2, seed=0)


@pytest.fixture(scope="session")
def small_fixture_config():
    return SMALL_FIXTURE


@pytest.fixture(scope="session")
def pristine_fixture_dir(tmp_path_factory):
    """The session's fixture dataset. Read it, never change it: copy it with ``fixture_copy``."""
    return make_fixture(tmp_path_factory.mktemp("pristine") / "fx", SMALL_FIXTURE)


@pytest.fixture(scope="session")
def pristine_index(pristine_fixture_dir):
    return chips.read_index(pristine_fixture_dir)


@pytest.fixture
def fixture_copy(pristine_fixture_dir, tmp_path):
    """A private copy of the session fixture that a test may damage."""
    return shutil.copytree(pristine_fixture_dir, tmp_path / "fx")


# --- the notebook chain, run once per session for tests/test_notebooks.py and tests/test_supplement.py
CHAIN_CHIPS, CHAIN_SIZE, CHAIN_TIMESTEPS = 16, 32, 2


@pytest.fixture(scope="session")
def shared_kernel():
    """One Jupyter kernel for the session's notebook runs: terratorch and Lightning are imported once."""
    from nycdata.study.notebooks import SharedKernel

    with SharedKernel() as kernel:
        yield kernel


@pytest.fixture(scope="session")
def run(tmp_path_factory, shared_kernel):
    """Run folder of `run_pipeline` on a fresh fixture (tiny model, 2 epochs), executed from another cwd."""
    import os

    from nycdata.params import PARAMS_DIR, load_params
    from nycdata.study.chain import run_pipeline

    base = tmp_path_factory.mktemp("chain")
    params = load_params(PARAMS_DIR / "fixture.yaml", overrides={
        "output_root": str(base / "outputs"), "data_root": str(base / "data"), "run_name": "nb",
        "fixture_chips": CHAIN_CHIPS, "fixture_size": CHAIN_SIZE, "bootstrap_samples": 200})
    cwd, threads = os.getcwd(), os.environ.get("OMP_NUM_THREADS")
    os.chdir(base)  # paths come from parameters, never from the working directory
    # one CPU thread, as each of test_launch.py's two concurrent cells gets on 2 cores: float sums then add up in
    # the same order, so the launched grid must reproduce this run's comparison.json exactly
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return run_pipeline(params, kernel=shared_kernel, log=lambda message: None)
    finally:
        os.chdir(cwd)
        os.environ.pop("OMP_NUM_THREADS") if threads is None else os.environ.update(OMP_NUM_THREADS=threads)
