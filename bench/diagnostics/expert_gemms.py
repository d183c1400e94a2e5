"""Per-GEMM profile of our two expert GEMMs against `torch._grouped_mm` on the same data.

For each (shape, tokens), on one random routing (uneven, as bench/single_gpu.py's router skew):

  gemm1  ours: `gate_up_gemm` (x rows gathered in the kernel, gate+up, SwiGLU in the epilogue)
         grouped_mm: `torch._grouped_mm` of the expert-sorted x (permuted beforehand, not timed)
         against gate/up as one [E, H, 2F] operand; no activation
  gemm2  ours: `down_gemm` (expert-sorted act, routing weight in fp32, rows scattered to slots)
         grouped_mm: `torch._grouped_mm` of the same act against down as [E, F, H]; no weight, no scatter

Ours runs with the config `comet.scheduler.configs.select_configs` picks ("selected") and with each
candidate config, each in every descriptor variant of the config (`GemmConfig` fields):
weight_descriptors (both GEMMs) and input_descriptors (GEMM2's A operand). Configs whose shared
memory does not fit are skipped (the compiler's OutOfResources).

Every output of ours is NaN-filled, computed once and checked against an fp32 torch reference of that
GEMM (relative Frobenius error, 2e-2 for bf16) before it is timed; the grouped_mm outputs are checked
too (activation applied to / routing weight applied to its output at check time only). Timing:
bench.common's CUDA events, median. TFLOP/s = 2*rows*N*K (GEMM1: N = 2F, K = H; GEMM2: N = H, K = F);
`vs_grouped_mm` = grouped_mm ms / ours ms (> 1: ours faster).

Writes bench/results/expert_gemms.csv (appended; with $OUT set, also $OUT/expert_gemms.csv and the
full log $OUT/expert_gemms.log); the short table (grouped_mm, the shipped config, the best config
of each variant) is printed last.

    python -m bench.diagnostics.expert_gemms                                  # Mixtral-8x7B:16384, DeepSeek-V3:4096,16384
    python -m bench.diagnostics.expert_gemms --runs DeepSeek-V3:16384 --configs 128x256x64-g8w8s3 128x128x64-g16w8s3
    python -m bench.diagnostics.expert_gemms --smoke                          # tiny shapes, 2 configs (CPU: interpreter)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from bench.baselines import grouped_mm_missing
from bench.common import (
    DTYPES, Inputs, RESULTS_DIR, ROUTER_SKEW_STD, RunLog, TIMINGS, TOLERANCE, append_csv, environment,
    make_inputs, make_weights, progress, relative_error, routing_stats, run_on_cpu, time_calls,
    within_tolerance,
)
from bench.shapes import MODELS, SMOKE_MODELS, ModelShape, model_shape
from comet.reference import activation_reference
from comet.weights import split_gate_up

# (shape, tokens) profiled by default: where single_gpu.py found us behind (Mixtral at 16384 tokens)
# or short of the 1.3x target (DeepSeek-V3).
DEFAULT_RUNS = ("Mixtral-8x7B:16384", "DeepSeek-V3:4096", "DeepSeek-V3:16384")
SMOKE_RUNS = ("tiny-mixtral:12", "tiny-deepseek-v3:6")
# GemmConfig fields as a label: BLOCK_MxBLOCK_NxBLOCK_K-g<GROUP_M>w<num_warps>s<num_stages>.
DEFAULT_CONFIGS = (
    "128x256x64-g8w8s3", "128x128x64-g8w8s3", "128x128x64-g8w8s4", "128x128x128-g8w8s3",
    "256x128x64-g8w8s3", "64x256x64-g8w4s4", "128x256x64-g16w8s3", "128x128x64-g16w8s3",
)
# Interpreted: a tile height with pointer weight loads and one with descriptors (>= 64 rows).
SMOKE_CONFIGS = ("16x32x32-g2w4s1", "64x32x32-g4w4s1")
GEMMS = ("gemm1", "gemm2")
# The GemmConfig fields a variant sets.
WEIGHT_FIELD, INPUT_FIELD = "weight_descriptors", "input_descriptors"
_CONFIG_LABEL = re.compile(r"(\d+)x(\d+)x(\d+)-g(\d+)w(\d+)s(\d+)")


# ----------------------------------------------------------------------------------------------
# Configs and descriptor variants
# ----------------------------------------------------------------------------------------------
def config_label(cfg) -> str:
    return (f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k}-g{cfg.group_m}w{cfg.num_warps}s{cfg.num_stages}")


def parse_config(label: str):
    from comet.kernels.expert_gemm import GemmConfig

    match = _CONFIG_LABEL.fullmatch(label)
    if match is None:
        raise ValueError(f"config: expected BLOCK_MxBLOCK_NxBLOCK_K-g<GROUP_M>w<warps>s<stages> "
                         f"(e.g. 128x256x64-g8w8s3), got {label!r}")
    return GemmConfig(*map(int, match.groups()))


def descriptor_variants(gemm: str) -> list[dict[str, bool]]:
    """The descriptor settings (GemmConfig fields) GEMM `gemm` is timed under: weight descriptors
    on/off and, for GEMM2 (the only GEMM whose A operand is contiguous), input descriptors on/off."""
    weight = [{WEIGHT_FIELD: on} for on in (True, False)]
    if gemm == "gemm1":
        return weight
    return [{**w, INPUT_FIELD: on} for w in weight for on in (True, False)]


def variant_label(variant: dict[str, bool]) -> str:
    """'w:desc a:ptr' and the like: how the weights (w) and GEMM2's input (a) are loaded."""
    kind = {True: "desc", False: "ptr"}
    label = f"w:{kind[variant[WEIGHT_FIELD]]}"
    return label + (f" a:{kind[variant[INPUT_FIELD]]}" if INPUT_FIELD in variant else "")


