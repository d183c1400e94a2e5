"""Can the dispatch's traffic run beside the expert GEMM? Two ways of moving the bytes, each timed
alone and at the same time as GEMM1 (two streams):

  push N   N Triton programs storing into every rank's buffer (`comet.kernels.comm_probe`, which
           also waits for what the others push to this rank); GEMM1 on the other SMs (SMs - N
           persistent programs); "push N cs": the same with evict-first loads and streaming stores;
  copy     the copy engines: a tensor copy into every other rank's buffer (`CommWorkspace.peer_buffer`)
           on a side stream, GEMM1 on every SM.

GEMM1 is the gate/up GEMM of one balanced rank of an expert-parallel call of the shape (tokens x
top_k rows over the rank's E/W experts, random routing, the tuned tile configs); the bytes per rank
are what its dispatch sends one rank (the tokens using one of that rank's experts), to every rank:
the pushes to itself as well (as comm_probe moves them), the copies only to the others. Per shape and mover: GEMM1 alone on the SMs it gets and
on every SM, the mover alone, both together (from the common start to the last end), each one's time
inside the pair, the mover's GB/s to the other ranks alone and beside GEMM1, and the share of the
mover's time hidden: 1 - (pair - GEMM1 alone on every SM) / mover alone. Every time is the slowest
rank's median over --repeats; what arrived is checked after each timing. Rank 0 prints the table
and appends bench/results/overlap_probe.csv (copied to $OUT when set).

    torchrun --nproc-per-node 2 -m bench.experiments.overlap_probe [--shapes Qwen3-30B-A3B Mixtral-8x7B] [--tokens 8192]
    python -m bench.experiments.overlap_probe --smoke     # the same logic on 2 CPU ranks (interpreter), one after another
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

from bench.common import DTYPES, RESULTS_DIR, append_csv, environment, run_probe
from bench.shapes import model_shape
from comet.device_info import num_sms


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", help="default Qwen3-30B-A3B Mixtral-8x7B DeepSeek-V3 (--smoke: tiny-mixtral)")
    p.add_argument("--tokens", type=int, help="tokens per rank (default 8192; --smoke: 24)")
    p.add_argument("--push-programs", type=int, nargs="+", help="pushing programs of the push movers (default 8 16; "
                   "--smoke: 2)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, help="timed repeats per measurement (default 10; --smoke: 2)")
    p.add_argument("--results-dir", type=Path, help="where overlap_probe.csv goes (default bench/results; "
                   "--smoke: a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="2 CPU ranks, kernels interpreted, tiny sizes")
    args = p.parse_args(argv)
    defaults = dict(shapes=["Qwen3-30B-A3B", "Mixtral-8x7B", "DeepSeek-V3"], tokens=8192, push_programs=[8, 16],
                    repeats=10)
    if args.smoke:
        defaults.update(shapes=["tiny-mixtral"], tokens=24, push_programs=[2], repeats=2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.tokens < 1 or args.repeats < 1 or min(args.push_programs) < 1:
        p.error("--tokens, --repeats and --push-programs: expected positive values")
    if args.results_dir is None:
        args.results_dir = Path(tempfile.mkdtemp(prefix="comet-overlap-probe-")) if args.smoke else RESULTS_DIR
    return args


def gemm1(cfg, tokens: int, world: int, dtype: torch.dtype, device: torch.device):
    """GEMM1 of one balanced rank: a function of the most programs it may use."""
    from comet.kernels.expert_gemm import GemmProblem, launch_gemm
    from comet.scheduler.configs import select_configs
    from comet.scheduler.routing import analyze_routing

    experts, hidden, ffn = cfg.num_experts // world, cfg.hidden_size, cfg.ffn_size
    top_k = min(cfg.top_k, experts)
    gen = torch.Generator(device=device).manual_seed(1234 + dist.get_rank())
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    gate_up = (torch.randn(experts, 2 * ffn, hidden, generator=gen, device=device) * hidden**-0.5).to(dtype)
    ids = torch.rand(tokens, experts, generator=gen, device=device).argsort(dim=1)[:, :top_k].contiguous()
    routing = analyze_routing(ids, experts)
    cfg1, _ = select_configs(ids.numel(), experts, hidden, ffn, dtype, device)
    act = torch.empty(ids.numel(), ffn, dtype=dtype, device=device)
    problem = GemmProblem.gate_up(x, gate_up, None, False, routing.sorted_rows, torch.ones(ids.numel(), device=device),
                                  routing.hist, act, top_k=top_k, activation=cfg.activation, alpha=cfg.swiglu_alpha,
                                  limit=cfg.swiglu_limit, weight_on_input=False, cfg=cfg1)
    return lambda max_programs: launch_gemm(problem, max_programs=max_programs)


def rank_data(rank: int, n: int, dtype, device) -> torch.Tensor:
    """What `rank` sends: every rank can make every other's, to check what arrived."""
    gen = torch.Generator(device=device).manual_seed(99 + rank)
    return torch.randn(n, generator=gen, device=device).to(dtype)


