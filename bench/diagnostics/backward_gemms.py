#!/usr/bin/env python3
"""Diagnostic and tuner: GPU time of each backward kernel of the routed experts per tile config
(with descriptor loads and with pointer loads), on one shape's real routing: the dgrad of GEMM2
(+ activation backward), the dgrad of GEMM1 and the weight gradients of both GEMMs
(`comet.kernels.expert_backward`). Each output is checked against the first config's before it
is timed. Prints a table (kernel, config, us, TFLOP/s), appends it to
bench/results/backward_gemms.csv; `--write-table` stores each kernel's fastest config in
scheduler/tables/backward_<gpu>.json, which `comet.scheduler.configs.backward_configs` reads.

`--dw1-presort` times only the weight gradient of GEMM1, x gathered by token (the default) against
x first copied into zero-padded expert segments (`gather_padded_rows`) and read presorted
(`BackwardConfigs.gate_up_wgrad_presorted`): per config the gathered wgrad, the copy, the presorted
wgrad, their sum, copy + wgrad timed together, the speedups and the presorted output's error
against the gathered one's; first the selected config (its presorted run at
`presorted_wgrad_config`'s stages), then `--dw1-configs` (each for both paths). A table and
bench/results/backward_dw1_presort.csv; `--write-table` stores the choice: the fastest presorted
config (copy included) where it beats every gathered run, else null (dW1 gathers). `--smoke`
runs on CPU (Triton interpreter), tiny shapes.

    python -m bench.diagnostics.backward_gemms --shapes Qwen3-30B-A3B --tokens 8192
    python -m bench.diagnostics.backward_gemms --shapes Qwen3-30B-A3B OLMoE-1B-7B --write-table
    python -m bench.diagnostics.backward_gemms --dw1-presort --shapes Qwen3-30B-A3B OLMoE-1B-7B Mixtral-8x7B
    python -m bench.diagnostics.backward_gemms --smoke --dw1-presort
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import torch

from bench.common import (
    RESULTS_DIR, ROUTER_SKEW_STD, TIMINGS, Timing, append_csv, environment, make_inputs, make_weights, progress,
    relative_error, run_on_cpu, time_calls,
)
from bench.diagnostics.expert_gemms import config_label, parse_config
from bench.shapes import model_shape

if TYPE_CHECKING:  # the kernels are imported lazily (--smoke interprets them)
    from comet.kernels.expert_gemm import GemmConfig

# The weight gradients' row-index load takes pipeline stages: num_stages 4 keeps 2 data tiles in
# flight, 5 and 6 keep 3, 8 keeps 4. The gathered operand's columns want the tile's 128 side
# (down_wgrad gathers A, gate_up_wgrad B). 128 x 256 down_dgrad tiles spill registers
# (`python -m bench.diagnostics.kernel_resources`); gate_up_dgrad's do not.
WGRAD_CONFIGS = ("128x256x64-g1w8s5", "256x128x64-g1w8s5", "128x256x64-g1w8s4", "256x128x64-g1w8s4",
                 "128x256x32-g1w8s6", "256x128x32-g1w8s6")
DGRAD_CONFIGS = ("128x128x64-g8w8s3", "128x128x64-g8w8s4", "128x256x64-g8w8s3", "64x128x64-g8w4s4")
# dW1 reading x presorted in zero-padded segments: no row-index loads, so every stage holds a data
# tile (the gathered kernel's s5 keeps 3 in flight, the presorted s3 as many). Compiled offline,
# 16-bit, 256 x 128 x 64: s3 208 KiB (output through its descriptor), s4 224 KiB (pointer stores:
# the staged output tile does not fit beside 4 stages), s5 272 KiB (does not fit; only the
# gathered path runs it).
DW1_PRESORT_CONFIGS = ("256x128x64-g1w8s3", "256x128x64-g1w8s4", "256x128x32-g1w8s6", "256x128x32-g1w8s8",
                       "128x256x64-g1w8s3", "256x128x64-g1w8s5")
DW1_AGREEMENT = 1e-3  # relative error of presorted dW1 against the gathered one's that still counts as equal
# --smoke: the interpreter's sizes (a 64-row tile takes the descriptor paths' shapes there too)
SMOKE_SHAPES, SMOKE_TOKENS = ("tiny-mixtral",), (24,)
SMOKE_WGRAD_CONFIGS, SMOKE_DGRAD_CONFIGS = ("32x16x16-g1w4s1",), ("16x32x32-g2w4s1",)
SMOKE_DW1_CONFIGS = ("16x32x16-g1w4s1", "64x64x16-g1w4s1")
SWEEP_TIMING = Timing(3, 10, 200, 0.2)


def problems(shape_name: str, tokens: int, device):
    """(shape config, {BackwardConfigs field: (call of a GemmConfig, FLOPs, "dgrad" or "wgrad")},
    the tensors and sizes the calls share). down_dgrad's call writes the d_pre_act that
    gate_up_wgrad's reads."""
    from comet.kernels.expert_backward import down_dgrad, down_wgrad, dw_partial_blocks, gate_up_dgrad, gate_up_wgrad
    from comet.ops import routed_experts_train

    shape = model_shape(shape_name)
    cfg = shape.cfg
    torch.manual_seed(0)
    w = make_weights(shape, torch.bfloat16, device)
    s = make_inputs(cfg, tokens, torch.bfloat16, device, torch.randn(cfg.num_experts, device=device) * ROUTER_SKEW_STD)
    _, pre_act, sorted_rows, hist = routed_experts_train(
        s.x, s.topk_ids, s.topk_weights, w.gate_up, w.down, w.gate_up_bias, w.down_bias, w.interleaved,
        cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit, cfg.weight_on_input, True)
    rows, (e, h, f) = sorted_rows.numel(), w.down.shape
    k = cfg.top_k
    rw = s.topk_weights.reshape(-1).float().contiguous()
    g = torch.randn_like(s.x)
    act = torch.empty(rows, f, dtype=s.x.dtype, device=device)
    d_pre = torch.empty(rows, 2 * f, dtype=s.x.dtype, device=device)
    slots = torch.empty(rows, h, dtype=s.x.dtype, device=device)
    d_down = torch.empty(e, h, f, dtype=s.x.dtype, device=device)
    d_gate_up = torch.empty(e, 2 * f, h, dtype=s.x.dtype, device=device)
    gemm1_flops = 2 * rows * h * 2 * f

    def down_dgrad_call(c):
        dw = torch.zeros(dw_partial_blocks(f, c), rows, device=device)
        down_dgrad(g, w.down, w.down_bias, pre_act, sorted_rows, rw, hist, d_pre, act, dw, top_k=k,
                   interleaved=w.interleaved, activation=cfg.activation, alpha=cfg.swiglu_alpha,
                   limit=cfg.swiglu_limit, weight_on_input=cfg.weight_on_input, cfg=c)
        return d_pre

    def gate_up_dgrad_call(c):
        dw = torch.zeros(dw_partial_blocks(h, c), rows, device=device)
        gate_up_dgrad(d_pre, w.gate_up, s.x, sorted_rows, rw, hist, slots, dw, top_k=k,
                      weight_on_input=cfg.weight_on_input, cfg=c)
        return slots

    # as comet.ops.experts_backward calls them (bias gradients where the shape has biases)
    d_down_bias = torch.empty(e, h, dtype=s.x.dtype, device=device) if w.down_bias is not None else None
    d_gate_up_bias = torch.empty(e, 2 * f, dtype=s.x.dtype, device=device) if w.gate_up_bias is not None else None

    def down_wgrad_call(c):
        down_wgrad(g, act, sorted_rows, rw, hist, d_down, d_down_bias, top_k=k, weight_on_input=cfg.weight_on_input,
                   cfg=c)
        return d_down

    def gate_up_wgrad_call(c):
        gate_up_wgrad(d_pre, s.x, sorted_rows, rw, hist, d_gate_up, d_gate_up_bias, top_k=k,
                      weight_on_input=cfg.weight_on_input, cfg=c)
        return d_gate_up

    data = SimpleNamespace(x=s.x, sorted_rows=sorted_rows, hist=hist, row_weights=rw, d_pre_act=d_pre,
                           d_gate_up=d_gate_up, d_gate_up_bias=d_gate_up_bias, rows=rows, experts=e, hidden=h,
                           ffn=f, top_k=k, gemm1_flops=gemm1_flops)
    return cfg, {"down_dgrad": (down_dgrad_call, gemm1_flops / 2, "dgrad"),
                 "gate_up_dgrad": (gate_up_dgrad_call, gemm1_flops, "dgrad"),
                 "down_wgrad": (down_wgrad_call, gemm1_flops / 2, "wgrad"),
                 "gate_up_wgrad": (gate_up_wgrad_call, gemm1_flops, "wgrad")}, data


