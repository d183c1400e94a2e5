"""Push bandwidth of Triton programs storing into peer GPUs' memory, through the comm workspace.

    torchrun --nproc-per-node 2 -m bench.experiments.comm_probe [--sizes-mib 1 4 16 64 256] [--programs 4 8 16 32 64 132]
    python -m bench.experiments.comm_probe --smoke        # the same logic on 2 CPU ranks (interpreter), tiny sizes

Every rank sends its data to every rank (itself included) with `comet.kernels.comm_probe`. The run
(1) checks what arrives over several consecutive calls and shapes, (2) times calls back to back (no
host sync between them: buffers and flags are reused through epochs; the slowest rank's median of 3
repeats), checking the data again, (3) measures how long one flag poll takes by letting rank 0 wait
on a peer that stops sending (this sets how long the default wait limit is in seconds). Rank 0
prints a table (GB/s each rank pushes to its peers) and appends rows to bench/results/comm_probe.csv
(copied to $OUT when set). comet must be pip-installed (`pip install -e .`).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from bench.common import RESULTS_DIR, append_csv, environment, run_probe
from comet.device_info import num_sms

# (elements, programs, chunk elements) of the correctness calls; each list is run twice in a row.
CHECK_CALLS = [(1000, 2, None), (4096, 8, 512), (1 << 20, 16, None), (1 << 20, 32, 4096), (12345, 3, 1024)]
SMOKE_CHECK_CALLS = [(1000, 2, None), (999, 3, 128)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", type=float, nargs="+", help="MiB each rank sends to each rank "
                   "(default 1 4 16 64 256; --smoke: 0.01)")
    p.add_argument("--programs", type=int, nargs="+", help="numbers of pushing programs, capped at the "
                   "number of SMs (default 4 8 16 32 64 132; --smoke: 1 3)")
    p.add_argument("--block", type=int, help="elements per store (default 4096; --smoke: 256)")
    p.add_argument("--num-warps", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, help="untimed calls per configuration (default 5; --smoke: 1)")
    p.add_argument("--iters", type=int, help="calls per timed repeat (default 20; --smoke: 2)")
    p.add_argument("--no-calibrate", action="store_true", help="skip measuring the time of one flag poll")
    p.add_argument("--results-dir", type=Path, help="where comm_probe.csv goes (default bench/results; "
                   "--smoke: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="2 CPU ranks, kernels interpreted, tiny sizes")
    args = p.parse_args(argv)
    defaults = dict(sizes_mib=[1, 4, 16, 64, 256], programs=[4, 8, 16, 32, 64, 132], block=4096, warmup=5,
                    iters=20)
    if args.smoke:
        defaults.update(sizes_mib=[0.01], programs=[1, 3], block=256, warmup=1, iters=2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.results_dir is None:
        args.results_dir = Path(tempfile.mkdtemp(prefix="comet-comm-probe-")) if args.smoke else RESULTS_DIR
    return args


def log(msg: str):
    print(f"[rank {dist.get_rank() if dist.is_initialized() else '?'}] {msg}", flush=True)


def rank_data(seed: int, call: int, rank: int, n: int, dtype, device) -> torch.Tensor:
    """What `rank` sends in `call`: every rank can make every peer's."""
    gen = torch.Generator(device=device).manual_seed(seed * 1009 + call * 101 + rank)
    return torch.randn(n, generator=gen, device=device).to(dtype)


def check_received(got, seed, call, ws, n, dtype, what: str):
    for src in range(ws.world_size):
        want = rank_data(seed, call, src, n, dtype, ws.device)
        if not torch.equal(got[src], want):
            bad = (got[src] != want).nonzero()
            raise AssertionError(f"{what}: data from rank {src} differs at {bad.numel()} of {n} elements, "
                                 f"first at {bad[:4].flatten().tolist()}")


def check_exchange(ws, comm_probe, calls, dtype):
    """Several consecutive calls, several shapes: every source's data arrives exactly."""
    for call, (n, programs, chunk) in enumerate(calls * 2):
        got = comm_probe(ws, rank_data(7, call, ws.rank, n, dtype, ws.device), num_programs=programs,
                         chunk_elems=chunk, block=1024 if ws.device.type == "cuda" else 64)
        check_received(got, 7, call, ws, n, dtype, f"call {call} (n={n}, programs={programs}, chunk={chunk})")
    log(f"exchange check passed ({2 * len(calls)} calls)")


def seconds_per_call(ws, run_calls, iters: int) -> float:
    """Back-to-back calls: wall time of `iters` calls / iters, on the device's clock."""
    if ws.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_calls()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    start = time.perf_counter()
    run_calls()
    return (time.perf_counter() - start) / iters


