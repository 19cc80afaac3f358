"""The report's figures keep titles, legends and labels inside the image: the saved PNG's frame is background."""

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: the tests draw off screen

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from nycdata.data.classes import NUM_CLASSES
from nycdata.data.metrics import CM_COLUMNS
from nycdata.runs import RunLayout
from nycdata.study import plots
from nycdata.study.evaluate import compare
from nycdata.study.report import save_figure, write_figures
from nycdata.study.stats import no_interval_text

FRAME_PX = 3
# the longest name compare() can give, and one longer still as a hand-named comparison of an older run would be
LONG_SINGLE_PARENT = "tim_ndvi_cached_vs_baseline_frozen_embed_fixed_split_single_test_parent"
VARIANTS = ("tim", "baseline", "tim_cached", "tim_ndvi_cached", "tim_s1_cached", "baseline_s1", "baseline_frozen_embed")


def frame_is_background(png, width: int = FRAME_PX, tolerance: float = 0.02) -> bool:
    """True when the outermost ``width`` pixels on every side are (near) white: nothing drawn reaches the edge."""
    image = imread(png)[..., :3]
    frame = np.concatenate([image[:width].reshape(-1, 3), image[-width:].reshape(-1, 3),
                            image[:, :width].reshape(-1, 3), image[:, -width:].reshape(-1, 3)])
    return bool((frame >= 1 - tolerance).all())


def synthetic_per_chip(parents: int = 4, chips: int = 2, seeds=(0, 1)) -> pd.DataFrame:
    """Per-chip confusions of every variant: mostly right, some noise, two folds of parents."""
    rng = np.random.default_rng(0)
    rows = []
    for variant in VARIANTS:
        for seed in seeds:
            for p in range(parents):
                for c in range(chips):
                    cm = rng.integers(0, 40, (NUM_CLASSES, NUM_CLASSES)) + np.diag(rng.integers(50, 200, NUM_CLASSES))
                    rows.append({"chip_id": f"nyc_p{p}_c{c}", "parent_id": f"p{p}", "fold": p % 2, "variant": variant,
                                 "seed": seed, **dict(zip(CM_COLUMNS, cm.ravel().tolist()))})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def per_chip():
    return synthetic_per_chip()


@pytest.fixture(scope="module")
def comparison(per_chip):
    """Every comparison compare() makes of the synthetic run, plus a long-named one without intervals."""
    result = compare(per_chip, n_boot=50)
    single = {**result["tim_vs_baseline"], "n_parents": 1, "ci95_pp": [None, None], "parent_t_ci95_pp": [None, None],
              "ci_excludes_zero": False, "parent_t_excludes_zero": False, "interval_excludes_zero": False}
    return {**result, LONG_SINGLE_PARENT: single}


def test_every_report_figure_fits_its_frame(tmp_path, per_chip, comparison):
    agreement = per_chip[["chip_id"]].drop_duplicates().assign(thought_agreement=np.linspace(0.1, 0.9, 8))
    agreement.to_csv(RunLayout(tmp_path).thoughts_per_chip, index=False)
    written = write_figures(tmp_path, per_chip, comparison)
    assert {p.name for p in written} == {"forest.png", "per_class_delta.png", "gain_vs_thought_agreement.png"}
    assert [p.name for p in written if not frame_is_background(p)] == []


def test_the_frame_check_sees_a_title_wider_than_its_figure(tmp_path):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_title("TiM effect with 95 % intervals over test parents: " + LONG_SINGLE_PARENT, fontsize=12)
    fig.savefig(tmp_path / "plain.png", dpi=110)                  # the figure's own size: the title is cut
    save_figure(fig, tmp_path / "report.png")
    plt.close(fig)
    assert not frame_is_background(tmp_path / "plain.png")
    assert frame_is_background(tmp_path / "report.png")
    assert imread(tmp_path / "report.png").shape[1] > imread(tmp_path / "plain.png").shape[1]


def test_forest_marks_a_missing_interval_as_the_tables_do(comparison):
    fig = plots.forest(comparison)
    texts = [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    assert texts == [no_interval_text(1)] * 2  # pooled and per-parent row of the single-parent comparison
