"""The tuner of the expert-parallel split, behind `torchrun --nproc-per-node W -m comet tune --ep-split`
and `bench/ep.py --write-table`: time `comet.ep.ep_experts` per candidate split (n_comm,
column_chunks) on the running process group, and record each shape's fastest in the GPU's split
table (`scheduler/tables/ep_<gpu>.json`), which `n_comm="auto"` reads first (`comet.scheduler.ep_split`).

Every function here is collective over the default process group (every rank calls it with the
same arguments); the table is written by rank 0.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from comet.config import MoEConfig
from comet.scheduler.ep_split import EpSplit, ep_shape, write_table_entry
from comet.weights import ExpertWeights

DEFAULT_N_COMM = (8, 16, 32)
# Relative Frobenius error of a fused split against the unfused path's output on the same inputs.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}


def candidate_splits(n_comms) -> list[tuple[int, int | None]]:
    """(n_comm, column_chunks) to time: the unfused path, then per n_comm the fused path with the
    cost model's column chunks (None) and with only the dispatch fused (0)."""
    return [(0, None)] + [c for n in n_comms for c in ((n, None), (n, 0))]


def _slowest(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _median_ms(call, device: torch.device, warmup: int, reps: int) -> float:
    """Median ms of `reps` calls after `warmup` (a fixed count: every rank makes the same calls)."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def sweep_splits(configs: dict[str, MoEConfig], tokens_per_rank, dtype: torch.dtype, device: torch.device,
                 n_comms=DEFAULT_N_COMM, warmup: int = 3, reps: int = 20, seed: int = 0) -> list[dict]:
    """One row per (shape name, tokens per rank, candidate split): shape, tokens_per_rank, E, H, F,
    K, world_size, n_comm, column_chunks (as the state resolved them), status ("ok", or
    "mismatch" where the output differs from the unfused path's), rel_err, ms (the slowest
    rank's median). Random weights (the same on every rank) and router logits (each rank its own)."""
    from comet.ep import ExpertParallelState, ep_experts
    from comet.reference import route

    rank, world = dist.get_rank(), dist.get_world_size()
    rows = []
    for name, cfg in configs.items():
        if cfg.num_experts % world:
            raise ValueError(f"{name}: {cfg.num_experts} experts do not split over {world} ranks")
        per_rank = cfg.num_experts // world
        torch.manual_seed(seed)
        e, f, h = cfg.num_experts, cfg.ffn_size, cfg.hidden_size
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        gate_up = (torch.randn(e, 2 * f, h, device=device, dtype=dtype) * h ** -0.5)[part].contiguous()
        down = (torch.randn(e, h, f, device=device, dtype=dtype) * f ** -0.5)[part].contiguous()
        local = ExpertWeights(gate_up, down)
        router = torch.randn(e, h, device=device, dtype=torch.float32)
        for tokens in tokens_per_rank:
            torch.manual_seed(seed * 7919 + tokens * 31 + rank)
            x = torch.randn(tokens, h, device=device, dtype=dtype)
            topk_weights, topk_ids = route(x.float() @ router.t(), cfg)
            state = ExpertParallelState(max_tokens=tokens, configs=[cfg])
            shape = ep_shape(tokens, h, f, e, cfg.top_k, world, dtype)
            reference = None
            for n_comm, column_chunks in candidate_splits(n_comms):
                split = state.split(shape, n_comm, column_chunks)

                def call():
                    return ep_experts(x, topk_ids, topk_weights, local, cfg, state, n_comm=split.n_comm,
                                      column_chunks=split.column_chunks)

                with torch.no_grad():
                    out = call().float()
                    reference = out if reference is None else reference
                    error = _slowest(((out - reference).norm() / reference.norm().clamp_min(1e-30)).item(), device)
                    ms = _slowest(_median_ms(call, device, warmup, reps), device)
                rows.append({"shape": name, "tokens_per_rank": tokens, "E": e, "H": h, "F": f, "K": cfg.top_k,
                             "world_size": world, "n_comm": split.n_comm, "column_chunks": split.column_chunks,
                             "status": "ok" if error <= TOLERANCE[dtype] else "mismatch", "rel_err": error, "ms": ms})
            state.close()
    return rows


def best_splits(rows: list[dict]) -> dict[tuple[str, int], EpSplit]:
    """(shape name, tokens per rank) -> the fastest split among `rows` whose status is "ok" (rows
    with the keys of `sweep_splits`'; other keys are ignored)."""
    best: dict[tuple[str, int], dict] = {}
    for r in rows:
        if r.get("status") != "ok" or r.get("ms") is None or r.get("n_comm") is None:
            continue
        key = (r["shape"], int(r["tokens_per_rank"]))
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    return {key: EpSplit(int(r["n_comm"]), int(r["column_chunks"])) for key, r in best.items()}


def write_splits(best: dict[tuple[str, int], EpSplit], configs: dict[str, MoEConfig], world: int,
                 dtype: torch.dtype, gpu: str) -> Path | None:
    """Record each (shape, tokens per rank)'s split of `best` in `gpu`'s split table; -> its path
    (None if `best` is empty). Not collective: call it on one rank."""
    path = None
    for (name, tokens), split in sorted(best.items()):
        c = configs[name]
        shape = ep_shape(tokens, c.hidden_size, c.ffn_size, c.num_experts, c.top_k, world, dtype)
        path = write_table_entry(gpu, shape, split)
        print(f"table: {name} T/rank={tokens}: n_comm={split.n_comm}, column_chunks={split.column_chunks}")
    return path
