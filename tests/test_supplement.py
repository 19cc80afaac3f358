"""Supplementary material, model card and the dry-run-by-default publish step (never touching the network)."""

import json
import math
import os
import re
import shutil
import socket
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from nycdata.runs import RunLayout
from nycdata.study.report import INDEX_FILE, write_summary
from nycdata.study.stats import no_interval_text
from nycdata.study.supplement import CARD_FILE, CARD_PAGE, build_supplement, publish, upload_plan


@pytest.fixture
def params(run):
    return yaml.safe_load((run / "params.yaml").read_text())


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test must never touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_supplement_is_self_contained(run, params):
    folder = build_supplement(params, log=lambda m: None)
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert {"summary.md", "results.csv", "comparison.json", "params.yaml", "versions.json", CARD_FILE,
            "figures/forest.png", "figures/per_class_delta.png", "html/04_evaluate.html"} <= names
    assert len([n for n in names if n.startswith("html/")]) == 8  # 01, 02, 03 x 2 variants x 2 folds, 04, 05
    assert json.loads((folder / "versions.json").read_text())["terratorch"] == "1.2.11"
    card = (folder / CARD_FILE).read_text()
    comparison = json.loads((run / "comparison.json").read_text())["tim_vs_baseline"]
    assert card.startswith("---\nlibrary_name: terratorch") and "## Reproduce" in card and "## Limitations" in card
    assert f"{comparison['delta_miou_pp']:+.2f} pp" in card and comparison["verdict"] in card
    with zipfile.ZipFile(run / "supplement.zip") as archive:
        assert CARD_FILE in archive.namelist() and "html/05_visualise_tim_seed42.html" in archive.namelist()


def test_publish_is_a_dry_run_without_flag_and_token(run, params):
    build_supplement(params, log=lambda m: None)
    logged = []
    lines = publish({**params, "hf_repo_id": "me/nyc-tim"}, token=None, log=logged.append)
    assert any(line.endswith("me/nyc-tim/README.md") for line in lines) and "dry run" in logged[0]
    assert publish({**params, "publish": True, "hf_repo_id": "me/nyc-tim"}, token=None, log=logged.append) == lines


def _copy_linking_checkpoints(src, dst):
    """copytree's copy function: checkpoints (60-100 MB each, only listed here, never written) become hard links."""
    if src.endswith(".ckpt"):
        try:
            return os.link(src, dst)
        except OSError:  # a file system without hard links: copy
            pass
    shutil.copy2(src, dst)


def test_checkpoint_uploaded_only_when_the_gate_says_publish(run, params, tmp_path, monkeypatch):
    copy = tmp_path / "nb"
    shutil.copytree(run, copy, copy_function=_copy_linking_checkpoints)
    local = {**params, "output_root": str(tmp_path), "hf_repo_id": "me/nyc-tim", "publish": True}
    build_supplement(local, log=lambda m: None)
    comparison_file = copy / "supplement" / "comparison.json"
    comparison = json.loads(comparison_file.read_text())
    for verdict, expect_ckpt in ((False, False), (True, True)):
        comparison["tim_vs_baseline"]["publish"] = verdict
        comparison_file.write_text(json.dumps(comparison))
        assert any(remote.endswith(".ckpt") for _, remote in upload_plan(local)) == expect_ckpt

    uploads = []

    class FakeApi:
        def __init__(self, token):
            assert token == "hf_test"

        def create_repo(self, repo_id, exist_ok):
            uploads.append(("create", repo_id))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id):
            uploads.append((path_in_repo, repo_id))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    publish(local, token="hf_test", log=lambda m: None)
    assert uploads[0] == ("create", "me/nyc-tim")
    assert {u[0] for u in uploads[1:]} == {"README.md", "comparison.json", "results.csv", "tim_fold0_seed42.ckpt",
                                           "tim_fold1_seed42.ckpt"}  # one model per fold


class _Links(HTMLParser):
    """Every href and src of a page."""

    def __init__(self):
        super().__init__()
        self.targets = []

    def handle_starttag(self, tag, attrs):
        self.targets += [value for name, value in attrs if name in ("href", "src") and value]


def relative_links(page: Path) -> set[str]:
    """The page's links to files next to it: web, data:, mailto: and same-page #anchors left out."""
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    targets = set()
    for target in parser.targets:
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or not parts.path:  # http(s):, data:, mailto:, //host, #anchor
            continue
        targets.add(unquote(parts.path))
    return targets


def broken_links(folder: Path, pages) -> list[str]:
    return sorted(f"{page.relative_to(folder)} -> {target}" for page in pages for target in relative_links(page)
                  if not (page.parent / target).exists())


def test_front_page_links_work_from_the_unzipped_archive_elsewhere(run, params, tmp_path):
    build_supplement(params, log=lambda m: None)
    unzipped = tmp_path / "reviewer"
    with zipfile.ZipFile(run / "supplement.zip") as archive:
        archive.extractall(unzipped)
    index = unzipped / INDEX_FILE
    pages = [index, unzipped / CARD_PAGE, *sorted((unzipped / "html").glob("*.html"))]
    assert len(pages) == 10 and all(page.is_file() for page in pages)
    assert broken_links(unzipped, pages) == []
    # the front page reaches every file of the supplement: notebooks, all figures, data, card and versions
    files = {p.relative_to(unzipped).as_posix() for p in unzipped.rglob("*") if p.is_file()} - {INDEX_FILE}
    assert {"versions.json", "results.csv", "comparison.json", "per_chip.csv", "params.yaml", CARD_PAGE} <= files
    assert files - relative_links(index) == set()
    page = index.read_text(encoding="utf-8")
    assert "<table>" in page and "<title>" in page and str(run) not in page
    # the run's own index.html (written with summary.md) links what the run folder holds, all of it relative
    assert broken_links(run, [run / INDEX_FILE]) == [] and str(run) not in (run / INDEX_FILE).read_text(encoding="utf-8")
    assert {f"html/{p.name}" for p in (run / "html").glob("*.html")} <= relative_links(run / INDEX_FILE)


def test_a_missing_interval_reads_the_same_in_summary_card_and_front_pages(run, params, tmp_path):
    copy = tmp_path / params["run_name"]
    copy.mkdir()
    for name in ("per_chip", "data_summary", "params_file"):
        shutil.copy2(getattr(RunLayout(run), name), getattr(RunLayout(copy), name))
    comparison = json.loads((run / "comparison.json").read_text())
    # one test parent, as an older run wrote it: NaN where today's runs write null
    comparison["tim_vs_baseline"].update(n_parents=1, ci95_pp=[math.nan, math.nan], parent_t_ci95_pp=[None, None],
                                         ci_excludes_zero=False, interval_excludes_zero=False, sign_flip_p=1.0,
                                         sign_flip_min_p=1.0)
    RunLayout(copy).comparison.write_text(json.dumps(comparison))
    local = {**params, "output_root": str(tmp_path)}
    write_summary(copy, local, [])
    supplement = build_supplement(local, log=lambda m: None)
    reports = [copy / "summary.md", copy / INDEX_FILE, supplement / CARD_FILE, supplement / CARD_PAGE,
               supplement / INDEX_FILE]
    texts = {path.relative_to(tmp_path).as_posix(): path.read_text(encoding="utf-8") for path in reports}
    assert {name: bool(re.search(r"\bnan\b", text, re.IGNORECASE)) for name, text in texts.items()} == dict.fromkeys(
        texts, False)
    assert {name: text.count(no_interval_text(1)) >= 2 for name, text in texts.items()} == dict.fromkeys(texts, True)
