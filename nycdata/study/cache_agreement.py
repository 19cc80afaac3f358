"""Does a ``*_cached`` variant learn what its online TiM twin learns? The evidence for using cached thoughts.

What the two runs share, by construction and by test (tests/test_train.py, tests/test_thought_cache.py): with one
training seed (and fold) they start from the same weights, see the same chips in the same order with the same D4
transforms and the same dropout (``EpochDraws``, ``BatchSeeds``, ``isolate_thought_rng``), and think with the same
generator; a cached thought, fed back, gives bit-identical encoder features to the online forward that produced it.
What differs is only which thoughts they read: online TiM samples a fresh thought in every step, the cached run
draws one of ``thought_cache_samples`` samples per chip and transform per epoch, generated once on the training
device under the training precision (per chip, sample and ``thought_seed``).

What the check shows: the online variant is fine-tuned once per ``thought_seed``; the spread of those test mIoUs
is the spread of thought sampling, and the cached run must land where one more online run would: inside the
``level`` (95 %) prediction interval ``mean +- t(n-1) * sd * sqrt(1 + 1/n)`` of the n online runs.

What it cannot show: equivalence. "Agree" means no detectable difference at this interval's width, which is wide
with few thought seeds (and with random weights, where thoughts barely matter); the width is reported, read it. It
checks one training seed and fold, not the study's average. It cannot tell whether a few cached samples per chip
suffice for effects that need many distinct thoughts over many epochs, beyond what shows in the final mIoU.

The check reuses the study's finished cells (``<run>/<variant>/[fold<f>/]seed<k>`` with ``k = params['seed']``,
at the params' ``thought_seed``) and trains every other run into ``<run>/cache_agreement/thought_seed<t>/``,
out of the study's grid. The verdict goes to ``<run>/cache_agreement/<cached variant>[_fold<f>]_seed<k>.json``.
Finished trainings and their test metrics are reused, so an interrupted check continues where it stopped
and another ``level`` costs no retraining.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from nycdata.data.dataset import prepare_dataset
from nycdata.io import write_json
from nycdata.model.variants import VARIANTS, Variant, cached_twin, get_variant
from nycdata.params import Params
from nycdata.runs import CellLayout, RunLayout, cell_dir
from nycdata.study.evaluate import FinishedRun, test_run
from nycdata.study.train import fine_tune, variant_datamodule



def result_path(params: Mapping, cached: Variant) -> Path:
    """``<run>/cache_agreement/<cached variant>[_fold<f>]_seed<k>.json``: one verdict per pair, fold and training seed."""
    fold = f"_fold{params['fold']}" if params["cv_folds"] else ""
    return RunLayout.of(params).cache_agreement / f"{cached.name}{fold}_seed{params['seed']}.json"


def cached_pair(variant_name: str) -> tuple[Variant, Variant]:
    """(online TiM variant, its ``*_cached`` twin) for either name of the pair."""
    online = get_variant(get_variant(variant_name).online)
    twin = cached_twin(online.name)
    if twin is None:
        pairs = ", ".join(v.online for v in VARIANTS.values() if v.cached)
        raise ValueError(f"variant {variant_name!r} has no cached twin; set variant to one of: {pairs} (e.g. -p variant tim)")
    return online, get_variant(twin)


def check_agreement(params: Mapping, thought_seeds: Sequence[int] = (0, 1, 2), level: float = 0.95,
                    log: Callable[[str], None] = print) -> dict:
    """Fine-tune the online variant once per thought seed and the cached twin once (seed ``params['seed']``)."""
    online, cached = cached_pair(params["variant"])
    if len(set(thought_seeds)) < 2:
        raise ValueError(f"thought_seeds {list(thought_seeds)}: the spread of thought sampling needs at least 2 distinct seeds")

    prepare_dataset(params, log)
    online_miou = [_fine_tune_and_test(_cell_params(params, online, t), log) for t in thought_seeds]
    cached_miou = _fine_tune_and_test(_cell_params(params, cached, params["thought_seed"]), log)
    result = {"online_variant": online.name, "cached_variant": cached.name, "seed": params["seed"],
              "thought_seeds": list(thought_seeds), "online_miou": online_miou, "cached_miou": cached_miou,
              **prediction_interval(online_miou, level)}
    result["difference"] = cached_miou - result["online_mean"]
    result["agree"] = bool(result["interval"][0] <= cached_miou <= result["interval"][1])
    write_json(result_path(params, cached), result)
    log(agreement_line(result))
    return result


def prediction_interval(values: Sequence[float], level: float) -> dict:
    """Where one more draw like ``values`` falls with probability ``level`` (Student t, n - 1 degrees of freedom)."""
    from scipy import stats

    if not 0 <= level < 1:
        raise ValueError(f"level {level}: must be in [0, 1), e.g. 0.95")
    n, mean, sd = len(values), float(np.mean(values)), float(np.std(values, ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd * (1 + 1 / n) ** 0.5
    return {"online_mean": mean, "thought_spread_sd": sd, "level": level, "interval": [mean - half, mean + half]}


def agreement_line(result: Mapping) -> str:
    verdict = "agree" if result["agree"] else "DISAGREE"
    return (f"cache check ({result['cached_variant']} vs {result['online_variant']}, seed {result['seed']}): "
            f"cached mIoU {result['cached_miou']:.4f}, online {result['online_mean']:.4f} +- {result['thought_spread_sd']:.4f} "
            f"(sd over thought seeds {result['thought_seeds']}); difference {result['difference']:+.4f}; "
            f"{result['level']:.0%} prediction interval [{result['interval'][0]:.4f}, {result['interval'][1]:.4f}] -> {verdict}")


def _cell_params(params: Mapping, variant: Variant, thought_seed: int) -> dict:
    """Params of one training: the study's finished cell when it is this one, else a side run that stays out of the study."""
    cell = Params(params).replace(variant=variant.name, thought_seed=thought_seed)
    if thought_seed == params["thought_seed"] and CellLayout(cell_dir(cell)).train_summary.is_file():
        return cell
    return cell.replace(output_root=str(RunLayout.of(params).cache_agreement), run_name=f"thought_seed{thought_seed}")


def _fine_tune_and_test(params: Mapping, log: Callable[[str], None]) -> float:
    """Fine-tune (or continue, or reuse) one cell and return its test mIoU."""
    run = FinishedRun(params["variant"], params["seed"], cell_dir(params), params["fold"] if params["cv_folds"] else None)
    log(f"cache check: {run.variant} with thought_seed {params['thought_seed']} in {run.path}")
    fine_tune(params, resume=True, log=log)
    if not CellLayout(run.path).test_metrics.is_file():  # written last, once per finished training
        test_run(run, params, variant_datamodule(params, get_variant(run.variant), log))
    return float(json.loads(CellLayout(run.path).test_metrics.read_text())["miou"])
