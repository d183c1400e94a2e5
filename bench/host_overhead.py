#!/usr/bin/env python3
"""Where the host time of an eager `comet.moe_experts` call goes, for batches small enough that the
host, not the GPU, bounds the layer (bench/single_gpu.py's `ours` vs `ours_graph` rows show when).

For each shape and token count: the host time per call (back-to-back calls, no sync in between:
once the launch queue is far ahead of a tiny batch's GPU work, wall time / calls is the host's
cost), the GPU time per call (CUDA-graph replays) and a cProfile of the host calls, the functions
with the most own time first. Writes bench/results/host_overhead.csv (appended) and, with $OUT
set, the profiles there.

    python bench/host_overhead.py                                    # OLMoE and Qwen3, 128 tokens
    python bench/host_overhead.py --shapes Mixtral-8x7B --tokens 128 1024
    python bench/host_overhead.py --smoke                            # tiny shape on CPU (interpreter)
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `comet` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd
import torch

import comet
from bench.common import RESULTS_DIR, append_csv, environment, graph_replays, output_dir, run_on_cpu
from bench.shapes import MODELS, SMOKE_MODELS, model_shape
from bench.single_gpu import ROUTER_SKEW_STD, make_inputs, make_weights


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", metavar="NAME", help=f"model shapes (default: OLMoE-1B-7B "
                   f"Qwen3-30B-A3B): {', '.join(MODELS)}")
    p.add_argument("--tokens", nargs="+", type=int, default=[128])
    p.add_argument("--calls", type=int, default=300, help="calls timed and profiled (default 300)")
    p.add_argument("--top", type=int, default=25, help="profile lines printed per case (default 25)")
    p.add_argument("--smoke", action="store_true", help="a tiny shape on CPU, results in a temp dir")
    p.add_argument("--results-dir", type=Path, help="where the CSV goes (default bench/results)")
    args = p.parse_args(argv)
    names = list(SMOKE_MODELS) if args.smoke else list(MODELS)
    args.shapes = args.shapes or (names[:1] if args.smoke else ["OLMoE-1B-7B", "Qwen3-30B-A3B"])
    unknown = [n for n in args.shapes if n not in names]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {names}")
    if args.calls < 1 or min(args.tokens) < 1:
        p.error("--calls and --tokens must be positive")
    if args.smoke:
        args.calls, args.tokens = min(args.calls, 3), [8]
    if args.results_dir is None:
        args.results_dir = Path(tempfile.mkdtemp(prefix="comet-bench-smoke-")) if args.smoke else RESULTS_DIR
    return args


def host_us_per_call(call, calls: int, device: torch.device) -> float:
    """Host microseconds per call, the launch queue not drained in between."""
    start = time.perf_counter()
    for _ in range(calls):
        call()
    host = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return host / calls * 1e6


def gpu_us_per_call(call, calls: int, device: torch.device) -> float | None:
    """GPU microseconds per call from CUDA-graph replays (None off a GPU)."""
    if device.type != "cuda":
        return None
    replay = graph_replays(lambda _: call(), [None], device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        replay(None)
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / calls * 1e3


def profile_text(call, calls: int, top: int) -> str:
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        call()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def run(args, device: torch.device) -> int:
    env, rows = environment(device), []
    out = output_dir()
    for name in args.shapes:
        shape = model_shape(name)
        weights = make_weights(shape, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
        skew = torch.randn(shape.cfg.num_experts, device=device) * ROUTER_SKEW_STD
        for tokens in args.tokens:
            x, ids, topk_weights = make_inputs(shape.cfg, tokens, weights.gate_up.dtype, device, skew)

            def call():
                return comet.moe_experts(x, ids, topk_weights, weights, shape.cfg, backend="triton",
                                         check_values=False)

            with torch.no_grad():
                call()  # compiles
                host = host_us_per_call(call, args.calls, device)
                gpu = gpu_us_per_call(call, args.calls, device)
                text = profile_text(call, args.calls, args.top)
            rows.append({**env, "shape": name, "tokens": tokens, "calls": args.calls, "host_us_per_call": host,
                         "gpu_us_per_call": gpu})
            print(f"== {name}, {tokens} tokens: host {host:.1f} us per call, GPU "
                  f"{'-' if gpu is None else f'{gpu:.1f}'} us per call; profile of {args.calls} calls:")
            print(text)
            if out:
                out.mkdir(parents=True, exist_ok=True)
                (out / f"host_profile_{name}_{tokens}.txt").write_text(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    append_csv(args.results_dir / "host_overhead.csv", rows)
    print(pd.DataFrame(rows)[["shape", "tokens", "host_us_per_call", "gpu_us_per_call"]].to_string(index=False))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return run_on_cpu(lambda device: run(args, device))
    if not torch.cuda.is_available():
        sys.exit("bench/host_overhead.py: needs a CUDA GPU (or --smoke)")
    return run(args, torch.device("cuda"))


if __name__ == "__main__":
    sys.exit(main())
