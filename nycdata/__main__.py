"""Command line of the reproduction package: ``python -m nycdata COMMAND --help`` for each command.

Each command imports its own stack inside its function: terratorch and Lightning take seconds to import, and
``validate``, ``fetch`` or ``build`` need neither.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml


def _log(message: str) -> None:
    print(message, flush=True)


def cmd_fixture(args) -> int:
    from nycdata.data.fixture import FixtureConfig, make_fixture

    config = FixtureConfig(chips=args.chips, size=args.size, timesteps=args.timesteps, seed=args.seed)
    out = make_fixture(Path(args.out_dir), config, overwrite=args.overwrite)
    _log(f"fixture: wrote {config.chips} chips ({config.size} px, {config.timesteps} timesteps, seed {config.seed}) to {out}")
    return 0


def cmd_validate(args) -> int:
    from nycdata.data.validate import validate_dataset

    problems = validate_dataset(Path(args.data_dir), progress=_log)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        chips_hit = {p.chip_id for p in problems if p.chip_id}
        print(f"validate: {len(problems)} problem(s) in {len(chips_hit)} chip(s) of {args.data_dir}", file=sys.stderr)
        return 1
    _log(f"validate: {args.data_dir} is a valid chip dataset")
    return 0


def _parse_overrides(pairs: list[list[str]] | None) -> dict:
    """``-p key value`` pairs, values parsed as YAML like papermill does (``4`` -> int, ``[a, b]`` -> list)."""
    return {key: yaml.safe_load(value) for key, value in (pairs or [])}


def cmd_run(args) -> int:
    from nycdata.study.chain import run_pipeline

    params = _params(args)
    started = time.monotonic()
    resume = args.command == "study" or getattr(args, "resume", False)
    launcher = _launcher(args)
    from contextlib import nullcontext

    from nycdata.study.notebooks import SharedKernel

    with SharedKernel() if args.one_kernel else nullcontext() as kernel:
        run_dir = run_pipeline(params, overwrite=getattr(args, "overwrite", False), resume=resume or launcher is not None,
                               log=_log, kernel=kernel, launcher=launcher)
    _log(f"run: finished in {time.monotonic() - started:.0f} s; outputs in {run_dir}")
    return 0


def _launcher(args):
    if not getattr(args, "launcher", None):
        return None
    from nycdata.study.launch import Launcher

    return Launcher(args.launcher, max_parallel=args.max_parallel, partition=args.partition,
                    gpus_per_cell=args.gpus_per_cell, timeout_min=args.timeout_min, poll_s=args.poll_s)


def _add_chain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--one-kernel", action="store_true",
                   help="run every notebook in one kernel, reset before each (faster on small runs; default: a fresh "
                        "kernel per notebook)")
    p.add_argument("--launcher", choices=["local", "slurm", "debug"],
                   help="run the grid's fine-tunes as concurrent jobs through submitit: local (this machine, one GPU "
                        "or a share of the cores per cell), slurm (a job array), debug (the slurm path in this "
                        "process); default: one after another in this process. Implies --resume.")
    p.add_argument("--max-parallel", type=int, default=1, help="cells running at once (default 1)")
    p.add_argument("--partition", help="SLURM partition")
    p.add_argument("--gpus-per-cell", type=int, help="GPUs per cell (default: 1 on SLURM; locally 1 if CUDA is visible)")
    p.add_argument("--timeout-min", type=int, default=24 * 60, help="per-cell time limit in minutes (default 1440)")
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between job status checks (default 5)")


def _params(args):
    from nycdata.params import load_params

    return load_params(*args.params_file, overrides=_parse_overrides(args.param))


def cmd_export_config(args) -> int:
    from nycdata.study.export import config_yaml

    sys.stdout.write(config_yaml(_params(args)))
    return 0


def cmd_download_weights(args) -> int:
    from nycdata.model import weights
    from nycdata.model.variants import get_variant

    params = _params(args)
    for path in weights.download(params, get_variant(params["variant"])):
        _log(f"cached {path}")
    return 0


def cmd_supplement(args) -> int:
    from nycdata.study.supplement import build_supplement

    build_supplement(_params(args), log=_log)
    return 0


def cmd_publish(args) -> int:
    from huggingface_hub import get_token

    from nycdata.study.supplement import publish

    publish(_params(args), token=get_token(), log=_log)
    return 0


def cmd_build(args) -> int:
    from nycdata.sources.build import build_dataset

    params = _params(args)
    build_dataset(Path(args.sources), Path(args.out_dir), params, overwrite=args.overwrite, log=_log)
    return 0


def cmd_fetch(args) -> int:
    params = _params(args)
    out = Path(args.out_dir)
    common = dict(bbox=tuple(params["fetch_bbox"]), dry_run=args.dry_run, log=_log)
    window = dict(start=params["fetch_start"] or None, end=params["fetch_end"] or None)
    if args.source == "stac":
        from nycdata.sources.stac import fetch_stac

        fetch_stac(out, **common, **window, timesteps=params["timesteps"], max_cloud=params["max_cloud_cover"],
                   parent_px=params["parent_size_px"], s1_max_days=params["s1_max_days"],
                   catalog=params["stac_catalog"])
    elif args.source == "majortom":
        from nycdata.sources.majortom import fetch_majortom

        fetch_majortom(out, **common, **window, max_cloud=params["max_cloud_cover"])
    else:
        from nycdata.sources.worldcover import fetch_worldcover

        fetch_worldcover(out, **common)
    _log("fetch: dry run, nothing written" if args.dry_run else f"fetch: manifest {out / 'sources.csv'}")
    return 0


def cmd_synthetic_sources(args) -> int:
    from nycdata.sources.synthetic import SyntheticSourcesConfig, make_sources

    manifest = make_sources(Path(args.out_dir), SyntheticSourcesConfig(parents=args.parents, seed=args.seed))
    _log(f"synthetic sources: {manifest}")
    return 0


def cmd_bench(args) -> int:
    from nycdata.study.bench import markdown, run_bench, write_bench

    params = _params(args)
    result = run_bench(params, device=args.device, warmup=args.warmup, rounds=args.rounds, steps=args.steps, log=_log)
    paths = write_bench(params, result)
    _log(markdown(result))
    _log(f"bench: wrote {paths[0]} and {paths[1]}")
    return 0


def cmd_gpu_check(args) -> int:
    from nycdata.study.gpu_check import run_gpu_check

    run_gpu_check(args.params_file, _parse_overrides(args.param), chips=args.chips, size=args.size,
                  timesteps=args.timesteps, out=args.out, rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                  epochs=args.epochs, study_chips=args.study_chips, loader_seconds=args.loader_seconds, log=_log)
    return 0


def cmd_cache_check(args) -> int:
    from nycdata.study.cache_agreement import check_agreement

    result = check_agreement(_params(args), thought_seeds=args.thought_seeds, level=args.level, log=_log)
    return 0 if result["agree"] else 1


def cmd_lab(args) -> int:
    from nycdata.lab import run_lab

    return run_lab(port=args.port, ip=args.ip, log=_log)


def cmd_install_kernel(args) -> int:
    from nycdata.lab import KERNEL_NAME, install_kernel

    _log(f"install-kernel: Jupyter kernel {KERNEL_NAME!r} ({sys.executable}) in {install_kernel()}")
    return 0


def _add_params_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--params-file", action="append", default=[], help="params YAML (repeatable; later wins)")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"), help="override one parameter")


def _params_command(sub, name: str, help_text: str, func) -> argparse.ArgumentParser:
    """A subcommand driven by params files (``-f``) and overrides (``-p NAME VALUE``)."""
    p = sub.add_parser(name, help=help_text)
    _add_params_options(p)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nycdata", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fixture", help="write the synthetic, learnable fixture dataset")
    p.add_argument("out_dir")
    p.add_argument("--chips", type=int, default=16, help="number of chips (default 16)")
    p.add_argument("--size", type=int, default=64, help="chip size in pixels, multiple of 16 (default 64)")
    p.add_argument("--timesteps", type=int, default=2, help="timesteps per chip (default 2)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    p.set_defaults(func=cmd_fixture)

    p = sub.add_parser("validate", help="check a chip dataset; exit 1 and list every problem if any")
    p.add_argument("data_dir")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("build", help="build the chip dataset from a sources manifest, then validate it")
    p.add_argument("sources", help="sources.csv written by `fetch` (or by hand)")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty OUT_DIR")
    _add_params_options(p)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("fetch", help="download raw sources for the NYC AOI and write sources.csv (needs internet)",
                       description="stac: the default multi-date chain (Planetary Computer: S2 dates over the season, "
                       "S1 matched to them, DEM, WorldCover). majortom + worldcover: the original's single-date "
                       "sources. Dates from fetch_start/fetch_end, cloud from max_cloud_cover (-f/-p).")
    p.add_argument("source", choices=["stac", "majortom", "worldcover"])
    p.add_argument("out_dir")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would be fetched (parents/cells, dates, products, cloud %%, sizes); write nothing")
    _add_params_options(p)
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("synthetic-sources", help="write synthetic raw sources + sources.csv (offline stand-in for fetch)")
    p.add_argument("out_dir")
    p.add_argument("--parents", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synthetic_sources)

    p = sub.add_parser("lab", help="JupyterLab on the repository with the nycdata kernel; prints its URL, "
                       "Ctrl-C stops it")
    p.add_argument("--port", type=int, default=8888,
                   help="port (default 8888; a busy one moves to a free one nearby, 0 takes any free one)")
    p.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.set_defaults(func=cmd_lab)

    p = sub.add_parser("install-kernel", help="register this environment as the Jupyter kernel 'nycdata' "
                       "(the notebooks' kernel, for JupyterLab and papermill)")
    p.set_defaults(func=cmd_install_kernel)

    p = _params_command(sub, "run", "run the notebook chain for a params file into output_root/run_name", cmd_run)
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder instead of failing")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in its folder: finished cells are skipped, a stopped fine-tune resumes")
    _add_chain_options(p)
    p = _params_command(sub, "bench", "time train steps (baseline, tim, tim_cached), inference, thought caching, loader",
                        cmd_bench)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when visible (default)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after building each model (default 2)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds, variant order rotated (default 5)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant and round (default 2)")
    p = _params_command(sub, "gpu-check", "synthetic chips at the real shape: bench, thought caching and a short "
                        "fine-tune at the real model size; the study's projected time and disk (bench.json/bench.md)",
                        cmd_gpu_check)
    p.add_argument("--chips", type=int, default=64, help="synthetic chips (default 64)")
    p.add_argument("--size", type=int, default=None, help="chip size in px (default: the params' chip_size, 256)")
    p.add_argument("--timesteps", type=int, default=None, help="timesteps (default: the params' timesteps, 4)")
    p.add_argument("--out", default=None, help="output_root; the check writes into OUT/gpu_check (default: outputs)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved bench rounds (default 5)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after building each model (default 2)")
    p.add_argument("--epochs", type=int, default=2, help="epochs of the short baseline fine-tune (default 2)")
    p.add_argument("--study-chips", type=int, default=400,
                   help="chips of the real dataset when it is not at data_root to count (default 400)")
    p.add_argument("--loader-seconds", type=float, default=2.0, help="seconds to time the data loader (default 2)")
    p = _params_command(sub, "cache-check", "does the cached-thought twin of `variant` agree with online TiM at `seed`? "
                        "(online once per thought seed, cached once; exit 1 if not)", cmd_cache_check)
    p.add_argument("--thought-seeds", type=int, nargs="+", default=[0, 1, 2], help="online thought seeds (default 0 1 2)")
    p.add_argument("--level", type=float, default=0.95,
                   help="the cached run must fall in this prediction interval of the online runs (default 0.95)")
    p = _params_command(sub, "study", "the study grid (variants x seeds x folds): the same as `run --resume`", cmd_run)
    _add_chain_options(p)
    for name, help_text, func in (
        ("supplement", "pack the run's supplementary material (folder + zip) with its model card", cmd_supplement),
        ("publish", "upload the model card (+ TiM checkpoint if the gate says so); dry run by default", cmd_publish),
        ("export-config", "print a LightningCLI config for `terratorch fit --config`", cmd_export_config),
        ("download-weights", "fetch the TerraMind files a variant needs into the Hugging Face cache", cmd_download_weights),
    ):
        _params_command(sub, name, help_text, func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