class Movers:
    """The two ways of moving this rank's data to every rank, and the checks of what arrived."""

    def __init__(self, ws, n: int, dtype: torch.dtype):
        self.ws, self.n = ws, n
        self.data = rank_data(ws.rank, n, dtype, ws.device)
        self.copy_name = f"overlap_probe.copy.{str(dtype).removeprefix('torch.')}.{n}"
        self.copy_recv = ws.buffer(self.copy_name, (ws.world_size, n), dtype)
        self.pushed = None

    def push(self, programs: int, streaming: bool):
        from comet.kernels.comm_probe import comm_probe

        block = 4096 if self.ws.device.type == "cuda" else 256
        self.pushed = comm_probe(self.ws, self.data, num_programs=programs, block=block, num_warps=8, check=False,
                                 streaming=streaming)

    def copy(self):
        # Only to the other ranks: the dispatch reads a rank's own rows in place, and a copy within
        # one GPU would wait for SMs that the persistent GEMM holds.
        ws = self.ws
        for j in range(1, ws.world_size):  # the next rank first, so that no two sources start on one target
            dst = (ws.rank + j) % ws.world_size
            ws.peer_buffer(self.copy_name, dst)[ws.rank].copy_(self.data, non_blocking=True)

    def check(self, mover: str):
        """After a barrier: every source's data arrived whole (the copy's: every other source's)."""
        self.ws.check_errors()
        got = self.pushed if mover.startswith("push") else self.copy_recv
        for src in range(self.ws.world_size):
            if mover == "copy" and src == self.ws.rank:
                continue
            if not torch.equal(got[src], rank_data(src, self.n, self.data.dtype, self.ws.device)):
                raise AssertionError(f"{mover}: rank {self.ws.rank} got wrong data from rank {src}")


