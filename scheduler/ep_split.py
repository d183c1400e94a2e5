"""The comm/compute split of the expert-parallel layer, chosen per call from the shape bucket.

`choose_split(shape, device)` gives `EpSplit(n_comm, column_chunks)`: how many programs of each
fused kernel push (0: the unfused path, dispatch / expert GEMMs / combine as separate launches,
every SM on each) and into how many column chunks GEMM2 is cut (`comet.kernels.ep_combine`). It
reads only shapes (tokens per rank = the buffers' capacity, the same on every rank, so every rank
picks the same path), never tensor values: no host sync.

Sources, in order:
1. the tuned table for this GPU, `scheduler/tables/ep_<gpu>.json` (written by
   `torchrun --nproc-per-node W bench/ep.py --write-table`: the fastest measured of the unfused path
   and each fused n_comm), entry of the nearest token bucket (log scale);
2. else the cost model below; it picks the fused path only where it predicts a gain of more than
   `FUSED_MARGIN` (20%).

Cost model (H200 constants; other GPUs scale GEMM rate and bandwidths by their SM count):
- GEMM time = expert FLOPs of the rank's expected (balanced) rows / `GEMM_FLOPS`; a fused kernel
  computes on SMs - n_comm programs, so its GEMMs take SMs / (SMs - n_comm) as long;
- push time = bytes / bandwidth of the programs pushing, interpolated from `PUSH_GBPS` (measured
  on 2 x H200, bench/results/comm_probe.csv, 64 MiB per peer in 32K-element stores, commit b50d2d9:
  ~21 GB/s per program at 8 programs, flattening to ~300 GB/s at 132). A token goes once to every
  rank holding one of its experts: with uniform routing of K distinct experts over E, a rank gets a
  token with probability 1 - C(E - E/W, K) / C(E, K); a rank pushes W - 1 such shares to the
  others, and unfused also copies its own share to itself;
- unfused: GEMM1 + GEMM2 + dispatch + combine at every SM's bandwidth + the slot sum (HBM);
- fused: max(GEMM1, dispatch to the others on n_comm programs) + max(GEMM2 + GEMM2's input
  re-read once per extra column chunk, (C-1)/C of the combine on n_comm programs) + the last
  chunk's combine (its own tokens' partial rows included: every token has a slot there).
  Plus the fused kernels' own costs, measured: their structure (tile waits, counters, the sums
  done by few programs) adds `FUSED_STRUCTURE` of the GEMM time (bench/ep_kernels.py on one rank,
  Qwen3-30B-A3B: 1504 vs 1402 us), and GEMM1 in arrival order reads each local expert's weights
  once per source.
What it leaves out (so the tuned table wins where it exists): routing skew, launch latencies, and
that small batches are bound by reading the expert weights, not by FLOPs.
"""
from __future__ import annotations

import bisect
import functools
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

from comet.scheduler.configs import TABLE_DIR, gpu_key

# Measured on H200 (see the module docstring); an SM count other than H200's scales them.
H200_SMS = 132
GEMM_FLOPS = {2: 600e12, 4: 300e12}  # by element size: bf16/fp16 tensor cores, fp32 as TF32
HBM_BYTES_PER_S = 4.0e12
PUSH_GBPS = {8: 171.7, 16: 223.7, 32: 264.6, 132: 303.0}  # programs -> GB/s
FUSED_STRUCTURE = 0.07
N_COMM_CANDIDATES = (4, 8, 16, 24, 32, 48, 64)
COLUMN_CHUNK_CANDIDATES = (1, 2, 4, 8)
# The model leaves out the fused path's own costs (see the docstring); before the column-chunk and
# vector-wait fixes they made it 1.4x (Mixtral) to 2.3x (Qwen3-30B-A3B) slower than unfused at 8192
# tokens per rank on 2 x H200 where the model predicted parity or a 15% gain. So it must predict a
# clear win; the tuned table decides the rest.
FUSED_MARGIN = 0.2


class EpShape(NamedTuple):
    """What the split depends on: tokens per rank (the capacity), the expert shape, the group
    size, the element size in bytes."""

    tokens: int
    hidden: int
    ffn: int
    num_experts: int
    top_k: int
    world: int
    element_size: int


class EpSplit(NamedTuple):
    n_comm: int  # pushing programs per fused kernel; 0 = unfused
    column_chunks: int  # GEMM2 column chunks of the fused combine (1 when unfused)


def ep_shape(tokens: int, hidden: int, ffn: int, num_experts: int, top_k: int, world: int,
             dtype: torch.dtype) -> EpShape:
    return EpShape(tokens, hidden, ffn, num_experts, top_k, world, dtype.itemsize)


def table_key(shape: EpShape) -> str:
    return (f"E{shape.num_experts}_H{shape.hidden}_F{shape.ffn}_K{shape.top_k}_W{shape.world}"
            f"_B{shape.element_size}")


def tokens_bucket(tokens: int) -> int:
    return 1 << max(0, tokens - 1).bit_length()


def table_path(gpu: str) -> Path:
    return TABLE_DIR / f"ep_{gpu}.json"


@functools.lru_cache(maxsize=None)
def load_table(gpu: str) -> dict:
    path = table_path(gpu)
    return json.loads(path.read_text()) if path.is_file() else {}


def table_split(table: dict, shape: EpShape) -> EpSplit | None:
    """The entry of the token bucket nearest (log scale) to `shape`'s, if the shape was tuned."""
    entries = table.get(table_key(shape))
    if not entries:
        return None
    bucket = tokens_bucket(shape.tokens).bit_length()
    best = min(entries, key=lambda b: abs(int(b).bit_length() - bucket))
    return EpSplit(**entries[best])