def label(c) -> str:
    """A config's label with its load path: "128x256x64-g1w8s3-desc" (descriptors) or "...-ptr"."""
    return config_label(c) + ("-desc" if c.weight_descriptors else "-ptr")


def dw1_presort(shape_name: str, tokens: int, device, configs: list, timing: Timing,
                env: dict) -> tuple[list[dict], GemmConfig | None]:
    """Rows timing dW1 with x gathered by token against x copied into zero-padded expert segments
    first, one per config: the selected configs (`backward_configs(...)`: gathered at its
    gate_up_wgrad, presorted at its gate_up_wgrad_presorted, else at `presorted_wgrad_config` of
    gate_up_wgrad), then each of `configs` (both paths at it). With the rows, the choice for
    `BackwardConfigs.gate_up_wgrad_presorted`: the presorted config fastest with its copy (timed
    together) if it beats every gathered run, else None.
    us_gathered, us_copy (`gather_padded_rows` at the config's block_k), us_presorted (the wgrad
    reading its output), us_sum (the two), us_together (copy + wgrad timed as one call);
    speedup = us_gathered of the same row / us_sum, speedup_vs_selected = the selected row's
    us_gathered / us_sum; rel_err of the presorted output against the gathered one's (at the
    selected config where this row's gathered run fails)."""
    from comet.kernels.expert_backward import gate_up_wgrad
    from comet.kernels.routing import gather_padded_rows, padded_rows
    from comet.scheduler.configs import backward_configs, presorted_wgrad_config

    cfg, probs, d = problems(shape_name, tokens, device)
    selected = backward_configs(d.rows, d.experts, d.hidden, d.ffn, d.x.dtype, device)
    probs["down_dgrad"][0](selected.down_dgrad)  # d_pre_act as the backward's dW1 reads it
    woi = cfg.weight_on_input
    buffers = {}

    def copy(c):
        if c.block_k not in buffers:  # the backward's buffer of its own, one per segment size
            buffers[c.block_k] = torch.empty(padded_rows(d.rows, d.experts, c.block_k), d.hidden, dtype=d.x.dtype,
                                             device=device)
        return gather_padded_rows(d.x, d.sorted_rows, d.hist, d.top_k, buffers[c.block_k], num_experts=d.experts,
                                  block=c.block_k, row_weights=d.row_weights if woi else None)

    def wgrad(c, x_padded=None):
        gate_up_wgrad(d.d_pre_act, d.x, d.sorted_rows, d.row_weights, d.hist, d.d_gate_up, d.d_gate_up_bias,
                      top_k=d.top_k, weight_on_input=woi, cfg=c, x_padded=x_padded)
        return d.d_gate_up

    def us(call) -> float:
        return statistics.median(time_calls(lambda i: call(), 1, device, warmup=timing.warmup,
                                            min_reps=timing.min_reps, max_reps=timing.max_reps,
                                            budget_s=timing.budget_s)) * 1e3

    rows, reference, selected_us = [], None, None
    runs = [("selected", selected.gate_up_wgrad,
             selected.gate_up_wgrad_presorted or presorted_wgrad_config(selected.gate_up_wgrad, d.x.dtype.itemsize))]
    gathered_best, presorted_best = None, None  # the fastest gathered us; (us, config) of the presorted runs
    runs += [("candidate", c, c) for c in configs]
    for which, gathered_cfg, presorted_cfg in runs:
        row = {**env, "shape": shape_name, "tokens": tokens, "kernel": "gate_up_wgrad", "which": which,
               "config": label(gathered_cfg), "presorted_config": label(presorted_cfg),
               "presorted_stages": presorted_cfg.num_stages}
        notes, want = [], None
        try:
            want = wgrad(gathered_cfg).clone()
            reference = want if reference is None else reference
            row["us_gathered"] = us(lambda: wgrad(gathered_cfg))
            row["tflops_gathered"] = d.gemm1_flops / (row["us_gathered"] * 1e-6) / 1e12
            if which == "selected":
                selected_us = row["us_gathered"]
            if gathered_best is None or row["us_gathered"] < gathered_best:
                gathered_best = row["us_gathered"]
        except Exception as exc:  # a config that does not compile or fit: report it, go on
            notes.append(f"gathered: {type(exc).__name__}: {exc}"[:200])
        try:
            x_padded = copy(presorted_cfg)
            got = wgrad(presorted_cfg, x_padded)
            row["rel_err"] = relative_error(got, want if want is not None else reference)
            row["us_copy"] = us(lambda: copy(presorted_cfg))
            row["us_presorted"] = us(lambda: wgrad(presorted_cfg, x_padded))
            row["us_sum"] = row["us_copy"] + row["us_presorted"]
            row["us_together"] = us(lambda: wgrad(presorted_cfg, copy(presorted_cfg)))
            row["tflops_presorted"] = d.gemm1_flops / (row["us_presorted"] * 1e-6) / 1e12
            if "us_gathered" in row:
                row["speedup"] = row["us_gathered"] / row["us_sum"]
            if selected_us is not None:
                row["speedup_vs_selected"] = selected_us / row["us_sum"]
        except Exception as exc:
            notes.append(f"presorted: {type(exc).__name__}: {exc}"[:200])
        err = row.get("rel_err")
        # The presorted kernel sums the same products in the same order as the gathered one:
        # anything past rounding is a wrong result, not noise.
        row["status"] = ("error" if notes else "ok") if err is None or err < DW1_AGREEMENT else "mismatch"
        if notes:
            row["note"] = "; ".join(notes)
        elif row["status"] == "ok" and (presorted_best is None or row["us_together"] < presorted_best[0]):
            presorted_best = (row["us_together"], presorted_cfg)
        rows.append(row)
    if presorted_best and (gathered_best is None or presorted_best[0] < gathered_best):
        return rows, presorted_best[1]
    return rows, None


