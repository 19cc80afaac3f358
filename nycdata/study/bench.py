"""``python -m nycdata bench``: what decides how long the study takes, measured in one process on the same inputs.

**Interleaved rounds.** The three models (``baseline``, online ``tim``, ``tim_cached``) are built once, each warmed
up right after it is built, then timed in ``rounds`` rounds: in every round each variant runs ``steps`` train steps
(forward, loss, backward and the training optimizer's step: :func:`nycdata.study.summaries.time_train_step`),
``steps`` inference passes and, for ``baseline`` and ``tim_cached``, ``steps`` encoder-only forward+backward passes;
the order of the variants rotates from round to round. Load from other processes then hits every variant alike
instead of whichever ran while it lasted. Per variant the median over rounds of the per-round median is reported;
per ratio (``tim/baseline``, ``tim_cached/baseline``) the median over rounds of the *per-round* ratio with its
min, max and quartiles. When ``(max - min) / median`` exceeds :data:`SPREAD_LIMIT` the ratio is flagged "spread too
wide to conclude" (and with fewer than :data:`MIN_ROUNDS` rounds the spread is not judged at all).

**The floor.** ``tim_cached`` cannot cost what ``baseline`` costs: its encoder reads one more modality (the thought,
one token per patch), so at 256 px with S2+S1+DEM inputs each timestep has ``768 -> 1024`` tokens, while the
necks, UNet decoder, head, loss and optimizer cost the same. With a transformer layer of width ``d`` and MLP hidden
size ``h`` (``4d`` in TerraMind) costing ``C_layer(N) = N (4 d^2 + 2 d h) + 2 N^2 d`` multiply-adds on ``N``
tokens (``N (12 d^2 + 2 N d)`` for ``h = 4d``: qkv and output projections, MLP, attention scores and values), the
encoder of depth ``L`` costs ``C(N) = L C_layer(N)`` per timestep (terratorch's TemporalWrapper runs the encoder on
every timestep separately, so timesteps cancel in every ratio). With ``s_dec`` the measured share of the baseline
train step that is *not* the encoder's forward+backward (``1 - encoder-only step / whole step``, median over
rounds of the per-round value)::

    floor(tim_cached) = s_dec + (1 - s_dec) * C(N_cached) / C(N_base)

Online TiM additionally runs the frozen generator, forward only, on the input tokens: its encoder (depth ``L_g``)
on ``N_base`` tokens, the context projection, and its decoder (depth ``L_gd``) on ``M`` thought tokens with
cross-attention to the ``N_base`` context: ``G = L_g C_layer(N_base) + N_base d^2 + L_gd [M (4 d^2 + 2 d h) +
2 M^2 d + 2 M d^2 + 2 N_base d^2 + 2 M N_base d]`` (sampling, the logits projection and the tokenizer are left out).
A forward+backward pass costs about three forward passes, so the encoder's share of the step stands for
``3 C(N_base)`` and::

    floor(tim) = floor(tim_cached) + (1 - s_dec) * G / (3 C(N_base))

The floors assume wall time proportional to multiply-adds, which holds for large matrix products (a GPU at batch
8, 256 px) and less for small ones (the CPU at toy sizes, where fixed per-op costs dominate). ``bench.json`` gives
measured/floor per ratio and whether ``tim_cached`` is within :data:`FLOOR_TOLERANCE` of its floor.

Also per variant: inference time per chip, peak memory (on a GPU, CUDA's max allocated during the variant's turns
as if it were alone on the device: the other models' resident weights and optimizer states are subtracted; on the
CPU the growth of the process's resident set while the variant was built and warmed up, approximate), its weights
and optimizer state, FLOPs per chip and train step (``torch.utils.flop_counter``) and the top operations of one
profiled train step (self CPU time on the CPU, self device time on a GPU). Plus thought-caching time per chip and
data-loader throughput reading real chip files with the configured workers.

From those numbers and the dataset's split sizes it projects the study of the params (``variants`` x ``seeds``
x folds x ``max_epochs``), as configured and with every online TiM variant swapped for its ``*_cached`` twin.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from nycdata.data import chips
from nycdata.data.dataset import ChipDataset, NYCDataModule, prepare_dataset, split_spec
from nycdata.data.thoughts import THOUGHTS_KEY, tokens_to_map
from nycdata.io import write_json
from nycdata.model.factory import MODEL_SIZES
from nycdata.model.thinking import cached_samples, think_chip
from nycdata.model.tim import frozen_generator_keys
from nycdata.model.variants import cached_twin, get_variant
from nycdata.params import resolve_path
from nycdata.runs import RunLayout
from nycdata.study.summaries import time_train_step
from nycdata.study.train import build_task

VARIANTS = ("baseline", "tim", "tim_cached")
RATIOS = {"tim_over_baseline": "tim", "tim_cached_over_baseline": "tim_cached"}
ENCODER_TIMED = ("baseline", "tim_cached")  # encoder-only passes: the decoder share, and the encoder's own ratio
SPREAD_LIMIT = 0.15  # (max - min) / median of the per-round ratios above this: too wide to conclude
MIN_ROUNDS = 3  # fewer rounds: the spread is not judged
FLOOR_TOLERANCE = 1.1  # tim_cached "at its floor" when measured / floor <= this
TOP_OPS = 10


# --- out of memory: fail loudly, naming what to change -----------------------------------------------------------


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's "out of memory" RuntimeError."""
    text = str(err)
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and ("out of memory" in text.lower() or "DefaultCPUAllocator" in text))


