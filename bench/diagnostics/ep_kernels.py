"""Where an expert-parallel call spends its time: GPU time per kernel, from the PyTorch profiler.

For each shape and each split (`--n-comm`: 0 is the unfused path; > 0 the fused kernels; N:0 only
the dispatch fused), the
rank's calls of `comet.ep.ep_experts` are profiled after warm-up, and every kernel's mean time per
call is listed, beside the wall time per call (CUDA events). Also run with one rank (torchrun
--nproc-per-node 1): the fused kernels then have nothing to send or wait for, so what they cost
over the unfused GEMMs is the price of their structure alone.

    torchrun --nproc-per-node 2 -m bench.diagnostics.ep_kernels --shapes Qwen3-30B-A3B --tokens 8192 --n-comm 0 8 16 8:0

`--leads` times the fused splits with other lead experts (the fused GEMM1's own rows run first,
`comet.ep.ep_experts(lead_experts=...)`): "model" (the cost model's) or a share of a rank's experts
(1.0: every source's rows after all own rows). The unfused path's two GEMM launches (one kernel
name) are listed apart: `_expert_gemm_kernel (GEMM1)` and `(GEMM2)`; with only the dispatch fused,
GEMM2 runs over the arrival bins as `_arrival_gemm_kernel` (`comet.kernels.ep_tiles`).

Prints a table per shape (kernels x splits, us per call, rank 0); appends bench/results/ep_kernels.csv
(GPU, torch, Triton, commit in every row; copied to $OUT when set).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from bench.common import (
    DTYPES, RESULTS_DIR, ROUTER_SKEW_STD, append_csv, environment, init_torchrun_rank, make_inputs,
    make_weights, parse_split,
)
from bench.shapes import model_shape


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["Qwen3-30B-A3B"])
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank (default %(default)s)")
    p.add_argument("--n-comm", nargs="+", default=["0", "8", "16"],
                   help="splits: N pushing programs (0: unfused) or N:0 (only the dispatch fused)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--leads", nargs="+", default=["model"], type=lead_value,
                   help="lead experts of the fused splits: 'model' or a share of a rank's experts (default: model)")
    p.add_argument("--calls", type=int, default=10, help="profiled calls per split (default %(default)s)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    try:
        [parse_split(v) for v in args.n_comm]
    except ValueError as err:
        p.error(f"--n-comm: {err}")
    return args


def lead_value(text: str) -> str:
    """A --leads value, checked: 'model' or a share in [0, 1]."""
    try:
        if text == "model" or 0.0 <= float(text) <= 1.0:
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected 'model' or a share in [0, 1], got {text!r}")


def lead_count(lead: str, experts_per_rank: int) -> int | None:
    """--leads value -> ep_experts' lead_experts (None: the cost model's)."""
    return None if lead == "model" else round(float(lead) * experts_per_rank)


def kernel_times(call, calls: int) -> tuple[dict[str, float], float]:
    """(kernel name -> mean GPU us per call, wall us per call) over `calls` calls."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(calls):
            call()
        end.record()
        torch.cuda.synchronize()
    per_kernel: dict[str, float] = {}
    kernels = [(e.name[:60], e.device_time_total) for e in prof.events() if e.device_type.name == "CUDA" and e.name]
    # The single-GPU GEMM kernel runs twice per call, unfused only: GEMM1 and GEMM2 take turns. With
    # only the dispatch fused, GEMM2 is the arrival-bin kernel.
    gemms = 0
    for name, us in kernels:
        if name.startswith("_expert_gemm_kernel"):
            name = f"_expert_gemm_kernel (GEMM{1 + gemms % 2})"
            gemms += 1
        elif name.startswith("_arrival_gemm_kernel"):
            name = "_arrival_gemm_kernel (GEMM2)"
        per_kernel[name] = per_kernel.get(name, 0.0) + us / calls
    return per_kernel, start.elapsed_time(end) * 1e3 / calls


def run(args) -> list[dict]:
    from comet.ep import ExpertParallelState, ep_experts

    device = torch.device("cuda", torch.cuda.current_device())
    rank, world = dist.get_rank(), dist.get_world_size()
    env, dtype, rows = environment(device), DTYPES[args.dtype], []
    with torch.inference_mode():
        for name in args.shapes:
            cfg = model_shape(name).cfg
            per_rank = cfg.num_experts // world
            torch.manual_seed(0)  # the same weights and router skew on every rank
            skew = torch.randn(cfg.num_experts, device=device) * ROUTER_SKEW_STD
            full = make_weights(model_shape(name), dtype, device)
            local = full._replace(gate_up=full.gate_up[rank * per_rank:(rank + 1) * per_rank],
                                  down=full.down[rank * per_rank:(rank + 1) * per_rank])
            torch.manual_seed(1 + rank)
            s = make_inputs(cfg, args.tokens, dtype, device, skew)
            state = ExpertParallelState(max_tokens=args.tokens, configs=[cfg])
            for n_comm in args.n_comm:
                split, column_chunks = parse_split(n_comm)
                for lead in args.leads if split != 0 else ["-"]:
                    lead_experts = None if split == 0 else lead_count(lead, per_rank)
                    per_kernel, wall = kernel_times(
                        lambda: ep_experts(s.x, s.topk_ids, s.topk_weights, local, cfg, state,
                                           n_comm=split, column_chunks=column_chunks, lead_experts=lead_experts),
                        args.calls)
                    per_kernel["(wall time per call)"] = wall
                    series = n_comm if lead in ("-", "model") else f"{n_comm} lead {lead}"
                    rows += [{**env, "world_size": world, "shape": name, "tokens_per_rank": args.tokens,
                              "n_comm": series, "lead_experts": lead, "kernel": k, "us_per_call": us}
                             for k, us in per_kernel.items()]
            state.close()
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    init_torchrun_rank("bench.diagnostics.ep_kernels")
    try:
        rows = run(args)
        if dist.get_rank() == 0:
            csv = args.results_dir / "ep_kernels.csv"
            append_csv(csv, rows)
            df = pd.DataFrame(rows)
            for name, part in df.groupby("shape"):
                table = part.pivot_table(index="kernel", columns="n_comm", values="us_per_call", aggfunc="sum")
                print(f"\n{name}, {args.tokens} tokens per rank, {dist.get_world_size()} ranks: us per call (rank 0)")
                print(table.sort_values(table.columns[-1], ascending=False).to_string(float_format=lambda v: f"{v:.0f}"))
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