def print_dw1_table(rows: list[dict]):
    print(f"{'shape':<15}{'tokens':>7}  {'config':<44}{'gathered':>9}{'copy':>8}{'presort':>9}{'sum':>9}"
          f"{'together':>9}{'speedup':>8}{'vs sel':>7}{'rel_err':>9}  status (us; speedup = gathered / sum)")
    for r in rows:
        def col(key, width, fmt=".1f"):
            v = r.get(key)
            return f"{'-' if v is None else format(v, fmt):>{width}}"
        shown = r["config"] + (f" (selected, presorted s{r['presorted_stages']})" if r["which"] == "selected" else "")
        print(f"{r['shape']:<15}{r['tokens']:>7}  {shown:<44}{col('us_gathered', 9)}{col('us_copy', 8)}"
              f"{col('us_presorted', 9)}{col('us_sum', 9)}{col('us_together', 9)}{col('speedup', 8, '.2f')}"
              f"{col('speedup_vs_selected', 7, '.2f')}{col('rel_err', 9, '.1e')}  {r['status']} {r.get('note', '')}")


def write_table(best: dict, device):
    """Merge `best` ({(shape_key, bucket): {BackwardConfigs field: GemmConfig or None}}) into this
    GPU's backward table."""
    from comet.scheduler.configs import TABLE_DIR, backward_table_name, clear_table_cache, gpu_key, load_table

    name = backward_table_name(gpu_key(device))
    table = {key: dict(value) for key, value in load_table(name).items()}
    for (key, bucket), kernels in best.items():  # kernels not swept keep their entries
        table.setdefault(key, {}).setdefault(str(bucket), {}).update(
            {k: c and dataclasses.asdict(c) for k, c in kernels.items()})
    path = TABLE_DIR / f"{name}.json"
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    clear_table_cache()
    print(f"wrote {path}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", help="default: Qwen3-30B-A3B (--smoke: tiny-mixtral)")
    p.add_argument("--tokens", nargs="+", type=int, help="default: 8192 (--smoke: 24)")
    p.add_argument("--wgrad-configs", nargs="*")
    p.add_argument("--dgrad-configs", nargs="*")
    p.add_argument("--descriptors", choices=("both", "on", "off"), default="both",
                   help="weights (and the weight gradients' sorted operand) through descriptors, pointers or both")
    p.add_argument("--no-precompile", action="store_true",
                   help="compile each config when it first runs, not all of them first in parallel processes")
    p.add_argument("--write-table", action="store_true", help="store each kernel's fastest config")
    p.add_argument("--dw1-presort", action="store_true",
                   help="only dW1: x gathered by token vs copied into zero-padded expert segments first (the "
                        "selected config and --dw1-configs, each with --descriptors)")
    p.add_argument("--dw1-configs", nargs="*", help=f"default: {' '.join(DW1_PRESORT_CONFIGS)}")
    p.add_argument("--smoke", action="store_true", help="CPU (Triton interpreter): tiny shapes and configs")
    p.add_argument("--results-dir", type=Path, help="where the CSV goes (default bench/results; --smoke: a temp dir)")
    args = p.parse_args(argv)
    if args.smoke and args.write_table:
        p.error("--write-table needs a GPU run, not --smoke")
    args.shapes = args.shapes or list(SMOKE_SHAPES if args.smoke else ("Qwen3-30B-A3B",))
    args.tokens = args.tokens or list(SMOKE_TOKENS if args.smoke else (8192,))
    for name, default, smoke in (("wgrad_configs", WGRAD_CONFIGS, SMOKE_WGRAD_CONFIGS),
                                 ("dgrad_configs", DGRAD_CONFIGS, SMOKE_DGRAD_CONFIGS),
                                 ("dw1_configs", DW1_PRESORT_CONFIGS, SMOKE_DW1_CONFIGS)):
        if getattr(args, name) is None:
            setattr(args, name, list(smoke if args.smoke else default))
    args.timing = TIMINGS["smoke"] if args.smoke else SWEEP_TIMING
    if args.results_dir is None:
        args.results_dir = Path(tempfile.mkdtemp(prefix="comet-bench-smoke-")) if args.smoke else RESULTS_DIR
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return run_on_cpu(lambda device: run(args, device))  # kernels are imported lazily: interpreted
    if not torch.cuda.is_available():
        print("backward_gemms.py: needs a CUDA device (or --smoke)", file=sys.stderr)
        return 2
    return run(args, torch.device("cuda"))


