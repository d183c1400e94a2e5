"""Push bandwidth of Triton programs storing into peer GPUs' memory, through the comm workspace.

    torchrun --nproc-per-node 2 bench/comm_probe.py [--sizes-mib 1 4 16 64 256] [--programs 4 8 16 32 64 132]

Every rank sends the same data to every rank (itself included) with `comet.kernels.comm_probe`:
checks what arrives, times calls back to back (no host sync between them: buffers and flags are
reused through epochs), and measures how long one poll of a flag takes (which sets the wait
limit's length in seconds). Rank 0 prints a table and writes bench/results/comm_probe_<gpu>.csv.
"""
import os

# Before torch.distributed starts: NVLink multicast (NVLS) is never used.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes-mib", type=float, nargs="+", default=[1, 4, 16, 64, 256],
                   help="bytes each rank sends to each rank, in MiB")
    p.add_argument("--programs", type=int, nargs="+", default=[4, 8, 16, 32, 64, 132],
                   help="numbers of pushing programs (capped at the number of SMs)")
    p.add_argument("--block", type=int, default=4096, help="elements per store")
    p.add_argument("--num-warps", type=int, default=8)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-calibrate", action="store_true", help="skip measuring the time of one flag poll")
    return p.parse_args()


def log(msg: str):
    print(f"[rank {dist.get_rank() if dist.is_initialized() else '?'}] {msg}", flush=True)


def rank_data(seed: int, call: int, rank: int, n: int, dtype, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed * 1009 + call * 101 + rank)
    return torch.randn(n, generator=gen, device=device).to(dtype)


def check_exchange(ws, comm_probe, dtype, device):
    """Data correctness: several consecutive calls, several shapes, every source's data exact."""
    configs = [(1000, 2, None), (4096, 8, 512), (1 << 20, 16, None), (1 << 20, 32, 4096), (12345, 3, 1024)]
    for call, (n, programs, chunk) in enumerate(configs * 2):
        got = comm_probe(ws, rank_data(7, call, ws.rank, n, dtype, device), num_programs=programs,
                         chunk_elems=chunk, block=1024)
        for src in range(ws.world_size):
            want = rank_data(7, call, src, n, dtype, device)
            if not torch.equal(got[src], want):
                bad = (got[src] != want).nonzero()
                raise AssertionError(f"call {call} (n={n}, programs={programs}): data from rank {src} differs at "
                                     f"{bad.numel()} elements, first at {bad[:4].flatten().tolist()}")
    log(f"exchange check passed ({2 * len(configs)} calls)")


def time_config(ws, comm_probe, n, programs, args, dtype, device) -> float:
    """Seconds per call, the slowest rank's median over repeats."""
    data = rank_data(11, 0, ws.rank, n, dtype, device)
    kwargs = dict(num_programs=programs, block=args.block, num_warps=args.num_warps, check=False)
    for _ in range(args.warmup):
        comm_probe(ws, data, **kwargs)
    ws.barrier()
    samples = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.iters):
            got = comm_probe(ws, data, **kwargs)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / args.iters)
        ws.barrier()
    ws.check_errors()
    for src in range(ws.world_size):
        if not torch.equal(got[src], rank_data(11, 0, src, n, dtype, device)):
            raise AssertionError(f"timed config n={n}, programs={programs}: wrong data from rank {src}")
    seconds = torch.tensor([sorted(samples)[1]], device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()


def calibrate_poll(comm_probe, dtype, device) -> float:
    """Seconds per flag poll: rank 0 waits on a peer that stops sending, until its limit."""
    from comet.comm import CommTimeoutError, CommWorkspace

    polls = 1 << 20
    ws = CommWorkspace.create(device=device, max_spins=polls)
    data = torch.ones(4096, dtype=dtype, device=device)
    comm_probe(ws, data, num_programs=1)  # together once: makes the buffers
    elapsed = None
    if ws.rank == 0:
        torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            comm_probe(ws, data, num_programs=1)
            raise AssertionError("the wait on a silent peer did not time out")
        except CommTimeoutError as e:
            elapsed = time.perf_counter() - start
            log(f"expected timeout: {e}")
    dist.barrier()
    ws.close()
    return None if elapsed is None else elapsed / polls


def environment_row(device) -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit}


def main():
    args = parse_args()
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        sys.exit("bench/comm_probe.py: launch it with torchrun, e.g. torchrun --nproc-per-node 2 bench/comm_probe.py")
    if not torch.cuda.is_available():
        sys.exit("bench/comm_probe.py: needs CUDA GPUs")
    local_rank = int(os.environ["LOCAL_RANK"])
    if local_rank >= torch.cuda.device_count():
        sys.exit(f"bench/comm_probe.py: local rank {local_rank} but only {torch.cuda.device_count()} GPUs visible")
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl")
    try:
        run(args, device)
    finally:
        dist.destroy_process_group()


def run(args, device):
    from comet.comm import CommWorkspace
    from comet.kernels.comm_probe import comm_probe

    dtype = getattr(torch, args.dtype)
    world = dist.get_world_size()
    if world < 2:
        log("warning: one rank only; this measures local copies, not peer pushes")
    ws = CommWorkspace.create()
    log(f"{ws!r} on {torch.cuda.get_device_name(device)}, max_spins={ws.max_spins}")
    check_exchange(ws, comm_probe, dtype, device)

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs_list = sorted({min(p, sms) for p in args.programs})
    rows = []
    for mib in args.sizes_mib:
        n = int(mib * (1 << 20)) // dtype.itemsize
        for programs in programs_list:
            seconds = time_config(ws, comm_probe, n, programs, args, dtype, device)
            peer_bytes = n * dtype.itemsize * (world - 1)
            rows.append({"mib_per_peer": mib, "programs": programs, "block": args.block, "num_warps": args.num_warps,
                         "us_per_call": seconds * 1e6, "push_gbps_per_rank": peer_bytes / seconds / 1e9,
                         "world_size": world, "dtype": args.dtype})
            if dist.get_rank() == 0:
                r = rows[-1]
                print(f"{mib:>8g} MiB  {programs:>4} programs  {r['us_per_call']:>10.1f} us  "
                      f"{r['push_gbps_per_rank']:>7.1f} GB/s to peers", flush=True)
    ws.close()

    seconds_per_poll = None if args.no_calibrate else calibrate_poll(comm_probe, dtype, device)
    if dist.get_rank() != 0:
        return
    import pandas as pd

    table = pd.DataFrame(rows)
    for key, value in environment_row(device).items():
        table[key] = value
    print()
    print(table.pivot(index="mib_per_peer", columns="programs", values="push_gbps_per_rank")
          .to_string(float_format=lambda v: f"{v:.1f}"))
    print("(GB/s each rank pushes to its peers: rows MiB per peer, columns programs)")
    if seconds_per_poll is not None:
        from comet.comm import DEFAULT_MAX_SPINS

        limit = DEFAULT_MAX_SPINS["cuda"] * seconds_per_poll
        print(f"one flag poll: {seconds_per_poll * 1e9:.0f} ns; the default wait limit of "
              f"{DEFAULT_MAX_SPINS['cuda']} polls is {limit:.0f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device)).strip("_")
    out = RESULTS / f"comm_probe_{slug}.csv"
    table.to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
