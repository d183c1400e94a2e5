#!/usr/bin/env python3
"""Diagnostic and tuner: GPU time of each backward kernel of the routed experts per tile config
(with descriptor loads and with pointer loads), on one shape's real routing: the dgrad of GEMM2
(+ activation backward), the dgrad of GEMM1 and the weight gradients of both GEMMs
(`comet.kernels.expert_backward`). Each output is checked against the first config's before it
is timed. Prints a table (kernel, config, us, TFLOP/s), appends it to
bench/results/backward_gemms.csv; `--write-table` stores each kernel's fastest config in
scheduler/tables/backward_<gpu>.json, which `comet.scheduler.configs.backward_configs` reads.

    python -m bench.diagnostics.backward_gemms --shapes Qwen3-30B-A3B --tokens 8192
    python -m bench.diagnostics.backward_gemms --shapes Qwen3-30B-A3B OLMoE-1B-7B --write-table
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys

import torch

from bench.common import (
    RESULTS_DIR, ROUTER_SKEW_STD, append_csv, environment, make_inputs, make_weights, progress, relative_error,
    time_calls,
)
from bench.diagnostics.expert_gemms import config_label, parse_config
from bench.shapes import model_shape

# The weight gradients' row-index load takes pipeline stages: num_stages 4 keeps 2 data tiles in
# flight, 5 and 6 keep 3, 8 keeps 4. The gathered operand's columns want the tile's 128 side
# (down_wgrad gathers A, gate_up_wgrad B). 128 x 256 down_dgrad tiles spill registers
# (`python -m bench.diagnostics.kernel_resources`); gate_up_dgrad's do not.
WGRAD_CONFIGS = ("128x256x64-g1w8s5", "256x128x64-g1w8s5", "128x256x64-g1w8s4", "256x128x64-g1w8s4",
                 "128x256x32-g1w8s6", "256x128x32-g1w8s6")
DGRAD_CONFIGS = ("128x128x64-g8w8s3", "128x128x64-g8w8s4", "128x256x64-g8w8s3", "64x128x64-g8w4s4")


def problems(shape_name: str, tokens: int, device):
    """(shape config, {BackwardConfigs field: (call of a GemmConfig, FLOPs, "dgrad" or "wgrad")})."""
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

    return cfg, {"down_dgrad": (down_dgrad_call, gemm1_flops / 2, "dgrad"),
                 "gate_up_dgrad": (gate_up_dgrad_call, gemm1_flops, "dgrad"),
                 "down_wgrad": (down_wgrad_call, gemm1_flops / 2, "wgrad"),
                 "gate_up_wgrad": (gate_up_wgrad_call, gemm1_flops, "wgrad")}


def write_table(best: dict, device):
    """Merge `best` ({(shape_key, bucket): {kernel: GemmConfig}}) into this GPU's backward table."""
    from comet.scheduler.configs import TABLE_DIR, backward_table_name, clear_table_cache, gpu_key, load_table

    name = backward_table_name(gpu_key(device))
    table = {key: dict(value) for key, value in load_table(name).items()}
    for (key, bucket), kernels in best.items():  # kernels not swept keep their entries
        table.setdefault(key, {}).setdefault(str(bucket), {}).update(
            {k: dataclasses.asdict(c) for k, c in kernels.items()})
    path = TABLE_DIR / f"{name}.json"
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    clear_table_cache()
    print(f"wrote {path}")


def main(argv=None) -> int:
    from comet.scheduler.configs import rows_bucket, shape_key

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["Qwen3-30B-A3B"])
    p.add_argument("--tokens", nargs="+", type=int, default=[8192])
    p.add_argument("--wgrad-configs", nargs="*", default=list(WGRAD_CONFIGS))
    p.add_argument("--dgrad-configs", nargs="*", default=list(DGRAD_CONFIGS))
    p.add_argument("--descriptors", choices=("both", "on", "off"), default="both",
                   help="weights (and the weight gradients' sorted operand) through descriptors, pointers or both")
    p.add_argument("--no-precompile", action="store_true",
                   help="compile each config when it first runs, not all of them first in parallel processes")
    p.add_argument("--write-table", action="store_true", help="store each kernel's fastest config")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("backward_gemms.py: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    env = environment(device)
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[args.descriptors]
    configs = {kind: [dataclasses.replace(parse_config(c), weight_descriptors=d) for c in labels for d in modes]
               for kind, labels in (("wgrad", args.wgrad_configs), ("dgrad", args.dgrad_configs))}
    if not args.no_precompile:
        from bench.diagnostics.offline_compile import precompile

        kinds = {"down_dgrad": "dgrad", "gate_up_dgrad": "dgrad", "down_wgrad": "wgrad", "gate_up_wgrad": "wgrad"}
        major, minor = torch.cuda.get_device_capability(device)
        try:
            precompile([(s, kernel, c) for s in args.shapes for kernel, kind in kinds.items() for c in configs[kind]],
                       10 * major + minor)
        except Exception as exc:  # only time is lost: each config then compiles when it first runs
            print(f"backward_gemms: precompiling failed ({type(exc).__name__}: {exc}); compiling as configs run",
                  file=sys.stderr)
    bar = progress(len(args.shapes) * len(args.tokens) * 2 * sum(map(len, configs.values())), "backward_gemms")
    rows, best = [], {}
    for shape_name in args.shapes:
        for tokens in args.tokens:
            cfg, probs = problems(shape_name, tokens, device)
            key = (shape_key(cfg.num_experts, cfg.hidden_size, cfg.ffn_size, torch.bfloat16),
                   rows_bucket(tokens * cfg.top_k, cfg.num_experts))
            for kernel, (call, flops, kind) in probs.items():
                first, fastest = None, None
                for c in configs[kind]:
                    row = {**env, "shape": shape_name, "tokens": tokens, "kernel": kernel,
                           "config": config_label(c) + ("-desc" if c.weight_descriptors else "-ptr")}
                    try:
                        out = call(c).clone()
                        first = out if first is None else first
                        err = relative_error(out, first)
                        times = time_calls(lambda i: call(c), 1, device, warmup=3, min_reps=10, max_reps=200,
                                           budget_s=0.2)
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
    append_csv(RESULTS_DIR / "backward_gemms.csv", rows)
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
