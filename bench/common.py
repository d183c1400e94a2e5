"""What every benchmark shares: the environment of a run, timing, accuracy checks, results files, the log.

Timing: CUDA events around each call (host clock on CPU), after warm-up, median of many; call i
gets input set i % n, so one set's activations do not sit in L2 between calls.
Results: one CSV row per measurement, appended to `bench/results/<name>.csv`, each row carrying
the GPU, torch, Triton, transformers and the git commit; a PNG plot of the run. When `$OUT` is set
(the device machine's output folder) the log, the CSV and the plot are also written there.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import pandas as pd
import torch
from tqdm import tqdm

import comet
from bench.shapes import ModelShape
from comet import measurement
from comet.multiprocess import init_torchrun_rank  # noqa: F401  (the benchmarks' torchrun preamble)
from comet.reference import experts_reference, route

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# Relative Frobenius error allowed against the fp32 reference. fp32 allows for TF32 dot products.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict[str, str]:
    """The columns that identify where and on what code a row was measured."""
    return {**measurement.environment(device), "transformers": measurement.package_version("transformers")}


def output_dir() -> Path | None:
    """The device machine's `$OUT` folder (what is written there comes back), if set."""
    out = os.environ.get("OUT")
    return Path(out) if out else None


# ----------------------------------------------------------------------------------------------
# Log
# ----------------------------------------------------------------------------------------------
class RunLog:
    """Prints above the progress bar and, when `$OUT` is set, keeps a full copy in `$OUT/<name>.log`."""

    def __init__(self, name: str):
        out = output_dir()
        self.path = out / f"{name}.log" if out else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
        else:
            self._file = None

    def __call__(self, message: str = ""):
        tqdm.write(message)
        if self._file:
            self._file.write(message + "\n")
            self._file.flush()

    def exception(self, message: str):
        self(f"{message}\n{traceback.format_exc()}")

    def close(self):
        if self._file:
            self._file.close()


def progress(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=None)  # no bar when not a TTY


# ----------------------------------------------------------------------------------------------
# Where a run goes
# ----------------------------------------------------------------------------------------------
def run_on_cpu(run: Callable[[torch.device], int]) -> int:
    """`run(cpu)` for a script's --smoke mode: kernels interpreted (set before they are imported;
    never on a GPU machine, where it would switch every later kernel import of the process), one
    thread (tiny CPU ops on a busy machine otherwise spin in OpenMP, up to 100x slower)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def run_on_device(script: str, args, run: Callable[[object, torch.device], int]) -> int:
    """A benchmark's main: `run(args, cpu)` through `run_on_cpu` with `args.smoke`, else
    `run(args, cuda)`; 2 (with a message naming `script`) where there is no CUDA device."""
    if args.smoke:
        return run_on_cpu(lambda device: run(args, device))
    if not torch.cuda.is_available():
        print(f"{script}: no CUDA device; use --smoke to test this script on CPU", file=sys.stderr)
        return 2
    return run(args, torch.device("cuda"))


def finish_shape_args(p, args, default_tokens: Iterable[int]):
    """The shape and run arguments every shape benchmark shares, checked and completed in place
    (`p` the parser, whose `error` exits): `shape_names`, `tokens` (default `default_tokens`,
    the smoke ones with --smoke), `timing`, `results_dir` (a temp dir with --smoke)."""
    from bench.shapes import SMOKE_TOKEN_COUNTS, shape_names

    try:
        args.shape_names = shape_names(args.shapes, args.smoke)
    except ValueError as err:
        p.error(str(err))
    args.tokens = args.tokens or list(SMOKE_TOKEN_COUNTS if args.smoke else default_tokens)
    if min(args.tokens) < 1 or args.input_sets < 1:
        p.error("--tokens and --input-sets must be positive")
    args.timing = TIMINGS["smoke" if args.smoke else "quick" if args.quick else "default"]
    if args.results_dir is None:
        args.results_dir = Path(tempfile.mkdtemp(prefix="comet-bench-smoke-")) if args.smoke else RESULTS_DIR
    return args


def record_error(row: dict, log, what: str, exc: Exception, device: torch.device):
    """A measurement that raised: logged with its traceback, the row marked "error" with the
    exception's text, the GPU's cached memory released, so the run goes on with the others."""
    log.exception(f"!!! ERROR: {what}")
    row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_probe(module: str, run: Callable, report: Callable, args) -> int:
    """A multi-rank probe's main: `run(args)` on every rank (rank 0 returns the rows), then
    `report(rows, args.results_dir)`; on 2 CPU ranks with the interpreter when `args.smoke`,
    else on this torchrun rank's GPU."""
    import torch.distributed as dist

    if args.smoke:
        from comet.multiprocess import run_ranks

        report(run_ranks(run, 2, args, env={"TRITON_INTERPRET": "1"}, timeout=600)[0], args.results_dir)
        return 0
    init_torchrun_rank(module, cpu_option="--smoke")
    try:
        rows = run(args)
        if dist.get_rank() == 0:
            report(rows, args.results_dir)
    finally:
        dist.destroy_process_group()
    return 0


