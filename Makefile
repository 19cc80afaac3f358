# Two entry points: `make test` and `make demo`. Each creates .venv when it is
# missing or older than requirements.lock / pyproject.toml, so a fresh clone
# needs nothing else; a second run does not reinstall.
# The first of Python 3.11, 3.12, 3.13 that runs (a pyenv shim of an inactive version does not; PYTHON=... overrides).
PYTHON ?= $(firstword $(foreach v,3.11 3.12 3.13,$(shell python$(v) -c 'import sys' >/dev/null 2>&1 && command -v python$(v))))
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-from-lock

PARAMS ?= params/nyc.yaml

.PHONY: test demo demo-original study gpu-check lab venv lock clean-outputs

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -n "$(PYTHON)" || { echo "no python3.11, python3.12 or python3.13 found: install one, or pass PYTHON=/path/to/python" >&2; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m nycdata install-kernel
	@touch $@

test: $(STAMP)
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m nycdata run -f params/fixture.yaml -p run_name demo --overwrite

# The original experiment's configuration, defects included (params/original.yaml), on the fixture's tiny model;
# cv_folds 0 because the original used one fixed split.
demo-original: $(STAMP)
	$(PY) -m nycdata run -f params/original.yaml -f params/fixture.yaml -p cv_folds 0 -p run_name demo_original --overwrite

# JupyterLab on this repository with the notebooks' kernel `nycdata` (this .venv); prints the URL, Ctrl-C stops it.
# LAB_PORT=... picks the port (a busy one moves to a free one).
LAB_PORT ?= 8888
lab: $(STAMP)
	$(PY) -m nycdata lab --port $(LAB_PORT)

# The variants x seeds grid of PARAMS; rerunning continues where it stopped.
study: $(STAMP)
	$(PY) -m nycdata study -f $(PARAMS)

# On a GPU box: synthetic chips at the real shape, bench + thought caching + a short fine-tune at base size,
# bench.json/bench.md naming the GPU, and the study's projected time and disk.
gpu-check: $(STAMP)
	$(PY) -m nycdata gpu-check

# Refresh the lock from the current .venv (after a deliberate dependency change).
lock: $(STAMP)
	{ echo "# Exact versions of a working environment (Python 3.11, x86_64). Regenerate with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^nycdata'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

clean-outputs:
	rm -rf outputs/fixture_data outputs/demo outputs/demo_original
