"""The comm/compute split of the expert-parallel layer, chosen per call from the shape bucket.

`choose_split(shape, device, rates)` gives `EpSplit(n_comm, column_chunks)`: how many programs of each
fused kernel push (0: the unfused path, dispatch / expert GEMMs / combine as separate launches,
every SM on each) and into how many column chunks GEMM2 is cut (`comet.kernels.ep_combine`; 0:
GEMM2 and the combine not fused, only the dispatch). It
reads only shapes (tokens per rank = the buffers' capacity, the same on every rank, so every rank
picks the same path), never tensor values: no host sync.

Sources, in order:
1. the tuned table for this GPU, `scheduler/tables/ep_<gpu>.json` (written by
   `torchrun --nproc-per-node W -m comet tune --ep-split`, or `bench/ep.py --write-table` beside the
   baselines, both through `comet.ep_tune`: the fastest measured of the unfused path and each fused
   n_comm), entry of the nearest token bucket (log scale);
2. else the cost model below; it picks the fused path only where it predicts a gain of more than
   `FUSED_MARGIN` (20%). It is fed `MachineRates`: measured once per process group on the machine
   (`comet.scheduler.ep_calibrate`, what `comet.ep` passes), else the H200's (`H200_RATES`, the
   figures below) scaled by the SM count.

Cost model:
- GEMM time = expert FLOPs of the rank's expected (balanced) rows / the GEMM rate; a fused kernel
  computes on SMs - n_comm programs, so its GEMMs take SMs / (SMs - n_comm) as long;
- push time = bytes / bandwidth of the programs pushing, interpolated from the rates' push points
  (`H200_RATES`: docs/performance-ep.md). A token goes once to every
  rank holding one of its experts: with uniform routing of K distinct experts over E, a rank gets a
  token with probability 1 - C(E - E/W, K) / C(E, K); a rank pushes W - 1 such shares to the
  others, and unfused also copies its own share to itself;
- unfused: GEMM1 + GEMM2 + dispatch at every SM's bandwidth + the slot sum and the combine's
  push in one launch (the slower of the two);
- fused: max(GEMM1, dispatch to the others on n_comm programs) + max(GEMM2 + GEMM2's input
  re-read once per extra column chunk, (C-1)/C of the combine on n_comm programs) + the last
  chunk's combine (its own tokens' partial rows included: every token has a slot there);
  with 0 column chunks (only the dispatch fused): the same GEMM1 term + the unfused GEMM2 and
  slot sum with the push.
  Plus the fused kernels' own costs: their structure (tile waits, counters, each token's K slot
  rows summed by the few pushing programs while GEMM2 runs) adds `FUSED_STRUCTURE` of the GEMM
  time, and GEMM1 in arrival order reads each local expert's weights once per source (the
  fitted constants and what they were fitted to: docs/performance-ep.md).
What it leaves out (so the tuned table wins where it exists): routing skew, launch latencies, and
that small batches are bound by reading the expert weights, not by FLOPs.
"""
from __future__ import annotations

import bisect
import functools
import json
import math
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from comet.device_info import num_sms
from comet.scheduler.configs import TABLE_DIR, gpu_key


class MachineRates(NamedTuple):
    """What the cost model knows of a machine."""

    sms: int
    gemm_flops: float  # bf16/fp16 tensor-core FLOP/s of a large GEMM (fp32, as TF32: half)
    hbm_bytes_per_s: float
    push_gbps: tuple[tuple[int, float], ...]  # (pushing programs, GB/s to peers), increasing programs

    def scaled(self, sms: int) -> "MachineRates":
        """These rates for a GPU of `sms` SMs, per-SM rates kept (for a GPU nobody measured)."""
        f = sms / self.sms
        return MachineRates(sms, self.gemm_flops * f, self.hbm_bytes_per_s * f,
                            tuple((max(1, round(p * f)), g * f) for p, g in self.push_gbps))


# 2 x H200 (docs/performance-ep.md).
H200_RATES = MachineRates(sms=132, gemm_flops=600e12, hbm_bytes_per_s=4.0e12,
                          push_gbps=((8, 171.7), (16, 223.7), (32, 264.6), (132, 303.0)))