# ----------------------------------------------------------------------------------------------
# Problem: data, our calls, grouped_mm calls, references
# ----------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """One (shape, tokens): weights, routing, input sets (rotated between timed calls) and outputs."""

    shape: ModelShape
    tokens: int
    dtype: torch.dtype
    weights: object  # comet.ExpertWeights
    routing: Inputs  # set 0's x and the routing every set shares
    plan: object  # comet.scheduler.routing.RoutingPlan
    row_weights: torch.Tensor  # fp32 [T*K], token-slot order
    sorted_weights: torch.Tensor  # fp32 [T*K], expert-sorted order
    counts: torch.Tensor  # int32 [E] rows per expert
    offsets: torch.Tensor  # int32 [E] end offsets (grouped_mm)
    xs: list[torch.Tensor]  # [T, H] per set
    x_sorted: list[torch.Tensor]  # [T*K, H] per set, expert order (grouped_mm's GEMM1 input)
    acts: list[torch.Tensor]  # [T*K, F] per set, expert order (GEMM2 input of both)
    out1: torch.Tensor  # [T*K, F] ours' GEMM1 output
    out2: torch.Tensor  # [T*K, H] ours' GEMM2 output (token-slot order)

    @property
    def rows(self) -> int:
        return self.tokens * self.shape.cfg.top_k

    def flops(self, gemm: str) -> int:
        c = self.shape.cfg
        n, k = (2 * c.ffn_size, c.hidden_size) if gemm == "gemm1" else (c.hidden_size, c.ffn_size)
        return 2 * self.rows * n * k


def check_shape(shape: ModelShape):
    c = shape.cfg
    if shape.hf_layout != "standard" or c.expert_bias or c.weight_on_input:
        raise ValueError(f"shape: {shape.name} has interleaved gate/up, expert biases or input-side routing "
                         "weights; this profile times the bias-free gate-first layout only")


