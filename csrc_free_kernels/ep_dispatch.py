"""Expert-parallel dispatch: every rank pushes its tokens into the receive buffers of the ranks
that hold their experts, then each rank waits for what it receives.

Receive buffers on every rank (leading 2 = epoch parity, then source rank, then receive slot):
`x` [2, W, C, H], `ids` int32 [2, W, C, K] (the expert's local id on the receiver, -1 where that
expert lives elsewhere), `weights` fp32 [2, W, C, K], `count` int32 [2, W]. Flags: `meta` [2, W]
(the count has arrived) and `chunk` [2, W, ceil(C / CHUNK)] (slots [c*CHUNK, (c+1)*CHUNK) have).

Two launches: `dispatch_push` (no waits) and `dispatch_receive` (waits, then writes the received
routing into local tensors with unused slots marked -1). Keeping all waits out of the pushing
launch means no rank's pushes depend on another rank's progress, which the Triton interpreter
(programs run one after another, ranks are processes) needs to finish at all.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from comet.comm import CommWorkspace, WaitKind
from comet.kernels.signals import peer_ptr, signal_set, wait_flag_ge


class DispatchBuffers(NamedTuple):
    """Names of the workspace buffers one dispatch shape uses."""

    x: str
    ids: str
    weights: str
    count: str
    meta_flags: str
    chunk_flags: str
    capacity: int
    chunk: int


def dispatch_buffers(ws: CommWorkspace, capacity: int, hidden: int, top_k: int, dtype: torch.dtype,
                     chunk: int) -> DispatchBuffers:
    """The receive buffers for `capacity` tokens per source (made collectively on first use)."""
    w, tag = ws.world_size, str(dtype).removeprefix("torch.")
    n_chunks = triton.cdiv(capacity, chunk)
    names = DispatchBuffers(
        f"ep.recv_x.{tag}.C{capacity}.H{hidden}", f"ep.recv_ids.C{capacity}.K{top_k}",
        f"ep.recv_weights.C{capacity}.K{top_k}", "ep.recv_count", "ep.dispatch_meta_flags",
        f"ep.dispatch_chunk_flags.{n_chunks}", capacity, chunk)
    ws.buffer(names.x, (2, w, capacity, hidden), dtype)
    ws.buffer(names.ids, (2, w, capacity, top_k), torch.int32)
    ws.buffer(names.weights, (2, w, capacity, top_k), torch.float32)
    ws.buffer(names.count, (2, w), torch.int32)
    ws.flags(names.meta_flags, (2, w))
    ws.flags(names.chunk_flags, (2, w, n_chunks))
    return names


@triton.jit(do_not_specialize=["rank", "epoch", "num_tokens"])
def _dispatch_push_kernel(
    x_ptr, stride_x, topk_ids_ptr, topk_weights_ptr,
    send_tokens_ptr, send_counts_ptr,  # the send plan: int32 [W, T], int32 [W]
    recv_x_table, recv_ids_table, recv_weights_table, recv_count_table, meta_table, chunk_table,
    rank, epoch, num_tokens, capacity, hidden, experts_per_rank, n_chunks,
    WORLD: tl.constexpr, TOP_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    pid = tl.program_id(0)
    parity = epoch % 2
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < TOP_K
    # Program 0 tells every destination how many tokens come (destinations rotated by rank).
    if pid == 0:
        for j in range(WORLD):
            dst = (rank + j) % WORLD
            counts = peer_ptr(recv_count_table, dst, send_counts_ptr)
            tl.store(counts + parity * WORLD + rank, tl.load(send_counts_ptr + dst))
            signal_set(peer_ptr(meta_table, dst, meta_table) + parity * WORLD + rank, epoch)
    # Chunks of send slots are dealt round-robin to the programs; each pushes its chunks to every
    # destination, starting with itself and rotating by rank so that sources spread over targets.
    for j in range(WORLD):
        dst = (rank + j) % WORLD
        count = tl.load(send_counts_ptr + dst)
        base = tl.cast(parity * WORLD + rank, tl.int64) * capacity
        recv_x = peer_ptr(recv_x_table, dst, x_ptr) + base * hidden
        recv_ids = peer_ptr(recv_ids_table, dst, send_counts_ptr) + base * TOP_K
        recv_w = peer_ptr(recv_weights_table, dst, topk_weights_ptr) + base * TOP_K
        flags = peer_ptr(chunk_table, dst, chunk_table) + (parity * WORLD + rank) * n_chunks
        for c in range(pid, tl.cdiv(count, CHUNK), NUM_PROGRAMS):
            slots = c * CHUNK + tl.arange(0, CHUNK)
            s_mask = slots < count
            tokens = tl.load(send_tokens_ptr + dst * num_tokens + slots, mask=s_mask, other=0).to(tl.int64)
            route_off = tokens[:, None] * TOP_K + offs_k[None, :]
            route_mask = s_mask[:, None] & k_mask[None, :]
            ids = tl.load(topk_ids_ptr + route_off, mask=route_mask, other=-1).to(tl.int32)
            local = ids - dst * experts_per_rank
            local = tl.where((local >= 0) & (local < experts_per_rank), local, -1)
            recv_off = slots.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]
            tl.store(recv_ids + recv_off, local, mask=route_mask)
            tl.store(recv_w + recv_off, tl.load(topk_weights_ptr + route_off, mask=route_mask), mask=route_mask)
            for h in range(0, hidden, BLOCK_H):
                offs_h = h + tl.arange(0, BLOCK_H)
                m = s_mask[:, None] & (offs_h < hidden)[None, :]
                row = tl.load(x_ptr + tokens[:, None] * stride_x + offs_h[None, :], mask=m)
                tl.store(recv_x + slots.to(tl.int64)[:, None] * hidden + offs_h[None, :], row, mask=m)
            signal_set(flags + c, epoch)


@triton.jit(do_not_specialize=["rank", "epoch", "max_spins"])
def _dispatch_receive_kernel(
    recv_ids_table, recv_weights_table, recv_count_table, meta_table, chunk_table, error_ptr,
    ids_out_ptr, weights_out_ptr, counts_out_ptr,  # local: int32 [W, C, K], fp32 [W, C, K], int32 [W]
    rank, epoch, capacity, n_chunks, max_spins,
    WORLD: tl.constexpr, TOP_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
    META_KIND: tl.constexpr, CHUNK_KIND: tl.constexpr,
):
    # Program j receives from source (rank - j) mod W: this rank itself first.
    src = (rank - tl.program_id(0) + WORLD) % WORLD
    parity = epoch % 2
    row = parity * WORLD + src
    wait_flag_ge(peer_ptr(meta_table, rank, meta_table) + row, epoch, max_spins, error_ptr, META_KIND, src, 0)
    # Clamped: after a timed-out wait the count may be stale; it must still index inside the buffers.
    count = tl.minimum(tl.load(peer_ptr(recv_count_table, rank, counts_out_ptr) + row, volatile=True), capacity)
    flags = peer_ptr(chunk_table, rank, chunk_table) + row * n_chunks
    for c in range(tl.cdiv(count, CHUNK)):
        wait_flag_ge(flags + c, epoch, max_spins, error_ptr, CHUNK_KIND, src, c)
    tl.store(counts_out_ptr + src, count)
    base = tl.cast(row, tl.int64) * capacity * TOP_K
    recv_ids = peer_ptr(recv_ids_table, rank, ids_out_ptr) + base
    recv_w = peer_ptr(recv_weights_table, rank, weights_out_ptr) + base
    out_base = tl.cast(src, tl.int64) * capacity * TOP_K
    offs_k = tl.arange(0, BLOCK_K)
    for start in range(0, capacity, CHUNK):
        slots = start + tl.arange(0, CHUNK)
        off = slots.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]
        in_buffer = (slots < capacity)[:, None] & (offs_k < TOP_K)[None, :]
        arrived = in_buffer & (slots < count)[:, None]
        # Slots past the count hold older calls' data: mark them unused.
        tl.store(ids_out_ptr + out_base + off, tl.load(recv_ids + off, mask=arrived, other=-1), mask=in_buffer)
        tl.store(weights_out_ptr + out_base + off, tl.load(recv_w + off, mask=arrived, other=0.0), mask=in_buffer)


def hidden_block(chunk: int, hidden: int) -> int:
    # About 8K elements per [CHUNK, BLOCK_H] tile: a few registers per thread.
    return max(16, min(triton.next_power_of_2(hidden), 8192 // chunk))


def dispatch_push(ws: CommWorkspace, bufs: DispatchBuffers, epoch: int, x: torch.Tensor, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor, send_tokens: torch.Tensor, send_counts: torch.Tensor,
                  experts_per_rank: int, num_programs: int):
    """Push this rank's tokens (x [T, H], routing [T, K] with global ids; the send plan of
    `comet.scheduler.ep_plan`) into every destination's receive buffers, flags raised to `epoch`."""
    num_tokens, top_k = topk_ids.shape
    hidden = x.shape[1]
    _dispatch_push_kernel[(num_programs,)](
        x, x.stride(0), topk_ids, topk_weights, send_tokens, send_counts,
        ws.ptr_table(bufs.x), ws.ptr_table(bufs.ids), ws.ptr_table(bufs.weights), ws.ptr_table(bufs.count),
        ws.ptr_table(bufs.meta_flags), ws.ptr_table(bufs.chunk_flags),
        ws.rank, epoch, num_tokens, bufs.capacity, hidden, experts_per_rank, triton.cdiv(bufs.capacity, bufs.chunk),
        WORLD=ws.world_size, TOP_K=top_k, CHUNK=bufs.chunk, BLOCK_H=hidden_block(bufs.chunk, hidden),
        BLOCK_K=triton.next_power_of_2(top_k), NUM_PROGRAMS=num_programs, num_warps=4,
    )


