"""The two ways a person meets the study outside the command line, checked end to end as they would meet them.

1. ``make lab``: the JupyterLab that ``python -m nycdata lab`` starts offers the ``nycdata`` kernel as default and runs
   ``notebooks/01_load_data.ipynb`` cell by cell with one edit (``params_file`` pointing at the fixture), as a reader
   would with "Run All"; the Lab page itself loads in headless Chromium.
2. The supplement of a finished run: every page of the unzipped ``supplement.zip`` opens offline in headless Chromium
   with its images drawn, no error output shown and no console error.

The browser parts skip where Chromium is missing (.ci/run installs it).
"""

import json
import os
import sys
import time
import zipfile
from urllib.parse import unquote, urlsplit

import pytest
import requests
import yaml

from nycdata.params import PARAMS_DIR
from nycdata.study.supplement import build_supplement

from browser_tools import NO_CHROMIUM, Chromium, KernelChannel, LabProcess, chromium_path

NOTEBOOK = "notebooks/01_load_data.ipynb"
PARAMS_FILE_LINE = "params_file: str = ''"
# nbconvert's lab template asks every page for require.js and MathJax from this CDN. The notebooks hold no LaTeX
# and no widgets, so offline (as here: Chromium resolves no host names) a page loses nothing without them.
NBCONVERT_CDN = ("https://cdnjs.cloudflare.com/ajax/libs/require.js/",
                 "https://cdnjs.cloudflare.com/ajax/libs/mathjax/")

needs_chromium = pytest.mark.skipif(chromium_path() is None, reason=NO_CHROMIUM)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """``python -m nycdata lab --port 0``, the command behind ``make lab``; stopped with SIGTERM afterwards, which
    must end it cleanly (exit 0, server gone)."""
    server = LabProcess(tmp_path_factory.mktemp("lab"))
    yield server
    assert server.stop() == 0, server.log_file.read_text()[-3000:]
    assert server.stdout[-1] == "JupyterLab: stopped"
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.base_url}/api/status", timeout=5)