@contextlib.contextmanager
def out_of_memory_guard(doing: str, variant: str, params: Mapping, chip_size: int | None = None) -> Iterator[None]:
    """Turn an out-of-memory error into a RuntimeError naming the variant, batch and chip size and what to lower."""
    try:
        yield
    except RuntimeError as err:
        if not is_out_of_memory(err):
            raise
        size = params["model_size"]
        smaller = MODEL_SIZES[MODEL_SIZES.index(size) - 1] if size in MODEL_SIZES[1:] else None
        batch = params["batch_size"]
        hint = f"-p batch_size {max(1, batch // 2)}" + (f" or -p model_size {smaller}" if smaller else "")
        pixels = f"{chip_size} px, " if chip_size else ""
        raise RuntimeError(
            f"out of memory while {doing} variant {variant} (batch_size {batch}, {pixels}{params['timesteps']} timesteps, "
            f"terramind_v1_{size}, precision {params['precision']}): use a smaller batch_size or model_size ({hint})"
            f" [{type(err).__name__}: {text_head(err)}]") from err


def text_head(err: BaseException, chars: int = 160) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= chars else text[:chars] + "..."


# --- the device -------------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is visible, else ``cpu``; ``cuda`` without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is visible")
    return device


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model (``/proc/cpuinfo``), with the core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def versions() -> dict:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "terratorch": version("terratorch"),
            "lightning": version("lightning"), "cuda": torch.version.cuda if torch.cuda.is_available() else None}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _median_seconds(fn, device: str, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _inputs(batch: dict, variant, device: str) -> dict:
    x = {m: v.to(device) for m, v in batch["image"].items() if m in variant.modalities}
    if variant.cached:  # ids in the vocabulary's range: timing does not depend on their values
        B, _, T, H, W = next(iter(x.values())).shape
        x[THOUGHTS_KEY] = tokens_to_map(torch.randint(0, 4000, (B, 1, T, H // 16, W // 16))).to(device)
    return x


# --- one model under test ---------------------------------------------------------------------------------------


@dataclass
class Arm:
    """One variant's model, training optimizer and inputs on the device, and what its turns measured."""

    name: str
    task: Any
    optimizer: Any
    batch: dict
    params: Mapping
    device: str
    rounds: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in (
        "train_step_s", "forward_s", "backward_s", "infer_s", "encoder_step_s")})
    peak_bytes: int = 0
    rss_growth_mb: float = 0.0

    @property
    def autocast(self):
        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=str(self.params["precision"]).startswith("bf16"))

    @property
    def chip_size(self) -> int:
        return int(self.batch["mask"].shape[-1])

    def guard(self, doing: str):
        return out_of_memory_guard(doing, self.name, self.params, self.chip_size)

    def train_steps(self, steps: int) -> dict:
        return time_train_step(self.task, self.batch, steps, 0, self.optimizer, self.params["precision"])

    def infer(self) -> None:
        with torch.no_grad(), self.autocast:
            self.task.model(dict(self.batch["image"]))

    def encoder_step(self) -> None:
        """Forward and backward of the encoder alone (what scales with the tokens), grads dropped after."""
        self.task.model.train()
        self.task.model.zero_grad(set_to_none=True)
        with self.autocast:
            features = self.task.model.encoder(dict(self.batch["image"]))
            loss = sum(f.float().mean() for f in features)
        loss.backward()
        self.task.model.zero_grad(set_to_none=True)

    def weights_bytes(self) -> int:
        """What a checkpoint holds of the model: the state dict's tensors (shared ones once) without TiM's frozen
        generator, which checkpoints leave out (``NYCSegmentationTask.on_save_checkpoint``)."""
        left_out = set(frozen_generator_keys(self.task))
        return sum({t.data_ptr(): t.numel() * t.element_size() for key, t in self.task.state_dict().items()
                    if isinstance(t, torch.Tensor) and key not in left_out}.values())

    def optimizer_bytes(self) -> int:
        """The optimizer's state (AdamW: two moments per trainable tensor)."""
        return sum({t.data_ptr(): t.numel() * t.element_size() for state in self.optimizer.state.values()
                    for t in state.values() if isinstance(t, torch.Tensor)}.values())

    def state_bytes(self) -> int:
        """Weights, buffers and optimizer state held on the device: what a full (resumable) checkpoint holds."""
        return self.weights_bytes() + self.optimizer_bytes()


def build_arm(params: Mapping, name: str, batch: dict, device: str, warmup: int) -> Arm:
    variant = get_variant(name)
    rss_before = _rss_mb()
    arm = Arm(name, None, None, {"image": _inputs(batch, variant, device), "mask": batch["mask"].to(device)}, params, device)
    with arm.guard("building"):
        arm.task = build_task(params, variant).to(device)
        configured = arm.task.configure_optimizers()  # the training optimizer (terratorch's AdamW, trainable only)
        arm.optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    with arm.guard("warming up"):
        arm.train_steps(max(warmup, 1))  # one step at least: the optimizer state exists from here on
        arm.task.model.eval()
        for _ in range(max(warmup, 1)):
            arm.infer()
        if name in ENCODER_TIMED:
            arm.encoder_step()
    arm.optimizer.zero_grad(set_to_none=True)
    arm.rss_growth_mb = _rss_mb() - rss_before
    return arm


def run_turn(arm: Arm, steps: int) -> None:
    """One round's turn of ``arm``: ``steps`` train steps, inference passes and (for ENCODER_TIMED) encoder passes."""
    device = arm.device
    if device == "cuda":  # the other models' resident tensors are not this variant's
        _sync(device)
        others = torch.cuda.memory_allocated() - arm.state_bytes()
        torch.cuda.reset_peak_memory_stats()
    with arm.guard("training"):
        timing = arm.train_steps(steps)
    for key in ("train_step_s", "forward_s", "backward_s"):
        arm.rounds[key].append(timing[key.replace("train_", "")])
    arm.task.model.eval()
    with arm.guard("inferring with"):
        arm.rounds["infer_s"].append(_median_seconds(arm.infer, device, 0, steps))
    if arm.name in ENCODER_TIMED:
        with arm.guard("training the encoder of"):
            arm.rounds["encoder_step_s"].append(_median_seconds(arm.encoder_step, device, 0, steps))
    arm.optimizer.zero_grad(set_to_none=True)  # grads freed: the next turn's model gets the memory
    if device == "cuda":
        _sync(device)
        arm.peak_bytes = max(arm.peak_bytes, torch.cuda.max_memory_allocated() - others)


def rotation(round_index: int, names: Sequence[str] = VARIANTS) -> list[str]:
    """The order of round ``round_index``: the variants rotated by one each round."""
    k = round_index % len(names)
    return [*names[k:], *names[:k]]


# --- statistics and the floor (pure functions) --------------------------------------------------------------------


def ratio_summary(numerators: Sequence[float], denominators: Sequence[float], limit: float = SPREAD_LIMIT,
                  min_rounds: int = MIN_ROUNDS) -> dict:
    """Median over rounds of the per-round ratio, its min/max/quartiles and spread = (max - min) / median."""
    per_round = [n / d for n, d in zip(numerators, denominators)]
    median = statistics.median(per_round)
    q1, q3 = (statistics.quantiles(per_round, n=4, method="inclusive")[i] for i in (0, 2)) if len(per_round) > 1 \
        else (per_round[0], per_round[0])
    spread = (max(per_round) - min(per_round)) / median
    if len(per_round) < min_rounds:
        verdict, conclusive = f"{len(per_round)} round(s): too few to judge the spread (need {min_rounds})", False
    elif spread > limit:
        verdict, conclusive = f"spread too wide to conclude ({spread:.0%} > {limit:.0%} of the median)", False
    else:
        verdict, conclusive = f"spread {spread:.0%} of the median (limit {limit:.0%})", True
    return {"median": median, "min": min(per_round), "max": max(per_round), "q1": q1, "q3": q3, "spread": spread,
            "spread_limit": limit, "per_round": per_round, "conclusive": conclusive, "verdict": verdict}


def layer_cost(tokens: float, dim: int, mlp_hidden: int | None = None) -> float:
    """Multiply-adds of one transformer encoder layer on ``tokens`` tokens: ``N (4 d^2 + 2 d h) + 2 N^2 d``
    (``N (12 d^2 + 2 N d)`` for ``h = 4 d``)."""
    hidden = 4 * dim if mlp_hidden is None else mlp_hidden
    return tokens * (4 * dim**2 + 2 * dim * hidden) + 2 * tokens**2 * dim


def encoder_cost(tokens: float, dim: int, depth: int, mlp_hidden: int | None = None) -> float:
    """``C(N) = depth * layer_cost(N)``: the encoder's forward multiply-adds per timestep."""
    return depth * layer_cost(tokens, dim, mlp_hidden)


def generator_cost(input_tokens: float, thought_tokens: float, dim: int, encoder_depth: int, decoder_depth: int,
                   mlp_hidden: int | None = None) -> float:
    """Forward multiply-adds of TiM's frozen generator per timestep: encoder on the inputs, context projection,
    decoder on the thought tokens with cross-attention to the inputs (sampling and logits left out)."""
    hidden = 4 * dim if mlp_hidden is None else mlp_hidden
    n, m = input_tokens, thought_tokens
    decoder_layer = (m * (4 * dim**2 + 2 * dim * hidden) + 2 * m**2 * dim  # self-attention and MLP
                     + 2 * m * dim**2 + 2 * n * dim**2 + 2 * m * n * dim)  # cross-attention: q/out, k/v, scores/values
    return encoder_depth * layer_cost(n, dim, hidden) + n * dim**2 + decoder_depth * decoder_layer


def cached_floor(decoder_share: float, base_tokens: float, cached_tokens: float, dim: int, depth: int,
                 mlp_hidden: int | None = None) -> float:
    """``s_dec + (1 - s_dec) * C(N_cached) / C(N_base)``: the least ``tim_cached / baseline`` can be."""
    ratio = encoder_cost(cached_tokens, dim, depth, mlp_hidden) / encoder_cost(base_tokens, dim, depth, mlp_hidden)
    return decoder_share + (1 - decoder_share) * ratio


def online_floor(decoder_share: float, base_tokens: float, cached_tokens: float, dim: int, depth: int,
                 generator: float, mlp_hidden: int | None = None) -> float:
    """The cached floor plus the generator's forward ``G`` against the encoder's forward+backward ``3 C(N_base)``."""
    return (cached_floor(decoder_share, base_tokens, cached_tokens, dim, depth, mlp_hidden)
            + (1 - decoder_share) * generator / (3 * encoder_cost(base_tokens, dim, depth, mlp_hidden)))


def _vit(task):
    """The TerraMind ViT inside the temporal wrapper (the module holding ``encoder_embeddings``)."""
    module = task.model.encoder
    while not hasattr(module, "encoder_embeddings"):
        module = module.encoder
    return module


def floor_report(arms: Mapping[str, Arm], decoder_shares: Sequence[float], ratios: Mapping[str, dict]) -> dict:
    """The floors of ``tim_cached`` and ``tim`` from the models' dims and token counts and the measured decoder share."""
    base, tim = _vit(arms["baseline"].task), _vit(arms["tim"].task)
    block = base.encoder[0]
    dim, depth, hidden = block.attn.qkv.in_features, len(base.encoder), block.mlp.fc1.out_features
    x = arms["baseline"].batch["image"]
    patch = next(iter(base.encoder_embeddings.values())).patch_size
    H, W = next(iter(x.values())).shape[-2:]
    per_modality = (H // patch[0]) * (W // patch[1])
    variant = get_variant("tim_cached")
    n_base = len(get_variant("baseline").modalities) * per_modality
    n_cached = (len(variant.modalities) + len(variant.thoughts)) * per_modality
    generator = tim.sampler.model
    g_block = generator.decoder[0]
    g_dim, g_hidden = g_block.self_attn.qkv.in_features, g_block.mlp.fc1.out_features
    g_cost = generator_cost(n_base, len(variant.thoughts) * per_modality, g_dim, len(generator.encoder),
                            len(generator.decoder), g_hidden)
    s_dec = min(max(statistics.median(decoder_shares), 0.0), 1.0)
    floors = {"tim_cached_over_baseline": cached_floor(s_dec, n_base, n_cached, dim, depth, hidden),
              "tim_over_baseline": online_floor(s_dec, n_base, n_cached, dim, depth, g_cost, hidden)}
    report = {
        "decoder_share": s_dec, "decoder_share_per_round": list(decoder_shares),
        "embed_dim": dim, "depth": depth, "mlp_hidden": hidden, "tokens_per_modality": per_modality,
        "tokens_per_timestep": {"baseline": n_base, "tim_cached": n_cached}, "timesteps": int(next(iter(x.values())).shape[2]),
        "encoder_cost_ratio": encoder_cost(n_cached, dim, depth, hidden) / encoder_cost(n_base, dim, depth, hidden),
        "generator": {"embed_dim": g_dim, "encoder_depth": len(generator.encoder), "decoder_depth": len(generator.decoder),
                      "mlp_hidden": g_hidden, "forward_cost_over_encoder_train": g_cost / (3 * encoder_cost(n_base, dim, depth, hidden))},
        "tim_cached": floors["tim_cached_over_baseline"], "tim": floors["tim_over_baseline"],
        "formula": "floor(tim_cached) = s_dec + (1 - s_dec) * C(N_cached) / C(N_base); "
                   "floor(tim) = floor(tim_cached) + (1 - s_dec) * G / (3 C(N_base)); "
                   "C(N) = depth * (N (4 d^2 + 2 d h) + 2 N^2 d)",
    }
    for key, floor in floors.items():
        ratios[key].update(floor=floor, measured_over_floor=ratios[key]["median"] / floor)
    ratios["tim_cached_over_baseline"]["within_floor_tolerance"] = (
        ratios["tim_cached_over_baseline"]["measured_over_floor"] <= FLOOR_TOLERANCE)
    ratios["tim_cached_over_baseline"]["floor_tolerance"] = FLOOR_TOLERANCE
    return report


# --- one step, looked at closely ------------------------------------------------------------------------------------


def profile_step(arm: Arm, top: int = TOP_OPS) -> dict:
    """The ``top`` operations of one train step by self time (CPU time on the CPU, device time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if arm.device == "cuda" else [])
    try:
        with arm.guard("profiling"), profile(activities=activities) as prof:
            arm.train_steps(1)
    except Exception as err:  # out of memory (raised by the guard) stops the bench; a profiler failure does not
        if "out of memory while" in str(err):
            raise
        return {"error": text_head(err)}
    finally:
        arm.optimizer.zero_grad(set_to_none=True)
    key = "self_device_time_total" if arm.device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    total = sum(getattr(e, key) for e in events) or 1.0
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return {"sort_by": key, "total_ms": total / 1e3,
            "ops": [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total}
                    for e in ranked]}


def _cpu_attention_flops() -> dict:
    """FLOP formulas for the CPU's fused attention, which torch's counter does not know (GPU kernels it does)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v))
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v))
    return mapping