def parse_split(value: str) -> tuple[int | str, int | None]:
    """A split given on the command line ('auto', N >= 0, or 'N:0' for N pushing programs with only
    the dispatch fused) as `comet.ep.ep_experts`' (n_comm, column_chunks)."""
    if value == "auto":
        return "auto", None
    n_comm, _, chunks = value.partition(":")
    n, c = int(n_comm), (int(chunks) if chunks else None)
    if n < 0 or c not in (None, 0) or (c == 0 and n == 0):
        raise ValueError(f"expected 'auto', N >= 0 or 'N:0' with N > 0, got {value!r}")
    return n, c


# ----------------------------------------------------------------------------------------------
# Problem set-up
# ----------------------------------------------------------------------------------------------
# Router logits are N(0, 1) per token plus a fixed per-expert skew N(0, ROUTER_SKEW_STD^2), so the
# load is uneven as with trained routers: at 4096 tokens the busiest expert gets 1.4x (Mixtral) to
# 2.5x (DeepSeek-V3) the mean load, the idlest 0.2-0.5x. The run logs the measured max/mean.
ROUTER_SKEW_STD = 0.2


class Inputs(NamedTuple):
    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


def make_weights(shape: ModelShape, dtype: torch.dtype, device: torch.device) -> comet.ExpertWeights:
    """Random expert weights in the layout Hugging Face stores for `shape`; for GPT-OSS that is
    [E, H, 2F] / [E, F, H], passed to us as transposed views (interleaved gate/up)."""
    c = shape.cfg
    e, f, h = c.num_experts, c.ffn_size, c.hidden_size

    def randn(*size, std):
        return torch.randn(*size, dtype=dtype, device=device).mul_(std)

    gate_up_bias = randn(e, 2 * f, std=0.1) if c.expert_bias else None
    down_bias = randn(e, h, std=0.1) if c.expert_bias else None
    if shape.hf_layout == "gpt_oss":
        gate_up = randn(e, h, 2 * f, std=h**-0.5).mT
        down = randn(e, f, h, std=f**-0.5).mT
        return comet.ExpertWeights(gate_up, down, gate_up_bias, down_bias, interleaved=True)
    return comet.ExpertWeights(randn(e, 2 * f, h, std=h**-0.5), randn(e, h, f, std=f**-0.5),
                               gate_up_bias, down_bias)


def make_inputs(cfg: comet.MoEConfig, tokens: int, dtype: torch.dtype, device: torch.device,
                skew: torch.Tensor) -> Inputs:
    logits = torch.randn(tokens, cfg.num_experts, device=device) + skew
    topk_weights, topk_ids = route(logits, cfg)
    return Inputs(torch.randn(tokens, cfg.hidden_size, dtype=dtype, device=device), topk_ids, topk_weights)


def expert_flops(cfg: comet.MoEConfig, tokens: int) -> int:
    """GEMM FLOPs of the routed experts: per (token, slot), 2*H*2F for gate_up and 2*F*H for down."""
    return 2 * tokens * cfg.top_k * (2 * cfg.ffn_size * cfg.hidden_size + cfg.ffn_size * cfg.hidden_size)


def routing_stats(sets: list[Inputs], num_experts: int) -> dict[str, float]:
    """Mean over input sets of the distinct experts touched and of max/mean expert load."""
    distinct, imbalance = [], []
    for s in sets:
        load = torch.bincount(s.topk_ids.flatten(), minlength=num_experts).double()
        distinct.append(int((load > 0).sum()))
        imbalance.append(float(load.max() / load.mean()))
    return {"distinct_experts": statistics.mean(distinct), "load_max_over_mean": statistics.mean(imbalance)}


def reference_output(s: Inputs, w: comet.ExpertWeights, cfg: comet.MoEConfig, rows: int) -> torch.Tensor:
    """fp32 reference on the first `rows` tokens (fp32 input keeps the output in fp32)."""
    return experts_reference(
        s.x[:rows].float(), s.topk_ids[:rows], s.topk_weights[:rows], w.gate_up, w.down,
        w.gate_up_bias, w.down_bias, activation=cfg.activation, swiglu_alpha=cfg.swiglu_alpha,
        swiglu_limit=cfg.swiglu_limit, interleaved=w.interleaved, weight_on_input=cfg.weight_on_input)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float  # timed seconds per measurement, spent when calls are fast