def run(args, device) -> int:
    from comet.scheduler.configs import rows_bucket, shape_key

    env = environment(device)
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.descriptors]
    configs = {kind: [dataclasses.replace(parse_config(c), weight_descriptors=d) for c in labels for d in modes]
               for kind, labels in (("wgrad", args.wgrad_configs), ("dgrad", args.dgrad_configs),
                                    ("dw1", args.dw1_configs))}
    if not args.no_precompile and device.type == "cuda":
        from bench.diagnostics.offline_compile import precompile

        if args.dw1_presort:
            jobs = [(s, kernel, c) for s in args.shapes for c in configs["dw1"]
                    for kernel in ("gate_up_wgrad", "gate_up_wgrad_presorted", "gather_padded_rows")]
        else:
            kinds = {"down_dgrad": "dgrad", "gate_up_dgrad": "dgrad", "down_wgrad": "wgrad",
                     "gate_up_wgrad": "wgrad"}
            jobs = [(s, kernel, c) for s in args.shapes for kernel, kind in kinds.items() for c in configs[kind]]
        major, minor = torch.cuda.get_device_capability(device)
        try:
            precompile(jobs, 10 * major + minor)
        except Exception as exc:  # only time is lost: each config then compiles when it first runs
            print(f"backward_gemms: precompiling failed ({type(exc).__name__}: {exc}); compiling as configs run",
                  file=sys.stderr)
    if args.dw1_presort:
        rows, best = [], {}
        for shape_name in args.shapes:
            moe = model_shape(shape_name).cfg
            for tokens in args.tokens:
                shape_rows, choice = dw1_presort(shape_name, tokens, device, configs["dw1"], args.timing, env)
                rows += shape_rows
                key = (shape_key(moe.num_experts, moe.hidden_size, moe.ffn_size, torch.bfloat16),
                       rows_bucket(tokens * moe.top_k, moe.num_experts))
                best[key] = {"gate_up_wgrad_presorted": choice}
        append_csv(args.results_dir / "backward_dw1_presort.csv", rows)
        print_dw1_table(rows)
        if args.write_table:
            write_table(best, device)
        return 0
    bar = progress(len(args.shapes) * len(args.tokens) * 2 * (len(configs["wgrad"]) + len(configs["dgrad"])),
                   "backward_gemms")
    rows, best = [], {}
    for shape_name in args.shapes:
        for tokens in args.tokens:
            cfg, probs, _ = problems(shape_name, tokens, device)
            key = (shape_key(cfg.num_experts, cfg.hidden_size, cfg.ffn_size, torch.bfloat16),
                   rows_bucket(tokens * cfg.top_k, cfg.num_experts))
            for kernel, (call, flops, kind) in probs.items():
                first, fastest = None, None
                for c in configs[kind]:
                    row = {**env, "shape": shape_name, "tokens": tokens, "kernel": kernel,
                           "config": label(c)}
                    try:
                        out = call(c).clone()
                        first = out if first is None else first
                        err = relative_error(out, first)
                        t = args.timing
                        times = time_calls(lambda i: call(c), 1, device, warmup=t.warmup, min_reps=t.min_reps,
                                           max_reps=t.max_reps, budget_s=t.budget_s)
                        us = statistics.median(times) * 1e3
                        row.update(status="ok" if err < 2e-2 else "mismatch", rel_err_vs_first=err, us=us,
                                   tflops=flops / (us * 1e-6) / 1e12)
                        if row["status"] == "ok" and (fastest is None or us < fastest[0]):
                            fastest = (us, c)
                    except Exception as exc:  # a config that does not compile or fit: report it, go on
                        row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:200])
                    rows.append(row)
                    bar.update()
                if fastest:
                    best.setdefault(key, {})[kernel] = fastest[1]
    bar.close()
    append_csv(args.results_dir / "backward_gemms.csv", rows)
    print(f"{'shape':<15}{'tokens':>7}  {'kernel':<15}{'config':<26}{'us':>9}{'TFLOP/s':>9}  status")
    for r in rows:
        us, tf = r.get("us"), r.get("tflops")
        print(f"{r['shape']:<15}{r['tokens']:>7}  {r['kernel']:<15}{r['config']:<26}"
              f"{'-' if us is None else format(us, '9.1f'):>9}{'-' if tf is None else format(tf, '9.0f'):>9}"
              f"  {r['status']} {r.get('note', '')}")
    if args.write_table:
        write_table(best, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