def timed(main, side, repeats: int, device: torch.device) -> dict[str, float]:
    """Medians over `repeats` (after one untimed run) of the seconds from a common start to the end
    of `main` (on the current stream), of `side` (on a side stream) and of both; either may be None.
    On CPU they run one after the other."""
    spans = {"main": [], "side": [], "both": []}
    present = [key for key, fn in (("main", main), ("side", side)) if fn]
    side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    for repeat in range(repeats + 1):
        dist.barrier()
        if side_stream is None:
            t0 = time.perf_counter()
            if main:
                main()
            t1 = time.perf_counter()
            if side:
                side()
            ends = {"main": t1 - t0, "side": time.perf_counter() - t0}
        else:
            torch.cuda.synchronize(device)
            start, main_end, side_end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            start.record()
            if side:
                side_stream.wait_event(start)
                with torch.cuda.stream(side_stream):
                    side()
                    side_end.record(side_stream)
            if main:
                main()
            main_end.record()
            torch.cuda.synchronize(device)
            ends = {key: start.elapsed_time(end) / 1e3 for key, end in (("main", main_end), ("side", side_end))
                    if key in present}
        if repeat:
            for key in present:
                spans[key].append(ends[key])
            spans["both"].append(max(ends[key] for key in present))
    slowest = {}
    for key, values in spans.items():
        if values:  # the slowest rank's median
            t = torch.tensor([statistics.median(values)], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            slowest[key] = t.item()
    return slowest


def run(args) -> list[dict]:
    """One rank's part (the process group is up); rank 0 returns the rows."""
    from comet.comm import CommWorkspace
    from comet.scheduler.ep_split import ep_shape, share_per_rank

    dtype = DTYPES[args.dtype]
    world = dist.get_world_size()
    ws = CommWorkspace.create()
    device = ws.device
    sms = num_sms(device)
    env, rows = environment(device), []
    for name in args.shapes:
        cfg = model_shape(name).cfg
        if cfg.num_experts % world:
            raise ValueError(f"--shapes {name}: {cfg.num_experts} experts do not split over {world} ranks")
        shape = ep_shape(args.tokens, cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.top_k, world, dtype)
        n = max(1, round(share_per_rank(shape) * args.tokens)) * cfg.hidden_size
        movers = Movers(ws, n, dtype)
        run_gemm = gemm1(cfg, args.tokens, world, dtype, device)
        gemm_full = timed(lambda: run_gemm(sms), None, args.repeats, device)["main"]
        kinds = [(f"push {p}{tag}", p, tag == " cs") for p in args.push_programs if p < sms for tag in ("", " cs")]
        for mover, programs, streaming in kinds + [("copy", 0, False)]:
            move = (lambda p=programs, s=streaming: movers.push(p, s)) if programs else movers.copy
            gemm_alone = timed(lambda: run_gemm(sms - programs), None, args.repeats, device)["main"]
            alone = timed(None, move, args.repeats, device)
            dist.barrier()
            movers.check(mover)
            pair = timed(lambda: run_gemm(sms - programs), move, args.repeats, device)
            dist.barrier()
            movers.check(mover)
            moved = n * dtype.itemsize * (world - 1)
            rows.append({**env, "world_size": world, "shape": name, "tokens_per_rank": args.tokens, "dtype": args.dtype,
                         "mover": mover, "bytes_per_peer": n * dtype.itemsize,
                         "gemm_full_us": gemm_full * 1e6, "gemm_alone_us": gemm_alone * 1e6,
                         "move_alone_us": alone["side"] * 1e6, "pair_us": pair["both"] * 1e6,
                         "gemm_in_pair_us": pair["main"] * 1e6, "move_in_pair_us": pair["side"] * 1e6,
                         "move_gbps_alone": moved / alone["side"] / 1e9,
                         "move_gbps_in_pair": moved / pair["side"] / 1e9,
                         "hidden_share": 1 - (pair["both"] - gemm_full) / alone["side"]})
            if dist.get_rank() == 0:
                r = rows[-1]
                print(f"{name} {mover}: GEMM1 {r['gemm_full_us']:.0f} us (alone on its SMs {r['gemm_alone_us']:.0f}), "
                      f"move {r['move_alone_us']:.0f} us, both {r['pair_us']:.0f} us, hidden {r['hidden_share']:.2f}",
                      flush=True)
        ws.free(movers.copy_name)
    ws.close()
    return rows if dist.get_rank() == 0 else []


def report(rows: list[dict], results_dir: Path):
    import pandas as pd

    table = pd.DataFrame(rows)
    columns = ["gemm_full_us", "gemm_alone_us", "move_alone_us", "pair_us", "gemm_in_pair_us", "move_in_pair_us",
               "move_gbps_alone", "move_gbps_in_pair", "hidden_share"]
    print()
    print(table.set_index(["shape", "mover"])[columns].to_string(float_format=lambda v: f"{v:.2f}"))
    print("(us; GB/s each rank moves to the other ranks; hidden: 1 - (pair - GEMM1 on every SM) / move alone)")
    path = results_dir / "overlap_probe.csv"
    append_csv(path, rows)
    print(f"appended {len(rows)} rows to {path}")


def main(argv=None) -> int:
    return run_probe("bench.experiments.overlap_probe", run, report, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