def _fixture_params_file(tmp_path):
    """params/fixture.yaml with every write under ``tmp_path``, so running the notebook leaves the repo alone."""
    params = yaml.safe_load((PARAMS_DIR / "fixture.yaml").read_text())
    params |= {"output_root": str(tmp_path / "outputs"), "data_root": str(tmp_path / "fixture_data")}
    path = tmp_path / "fixture.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def _with_params_file(notebook: dict, params_file) -> list[str]:
    """The notebook's code cells, the one edit made: ``params_file`` in the parameters cell set to ``params_file``."""
    cells = [cell["source"] for cell in notebook["cells"] if cell["cell_type"] == "code"]
    tagged = [i for i, cell in enumerate(c for c in notebook["cells"] if c["cell_type"] == "code")
              if "parameters" in cell["metadata"].get("tags", [])]
    assert len(tagged) == 1, f"{NOTEBOOK}: {len(tagged)} cells tagged parameters"
    lines = cells[tagged[0]].split("\n")
    hits = [i for i, line in enumerate(lines) if line.startswith(PARAMS_FILE_LINE)]
    assert len(hits) == 1, f"{NOTEBOOK}: its parameters cell has no line starting {PARAMS_FILE_LINE!r}"
    lines[hits[0]] = lines[hits[0]].replace(PARAMS_FILE_LINE, f"params_file: str = {str(params_file)!r}", 1)
    cells[tagged[0]] = "\n".join(lines)
    return cells


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_make_lab_runs_a_notebook_on_the_nycdata_kernel_with_one_edit(lab, tmp_path):
    assert lab.url.startswith(lab.base_url + "/lab/tree/notebooks?token=") and len(lab.token) >= 32
    assert requests.get(f"{lab.base_url}/api/status", timeout=10).status_code == 403, "the token must be required"
    specs = lab.api("GET", "/api/kernelspecs").json()
    assert specs["default"] == "nycdata"
    assert specs["kernelspecs"]["nycdata"]["spec"]["argv"][0] == sys.executable, "the kernel is this environment"

    notebook = lab.api("GET", f"/api/contents/{NOTEBOOK}", params={"content": 1}).json()["content"]
    cells = _with_params_file(notebook, _fixture_params_file(tmp_path))
    session = lab.api("POST", "/api/sessions", json={"path": NOTEBOOK, "name": "01_load_data.ipynb",
                                                     "type": "notebook", "kernel": {"name": "nycdata"}}).json()
    assert session["kernel"]["name"] == "nycdata"
    channel = KernelChannel(lab, session["kernel"]["id"])
    try:
        probe = channel.execute("import os, sys; print(os.getpid(), sys.prefix)", timeout=120)
        pid, prefix = probe.stdout.split()
        assert prefix == sys.prefix
        for i, source in enumerate(cells):
            result = channel.execute(source, timeout=300)
            shown = [f"{e['content']['ename']}: {e['content']['evalue']}" for e in result.errors]
            assert not shown and result.reply_status == "ok", f"code cell {i} failed: {shown}\n{source}"
            assert result.stderr == "", f"code cell {i} wrote to stderr:\n{result.stderr}\n{source}"
    finally:
        channel.close()
        lab.api("DELETE", f"/api/sessions/{session['id']}")

    summary = json.loads((tmp_path / "outputs" / "fixture" / "data_summary.json").read_text())
    assert summary["n_chips"] == yaml.safe_load((PARAMS_DIR / "fixture.yaml").read_text())["fixture_chips"]
    assert lab.api("GET", "/api/sessions").json() == []
    deadline = time.monotonic() + 30
    while _pid_alive(int(pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _pid_alive(int(pid)), "deleting the session must stop its kernel"


@needs_chromium
def test_the_lab_page_loads_in_chromium(lab, tmp_path):
    browser = Chromium(tmp_path / "profile")
    try:
        browser.load(lab.url)
        listed = browser.wait_for("[...document.querySelectorAll('.jp-DirListing-item')]"
                                  ".some(item => item.textContent.includes('01_load_data.ipynb'))", timeout=90)
        problems = browser.problems()
    finally:
        browser.close()
    assert listed, "the Lab file browser did not list notebooks/01_load_data.ipynb"
    assert not problems, "\n".join(problems)


PAGE_CHECK = """(() => ({
  images: document.images.length,
  broken: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 120)),
  // nbconvert renders error outputs (tracebacks) and stderr streams alike with this mime type
  stderr: [...document.querySelectorAll('[data-mime-type="application/vnd.jupyter.stderr"]')]
            .map(e => e.innerText.slice(0, 500)),
  links: [...document.links].filter(a => a.protocol === 'file:').map(a => a.href.split('#')[0]),
}))()"""


@needs_chromium
def test_the_supplement_opens_offline_in_chromium(run, tmp_path):
    build_supplement(yaml.safe_load((run / "params.yaml").read_text()), log=lambda message: None)
    root = tmp_path / "supplement"
    with zipfile.ZipFile(run / "supplement.zip") as archive:
        archive.extractall(root)
    notebooks = sorted((root / "html").glob("*.html"))
    assert len(notebooks) >= 8
    pages = [root / "index.html"] * (root / "index.html").is_file() + notebooks
    browser = Chromium(tmp_path / "profile")
    found, images = {}, {}
    try:
        for page in pages:
            browser.load(page.as_uri())
            state = browser.evaluate(PAGE_CHECK)
            images[page.relative_to(root).as_posix()] = state["images"]
            problems = browser.problems()
            remote = [url for url in browser.requested() if not url.startswith(("file:", "data:"))]
            problems += [f"asks the network for {url}" for url in remote if not url.startswith(NBCONVERT_CDN)]
            problems = [p for p in problems if not any(cdn in p for cdn in NBCONVERT_CDN)]
            problems += [f"image not drawn: {src}" for src in state["broken"]]
            problems += [f"stderr or error output shown: {text}" for text in state["stderr"]]
            problems += [f"broken link: {href}" for href in state["links"] if not os.path.exists(_file_path(href))]
            if problems:
                found[page.relative_to(root).as_posix()] = problems
    finally:
        browser.close()
    assert not found, "\n".join(f"{page}: {problem}" for page, problems in found.items() for problem in problems)
    assert images["html/04_evaluate.html"] > 0, "the evaluation's figures must be in its page"


def _file_path(file_url: str) -> str:
    return unquote(urlsplit(file_url).path)
