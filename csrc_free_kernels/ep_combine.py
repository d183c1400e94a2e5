"""Expert-parallel combine: every rank sends the partial output rows of the tokens it received
back to their source ranks; each source sums, per token, the partials of the ranks it sent it to.

Combine buffer on every rank: `partials` [2, W, C, H] (epoch parity, contributing rank d, the
token's receive slot on d), flags [2, W, ceil(C / CHUNK)] (rank d's slots of that chunk have
arrived). One slot per contributing rank, summed in a fixed rank order: deterministic.

Two launches, as for the dispatch (`comet.kernels.ep_dispatch`): `combine_push` (no waits) and
`combine_reduce` (waits on the chunks each token block reads, then sums in fp32).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from comet.comm import CommWorkspace, WaitKind
from comet.kernels.ep_dispatch import hidden_block
from comet.kernels.signals import peer_ptr, signal_set, wait_flag_ge


class CombineBuffers(NamedTuple):
    partials: str
    flags: str
    capacity: int
    chunk: int


def combine_buffers(ws: CommWorkspace, capacity: int, hidden: int, dtype: torch.dtype, chunk: int) -> CombineBuffers:
    """The combine buffers for `capacity` tokens per rank (made collectively on first use)."""
    w, tag = ws.world_size, str(dtype).removeprefix("torch.")
    n_chunks = triton.cdiv(capacity, chunk)
    names = CombineBuffers(f"ep.partials.{tag}.C{capacity}.H{hidden}", f"ep.combine_flags.{n_chunks}", capacity, chunk)
    ws.buffer(names.partials, (2, w, capacity, hidden), dtype)
    ws.flags(names.flags, (2, w, n_chunks))
    return names


@triton.jit(do_not_specialize=["rank", "epoch"])
def _combine_push_kernel(
    partial_ptr,  # local [W * C, H]: row s*C + i = received token i of source s, this rank's experts summed
    counts_ptr,  # local int32 [W]: tokens received from each source
    partials_table, flags_table,
    rank, epoch, capacity, hidden, n_chunks,
    WORLD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    pid = tl.program_id(0)
    parity = epoch % 2
    for j in range(WORLD):
        dst = (rank + j) % WORLD
        count = tl.load(counts_ptr + dst)
        dst_rows = peer_ptr(partials_table, dst, partial_ptr) + tl.cast(parity * WORLD + rank, tl.int64) * capacity * hidden
        src_rows = partial_ptr + tl.cast(dst, tl.int64) * capacity * hidden
        flags = peer_ptr(flags_table, dst, flags_table) + (parity * WORLD + rank) * n_chunks
        for c in range(pid, tl.cdiv(count, CHUNK), NUM_PROGRAMS):
            slots = c * CHUNK + tl.arange(0, CHUNK)
            s_mask = slots < count
            row_off = slots.to(tl.int64)[:, None] * hidden
            for h in range(0, hidden, BLOCK_H):
                offs_h = h + tl.arange(0, BLOCK_H)
                m = s_mask[:, None] & (offs_h < hidden)[None, :]
                tl.store(dst_rows + row_off + offs_h[None, :], tl.load(src_rows + row_off + offs_h[None, :], mask=m),
                         mask=m)
            signal_set(flags + c, epoch)


@triton.jit(do_not_specialize=["rank", "epoch", "num_tokens", "max_spins"])
def _combine_reduce_kernel(
    out_ptr, mask_ptr, slot_ptr,  # out [T, H]; the send plan's mask (bool) and slot (int32) [W, T]
    partials_table, flags_table, error_ptr,
    rank, epoch, num_tokens, capacity, hidden, n_chunks, max_spins,
    WORLD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    WAIT_KIND: tl.constexpr,
):
    parity = epoch % 2
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < num_tokens
    partials = peer_ptr(partials_table, rank, out_ptr)
    own_flags = peer_ptr(flags_table, rank, flags_table)
    # Wait for the chunks this token block reads: its slots on rank d are increasing in t.
    for d in range(WORLD):
        sent = tl.load(mask_ptr + d * num_tokens + offs_t, mask=t_mask, other=0) != 0
        slots = tl.load(slot_ptr + d * num_tokens + offs_t, mask=sent, other=0)
        first = tl.min(tl.where(sent, slots, capacity), axis=0) // CHUNK
        end = (tl.max(tl.where(sent, slots, -1), axis=0) + CHUNK) // CHUNK
        flags = own_flags + (parity * WORLD + d) * n_chunks
        for c in range(first, end):
            wait_flag_ge(flags + c, epoch, max_spins, error_ptr, WAIT_KIND, d, c)
    for h in range(0, hidden, BLOCK_H):
        offs_h = h + tl.arange(0, BLOCK_H)
        h_mask = offs_h < hidden
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for d in range(WORLD):  # fixed order: the same sum whatever order the partials arrived in
            sent = tl.load(mask_ptr + d * num_tokens + offs_t, mask=t_mask, other=0) != 0
            slots = tl.minimum(tl.load(slot_ptr + d * num_tokens + offs_t, mask=sent, other=0), capacity - 1)
            rows = tl.cast(parity * WORLD + d, tl.int64) * capacity + slots.to(tl.int64)
            acc += tl.load(partials + rows[:, None] * hidden + offs_h[None, :],
                           mask=sent[:, None] & h_mask[None, :], other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * hidden + offs_h[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])


def combine_push(ws: CommWorkspace, bufs: CombineBuffers, epoch: int, partial: torch.Tensor, counts: torch.Tensor,
                 num_programs: int):
    """Send partial rows (partial [W*C, H], row s*C + i for received token i of source s; the
    first counts[s] of each source are sent) to their sources' combine buffers."""
    hidden = partial.shape[1]
    _combine_push_kernel[(num_programs,)](
        partial, counts, ws.ptr_table(bufs.partials), ws.ptr_table(bufs.flags),
        ws.rank, epoch, bufs.capacity, hidden, triton.cdiv(bufs.capacity, bufs.chunk),
        WORLD=ws.world_size, CHUNK=bufs.chunk, BLOCK_H=hidden_block(bufs.chunk, hidden),
        NUM_PROGRAMS=num_programs, num_warps=4,
    )


def combine_reduce(ws: CommWorkspace, bufs: CombineBuffers, epoch: int, mask: torch.Tensor, slot: torch.Tensor,
                   out: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over ranks d in order, where mask[d, t], of rank d's partial row at slot[d, t]."""
    num_tokens, hidden = out.shape
    if num_tokens == 0:
        return out
    block_t = 16
    block_h = max(16, min(triton.next_power_of_2(hidden), 4096 // block_t))
    _combine_reduce_kernel[(triton.cdiv(num_tokens, block_t),)](
        out, mask, slot, ws.ptr_table(bufs.partials), ws.ptr_table(bufs.flags), ws.errors,
        ws.rank, epoch, num_tokens, bufs.capacity, hidden, triton.cdiv(bufs.capacity, bufs.chunk), ws.max_spins,
        WORLD=ws.world_size, CHUNK=bufs.chunk, BLOCK_T=block_t, BLOCK_H=block_h,
        WAIT_KIND=int(WaitKind.COMBINE_CHUNK), num_warps=4,
    )
    return out