def write_table_entry(gpu: str, shape: EpShape, split: EpSplit) -> Path:
    """Record the measured best split of `shape`'s token bucket (merged into the GPU's table)."""
    table = dict(load_table(gpu))  # the cached table is not modified
    table.setdefault(table_key(shape), {})[str(tokens_bucket(shape.tokens))] = split._asdict()
    path = table_path(gpu)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    load_table.cache_clear()
    return path


# ----------------------------------------------------------------------------------------------
# Cost model
# ----------------------------------------------------------------------------------------------
def push_bytes_per_s(programs: int, sms: int = H200_SMS) -> float:
    """Bandwidth of `programs` programs storing to peer memory, interpolated from PUSH_GBPS."""
    counts = sorted(PUSH_GBPS)
    scale = sms / H200_SMS
    programs = min(max(programs / scale, 1.0), counts[-1])
    i = bisect.bisect_left(counts, programs)
    if i == 0:
        gbps = PUSH_GBPS[counts[0]] * programs / counts[0]  # per-program rate below the probe
    else:
        lo, hi = counts[i - 1], counts[i]
        gbps = PUSH_GBPS[lo] + (PUSH_GBPS[hi] - PUSH_GBPS[lo]) * (programs - lo) / (hi - lo)
    return gbps * 1e9 * scale


def share_per_rank(shape: EpShape) -> float:
    """Probability that a token has at least one of its K (distinct, uniform) experts on a given rank."""
    e, k = shape.num_experts, shape.top_k
    elsewhere = e - e // shape.world
    return 1.0 - (math.comb(elsewhere, k) / math.comb(e, k) if elsewhere >= k else 0.0)


def _parts(shape: EpShape, sms: int) -> dict:
    """Seconds of each part of a call at full GPU width."""
    rows = shape.tokens * shape.top_k  # balanced: every rank computes its own tokens' share of rows
    flops = GEMM_FLOPS.get(shape.element_size, GEMM_FLOPS[4]) * sms / H200_SMS
    row_bytes = shape.tokens * shape.hidden * shape.element_size
    return {
        "gemm1": 2 * rows * 2 * shape.ffn * shape.hidden / flops,
        "gemm2": 2 * rows * shape.ffn * shape.hidden / flops,
        "remote_bytes": (shape.world - 1) * share_per_rank(shape) * row_bytes,  # to the other ranks
        "own_bytes": share_per_rank(shape) * row_bytes,  # unfused: this rank's own share, copied
        "gemm2_input_s": rows * shape.ffn * shape.element_size / HBM_BYTES_PER_S,
        "slot_sum": 2 * rows * shape.hidden * shape.element_size / HBM_BYTES_PER_S,
        # GEMM1's weights of this rank's experts, read again for every other source
        "weights_reread_s": (shape.world - 1) * shape.num_experts // shape.world * 2 * shape.ffn * shape.hidden
        * shape.element_size / HBM_BYTES_PER_S,
    }


def unfused_seconds(shape: EpShape, sms: int = H200_SMS) -> float:
    p = _parts(shape, sms)
    pushed = p["remote_bytes"] + p["own_bytes"]
    return p["gemm1"] + p["gemm2"] + p["slot_sum"] + 2 * pushed / push_bytes_per_s(sms, sms)


def fused_seconds(shape: EpShape, n_comm: int, column_chunks: int, sms: int = H200_SMS) -> float:
    if n_comm >= sms:
        return math.inf  # no program left to compute
    p = _parts(shape, sms)
    stretch = sms / (sms - n_comm) * (1 + FUSED_STRUCTURE)
    rate = push_bytes_per_s(n_comm, sms)
    layer0 = max(p["gemm1"] * stretch + p["weights_reread_s"], p["remote_bytes"] / rate)
    combine = (p["remote_bytes"] + shape.tokens * shape.hidden * shape.element_size) / rate
    gemm2 = p["gemm2"] * stretch + (column_chunks - 1) * p["gemm2_input_s"]
    layer1 = max(gemm2, combine * (column_chunks - 1) / column_chunks) + combine / column_chunks
    return layer0 + layer1


def best_column_chunks(shape: EpShape, n_comm: int, sms: int = H200_SMS) -> int:
    """The column chunk count the model prefers for a given n_comm (at most one per 128 columns)."""
    allowed = [c for c in COLUMN_CHUNK_CANDIDATES if c * 128 <= max(shape.hidden, 128)]
    return min(allowed, key=lambda c: fused_seconds(shape, n_comm, c, sms))


def model_split(shape: EpShape, sms: int = H200_SMS) -> EpSplit:
    """The cost model's choice: the fastest fused split if it beats the unfused path by FUSED_MARGIN."""
    candidates = [n for n in N_COMM_CANDIDATES if n < sms // 2]
    if shape.tokens == 0 or not candidates:
        return EpSplit(0, 1)
    fused = [EpSplit(n, best_column_chunks(shape, n, sms)) for n in candidates]
    best = min(fused, key=lambda s: fused_seconds(shape, *s, sms))
    if fused_seconds(shape, *best, sms) < (1.0 - FUSED_MARGIN) * unfused_seconds(shape, sms):
        return best
    return EpSplit(0, 1)


def choose_split(shape: EpShape, device: torch.device) -> EpSplit:
    """The split of a call: the GPU's tuned table, else the cost model. Off a GPU (the Triton
    interpreter) the unfused path: the model describes GPU rates."""
    if device.type != "cuda":
        return EpSplit(0, 1)
    tuned = table_split(load_table(gpu_key(device)), shape)
    if tuned is not None:
        return tuned
    return model_split(shape, torch.cuda.get_device_properties(device).multi_processor_count)