def time_config(ws, comm_probe, n, programs, args, dtype) -> float:
    """Seconds per call: the slowest rank's median over 3 repeats."""
    data = rank_data(11, 0, ws.rank, n, dtype, ws.device)
    kwargs = dict(num_programs=programs, block=args.block, num_warps=args.num_warps, check=False)
    last = []

    def run_calls():
        for _ in range(args.iters):
            got = comm_probe(ws, data, **kwargs)
        last[:] = [got]

    for _ in range(args.warmup):
        comm_probe(ws, data, **kwargs)
    ws.barrier()
    samples = []
    for _ in range(3):
        samples.append(seconds_per_call(ws, run_calls, args.iters))
        ws.barrier()
    ws.check_errors()
    check_received(last[0], 11, 0, ws, n, dtype, f"timed n={n}, programs={programs}")
    seconds = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=ws.device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()


def calibrate_poll(comm_probe, polls: int, dtype, device) -> float | None:
    """Seconds per flag poll (on rank 0): it waits on a peer that stops sending, to its limit."""
    from comet.comm import CommTimeoutError, CommWorkspace

    ws = CommWorkspace.create(device=device)
    data = torch.ones(4096, dtype=dtype, device=device)
    comm_probe(ws, data, num_programs=1)  # together once: makes the buffers, under the default limit
    ws.barrier()
    seconds = None
    if ws.rank == 0:
        ws.max_spins = polls
        start = time.perf_counter()
        try:
            comm_probe(ws, data, num_programs=1)
        except CommTimeoutError as e:
            seconds = (time.perf_counter() - start) / polls
            log(f"expected timeout: {e}")
        else:
            raise AssertionError("the wait on a silent peer did not time out")
    ws.close()
    return seconds


def run(args) -> list[dict]:
    """One rank's part (the process group is up); rank 0 returns the rows."""
    from comet.comm import DEFAULT_MAX_SPINS, CommWorkspace
    from comet.kernels.comm_probe import comm_probe

    dtype = getattr(torch, args.dtype)
    world = dist.get_world_size()
    if world < 2:
        log("warning: one rank only; this measures local copies, not pushes to peers")
    ws = CommWorkspace.create()
    device = ws.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"{ws!r} on {name}, max_spins={ws.max_spins}")
    check_exchange(ws, comm_probe, SMOKE_CHECK_CALLS if args.smoke else CHECK_CALLS, dtype)

    max_programs = num_sms(device)
    rows = []
    env = environment(device)
    for mib in args.sizes_mib:
        n = max(1, int(mib * (1 << 20)) // dtype.itemsize)
        for programs in sorted({min(p, max_programs) for p in args.programs}):
            seconds = time_config(ws, comm_probe, n, programs, args, dtype)
            rows.append({**env, "world_size": world, "dtype": args.dtype, "mib_per_peer": mib, "elements": n,
                         "programs": programs, "block": args.block, "num_warps": args.num_warps,
                         "us_per_call": seconds * 1e6,
                         "push_gbps_per_rank": n * dtype.itemsize * (world - 1) / seconds / 1e9})
            if dist.get_rank() == 0:
                print(f"{mib:>8g} MiB per peer  {programs:>4} programs  {seconds * 1e6:>10.1f} us  "
                      f"{rows[-1]['push_gbps_per_rank']:>7.1f} GB/s to peers", flush=True)
    ws.close()
    if not args.no_calibrate:
        polls = 200 if args.smoke else 1 << 20
        per_poll = calibrate_poll(comm_probe, polls, dtype, device)
        if per_poll is not None:
            default = DEFAULT_MAX_SPINS[device.type]
            log(f"one flag poll takes {per_poll * 1e9:.0f} ns: the default limit of {default} polls is "
                f"{default * per_poll:.0f} s")
            for row in rows:
                row["ns_per_poll"] = per_poll * 1e9
    return rows if dist.get_rank() == 0 else []


def report(rows: list[dict], results_dir: Path):
    import pandas as pd

    table = pd.DataFrame(rows)
    print()
    print(table.pivot(index="mib_per_peer", columns="programs", values="push_gbps_per_rank")
          .to_string(float_format=lambda v: f"{v:.1f}"))
    print("(GB/s each rank pushes to its peers: rows MiB per peer, columns programs)")
    path = results_dir / "comm_probe.csv"
    append_csv(path, rows)
    print(f"appended {len(rows)} rows to {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import comet.kernels  # noqa: F401
    except ImportError as e:
        sys.exit(f"bench/experiments/comm_probe.py: comet.kernels is not importable ({e}); run `pip install -e .` first")
    return run_probe("bench.experiments.comm_probe", run, report, args)


if __name__ == "__main__":
    sys.exit(main())
