#!/usr/bin/env python3
"""Diagnostic: GPU time of each backward kernel of the routed experts, per tile config, on one
shape's real routing: the dgrad of GEMM2 (+ activation backward), the dgrad of GEMM1, and the
weight gradients of both GEMMs (`comet.kernels.expert_backward`). Output checked against the
default config's before it is timed. Prints a table (kernel, config, us, TFLOP/s) and appends it
to bench/results/backward_gemms.csv.

    python bench/backward_gemms.py --shape Qwen3-30B-A3B --tokens 8192
    python bench/backward_gemms.py --wgrad-configs 128x128x64-g1w8s3 128x256x64-g1w8s3 --dgrad-configs
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `comet` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import RESULTS_DIR, append_csv, environment, progress, time_calls
from bench.expert_gemms import config_label, parse_config
from bench.shapes import model_shape
from bench.single_gpu import ROUTER_SKEW_STD, make_inputs, make_weights

WGRAD_CONFIGS = ("128x128x64-g1w8s3", "128x128x32-g1w4s4", "128x256x64-g1w8s3", "256x128x64-g1w8s3",
                 "128x128x128-g1w8s2", "64x128x64-g1w4s4")
DGRAD_CONFIGS = ("128x128x64-g8w8s3", "128x64x64-g8w4s4", "128x128x64-g8w4s4", "128x256x64-g8w8s3",
                 "64x128x64-g8w4s4")


def problems(shape_name: str, tokens: int, device):
    """The backward kernels of one layer as callables of a GemmConfig, with their FLOPs."""
    from comet.kernels.expert_backward import down_dgrad, dw_partial_blocks, expert_wgrad, gate_up_dgrad
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
    gemm_flops = 2 * rows * h * 2 * f

    def dgrad2(c):
        dw = torch.zeros(dw_partial_blocks(f, c), rows, device=device)
        down_dgrad(g, w.down, w.down_bias, pre_act, sorted_rows, rw, hist, d_pre, act, dw, top_k=k,
                   interleaved=w.interleaved, activation=cfg.activation, alpha=cfg.swiglu_alpha,
                   limit=cfg.swiglu_limit, weight_on_input=cfg.weight_on_input, cfg=c)
        return d_pre

    def dgrad1(c):
        dw = torch.zeros(dw_partial_blocks(h, c), rows, device=device)
        gate_up_dgrad(d_pre, w.gate_up, s.x, sorted_rows, rw, hist, slots, dw, top_k=k,
                      weight_on_input=cfg.weight_on_input, cfg=c)
        return slots

    d_down = torch.empty(e, h, f, dtype=s.x.dtype, device=device)
    d_gate_up = torch.empty(e, 2 * f, h, dtype=s.x.dtype, device=device)

    def wgrad2(scale):
        def call(c):
            expert_wgrad(act, False, g, True, d_down.transpose(1, 2), None, sorted_rows, rw, hist, top_k=k,
                         scale_b=scale, cfg=c)
            return d_down
        return call

    def wgrad1(c):
        expert_wgrad(s.x, True, d_pre, False, d_gate_up.transpose(1, 2), None, sorted_rows, rw, hist, top_k=k,
                     cfg=c)
        return d_gate_up

    return {"dgrad_gemm2": (dgrad2, gemm_flops / 2, "dgrad"), "dgrad_gemm1": (dgrad1, gemm_flops, "dgrad"),
            "wgrad_gemm2_weighted": (wgrad2(True), gemm_flops / 2, "wgrad"),
            "wgrad_gemm2_unweighted": (wgrad2(False), gemm_flops / 2, "wgrad"),
            "wgrad_gemm1": (wgrad1, gemm_flops, "wgrad")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="Qwen3-30B-A3B")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--wgrad-configs", nargs="*", default=list(WGRAD_CONFIGS))
    p.add_argument("--dgrad-configs", nargs="*", default=list(DGRAD_CONFIGS))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("backward_gemms.py: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    env = environment(device)
    kinds = {"wgrad": [parse_config(c) for c in args.wgrad_configs],
             "dgrad": [parse_config(c) for c in args.dgrad_configs]}
    probs = problems(args.shape, args.tokens, device)
    bar = progress(sum(len(kinds[kind]) for _, _, kind in probs.values()), "backward_gemms")
    rows = []
    for name, (call, flops, kind) in probs.items():
        first = None
        for c in kinds[kind]:
            row = {**env, "shape": args.shape, "tokens": args.tokens, "kernel": name, "config": config_label(c)}
            try:
                out = call(c).clone()
                if first is None:
                    first = out
                err = float((out.float() - first.float()).norm() / first.float().norm().clamp_min(1e-30))
                times = time_calls(lambda i: call(c), 1, device, warmup=3, min_reps=10, max_reps=200, budget_s=0.2)
                us = statistics.median(times) * 1e3
                row.update(status="ok" if err < 2e-2 else "mismatch", rel_err_vs_first=err, us=us,
                           tflops=flops / (us * 1e-6) / 1e12)
            except Exception as exc:  # a config that does not compile or fit: report it, go on
                row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:200])
            rows.append(row)
            bar.update()
    bar.close()
    append_csv(RESULTS_DIR / "backward_gemms.csv", rows)
    print(f"{'kernel':<24}{'config':<22}{'us':>9}{'TFLOP/s':>9}  status")
    for r in rows:
        us, tf = r.get("us"), r.get("tflops")
        print(f"{r['kernel']:<24}{r['config']:<22}{us if us is None else format(us, '9.1f'):>9}"
              f"{tf if tf is None else format(tf, '9.0f'):>9}  {r['status']} {r.get('note', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
