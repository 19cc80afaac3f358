"""Shared fixtures: one small synthetic chip dataset per session, plus damageable copies of it."""

import shutil

import pytest

from nycdata import chips
from nycdata.fixture import FixtureConfig, make_fixture

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