def count_flops(arm: Arm) -> float:
    """FLOPs of one train step (forward, loss, backward; the optimizer's elementwise work left out) per chip."""
    from torch.utils.flop_counter import FlopCounterMode

    with arm.guard("counting the FLOPs of"), FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        time_train_step(arm.task, arm.batch, 1, 0, None, arm.params["precision"])
    arm.task.model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(arm.batch["mask"])


# --- throughput of the rest -----------------------------------------------------------------------------------------


def bench_loader(params: Mapping, min_seconds: float = 2.0) -> float:
    """Chips per second the train loader delivers (D4, configured workers), reading chip files from disk."""
    loader = NYCDataModule.from_params(params, pin_memory=torch.cuda.is_available()).train_dataloader()
    n_chips, started = 0, time.perf_counter()
    while True:
        for batch in loader:
            n_chips += len(batch["filename"])
        if time.perf_counter() - started >= min_seconds:
            break
    return n_chips / (time.perf_counter() - started)


def bench_thought_cache(params: Mapping, device: str, n_chips: int = 2, task=None) -> float:
    """Seconds per chip to think all 8 D4 transforms x the cached samples (the caching pass); ``task``: an online
    TiM task to think with (built when not given)."""
    task = (task or build_task(params, get_variant("tim")).to(device)).eval()
    dataset = ChipDataset(resolve_path(params["data_root"]), "train", get_variant("tim").modalities)
    with out_of_memory_guard("thinking with", "tim", params):
        think_chip(task, dataset[0], 1, params["thought_seed"], params["precision"])  # warm-up
        _sync(device)
        started = time.perf_counter()
        for i in range(min(n_chips, len(dataset))):
            think_chip(task, dataset[i], cached_samples(params), params["thought_seed"], params["precision"])
        _sync(device)
    return (time.perf_counter() - started) / min(n_chips, len(dataset))