def dispatch_receive(ws: CommWorkspace, bufs: DispatchBuffers, epoch: int, top_k: int):
    """Wait for every source's tokens of call `epoch`; return the received routing as local
    tensors: ids int32 [W, C, K] (local expert ids, -1 for unused slots and other ranks'
    experts), weights fp32 [W, C, K], counts int32 [W] (tokens from each source)."""
    w, c = ws.world_size, bufs.capacity
    ids = torch.empty(w, c, top_k, dtype=torch.int32, device=ws.device)
    weights = torch.empty(w, c, top_k, dtype=torch.float32, device=ws.device)
    counts = torch.empty(w, dtype=torch.int32, device=ws.device)
    _dispatch_receive_kernel[(w,)](
        ws.ptr_table(bufs.ids), ws.ptr_table(bufs.weights), ws.ptr_table(bufs.count),
        ws.ptr_table(bufs.meta_flags), ws.ptr_table(bufs.chunk_flags), ws.errors,
        ids, weights, counts,
        ws.rank, epoch, c, triton.cdiv(c, bufs.chunk), ws.max_spins,
        WORLD=w, TOP_K=top_k, CHUNK=bufs.chunk, BLOCK_K=triton.next_power_of_2(top_k),
        META_KIND=int(WaitKind.DISPATCH_METADATA), CHUNK_KIND=int(WaitKind.DISPATCH_CHUNK), num_warps=4,
    )
    return ids, weights, counts