FUSED_STRUCTURE = 0.3
N_COMM_CANDIDATES = (4, 8, 16, 24, 32, 48, 64)
COLUMN_CHUNK_CANDIDATES = (0, 1, 2, 4, 8)  # 0: GEMM2 and the combine unfused
# The fused path must beat the unfused one by this share in the model to be chosen (the model
# underrates the fused kernels' own costs: docs/performance-ep.md); the tuned table decides the rest.
FUSED_MARGIN = 0.2
# Spare GEMM1 work before the first tiles that read other ranks' rows (`lead_experts`): a stalled
# program costs more than re-reading an expert's weights.
LEAD_MARGIN = 1.25
# The fused GEMM1's pushing programs run at this share of their idle rate (`push_gbps`) beside
# the computing ones (fitted: docs/performance-ep.md).
PUSH_SHARE_BESIDE_GEMM = 0.4


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
    column_chunks: int  # GEMM2 column chunks of the fused combine (1 when unfused; 0: combine not fused)


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
def push_bytes_per_s(programs: float, rates: MachineRates = H200_RATES) -> float:
    """Bandwidth of `programs` programs storing to peer memory, interpolated from the rates' points
    (per program below the first, capped at the last)."""
    counts = [p for p, _ in rates.push_gbps]
    gbps = dict(rates.push_gbps)
    programs = min(max(programs, 1.0), counts[-1])
    i = bisect.bisect_left(counts, programs)
    if i == 0:
        return gbps[counts[0]] * programs / counts[0] * 1e9
    lo, hi = counts[i - 1], counts[i]
    return (gbps[lo] + (gbps[hi] - gbps[lo]) * (programs - lo) / (hi - lo)) * 1e9


def share_per_rank(shape: EpShape) -> float:
    """Probability that a token has at least one of its K (distinct, uniform) experts on a given rank."""
    e, k = shape.num_experts, shape.top_k
    elsewhere = e - e // shape.world
    return 1.0 - (math.comb(elsewhere, k) / math.comb(e, k) if elsewhere >= k else 0.0)


def _parts(shape: EpShape, rates: MachineRates) -> dict:
    """Seconds of each part of a call at full GPU width."""
    rows = shape.tokens * shape.top_k  # balanced: every rank computes its own tokens' share of rows
    flops = rates.gemm_flops * (1.0 if shape.element_size <= 2 else 0.5)
    hbm = rates.hbm_bytes_per_s
    row_bytes = shape.tokens * shape.hidden * shape.element_size
    return {
        "gemm1": 2 * rows * 2 * shape.ffn * shape.hidden / flops,
        "gemm2": 2 * rows * shape.ffn * shape.hidden / flops,
        "remote_bytes": (shape.world - 1) * share_per_rank(shape) * row_bytes,  # to the other ranks
        "own_bytes": share_per_rank(shape) * row_bytes,  # unfused: this rank's own share, copied
        "gemm2_input_s": rows * shape.ffn * shape.element_size / hbm,
        "slot_sum": 2 * rows * shape.hidden * shape.element_size / hbm,
        # GEMM1's weights of this rank's experts, read again for every other source
        "weights_reread_s": (shape.world - 1) * shape.num_experts // shape.world * 2 * shape.ffn * shape.hidden
        * shape.element_size / hbm,
    }


def _unfused_layer1(p: dict, rates: MachineRates) -> float:
    """GEMM2 on every SM, then the slot sum with the combine's push (own share included) in one
    launch: the slower of its local reads and its stores to the sources."""
    pushed = p["remote_bytes"] + p["own_bytes"]
    return p["gemm2"] + max(p["slot_sum"], pushed / push_bytes_per_s(rates.sms, rates))


def unfused_seconds(shape: EpShape, rates: MachineRates = H200_RATES) -> float:
    p = _parts(shape, rates)
    dispatch = (p["remote_bytes"] + p["own_bytes"]) / push_bytes_per_s(rates.sms, rates)
    return p["gemm1"] + dispatch + _unfused_layer1(p, rates)


