"""Every path of a run folder, in one place: ``output_root/run_name/...``.

No other module joins a run folder's paths by hand; they ask :class:`RunLayout` (the run) or :class:`CellLayout`
(one fine-tune: a variant, seed and fold).

::

    <run>/params.yaml                        the run's parameters (the notebook chain)
    <run>/notebooks/, html/, figures/        executed notebooks, their HTML, the report's figures
    <run>/data_summary.json, folds.csv, s2_medians.csv, build_summary.json, smoke.json
    <run>/per_chip.csv, test_metrics.json, comparison.json, results.csv, thoughts.json, summary.md
    <run>/thought_cache/<online variant>/    cached thoughts (nycdata.data.thoughts)
    <run>/generated_lulc/                    tim_input's generated LULC
    <run>/bench.json, bench.md               the benchmark
    <run>/logs/                              the launcher's per-cell job logs (nycdata.study.launch)
    <run>/data/                              gpu-check's synthetic chips at the real shape
    <run>/set_aside/<cell path>/<time>/      a cell's files moved out of the way before it restarted
    <run>/supplement/, supplement.zip        the supplementary material
    <run>/<variant>/[fold<f>/]seed<k>/       one fine-tune: checkpoints/best.ckpt (+ last.ckpt until done), metrics.csv,
                                             train_summary.json, wall_time_s.txt, test_metrics.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from nycdata.params import resolve_path


@dataclass(frozen=True)
class CellLayout:
    """One fine-tune's folder."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def train_summary(self) -> Path:
        return self.root / "train_summary.json"  # written once the training finished

    @property
    def wall_time(self) -> Path:
        return self.root / "wall_time_s.txt"

    @property
    def test_metrics(self) -> Path:
        return self.root / "test_metrics.json"


@dataclass(frozen=True)
class RunLayout:
    """A run folder ``output_root/run_name``: every result of a run lives below it."""
    root: Path

    @classmethod
    def of(cls, params: Mapping) -> "RunLayout":
        return cls(resolve_path(params["output_root"]) / params["run_name"])

    def cell(self, variant: str, seed: int, fold: int | None = None) -> CellLayout:
        """``<run>/<variant>/seed<k>``, or ``<run>/<variant>/fold<f>/seed<k>`` under cross-validation."""
        folder = self.root / variant
        if fold is not None:
            folder = folder / f"fold{fold}"
        return CellLayout(folder / f"seed{seed}")

    def cell_of(self, params: Mapping) -> CellLayout:
        """The cell of ``params``' variant, seed and (with ``cv_folds`` > 0) fold."""
        return self.cell(params["variant"], params["seed"], params["fold"] if params["cv_folds"] else None)

    def thought_cache(self, online_variant: str) -> Path:
        return self.root / "thought_cache" / online_variant

    def __getattr__(self, name: str) -> Path:
        try:
            return self.root / _FILES[name]
        except KeyError:
            raise AttributeError(f"RunLayout has no path {name!r}; known: {sorted(_FILES)}") from None


_FILES = {  # RunLayout attribute -> path below the run folder
    "params_file": "params.yaml", "notebooks": "notebooks", "html": "html", "figures": "figures",
    "data_summary": "data_summary.json", "folds": "folds.csv", "s2_medians": "s2_medians.csv",
    "build_summary": "build_summary.json", "smoke": "smoke.json", "per_chip": "per_chip.csv",
    "test_metrics": "test_metrics.json", "comparison": "comparison.json", "results": "results.csv",
    "thoughts": "thoughts.json", "thoughts_per_chip": "thoughts_per_chip.csv", "summary": "summary.md",
    "generated_lulc": "generated_lulc", "bench_json": "bench.json", "bench_md": "bench.md",
    "supplement": "supplement", "supplement_zip": "supplement.zip", "cache_agreement": "cache_agreement",
    "set_aside": "set_aside", "logs": "logs", "synthetic_data": "data",
}


def run_root(params: Mapping) -> Path:
    """The run folder ``output_root/run_name``."""
    return RunLayout.of(params).root


def cell_dir(params: Mapping) -> Path:
    """The folder of ``params``' cell (variant, seed and, under cross-validation, fold)."""
    return RunLayout.of(params).cell_of(params).root