TIMINGS = {"default": Timing(3, 20, 1000, 0.5), "quick": Timing(2, 5, 100, 0.1), "smoke": Timing(1, 2, 3, 0.0)}


def _timed_calls(call: Callable[[int], object], first: int, count: int, num_sets: int,
                 device: torch.device) -> list[float]:
    """Milliseconds of each of `count` calls; call i uses input set i % num_sets."""
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
        for i in range(count):
            starts[i].record()
            call((first + i) % num_sets)
            ends[i].record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]
    times = []
    for i in range(count):
        t0 = time.perf_counter()
        call((first + i) % num_sets)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_calls(call: Callable[[int], object], num_sets: int, device: torch.device, *, warmup: int,
               min_reps: int, max_reps: int, budget_s: float) -> list[float]:
    """Per-call times in ms after `warmup` calls. The repeat count fits `budget_s` (estimated from
    the warm-up), within [min_reps, max_reps]."""
    warm = _timed_calls(call, 0, max(warmup, 1), num_sets, device)
    estimate_ms = max(statistics.median(warm), 1e-3)
    reps = int(min(max(budget_s * 1e3 / estimate_ms, min_reps), max_reps))
    return _timed_calls(call, len(warm), reps, num_sets, device)


def graph_replays(call: Callable[[object], torch.Tensor], sets: list, device: torch.device
                  ) -> Callable[[object], torch.Tensor]:
    """`call` captured in one CUDA graph per input set, as a call that replays the set's graph and
    returns its output: the GPU's time without the host's launch overhead (what a model run under
    CUDA graphs sees). Each set is called once eagerly first (compiles kernels, makes buffers; a
    collective `call` pairs these calls across ranks). CUDA only."""
    if device.type != "cuda":
        raise RuntimeError("CUDA graph replay needs a CUDA device")
    for s in sets:
        call(s)
    torch.cuda.synchronize(device)
    graphs = {}
    for s in sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call(s)
        graphs[id(s)] = (graph, out)

    def replay(s) -> torch.Tensor:
        graph, out = graphs[id(s)]
        graph.replay()
        return out

    return replay


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------
def relative_error(out: torch.Tensor, ref: torch.Tensor, chunk: int = 1 << 26) -> float:
    """||out - ref|| / ||ref||, summed in fp64 over chunks of `chunk` elements, so that a weight
    gradient of many GB fits beside its reference, which may be on the host (nan if `out` has
    non-finite values)."""
    out, ref = out.reshape(-1), ref.reshape(-1)
    diff2 = torch.zeros((), dtype=torch.float64, device=out.device)
    ref2 = torch.zeros((), dtype=torch.float64, device=out.device)
    for start in range(0, out.numel(), chunk):
        o, r = out[start:start + chunk].double(), ref[start:start + chunk].to(out.device, torch.float64)
        if not bool(torch.isfinite(o).all()):
            return math.nan
        diff2 += (o - r).square().sum()
        ref2 += r.square().sum()
    return float(diff2.sqrt() / ref2.sqrt().clamp_min(1e-30))


def within_tolerance(error: float, dtype: torch.dtype) -> bool:
    return error <= TOLERANCE[dtype]  # False for nan


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
def append_csv(path: Path, rows: list[dict]):
    """Append `rows` to the CSV at `path` (columns are the union of old and new) and copy it to
    `$OUT` when set (`publish`)."""
    new = pd.DataFrame(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pd.concat([pd.read_csv(path), new], ignore_index=True) if path.exists() else new
    table.to_csv(path, index=False)
    publish([path])


def plot_panels(df: pd.DataFrame, path: Path, *, panel: str, x: str, y: str, series: str,
                ylabel: str, title: str, log_x: bool = True):
    """One panel per value of `panel`, `y` against `x` (a log2 axis unless not `log_x`), one line
    per value of `series`, in the same colour on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = df.dropna(subset=[y])
    panels = list(dict.fromkeys(df[panel]))
    if not panels:
        return
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {v: cycle[i % len(cycle)] for i, v in enumerate(dict.fromkeys(df[series]))}  # one colour a series
    for ax, name in zip(axes.flat, panels):
        part = df[df[panel] == name]
        for label, line in part.groupby(series, sort=False):
            line = line.sort_values(x)
            ax.plot(line[x], line[y], marker="o", label=str(label), color=colors[label])
        if log_x:
            ax.set_xscale("log", base=2)
            ticks = sorted(part[x].unique())
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set_title(str(name), fontsize=9)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(paths: Iterable[Path]):
    """Copy result files to `$OUT` (when set) so they come back from the device machine."""
    out = output_dir()
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if p.exists() and p.resolve().parent != out.resolve():
            shutil.copy(p, out / p.name)