def make_problem(shape: ModelShape, tokens: int, dtype: torch.dtype, input_sets: int, seed: int,
                 device: torch.device) -> Problem:
    from comet.scheduler.routing import analyze_routing

    check_shape(shape)
    c = shape.cfg
    torch.manual_seed(seed)
    skew = torch.randn(c.num_experts, device=device) * ROUTER_SKEW_STD
    w = make_weights(shape, dtype, device)
    routing = make_inputs(c, tokens, dtype, device, skew)
    plan = analyze_routing(routing.topk_ids, c.num_experts)
    flat_ids = routing.topk_ids.reshape(-1)
    counts = torch.bincount(flat_ids, minlength=c.num_experts).to(torch.int32)
    row_weights = routing.topk_weights.reshape(-1).float().contiguous()
    xs = [routing.x] + [torch.randn_like(routing.x) for _ in range(input_sets - 1)]
    rows = tokens * c.top_k
    # Random, not zeros: tensor cores draw less power (and run faster) on zeros.
    acts = [torch.randn(rows, c.ffn_size, dtype=dtype, device=device) for _ in range(input_sets)]
    return Problem(
        shape=shape, tokens=tokens, dtype=dtype, weights=w, routing=routing, plan=plan,
        row_weights=row_weights, sorted_weights=row_weights.index_select(0, plan.sorted_rows),
        counts=counts, offsets=counts.cumsum(0, dtype=torch.int32), xs=xs,
        x_sorted=[x.index_select(0, plan.sorted_rows // c.top_k) for x in xs], acts=acts,
        out1=torch.empty(rows, c.ffn_size, dtype=dtype, device=device),
        out2=torch.empty(rows, c.hidden_size, dtype=dtype, device=device))


def references(p: Problem) -> dict[str, torch.Tensor]:
    """fp32 results of input set 0, both in expert-sorted order: GEMM1 = act(x @ gate.T, x @ up.T),
    GEMM2 = (act @ down.T) * routing weight. Expert by expert, from the same low-precision operands."""
    c, w = p.shape.cfg, p.weights
    ref1 = torch.empty(p.rows, c.ffn_size, dtype=torch.float32, device=p.out1.device)
    ref2 = torch.empty(p.rows, c.hidden_size, dtype=torch.float32, device=p.out1.device)
    start = 0
    for e, count in enumerate(p.counts.tolist()):
        rows = slice(start, start + count)
        start += count
        x = p.x_sorted[0][rows].float()
        gate, up = split_gate_up(w.gate_up[e].float(), False)
        ref1[rows] = activation_reference(x @ gate.t(), x @ up.t(), c.activation, c.swiglu_alpha, c.swiglu_limit)
        ref2[rows] = (p.acts[0][rows].float() @ w.down[e].float().t()) * p.sorted_weights[rows, None]
    return {"gemm1": ref1, "gemm2": ref2}


@dataclass(frozen=True)
class Impl:
    """One timed thing: `call(i)` runs it on input set i and returns its output; `comparable` maps
    that output to the reference's form (check time only); `poison` is NaN-filled before the check."""

    call: Callable[[int], torch.Tensor]
    comparable: Callable[[torch.Tensor], torch.Tensor]
    poison: torch.Tensor | None


def gemm_problem(p: Problem, gemm: str, cfg):
    """Our GEMM `gemm` on input set 0 with `cfg`, as `comet.kernels.expert_gemm.GemmProblem`."""
    from comet.kernels.expert_gemm import GemmProblem

    c, w, plan = p.shape.cfg, p.weights, p.plan
    if gemm == "gemm1":
        return GemmProblem.gate_up(p.xs[0], w.gate_up, None, False, plan.sorted_rows, p.row_weights, plan.hist,
                                   p.out1, top_k=c.top_k, activation=c.activation, alpha=c.swiglu_alpha,
                                   limit=c.swiglu_limit, weight_on_input=False, cfg=cfg)
    return GemmProblem.down(p.acts[0], w.down, None, plan.sorted_rows, p.row_weights, plan.hist, p.out2,
                            top_k=c.top_k, weight_on_input=False, cfg=cfg)


def ours(p: Problem, gemm: str, cfg) -> Impl:
    from comet.kernels.expert_gemm import down_gemm, gate_up_gemm

    c, w, plan = p.shape.cfg, p.weights, p.plan
    if gemm == "gemm1":
        def call(i):
            gate_up_gemm(p.xs[i], w.gate_up, None, False, plan.sorted_rows, p.row_weights, plan.hist, p.out1,
                         top_k=c.top_k, activation=c.activation, alpha=c.swiglu_alpha, limit=c.swiglu_limit,
                         weight_on_input=False, cfg=cfg)
            return p.out1
        return Impl(call, lambda out: out, p.out1)

    def call(i):
        down_gemm(p.acts[i], w.down, None, plan.sorted_rows, p.row_weights, plan.hist, p.out2, top_k=c.top_k,
                  weight_on_input=False, cfg=cfg)
        return p.out2
    return Impl(call, lambda out: out.index_select(0, p.plan.sorted_rows), p.out2)


def descriptors_used(p: Problem, gemm: str, cfg) -> dict[str, int]:
    """What the launch will actually do with `cfg` (descriptors also depend on the tile height and
    the layout): b_desc = `GemmProblem.b_desc`, a_desc = `GemmProblem.a_desc`."""
    problem = gemm_problem(p, gemm, cfg)
    return {"b_desc": problem.b_desc, "a_desc": int(problem.a_desc)}


def grouped_mm(p: Problem, gemm: str) -> Impl:
    """The GEMM alone; weights passed transposed ([E, K, N] views) so every operand has a 16-byte
    aligned stride, as bench/baselines.py does."""
    c, w = p.shape.cfg, p.weights
    if gemm == "gemm1":
        def activated(h):
            gate, up = split_gate_up(h.float().mT, False)
            return activation_reference(gate.mT, up.mT, c.activation, c.swiglu_alpha, c.swiglu_limit)
        return Impl(lambda i: torch._grouped_mm(p.x_sorted[i], w.gate_up.transpose(1, 2), offs=p.offsets),
                    activated, None)
    return Impl(lambda i: torch._grouped_mm(p.acts[i], w.down.transpose(1, 2), offs=p.offsets),
                lambda y: y.float() * p.sorted_weights[:, None], None)


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------
def measure(impl: Impl, reference: torch.Tensor, p: Problem, gemm: str, timing, device: torch.device) -> dict:
    """Check once (poisoned output, set 0), then time. Returns the measured columns."""
    if impl.poison is not None:
        impl.poison.fill_(math.nan)
    started = time.perf_counter()
    error = relative_error(impl.comparable(impl.call(0)), reference)  # reads the result back: synchronizes
    first_call_s = time.perf_counter() - started  # mostly the kernel's compilation, for ours
    times = time_calls(impl.call, len(p.xs), device, warmup=timing.warmup, min_reps=timing.min_reps,
                       max_reps=timing.max_reps, budget_s=timing.budget_s)
    ms = statistics.median(times)
    return {"status": "ok" if within_tolerance(error, p.dtype) else "mismatch", "rel_err": error, "ms": ms,
            "ms_min": min(times), "reps": len(times), "tflops": p.flops(gemm) / (ms * 1e-3) / 1e12,
            "first_call_s": first_call_s}


def measure_safely(what: str, measure_fn: Callable[[], dict], log: RunLog, device: torch.device) -> dict:
    """`measure_fn()`, with a config the compiler rejects for its resources reported as skipped and
    any other failure as an error, so one bad config does not lose the rest."""
    from triton.runtime.errors import OutOfResources

    try:
        return measure_fn()
    except OutOfResources as exc:
        return {"status": "skipped", "note": f"does not fit: {exc}"[:300]}
    except Exception as exc:
        log.exception(f"!!! ERROR: {what}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}


def run_configs(configs: list, selected) -> list:
    """The selected config first, then the candidates that differ from it."""
    return [selected] + [cfg for cfg in configs if cfg != selected]


def profile_run(p: Problem, configs: list, selected: dict, timing, env: dict, log: RunLog, bar,
                device: torch.device) -> list[dict]:
    """Every row of one (shape, tokens): per GEMM, grouped_mm, then ours per config and descriptor
    variant. `selected`: gemm -> select_configs' pick; "shipped" is the selected config's own
    variant (what the layer runs)."""
    c = p.shape.cfg
    refs = references(p)
    stats = routing_stats([p.routing], c.num_experts)
    base = {**env, "shape": p.shape.name, "E": c.num_experts, "K": c.top_k, "H": c.hidden_size,
            "F": c.ffn_size, "dtype": str(p.dtype).removeprefix("torch."), "tokens": p.tokens, "rows": p.rows,
            **stats, "tolerance": TOLERANCE[p.dtype]}
    log(f"{p.shape.name} T={p.tokens}: {p.rows} rows, {stats['distinct_experts']:.0f} experts touched, "
        f"max/mean load {stats['load_max_over_mean']:.2f}; selected gemm1 {config_label(selected['gemm1'])}, "
        f"gemm2 {config_label(selected['gemm2'])}")
    missing = grouped_mm_missing()
    rows = []
    for gemm in GEMMS:
        what = f"grouped_mm {gemm} on {p.shape.name} T={p.tokens}"
        bar.set_postfix_str(what)
        row = {**base, "gemm": gemm, "impl": "grouped_mm", "config": "", "selected": False, "shipped": False,
               "variant": "", "note": ""}
        if missing:
            row.update(status="missing", note=missing)
        else:
            row.update(measure_safely(what, lambda: measure(grouped_mm(p, gemm), refs[gemm], p, gemm, timing, device),
                                      log, device))
        bar.update()
        log_row(log, row)
        rows.append(row)
        base_ms = row.get("ms") if row["status"] in ("ok", "mismatch") else None

        for cfg in run_configs(configs, selected[gemm]):
            for variant in descriptor_variants(gemm):
                what = f"ours {gemm} {config_label(cfg)} {variant_label(variant)} on {p.shape.name} T={p.tokens}"
                bar.set_postfix_str(what)
                is_selected = cfg == selected[gemm]
                row = {**base, "gemm": gemm, "impl": "ours", "config": config_label(cfg), "selected": is_selected,
                       "shipped": is_selected and all(getattr(cfg, k) == v for k, v in variant.items()),
                       "variant": variant_label(variant),
                       "weight_descriptors": variant[WEIGHT_FIELD],
                       "input_descriptors": variant.get(INPUT_FIELD, ""), "note": ""}
                run_cfg = dataclasses.replace(cfg, **variant)
                row.update(descriptors_used(p, gemm, run_cfg))
                row.update(measure_safely(what, lambda: measure(ours(p, gemm, run_cfg), refs[gemm], p, gemm,
                                                                timing, device), log, device))
                if base_ms and "ms" in row:
                    row["grouped_mm_ms"] = base_ms
                    row["vs_grouped_mm"] = base_ms / row["ms"]
                bar.update()
                log_row(log, row)
                rows.append(row)
    return rows


def log_row(log: RunLog, r: dict):
    where = f"{r['shape']} T={r['tokens']} {r['gemm']} {r['impl']} {r['config']} {r['variant']}".rstrip()
    if "ms" not in r:
        log(f"{'!!! ' if r['status'] == 'error' else ''}{where}: {r['status']} {r.get('note', '')}")
        return
    flag = "" if r["status"] == "ok" else f"  !!! {r['status'].upper()} (tolerance {r['tolerance']:.1g})"
    ratio = f"  x{r['vs_grouped_mm']:.2f} vs grouped_mm" if "vs_grouped_mm" in r else ""
    log(f"{where}: {r['ms']:.3f} ms, {r['tflops']:.1f} TFLOP/s, rel err {r['rel_err']:.2g}{ratio}{flag}")


# ----------------------------------------------------------------------------------------------
# Summary table
# ----------------------------------------------------------------------------------------------
def summary_rows(rows: list[dict]) -> list[dict]:
    """Per (shape, tokens, gemm): grouped_mm, ours shipped (the selected config as it is), and the
    fastest checked config of each descriptor variant."""
    out = []
    keys = list(dict.fromkeys((r["shape"], r["tokens"], r["gemm"]) for r in rows))
    for key in keys:
        group = [r for r in rows if (r["shape"], r["tokens"], r["gemm"]) == key]
        out += [dict(r, label="grouped_mm") for r in group if r["impl"] == "grouped_mm"]
        out += [dict(r, label="ours shipped") for r in group if r["shipped"]]
        for variant in dict.fromkeys(r["variant"] for r in group if r["impl"] == "ours"):
            timed = [r for r in group if r["impl"] == "ours" and r["variant"] == variant and r["status"] == "ok"]
            if timed:
                out.append(dict(min(timed, key=lambda r: r["ms"]), label="ours best"))
    return out


def format_table(rows: list[dict]) -> str:
    """The summary rows as text: ms ('!' = failed its check), TFLOP/s, x gmm = grouped_mm ms / ours ms."""
    columns = [("shape", 17), ("tokens", 7), ("gemm", 6), ("impl", 13), ("variant", 14), ("config", 19),
               ("ms", 9), ("TFLOP/s", 8), ("x gmm", 7)]
    lines = [[name for name, _ in columns], ["-" * (width - 1) for _, width in columns]]
    for r in summary_rows(rows):
        ms = "-" if "ms" not in r else f"{r['ms']:.3f}" + ("" if r["status"] == "ok" else "!")
        lines.append([r["shape"], r["tokens"], r["gemm"], r["label"], r["variant"] or "-", r["config"] or "-",
                      ms, "-" if "tflops" not in r else f"{r['tflops']:.1f}",
                      f"{r['vs_grouped_mm']:.2f}" if "vs_grouped_mm" in r else "-"])
    return "\n".join("".join(f"{str(c):<{w}}" if i < 6 else f"{str(c):>{w}}"
                             for i, (c, (_, w)) in enumerate(zip(cells, columns))) for cells in lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", metavar="SHAPE:TOKENS",
                   help="(shape, tokens) pairs; shapes: those of bench/shapes.py with gate-first weights and no "
                        f"expert biases, of {', '.join(MODELS)} (default: {' '.join(DEFAULT_RUNS)}); SHAPE/W: "
                        "the experts of one of W expert-parallel ranks")
    p.add_argument("--configs", nargs="+", metavar="CONFIG",
                   help="candidate configs besides the selected one, as BLOCK_MxBLOCK_NxBLOCK_K-g<GROUP_M>w<warps>"
                        f"s<stages> (default: {' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--dtype", choices=[d for d in DTYPES if d != "fp32"], default="bf16")
    p.add_argument("--input-sets", type=int, default=2, help="input sets rotated between timed calls (default 2)")
    p.add_argument("--timing", choices=["quick", "default"], default="quick",
                   help="bench/single_gpu.py's timing presets: quick ~0.1 s per measurement (default), "
                        "default ~0.5 s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, two configs, few repeats, results in a temp dir: tests this script "
                        "(on CPU under the Triton interpreter when there is no GPU)")
    p.add_argument("--results-dir", type=Path, help="where the CSV goes (default bench/results)")
    args = p.parse_args(argv)

    names = list(SMOKE_MODELS if args.smoke else MODELS)
    by_key = {name.lower(): name for name in names}
    args.pairs = []
    for run in args.runs or (SMOKE_RUNS if args.smoke else DEFAULT_RUNS):
        name, _, tokens = run.rpartition(":")
        base, slash, ranks = name.partition("/")
        if base.lower() not in by_key or not tokens.isdecimal() or int(tokens) < 1:
            p.error(f"--runs: expected SHAPE[/W]:TOKENS with SHAPE one of {names} and TOKENS > 0, got {run!r}")
        args.pairs.append((by_key[base.lower()] + slash + ranks, int(tokens)))
    for name in dict.fromkeys(name for name, _ in args.pairs):
        try:
            check_shape(model_shape(name))
        except ValueError as exc:
            p.error(f"--runs: {exc}")
    args.configs = args.configs or list(SMOKE_CONFIGS if args.smoke else DEFAULT_CONFIGS)
    if not all(_CONFIG_LABEL.fullmatch(label) for label in args.configs):
        p.error(f"--configs: expected labels like 128x256x64-g8w8s3, got {args.configs}")
    if args.input_sets < 1:
        p.error("--input-sets must be positive")
    args.timing = TIMINGS["smoke" if args.smoke else args.timing]
    if args.results_dir is None:
        args.results_dir = Path(tempfile.mkdtemp(prefix="comet-bench-smoke-")) if args.smoke else RESULTS_DIR
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.cuda.is_available():
        return run(args, torch.device("cuda"))
    if not args.smoke:
        print("expert_gemms.py: no CUDA device; use --smoke to test this script on CPU", file=sys.stderr)
        return 2
    return run_on_cpu(lambda device: run(args, device))  # kernels are imported lazily: interpreted


def run(args, device: torch.device) -> int:
    from comet.scheduler.configs import select_configs

    log = RunLog("expert_gemms")
    env = environment(device)
    log(" ".join(f"{k}={v}" for k, v in env.items()))
    configs = [parse_config(label) for label in args.configs]
    dtype = DTYPES[args.dtype]
    runs = []
    for name, tokens in args.pairs:
        shape = model_shape(name)
        c = shape.cfg
        picked = select_configs(tokens * c.top_k, c.num_experts, c.hidden_size, c.ffn_size, dtype, device)
        runs.append((shape, tokens, dict(zip(GEMMS, picked))))
    total = sum(1 + len(run_configs(configs, selected[g])) * len(descriptor_variants(g))
                for _, _, selected in runs for g in GEMMS)
    log(f"{total} measurements: {len(runs)} (shape, tokens) x 2 GEMMs x (grouped_mm + configs x descriptor variants)")

    csv_path = args.results_dir / "expert_gemms.csv"
    bar = progress(total, "expert_gemms")
    rows = []
    with torch.inference_mode():
        for shape, tokens, selected in runs:
            started = time.perf_counter()
            problem = make_problem(shape, tokens, dtype, args.input_sets, args.seed, device)
            run_rows = profile_run(problem, configs, selected, args.timing, env, log, bar, device)
            # Appended and published run by run, so a run cut short keeps what it measured.
            append_csv(csv_path, run_rows)
            rows += run_rows
            first_calls = sum(r.get("first_call_s", 0.0) for r in run_rows if r["impl"] == "ours")
            log(f"{shape.name} T={tokens}: {time.perf_counter() - started:.1f} s, of which {first_calls:.1f} s "
                "in ours' first calls (compilation)")
            del problem
            if device.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    log(f"results: {csv_path} ({len(rows)} rows appended)")
    bad = [r for r in rows if r["status"] in ("mismatch", "error")]
    for r in bad:
        why = f"relative error {r['rel_err']:.3g}" if r["status"] == "mismatch" else r["note"]
        log(f"!!! {r['status'].upper()}: {r['gemm']} {r['impl']} {r['config']} {r['variant']} on {r['shape']} "
            f"T={r['tokens']}: {why}")
    log()
    log(format_table(rows))
    log.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