def fused_seconds(shape: EpShape, n_comm: int, column_chunks: int, rates: MachineRates = H200_RATES) -> float:
    """A call with the dispatch fused into GEMM1 and, unless column_chunks is 0, the combine's push
    into GEMM2."""
    if n_comm >= rates.sms:
        return math.inf  # no program left to compute
    p = _parts(shape, rates)
    stretch = rates.sms / (rates.sms - n_comm) * (1 + FUSED_STRUCTURE)
    rate = push_bytes_per_s(n_comm, rates)
    layer0 = max(p["gemm1"] * stretch + p["weights_reread_s"], p["remote_bytes"] / rate)
    if column_chunks == 0:
        return layer0 + _unfused_layer1(p, rates)
    combine = (p["remote_bytes"] + shape.tokens * shape.hidden * shape.element_size) / rate
    gemm2 = p["gemm2"] * stretch + (column_chunks - 1) * p["gemm2_input_s"]
    layer1 = max(gemm2, combine * (column_chunks - 1) / column_chunks) + combine / column_chunks
    return layer0 + layer1


def lead_experts(shape: EpShape, n_comm: int, rates: MachineRates = H200_RATES) -> int:
    """How many local experts' own rows the fused GEMM1 runs first (`comet.kernels.ep_tiles.arrival_bin`):
    enough that their GEMM1 time on the computing programs covers the push to the other ranks
    (own rows are 1/W of a balanced rank's), with LEAD_MARGIN to spare, so that the later experts'
    rows from every source have arrived when their tiles come. Each of them has its weights read
    once more; a tile that comes too early stalls its program instead."""
    experts = shape.num_experts // shape.world
    if shape.world == 1 or n_comm <= 0 or n_comm >= rates.sms:
        return experts
    p = _parts(shape, rates)
    own_gemm1 = p["gemm1"] / shape.world * rates.sms / (rates.sms - n_comm)
    dispatch = p["remote_bytes"] / (PUSH_SHARE_BESIDE_GEMM * push_bytes_per_s(n_comm, rates))
    return min(experts, math.ceil(experts * LEAD_MARGIN * dispatch / own_gemm1))


def best_column_chunks(shape: EpShape, n_comm: int, rates: MachineRates = H200_RATES) -> int:
    """The column chunk count the model prefers for a given n_comm (at most one per 128 columns;
    0: the combine not fused)."""
    allowed = [c for c in COLUMN_CHUNK_CANDIDATES if c * 128 <= max(shape.hidden, 128)]
    return min(allowed, key=lambda c: fused_seconds(shape, n_comm, c, rates))


def model_split(shape: EpShape, rates: MachineRates = H200_RATES) -> EpSplit:
    """The cost model's choice: the fastest fused split if it beats the unfused path by FUSED_MARGIN."""
    candidates = [n for n in N_COMM_CANDIDATES if n < rates.sms // 2]
    if shape.tokens == 0 or not candidates:
        return EpSplit(0, 1)
    fused = [EpSplit(n, best_column_chunks(shape, n, rates)) for n in candidates]
    best = min(fused, key=lambda s: fused_seconds(shape, *s, rates))
    if fused_seconds(shape, *best, rates) < (1.0 - FUSED_MARGIN) * unfused_seconds(shape, rates):
        return best
    return EpSplit(0, 1)


def choose_split(shape: EpShape, device: torch.device, rates: Callable[[], MachineRates] | None = None) -> EpSplit:
    """The split of a call: the GPU's tuned table, else the cost model fed `rates()` (called only
    then; default: the H200's scaled to this GPU). Off a GPU (the Triton interpreter) the unfused
    path: the model describes GPU rates."""
    if device.type != "cuda":
        return EpSplit(0, 1)
    tuned = table_split(load_table(gpu_key(device)), shape)
    if tuned is not None:
        return tuned
    return model_split(shape, rates() if rates is not None else default_rates(device))


def default_rates(device: torch.device) -> MachineRates:
    """The H200's rates scaled to `device`'s SM count (as they are off a GPU): no measurement."""
    if device.type != "cuda":
        return H200_RATES
    return H200_RATES.scaled(num_sms(device))
