"""RunLayout owns every path of a run folder; no module spells one out by hand."""

import re

from nycdata.params import PARAMS_DIR, REPO_ROOT, load_params
from nycdata.runs import RunLayout, cell_dir, run_root


def test_layout_of_a_run_and_its_cells(tmp_path):
    params = load_params(PARAMS_DIR / "fixture.yaml", overrides={"output_root": str(tmp_path), "run_name": "r"})
    layout = RunLayout.of(params)
    assert layout.root == run_root(params) == tmp_path / "r"
    assert layout.cell("tim", 3, fold=1).root == tmp_path / "r" / "tim" / "fold1" / "seed3"
    assert layout.cell("tim", 3).last_checkpoint == tmp_path / "r" / "tim" / "seed3" / "checkpoints" / "last.ckpt"
    assert cell_dir({**params, "variant": "tim", "seed": 3, "fold": 1}) == layout.cell("tim", 3, 1).root  # cv_folds 2
    assert cell_dir({**params, "variant": "tim", "seed": 3, "cv_folds": 0}) == layout.cell("tim", 3).root
    assert (layout.comparison.name, layout.thought_cache("tim").relative_to(layout.root).as_posix()) == (
        "comparison.json", "thought_cache/tim")


def test_an_unknown_path_names_the_known_ones(tmp_path):
    try:
        RunLayout(tmp_path).comparisons
    except AttributeError as err:
        assert "'comparisons'" in str(err) and "comparison" in str(err)
    else:
        raise AssertionError("an unknown path must fail")


RUN_FILE_NAMES = re.compile(r"""["'](checkpoints|best\.ckpt|last\.ckpt|train_summary\.json|metrics\.csv|per_chip\.csv|"""
                            r"""comparison\.json|test_metrics\.json|thought_cache|generated_lulc|bench\.json|folds\.csv|"""
                            r"""summary\.md|results\.csv|supplement|figures|html|params\.yaml)["'/]""")


def test_no_module_spells_out_a_run_path():  # (the CLI is left out: "supplement" is also a command's name)
    spelt = [f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}"
             for path in sorted((REPO_ROOT / "nycdata").rglob("*.py")) if path.name not in ("runs.py", "__main__.py")
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if RUN_FILE_NAMES.search(line) and not line.lstrip().startswith("#")]
    assert spelt == []