# --- the benchmark --------------------------------------------------------------------------------------------------


def run_bench(params: Mapping, device: str = "auto", warmup: int = 2, rounds: int = 5, steps: int = 2,
              log: Callable[[str], None] = print, think_chips: int = 2, loader_seconds: float = 2.0,
              profile: bool = True, project: bool = True) -> dict:
    """Build the three models, warm each up, time them in ``rounds`` interleaved rounds of ``steps`` steps; then
    profile and count one step each, time thought caching (``think_chips`` chips; 0: not here) and the loader, and
    project the study (``project``). See the module docstring for what each number means."""
    device = resolve_device(device)
    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds {rounds} and steps {steps}: both must be at least 1")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    prepare_dataset(params, log, validate=False)
    batch = next(iter(NYCDataModule.from_params(params, num_workers=0, augment="none").train_dataloader()))
    result = {"device": device_name(device), "device_type": device, "versions": versions(),
              "torch_threads": torch.get_num_threads(), "model_size": params["model_size"],
              "batch_size": len(batch["mask"]), "chip_size": int(batch["mask"].shape[-1]), "timesteps": params["timesteps"],
              "precision": params["precision"],
              "method": {"rounds": rounds, "steps_per_round": steps, "warmup": warmup, "order": "rotated each round",
                         "spread_limit": SPREAD_LIMIT, "min_rounds": MIN_ROUNDS, "floor_tolerance": FLOOR_TOLERANCE,
                         "peak_memory": "CUDA max allocated, this model alone" if device == "cuda"
                         else "resident-set growth while built and warmed up (approximate)"},
              "variants": {}}
    started = time.monotonic()
    arms = {}
    for name in VARIANTS:
        arms[name] = build_arm(params, name, batch, device, warmup)
        log(f"bench: built and warmed up {name} ({time.monotonic() - started:.0f} s)")
    for r in range(rounds):
        order = rotation(r)
        for name in order:
            run_turn(arms[name], steps)
        per_round = ", ".join(f"{n} {arms[n].rounds['train_step_s'][-1]:.3f} s" for n in VARIANTS)
        log(f"bench: round {r + 1}/{rounds} ({' -> '.join(order)}): train step {per_round} ({time.monotonic() - started:.0f} s)")

    for name, arm in arms.items():
        numbers = {key: statistics.median(values) for key, values in arm.rounds.items() if values}
        numbers["infer_s_per_chip"] = numbers.pop("infer_s") / len(batch["mask"])
        weights, optimizer = arm.weights_bytes(), arm.optimizer_bytes()
        numbers.update(rounds_train_step_s=arm.rounds["train_step_s"], weights_mb=weights / 2**20,
                       optimizer_state_mb=optimizer / 2**20, state_mb=(weights + optimizer) / 2**20,
                       peak_mem_mb=(arm.peak_bytes / 2**20) if device == "cuda" else arm.rss_growth_mb)
        result["variants"][name] = numbers
    base = arms["baseline"].rounds
    result["ratios"] = {key: ratio_summary(arms[name].rounds["train_step_s"], base["train_step_s"])
                        for key, name in RATIOS.items()}
    for key in RATIOS:  # the keys other code reads: the median per-round ratio
        result[key] = result["ratios"][key]["median"]
    shares = [1 - e / s for e, s in zip(base["encoder_step_s"], base["train_step_s"])]
    result["floor"] = floor_report(arms, shares, result["ratios"])
    result["encoder_only_tim_cached_over_baseline"] = ratio_summary(
        arms["tim_cached"].rounds["encoder_step_s"], base["encoder_step_s"])["median"]

    for name, arm in arms.items():
        result["variants"][name]["flops_per_chip_step"] = count_flops(arm)
    if profile:
        result["top_ops"] = {name: profile_step(arm) for name, arm in arms.items()}
        log(f"bench: counted FLOPs and profiled one train step per variant ({time.monotonic() - started:.0f} s)")
    result["thought_cache_s_per_chip"] = (bench_thought_cache(params, device, think_chips, arms["tim"].task)
                                          if think_chips else None)
    del arms, arm
    if device == "cuda":
        torch.cuda.empty_cache()
    result["loader_chips_per_s"] = bench_loader(params, loader_seconds)
    v = result["variants"]
    result["gpu_chips_per_s_baseline"] = result["batch_size"] / v["baseline"]["train_step_s"]
    result["loader_over_consumption"] = result["loader_chips_per_s"] / result["gpu_chips_per_s_baseline"]
    if project:
        result["projection"] = project_study(params, result)
    log(f"bench: done in {time.monotonic() - started:.0f} s")
    return result


