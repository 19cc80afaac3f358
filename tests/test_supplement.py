"""Supplementary material, model card and the dry-run-by-default publish step (never touching the network)."""

import json
import os
import shutil
import socket
import zipfile

import pytest
import yaml

from nycdata.study.supplement import CARD_FILE, build_supplement, publish, upload_plan


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
