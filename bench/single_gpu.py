"""Single-GPU benchmark of the routed experts, three implementations on the same weights and routing:

  grouped_mm  a `torch._grouped_mm` pipeline (sort, gather, grouped GEMM, activation, grouped GEMM,
              weighted un-permute), no host sync
  hf          transformers' experts module with its "grouped_mm" experts implementation
  ours        `comet.moe_experts(..., backend=--backend)` (default "triton")
  ours_graph  the same captured in a CUDA graph and replayed (GPU only): the kernels' time without
              the host's launch overhead, which bounds small batches otherwise

Each output is checked against the fp32 reference on its first `--check-rows` tokens before it is
timed. Writes bench/results/single_gpu.csv (appended) and single_gpu.png; with $OUT set, also the
full log and copies of both there.

    python -m bench.single_gpu                                   # all shapes, 128..16384 tokens, bf16
    python -m bench.single_gpu --quick --shapes Mixtral-8x7B --tokens 128 4096
    python -m bench.single_gpu --smoke                           # tiny shapes on CPU, into a temp dir
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

import comet
from bench.baselines import grouped_mm_experts, grouped_mm_missing, hf_experts_module
from bench.common import (
    DTYPES, ROUTER_SKEW_STD, TOLERANCE, Inputs, RunLog, append_csv, environment, expert_flops, finish_shape_args,
    graph_replays, make_inputs, make_weights, plot_panels, progress, publish, record_error, reference_output,
    relative_error, routing_stats, run_on_device, time_calls, within_tolerance,
)
from bench.shapes import MODELS, TOKEN_COUNTS, ModelShape, model_shape
from comet.backends import backend_status

IMPLS = ("grouped_mm", "hf", "ours", "ours_graph")
H200_PEAK_BYTES_PER_S = 4.8e12  # HBM3e, datasheet
BANDWIDTH_TOKENS = 128  # up to here the experts stream their weights: report that bandwidth


# ----------------------------------------------------------------------------------------------
# Problem set-up
# ----------------------------------------------------------------------------------------------
def bytes_per_expert(w: comet.ExpertWeights) -> int:
    tensors = [t for t in (w.gate_up, w.down, w.gate_up_bias, w.down_bias) if t is not None]
    return sum(t[0].numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------
# The three implementations
# ----------------------------------------------------------------------------------------------
def comet_backends(device: torch.device) -> dict[str, str | None]:
    """comet's backends: name -> None if usable on `device`, else why not. A kernel module that
    fails to import (e.g. comet not pip-installed, so `comet.kernels` is not mapped) shows as
    an "<import>" entry instead of stopping the baselines."""
    try:
        return backend_status(device)
    except ImportError as exc:
        return {"<import>": f"importing comet's backends failed ({exc}); is comet pip-installed (pip install -e .)?"}


def build_impls(shape: ModelShape, w: comet.ExpertWeights, backend: str, backends: dict[str, str | None]
                ) -> tuple[dict[str, Callable[[Inputs], torch.Tensor]], dict[str, tuple[str, str]], dict[str, str]]:
    """(name -> call, name -> (status "missing" or "error", why it cannot run), name -> what exactly
    runs); `backends` as from `comet_backends`."""
    cfg = shape.cfg
    calls, skipped, detail = {}, {}, {}

    why = grouped_mm_missing()
    if why:
        skipped["grouped_mm"] = ("missing", why)
    else:
        calls["grouped_mm"] = lambda s: grouped_mm_experts(s.x, s.topk_ids, s.topk_weights, w, cfg)
        detail["grouped_mm"] = "torch._grouped_mm pipeline"

    try:
        module = hf_experts_module(w, cfg, shape.hf_layout)
        calls["hf"] = lambda s: module(s.x, s.topk_ids, s.topk_weights)
        detail["hf"] = f"transformers {type(module).__name__} [grouped_mm]"
    except ImportError as exc:
        skipped["hf"] = ("missing", f"transformers not importable: {exc}")
    except Exception as exc:  # e.g. a transformers version whose config rejects these sizes
        skipped["hf"] = ("error", f"building transformers' experts module failed: {type(exc).__name__}: {exc}")

    if "<import>" in backends:
        skipped["ours"] = ("missing", backends["<import>"])
    elif backend not in backends:
        skipped["ours"] = ("missing", f"backend {backend!r} is not registered (registered: {sorted(backends)})")
    elif backends[backend] is not None:
        skipped["ours"] = ("missing", f"backend {backend!r} cannot run here: {backends[backend]}")
    else:
        calls["ours"] = lambda s: comet.moe_experts(s.x, s.topk_ids, s.topk_weights, w, cfg,
                                                    backend=backend, check_values=False)
        detail["ours"] = f"comet backend {backend!r}"
    if "ours" in skipped:
        skipped["ours_graph"] = skipped["ours"]
    elif w.gate_up.device.type != "cuda":
        skipped["ours_graph"] = ("missing", "CUDA graphs need a CUDA device")
    else:
        detail["ours_graph"] = f"comet backend {backend!r}, CUDA graph replay"
    return calls, skipped, detail


# ----------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", metavar="NAME",
                   help=f"model shapes (default: all): {', '.join(MODELS)}")
    p.add_argument("--tokens", nargs="+", type=int, help=f"token counts (default: {list(TOKEN_COUNTS)})")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16"])
    p.add_argument("--backend", help="comet backend timed as 'ours' (default: triton; reference with --smoke)")
    p.add_argument("--input-sets", type=int, default=4, help="input sets rotated between calls (default 4)")
    p.add_argument("--check-rows", type=int, default=256,
                   help="tokens of each output checked against the fp32 reference (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer repeats (about 0.1 s per measurement)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU, reference backend, results in a temp dir: tests this script")
    p.add_argument("--results-dir", type=Path, help="where the CSV and PNG go (default bench/results)")
    args = p.parse_args(argv)

    finish_shape_args(p, args, TOKEN_COUNTS)
    if args.check_rows < 1:
        p.error("--check-rows must be positive")
    args.backend = args.backend or ("reference" if args.smoke else "triton")
    return args


@dataclass
class Session:
    """What every measurement of one run shares."""

    args: argparse.Namespace
    device: torch.device
    env: dict[str, str]
    backends: dict[str, str | None]
    copy_bw: float  # bytes/s
    log: RunLog
    bar: object  # tqdm progress bar


def measure(session: Session, what: str, call, sets: list[Inputs], ref: torch.Tensor, dtype) -> dict:
    """Check one implementation against the reference, then time it. Returns the measured columns."""
    error = relative_error(call(sets[0])[: ref.shape[0]], ref)
    ok = within_tolerance(error, dtype)
    if not ok:
        session.log(f"!!! MISMATCH: {what}: relative error {error:.3g} > tolerance {TOLERANCE[dtype]:.1g} "
                    f"against the fp32 reference")
    t = session.args.timing
    times = time_calls(lambda i: call(sets[i]), len(sets), session.device, warmup=t.warmup,
                       min_reps=t.min_reps, max_reps=t.max_reps, budget_s=t.budget_s)
    return {"status": "ok" if ok else "mismatch", "rel_err": error, "ms": statistics.median(times),
            "ms_min": min(times), "reps": len(times)}


def run_shape(session: Session, shape: ModelShape, dtype_name: str) -> list[dict]:
    """Every token count of one (shape, dtype): one row per implementation."""
    args, device, log = session.args, session.device, session.log
    cfg, dtype = shape.cfg, DTYPES[dtype_name]
    torch.manual_seed(args.seed)
    skew = torch.randn(cfg.num_experts, device=device) * ROUTER_SKEW_STD
    w = make_weights(shape, dtype, device)
    calls, skipped, detail = build_impls(shape, w, args.backend, session.backends)
    for impl, (status, why) in skipped.items():
        log(f"{'!!! ' if status == 'error' else ''}{impl} {status.upper()} for {shape.name}: {why}")
    results = []
    for tokens in args.tokens:
        sets = [make_inputs(cfg, tokens, dtype, device, skew) for _ in range(args.input_sets)]
        stats = routing_stats(sets, cfg.num_experts)
        ref = reference_output(sets[0], w, cfg, min(tokens, args.check_rows))
        flops = expert_flops(cfg, tokens)
        weight_bytes = stats["distinct_experts"] * bytes_per_expert(w)
        log(f"{shape.name} {dtype_name} T={tokens}: {stats['distinct_experts']:.1f} experts touched, "
            f"max/mean load {stats['load_max_over_mean']:.2f}")
        for impl in IMPLS:
            what = f"{impl} on {shape.name} {dtype_name} T={tokens}"
            session.bar.set_postfix_str(what)
            row = {**session.env, "shape": shape.name, "E": cfg.num_experts, "K": cfg.top_k,
                   "H": cfg.hidden_size, "F": cfg.ffn_size, "dtype": dtype_name, "tokens": tokens, "impl": impl,
                   "detail": detail.get(impl, ""), "input_sets": len(sets), "checked_rows": ref.shape[0],
                   "tolerance": TOLERANCE[dtype], **stats, "weight_bytes": weight_bytes,
                   "copy_bw_tbps": session.copy_bw / 1e12}
            row["status"], row["note"] = skipped.get(impl, ("ok", ""))
            if impl in calls or impl == "ours_graph" and impl not in skipped:
                try:
                    call = calls[impl] if impl in calls else graph_replays(calls["ours"], sets, device)
                    row.update(measure(session, what, call, sets, ref, dtype))
                    bytes_per_s = weight_bytes / (row["ms"] * 1e-3)
                    row.update(tflops=flops / (row["ms"] * 1e-3) / 1e12, weight_tbps=bytes_per_s / 1e12,
                               pct_h200_peak_bw=100 * bytes_per_s / H200_PEAK_BYTES_PER_S,
                               pct_copy_bw=100 * bytes_per_s / session.copy_bw)
                except Exception as exc:  # report and go on: one broken path must not lose the others
                    record_error(row, log, what, exc, device)
            results.append(row)
            session.bar.update()
        add_speedups(results[-len(IMPLS):])
        del sets, ref
    return results


def add_speedups(rows: list[dict]):
    """On the 'ours' row of one (shape, dtype, tokens): how many times faster than each baseline."""
    ms = {r["impl"]: r["ms"] for r in rows if r["status"] in ("ok", "mismatch")}
    ours = next(r for r in rows if r["impl"] == "ours")
    for base in ("grouped_mm", "hf"):
        if "ours" in ms and base in ms:
            ours[f"speedup_vs_{base}"] = ms[base] / ms["ours"]


def format_table(rows: list[dict]) -> str:
    """One line per (shape, dtype, tokens): ms of each implementation ('!' mismatch, 'x' error,
    '-' missing), ours' TFLOP/s and speedups, and up to BANDWIDTH_TOKENS tokens ours' weight-streaming
    bandwidth (TB/s, % of the H200's 4.8 TB/s, % of the measured copy bandwidth), also replayed in
    a CUDA graph (% of 4.8 TB/s)."""
    columns = [("shape", 17), ("dtype", 6), ("tokens", 7), ("grouped_mm ms", 14), ("hf ms", 10), ("ours ms", 10),
               ("graph ms", 9), ("ours TF/s", 10), ("x gmm", 7), ("x hf", 7), ("wt TB/s", 8), ("%4.8TB/s", 9),
               ("%copy", 7), ("graph %4.8", 11)]
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_key.setdefault((r["shape"], r["dtype"], r["tokens"]), {})[r["impl"]] = r

    def ms(r):
        return {"ok": f"{r.get('ms', 0):.3f}", "mismatch": f"{r.get('ms', 0):.3f}!", "error": "x",
                "missing": "-"}[r["status"]]

    def num(r, key, digits):
        value = r.get(key)
        return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"

    lines = []
    for (shape, dtype, tokens), impls in by_key.items():
        ours, graph = impls["ours"], impls["ours_graph"]
        cells = [shape, dtype, tokens, ms(impls["grouped_mm"]), ms(impls["hf"]), ms(ours), ms(graph),
                 num(ours, "tflops", 1), num(ours, "speedup_vs_grouped_mm", 2), num(ours, "speedup_vs_hf", 2)]
        if tokens <= BANDWIDTH_TOKENS:
            cells += [num(ours, "weight_tbps", 2), num(ours, "pct_h200_peak_bw", 1), num(ours, "pct_copy_bw", 1),
                      num(graph, "pct_h200_peak_bw", 1)]
        lines.append(cells)
    head = [name for name, _ in columns]
    rule = ["-" * (width - 1) for _, width in columns]
    return "\n".join("".join(f"{str(c):<{w}}" if i == 0 else f"{str(c):>{w}}"
                             for i, (c, (_, w)) in enumerate(zip(cells, columns)))
                     for cells in [head, rule, *lines])


def main(argv=None) -> int:
    return run_on_device("single_gpu.py", parse_args(argv), run)


def run(args, device: torch.device) -> int:
    from comet.scheduler.ep_calibrate import copy_bandwidth  # imports the kernels: after run_on_cpu's setting

    log = RunLog("single_gpu")
    env = environment(device)
    log(" ".join(f"{k}={v}" for k, v in env.items()))
    backends = comet_backends(device)
    log("comet backends: " + ", ".join(f"{n} {'ok' if why is None else 'unavailable (' + why + ')'}"
                                       for n, why in backends.items()))
    if backends.get(args.backend, "absent") is not None:
        log(f"!!! backend {args.backend!r} is MISSING on {device}: 'ours' is skipped, baselines still run")

    copy_bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (16 << 20), repeats=10)
    log(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s (bytes read + written)")

    # Rows are appended and published shape by shape, so a run cut short keeps what it measured.
    csv_path = args.results_dir / "single_gpu.csv"
    png_path = args.results_dir / "single_gpu.png"
    bar = progress(len(args.shape_names) * len(args.dtypes) * len(args.tokens) * len(IMPLS), "single_gpu")
    session = Session(args, device, env, backends, copy_bw, log, bar)
    rows = []
    with torch.inference_mode():
        for shape in map(model_shape, args.shape_names):
            for dtype_name in args.dtypes:
                shape_rows = run_shape(session, shape, dtype_name)
                append_csv(csv_path, shape_rows)
                rows += shape_rows
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    bar.close()

    df = pd.DataFrame(rows)
    df["series"] = df["impl"] + " " + df["dtype"]
    plot_panels(df, png_path, panel="shape", x="tokens", y="tflops", series="series", ylabel="TFLOP/s",
                title=f"routed experts, {env['gpu']}, torch {env['torch']}, triton {env['triton']}, "
                      f"commit {env['commit']}")
    log(f"results: {csv_path} ({len(rows)} rows appended), {png_path}")
    for impl, note in sorted({(r["impl"], r["note"]) for r in rows if r["status"] == "missing"}):
        log(f"MISSING: {impl}: {note}")
    bad = [r for r in rows if r["status"] in ("mismatch", "error")]
    for r in bad:
        why = f"relative error {r['rel_err']:.3g}" if r["status"] == "mismatch" else r["note"]
        log(f"!!! {r['status'].upper()}: {r['impl']} on {r['shape']} {r['dtype']} T={r['tokens']}: {why}")
    log()
    log(format_table(rows))
    publish([csv_path, png_path])
    log.close()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