def timed_as(name: str) -> str:
    """The benchmarked variant whose step time stands in for ``name`` (inputs aside: S1-only runs cost less)."""
    variant = get_variant(name)
    return "tim_cached" if variant.cached else "tim" if variant.is_tim else "baseline"


def expected_split_counts(params: Mapping, n_chips: int) -> tuple[int, int, int]:
    """Train, val and test chips of one fold of an ``n_chips`` dataset under ``params``' split rules, on average:
    with K folds a fold tests 1/K and validates ``f_val / (f_train + f_val)`` of the rest; else the fractions."""
    train_f, val_f, test_f = params["split_fractions"]
    if params["cv_folds"]:
        test = n_chips / params["cv_folds"]
        val = (n_chips - test) * val_f / (train_f + val_f)
    else:
        test, val = n_chips * test_f / (train_f + val_f + test_f), n_chips * val_f / (train_f + val_f + test_f)
    return round(n_chips - test - val), round(val), round(test)


def project_study(params: Mapping, result: dict, counts: tuple[int, int, int] | None = None,
                  n_chips: int | None = None) -> dict:
    """Hours the study of ``params`` takes at the measured speeds: every epoch runs (early stopping only shortens).

    Chips per split come from the dataset at ``data_root`` (averaged over the folds), or from ``counts`` (train,
    val, test of one fold) and ``n_chips`` (every chip, for thought caching) when given."""
    folds = max(params["cv_folds"], 1)
    if counts is None:
        index = chips.read_index(resolve_path(params["data_root"]))
        n_chips = len(index)
        if params["cv_folds"]:  # chips per split averaged over the folds
            split_counts = chips.fold_roles(index, split_spec(params)).groupby("split")["chips"].sum() / folds
        else:
            split_counts = index["split"].value_counts()
        counts = tuple(round(float(split_counts.get(split, 0))) for split in chips.SPLITS)
    n_train, n_val, n_test = counts
    steps = -(-n_train // params["batch_size"])

    def cell_seconds(name: str) -> float:
        timing = result["variants"][timed_as(name)]
        epoch = steps * timing["train_step_s"] + n_val * timing["infer_s_per_chip"]
        test = n_test * timing["infer_s_per_chip"] * (params["thought_samples"] if get_variant(name).is_tim else 1)
        return params["max_epochs"] * epoch + test

    def study_hours(names) -> float:
        caching = n_chips * sum(get_variant(n).cached for n in names)  # every chip, once per run folder
        return (folds * len(params["seeds"]) * sum(map(cell_seconds, names))
                + caching * (result["thought_cache_s_per_chip"] or 0.0)) / 3600

    names = list(params["variants"])
    cached = [cached_twin(n) or n for n in names]
    return {"variants": names, "seeds": len(params["seeds"]), "folds": folds, "max_epochs": params["max_epochs"],
            "chips": n_chips, "train_chips": n_train, "val_chips": n_val, "test_chips": n_test,
            "steps_per_epoch": steps, "cells": folds * len(params["seeds"]) * len(names),
            "cell_s": {n: cell_seconds(n) for n in dict.fromkeys(names + cached)},
            "hours": study_hours(names), "variants_cached": cached, "hours_cached": study_hours(cached)}


# --- the report -----------------------------------------------------------------------------------------------------


def _ratio_line(label: str, ratio: dict) -> str:
    line = (f"- {label}: **{ratio['median']:.2f}x** (median of {len(ratio['per_round'])} per-round ratios; "
            f"min {ratio['min']:.2f}, IQR {ratio['q1']:.2f}-{ratio['q3']:.2f}, max {ratio['max']:.2f}); {ratio['verdict']}.")
    if "floor" in ratio:
        line += f" Floor {ratio['floor']:.2f}x: measured/floor = {ratio['measured_over_floor']:.2f}"
        if "within_floor_tolerance" in ratio:
            line += (f", {'within' if ratio['within_floor_tolerance'] else 'NOT within'} "
                     f"{ratio['floor_tolerance']:.1f}x of the floor")
        line += "." if ratio["conclusive"] else " (the spread leaves this open)."
    return line


def markdown(result: dict) -> str:
    versions_ = result.get("versions", {})
    lines = [f"Device: {result['device']} ({result['torch_threads']} torch threads); torch {versions_.get('torch', '?')}, "
             f"terratorch {versions_.get('terratorch', '?')}; terramind_v1_{result['model_size']}, "
             f"batch {result['batch_size']} x {result['timesteps']} timesteps x {result['chip_size']} px, {result['precision']}."]
    if "method" in result:
        m = result["method"]
        lines += ["", f"{m['rounds']} interleaved rounds of {m['steps_per_round']} steps per variant (order {m['order']}, "
                  f"{m['warmup']} warm-up steps after each build); per variant the median of the per-round medians. "
                  f"Peak memory: {m['peak_memory']}."]
    lines += ["", "| variant | train step (s) | vs baseline | inference (s/chip) | peak memory (MB) | weights + optimizer (MB) "
              "| TFLOP per chip-step |", "|---|---|---|---|---|---|---|"]
    base = result["variants"]["baseline"]["train_step_s"]
    for name, v in result["variants"].items():
        flops = v.get("flops_per_chip_step")
        lines.append(f"| {name} | {v['train_step_s']:.3f} | {v['train_step_s'] / base:.2f}x | {v['infer_s_per_chip']:.4f} | "
                     f"{v['peak_mem_mb']:.0f} | {v.get('state_mb', float('nan')):.0f} | "
                     f"{'' if flops is None else f'{flops / 1e12:.3f}'} |")
    if "ratios" in result:
        lines += ["", "Ratios of train-step time, per round:"]
        lines += [_ratio_line(f"`{key.replace('_over_', ' / ')}`", ratio) for key, ratio in result["ratios"].items()]
    if "floor" in result:
        f = result["floor"]
        lines += ["", f"The floor: `tim_cached`'s encoder reads {f['tokens_per_timestep']['tim_cached']} tokens per timestep "
                  f"where `baseline`'s reads {f['tokens_per_timestep']['baseline']} (d = {f['embed_dim']}, depth {f['depth']}, "
                  f"MLP {f['mlp_hidden']}: encoder cost x{f['encoder_cost_ratio']:.3f}), while decoder, head and optimizer "
                  f"cost the same: {f['decoder_share']:.0%} of the baseline step is not the encoder's forward+backward "
                  f"(measured). floor(tim_cached) = s_dec + (1 - s_dec) x C(N_cached)/C(N_base) = **{f['tim_cached']:.2f}x**; "
                  f"online TiM adds its frozen generator's forward ({f['generator']['forward_cost_over_encoder_train']:.2f}x "
                  f"the encoder's forward+backward): floor(tim) = **{f['tim']:.2f}x**. C(N) = depth x (N (4d^2 + 2dh) + 2N^2 d) "
                  "multiply-adds; wall time taken as proportional to them."]
        if "encoder_only_tim_cached_over_baseline" in result:
            lines.append(f"Encoder alone, measured: tim_cached / baseline = {result['encoder_only_tim_cached_over_baseline']:.2f}x "
                         f"(model: {f['encoder_cost_ratio']:.2f}x).")
    for name, top in result.get("top_ops", {}).items():
        if "error" in top:
            lines += ["", f"Top operations of one `{name}` train step: the profiler failed ({top['error']})."]
            continue
        lines += ["", f"Top operations of one `{name}` train step ({top['sort_by'].replace('_total', '')}, "
                  f"{top['total_ms']:.0f} ms in all):", "", "| op | calls | self (ms) | share |", "|---|---|---|---|"]
        lines += [f"| `{op['op']}` | {op['calls']} | {op['self_ms']:.1f} | {op['share']:.0%} |" for op in top["ops"]]
    caching = result.get("thought_cache_s_per_chip")
    lines += ["", (f"Thought caching: {caching:.2f} s per chip (8 D4 transforms x cached samples). " if caching is not None else "")
              + f"Data loader: {result['loader_chips_per_s']:.1f} chips/s = {result['loader_over_consumption']:.1f}x what "
              "baseline training consumes."]
    if "projection" in result:
        p = result["projection"]
        lines += ["", f"Projected study ({len(p['variants'])} variants x {p['seeds']} seeds x {p['folds']} folds x "
                  f"{p['max_epochs']} epochs at most, {p['train_chips']} train chips per fold): {p['hours']:.2f} h ({p['hours'] * 60:.0f} min) as configured, "
                  f"{p['hours_cached']:.2f} h ({p['hours_cached'] * 60:.0f} min) with cached thoughts."]
    return "\n".join(lines)


def write_bench(params: Mapping, result: dict, extra_markdown: str = "") -> tuple:
    layout = RunLayout.of(params)
    path = write_json(layout.bench_json, result)
    table = layout.bench_md
    table.write_text(markdown(result) + ("\n\n" + extra_markdown if extra_markdown else "") + "\n")
    return path, table
