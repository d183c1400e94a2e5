"""Where the host time of an eager `comet.moe_experts` call goes, for batches small enough that the
host, not the GPU, bounds the layer (bench/single_gpu.py's `ours` vs `ours_graph` rows show when).

For each shape and token count, two variants on the same inputs: `ours` (what the layer runs) and
`library_sort` (the routing analysis through a memset, the histogram kernel and torch.argsort, as
batches above `comet.kernels.routing.SMALL_ROUTING_ROWS` rows take it). Each gets the
host time per call (bursts of back-to-back calls, the GPU drained between bursts: the median
burst's wall time / calls is the host's cost) and the GPU time per call (CUDA-graph replays); `ours` also a cProfile
of the host calls, the functions with the most own time first. Writes
bench/results/host_overhead.csv (appended; copied to $OUT when set, with the profiles).

    python -m bench.diagnostics.host_overhead                                    # OLMoE and Qwen3, 128 tokens
    python -m bench.diagnostics.host_overhead --shapes Mixtral-8x7B --tokens 128 1024
    python -m bench.diagnostics.host_overhead --smoke                            # tiny shape on CPU (interpreter)
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import comet
from bench.common import (
    RESULTS_DIR, ROUTER_SKEW_STD, append_csv, environment, graph_replays, make_inputs, make_weights,
    output_dir, reference_output, relative_error, run_on_cpu, within_tolerance,
)
from bench.shapes import MODELS, SMOKE_MODELS, model_shape


CHECK_ROWS = 256  # tokens of each output checked against the fp32 reference


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


# Calls per timed burst: their launches (4 or 5 each) stay well below the ~1000 a CUDA stream queues
# before a launch blocks, which would turn the host time into the GPU's.
BURST_CALLS = 50


def host_us_per_call(call, calls: int, device: torch.device) -> float:
    """Host microseconds per call: the median over bursts of BURST_CALLS back-to-back calls, the
    GPU drained between bursts."""
    per_burst = []
    for _ in range(max(1, calls // BURST_CALLS)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(min(calls, BURST_CALLS)):
            call()
        per_burst.append((time.perf_counter() - start) / min(calls, BURST_CALLS) * 1e6)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return statistics.median(per_burst)


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


@contextlib.contextmanager
def small_routing_rows(limit: int | None):
    """Run with `comet.kernels.routing.SMALL_ROUTING_ROWS` = limit (None: as it is)."""
    from comet.kernels import routing

    saved = routing.SMALL_ROUTING_ROWS
    routing.SMALL_ROUTING_ROWS = saved if limit is None else limit
    try:
        yield
    finally:
        routing.SMALL_ROUTING_ROWS = saved


def run(args, device: torch.device) -> int:
    env, rows = environment(device), []
    out = output_dir()
    for name in args.shapes:
        shape = model_shape(name)
        weights = make_weights(shape, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
        skew = torch.randn(shape.cfg.num_experts, device=device) * ROUTER_SKEW_STD
        for tokens in args.tokens:
            inputs = make_inputs(shape.cfg, tokens, weights.gate_up.dtype, device, skew)
            ref = reference_output(inputs, weights, shape.cfg, CHECK_ROWS)

            def call():
                return comet.moe_experts(*inputs, weights, shape.cfg, backend="triton", check_values=False)

            for variant, routing_rows in (("ours", None), ("library_sort", 0)):
                with torch.no_grad(), small_routing_rows(routing_rows):
                    error = relative_error(call()[:CHECK_ROWS], ref)  # (the first call also compiles)
                    status = "ok" if within_tolerance(error, inputs.x.dtype) else "MISMATCH"
                    host = host_us_per_call(call, args.calls, device)
                    gpu = gpu_us_per_call(call, args.calls, device)
                    text = profile_text(call, args.calls, args.top) if variant == "ours" else None
                rows.append({**env, "shape": name, "tokens": tokens, "variant": variant, "status": status,
                             "rel_err": error, "calls": args.calls, "host_us_per_call": host, "gpu_us_per_call": gpu})
                print(f"== {name}, {tokens} tokens, {variant}: {status} (rel err {error:.2g}), "
                      f"host {host:.1f} us per call, GPU {'-' if gpu is None else f'{gpu:.1f}'} us per call")
                if text:
                    print(f"profile of {args.calls} calls:\n{text}")
                    if out:
                        out.mkdir(parents=True, exist_ok=True)
                        (out / f"host_profile_{name}_{tokens}.txt").write_text(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    csv = args.results_dir / "host_overhead.csv"
    append_csv(csv, rows)
    table = pd.DataFrame(rows).pivot_table(index=["shape", "tokens"], columns="variant",
                                           values=["host_us_per_call", "gpu_us_per_call"])
    print(table.round(1).to_string())
    print("(microseconds per call: host = back-to-back eager calls, gpu = CUDA-graph replays)")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        return run_on_cpu(lambda device: run(args, device))
    if not torch.cuda.is_available():
        sys.exit("bench/diagnostics/host_overhead.py: needs a CUDA GPU (or --smoke)")
    return run(args, torch.device("cuda"))


if __name__ == "__main__":
    sys.exit(main())
