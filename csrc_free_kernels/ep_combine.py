"""Expert-parallel combine: every rank sends the partial output rows of the tokens it received
back to their source ranks; each source sums, per token, the partials of the ranks it sent it to.

Combine buffer on every rank: `partials` [2, W, C, H] (epoch parity, contributing rank d, the
token's receive slot on d), flags [2, W, ceil(C / CHUNK)] (rank d's slots of that chunk have
arrived). One slot per contributing rank, summed in a fixed rank order: deterministic.

`slot_sum_push` sums each received token's K slot rows (GEMM2's output) and stores the sums
straight into the source's buffer, one launch (no waits); `combine_push` sends rows already
summed (the communication-only timing). Fused into GEMM2 (`down_combine`): GEMM2's launch runs
its tiles column chunk by column chunk in its first programs, while its last programs sum each
received token's K slot rows of every finished column chunk and push them. More chunks hide
more of the push (only the last chunk's is exposed) but read GEMM2's input once more per chunk:
`comet.scheduler.ep_split` picks the count. Either way, `combine_reduce` then waits on the
chunks each token block reads and sums in fp32. The backward of `comet.ep` sends the partial
input gradients (`combine_push`) and the fp32 routing-weight gradients (a second buffer, its
own tag) the same way.

`combine_buffers` is collective the first time a tag and shape are asked for; the launchers never
sync the host. After any wait of the workspace gave up, `combine_reduce` writes NaN and copies the
error record to host memory, where the host reads it without a sync.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from comet.comm import CommWorkspace, WaitKind
from comet.kernels.ep_dispatch import PUSH_WARPS, ROW_STORAGE, hidden_block
from comet.kernels.ep_tiles import ArrivalTiles, bin_expert, fused_programs
from comet.kernels.expert_gemm import GemmProblem, expert_gemm_tile, locate_item
from comet.kernels.routing import expert_segments
from comet.kernels.signals import peer_ptr, signal_set, wait_flag_ge


class CombineBuffers(NamedTuple):
    partials: str
    flags: str
    capacity: int
    chunk: int

    @property
    def n_chunks(self) -> int:
        return triton.cdiv(self.capacity, self.chunk)


def combine_buffers(ws: CommWorkspace, capacity: int, width: int, chunk: int, tag: str) -> CombineBuffers:
    """Collective on first use: combine buffers named `tag` for `capacity` tokens per rank of rows
    of `width` elements of any dtype up to 4 bytes (each tag its own flags, so that two combines
    can run in one call)."""
    w = ws.world_size
    n_chunks = triton.cdiv(capacity, chunk)
    names = CombineBuffers(f"ep.partials.{tag}.C{capacity}.W{width}", f"ep.combine_flags.{tag}.C{capacity}.W{width}",
                           capacity, chunk)
    ws.buffer(names.partials, (2, w, capacity, width), ROW_STORAGE)
    ws.flags(names.flags, (2, w, n_chunks))
    return names


@triton.jit(do_not_specialize=["rank"])
def _combine_push_kernel(
    partial_ptr,  # local [W * C, H]: row s*C + i = received token i of source s, this rank's experts summed
    counts_ptr,  # local int32 [W]: tokens received from each source
    partials_table, flags_table,
    rank, epoch_ptr, capacity, hidden, n_chunks,
    WORLD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
):
    epoch = tl.load(epoch_ptr)
    pid = tl.program_id(0)
    parity = epoch % 2
    for j in range(WORLD):
        dst = (rank + j) % WORLD
        count = tl.load(counts_ptr + dst)
        dst_rows = (peer_ptr(partials_table, dst, partial_ptr)
                    + tl.cast(parity * WORLD + rank, tl.int64) * capacity * hidden)
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


@triton.jit
def _sum_push_unit(unit, column_chunk, chunk_n, num_n, recv_ids_ptr, recv_counts_ptr, chunk_done_ptr, partials_table,
                   flags_table, out_ptr, stride_om, rank, epoch, capacity, n_chunks, N, COLUMN_CHUNKS,
                   NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, WORLD: tl.constexpr,
                   CHUNK: tl.constexpr, COUNTED: tl.constexpr):
    """One unit of the combine push: token chunk `unit // WORLD` of the `unit % WORLD`-th source
    (sources rotated by rank, as in the dispatch) over one column chunk: sum each token's K slot
    rows, store the partial rows into the source's buffer. Consecutive units go to different
    sources, so that the stores over NVLink run all along beside the local ones, not after them.
    COUNTED: whoever pushes a token chunk's last column chunk (counted in chunk_done_ptr) raises
    its flag there; else the unit covers every column and raises it."""
    src = (rank + unit % WORLD) % WORLD
    c = unit // WORLD
    count = tl.load(recv_counts_ptr + src)
    if c * CHUNK < count:  # chunks past the count are empty: nothing to send, no flag
        parity = epoch % 2
        slots = c * CHUNK + tl.arange(0, CHUNK)
        s_mask = slots < count
        tokens = tl.cast(src, tl.int64) * capacity + slots
        dst_rows = peer_ptr(partials_table, src, out_ptr) + tl.cast(parity * WORLD + rank, tl.int64) * capacity * N
        for n_block in range(column_chunk * chunk_n, tl.minimum((column_chunk + 1) * chunk_n, num_n)):
            offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = offs_n < N
            acc = tl.zeros((CHUNK, BLOCK_N), dtype=tl.float32)
            for k in tl.static_range(TOP_K):
                row = tokens * TOP_K + k
                expert = tl.load(recv_ids_ptr + row, mask=s_mask, other=-1)
                routed = s_mask & (expert >= 0) & (expert < NUM_EXPERTS)  # others wrote no row
                acc += tl.load(out_ptr + row[:, None] * stride_om + offs_n[None, :],
                               mask=routed[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            tl.store(dst_rows + slots.to(tl.int64)[:, None] * N + offs_n[None, :],
                     acc.to(out_ptr.dtype.element_ty), mask=s_mask[:, None] & n_mask[None, :])
        flag = peer_ptr(flags_table, src, flags_table) + (parity * WORLD + rank) * n_chunks + c
        if COUNTED:
            tl.debug_barrier()  # every thread's stores before the count
            if tl.atomic_add(chunk_done_ptr + src * n_chunks + c, 1, sem="acq_rel", scope="sys") == COLUMN_CHUNKS - 1:
                signal_set(flag, epoch)
        else:
            signal_set(flag, epoch)


@triton.jit
def _claim_units(column_chunk, claims_ptr, chunk_n, num_n, recv_ids_ptr, recv_counts_ptr, chunk_done_ptr,
                 partials_table, flags_table, out_ptr, stride_om, rank, epoch, capacity, n_chunks, N, COLUMN_CHUNKS,
                 NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, WORLD: tl.constexpr,
                 CHUNK: tl.constexpr):
    """Take the units of a finished column chunk one at a time until none is left."""
    unit = tl.atomic_add(claims_ptr + column_chunk, 1, sem="relaxed", scope="gpu")
    while unit < WORLD * n_chunks:
        _sum_push_unit(unit, column_chunk, chunk_n, num_n, recv_ids_ptr, recv_counts_ptr, chunk_done_ptr,
                       partials_table, flags_table, out_ptr, stride_om, rank, epoch, capacity, n_chunks, N,
                       COLUMN_CHUNKS, NUM_EXPERTS, TOP_K, BLOCK_N, WORLD, CHUNK, True)
        unit = tl.atomic_add(claims_ptr + column_chunk, 1, sem="relaxed", scope="gpu")


@triton.jit(do_not_specialize=["rank"])
def _slot_sum_push_kernel(
    slots_ptr, stride_s,  # local [W*C*K, H]: GEMM2's weighted rows, token-slot order
    recv_ids_ptr, recv_counts_ptr,  # local: int32 [W*C, K] received routing (-1: unused), int32 [W]
    partials_table, flags_table,
    rank, epoch_ptr, capacity, n_chunks, N,
    NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, WORLD: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # One program per (source, token chunk): its sums go straight to the source, no local copy.
    # It covers every column, so no count of column chunks (COUNTED=False: no counter pointer).
    epoch = tl.load(epoch_ptr)
    num_n = tl.cdiv(N, BLOCK_N)
    _sum_push_unit(tl.program_id(0), 0, num_n, num_n, recv_ids_ptr, recv_counts_ptr, None, partials_table,
                   flags_table, slots_ptr, stride_s, rank, epoch, capacity, n_chunks, N, 1,
                   NUM_EXPERTS, TOP_K, BLOCK_N, WORLD, CHUNK, False)


# Program and chunk counts are plain arguments here: a new split must not compile a new kernel.
@triton.jit(do_not_specialize=["rank", "max_spins", "lead_experts", "NUM_PROGRAMS", "COMM_PROGRAMS", "COLUMN_CHUNKS"])
def _down_combine_kernel(
    recv_ids_ptr, recv_counts_ptr,  # local: int32 [W*C, K] received routing (arrival bins), int32 [W]
    # local, zeroed: int64 [COLUMN_CHUNKS] GEMM2 work items finished and push units taken per
    # column chunk; int64 [W, n_chunks] column chunks pushed per token chunk
    column_done_ptr, claims_ptr, chunk_done_ptr,
    partials_table, flags_table, error_ptr,
    rank, epoch_ptr, capacity, n_chunks, max_spins,
    gemm,  # GemmProblem.kernel_args() of GEMM2
    # ep_tiles.ArrivalTiles.kernel_args(): the tile map
    lead_experts, EXPERTS: tl.constexpr, BINS: tl.constexpr, NUM_BINS: tl.constexpr,
    NUM_PROGRAMS, COMM_PROGRAMS, COLUMN_CHUNKS, WORLD: tl.constexpr, CHUNK: tl.constexpr, WAIT_KIND: tl.constexpr,
):
    epoch = tl.load(epoch_ptr)
    # The first NUM_PROGRAMS programs run GEMM2 column chunk by column chunk (every M tile of chunk
    # 0, then of chunk 1, ...; inside a chunk, GROUP_M tiles x the chunk's N blocks at a time, so
    # those tiles' input rows are read from HBM once per chunk, not once per N block), counting
    # finished items per chunk. The last COMM_PROGRAMS programs wait for each chunk in turn (only
    # on lower ids, never on other ranks) and take its push units (`_claim_units`); computing
    # programs out of tiles take what is left of the chunks already finished, so the pushes of
    # a chunk finished late are shared by every program free by then.
    pid = tl.program_id(0)
    BLOCK_M: tl.constexpr = gemm.BLOCK_M
    row_start, counts, tile_start, tile_end, num_tiles = expert_segments(gemm.hist_ptr, BINS, NUM_BINS, BLOCK_M)
    num_n = tl.cdiv(gemm.N, gemm.BLOCK_N)
    chunk_n = tl.cdiv(num_n, COLUMN_CHUNKS)  # N blocks per column chunk (the last may have fewer)
    chunk_items = num_tiles * chunk_n
    if pid < NUM_PROGRAMS:
        for item in range(pid, chunk_items * COLUMN_CHUNKS, NUM_PROGRAMS):
            column_chunk = item // chunk_items
            bin, first_row, end_row, n_in_chunk = locate_item(
                item % chunk_items, row_start, counts, tile_start, tile_end, num_tiles, chunk_n, NUM_BINS, BLOCK_M,
                gemm.GROUP_M)
            n_block = column_chunk * chunk_n + n_in_chunk
            if n_block < num_n:
                expert, _ = bin_expert(bin, lead_experts, EXPERTS, BINS)
                expert_gemm_tile(expert, first_row, end_row, n_block, gemm)
            tl.debug_barrier()  # every thread's stores before the count
            tl.atomic_add(column_done_ptr + column_chunk, 1, sem="release", scope="gpu")
        # Out of tiles: take the units of finished chunks that no one has taken yet, without
        # waiting (a chunk still being computed is left to the pushing programs).
        for column_chunk in range(COLUMN_CHUNKS):
            if tl.atomic_add(column_done_ptr + column_chunk, 0, sem="acquire", scope="gpu") >= chunk_items:
                _claim_units(column_chunk, claims_ptr, chunk_n, num_n, recv_ids_ptr, recv_counts_ptr, chunk_done_ptr,
                             partials_table, flags_table, gemm.out_ptr, gemm.stride_om, rank, epoch, capacity,
                             n_chunks, gemm.N, COLUMN_CHUNKS, BINS, gemm.TOP_K, gemm.BLOCK_N, WORLD, CHUNK)
    else:
        for column_chunk in range(COLUMN_CHUNKS):
            wait_flag_ge(column_done_ptr + column_chunk, chunk_items, max_spins, error_ptr, WAIT_KIND, rank,
                         column_chunk)
            _claim_units(column_chunk, claims_ptr, chunk_n, num_n, recv_ids_ptr, recv_counts_ptr, chunk_done_ptr,
                         partials_table, flags_table, gemm.out_ptr, gemm.stride_om, rank, epoch, capacity, n_chunks,
                         gemm.N, COLUMN_CHUNKS, BINS, gemm.TOP_K, gemm.BLOCK_N, WORLD, CHUNK)


@triton.jit(do_not_specialize=["rank", "num_tokens", "max_spins"])
def _combine_reduce_kernel(
    out_ptr, mask_ptr, slot_ptr,  # out [T, H]; the send plan's mask (bool) and slot (int32) [W, T]
    partials_table, flags_table, error_ptr,
    host_error_table,  # int64 [1]: the address of the host's copy of the error record
    rank, epoch_ptr, num_tokens, capacity, hidden, n_chunks, max_spins,
    WORLD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
    WAIT_KIND: tl.constexpr, ERROR_FIELDS: tl.constexpr, ERROR_BLOCK: tl.constexpr,
):
    epoch = tl.load(epoch_ptr)
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
    # Any wait of this rank that gave up, in this call or before (the record is sticky): the rows
    # are NaN, never a plausible result.
    failed = tl.load(error_ptr, volatile=True) != 0
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
        acc = tl.where(failed, float("nan"), acc)
        tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * hidden + offs_h[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])
    if failed & (tl.program_id(0) == 0):  # the host reads this copy without a sync
        fields = tl.arange(0, ERROR_BLOCK)
        record = tl.load(error_ptr + fields, mask=fields < ERROR_FIELDS, volatile=True)
        tl.store(peer_ptr(host_error_table, 0, error_ptr) + fields, record, mask=fields < ERROR_FIELDS)


def combine_push(ws: CommWorkspace, bufs: CombineBuffers, epoch: torch.Tensor, partial: torch.Tensor, counts: torch.Tensor,
                 num_programs: int):
    """Send partial rows (partial [W*C, H], row s*C + i for received token i of source s; the
    first counts[s] of each source are sent) to their sources' combine buffers."""
    hidden = partial.shape[1]
    _combine_push_kernel[(num_programs,)](
        partial, counts, ws.ptr_table(bufs.partials), ws.ptr_table(bufs.flags),
        ws.rank, epoch, bufs.capacity, hidden, bufs.n_chunks,
        WORLD=ws.world_size, CHUNK=bufs.chunk, BLOCK_H=hidden_block(bufs.chunk, hidden, PUSH_WARPS),
        NUM_PROGRAMS=num_programs, num_warps=PUSH_WARPS,
    )


# [chunk, BLOCK_N] fp32 sums of 2K elements per warp, so that a block's K slot loads fit in registers.
SUM_PUSH_WARPS = 8


def slot_sum_push(ws: CommWorkspace, bufs: CombineBuffers, epoch: torch.Tensor, slots: torch.Tensor,
                  recv_ids: torch.Tensor, recv_counts: torch.Tensor, num_experts: int):
    """The slot combine and the combine's push in one launch: each received token's K slot rows
    (slots [W*C*K, H], GEMM2's output; recv_ids [W*C, K], rows with ids outside [0, num_experts)
    are skipped) summed in fp32 in slot order and stored straight into its source's combine
    buffer, a flag per token chunk. The push's stores to the peers overlap the sum's local reads,
    where `combine_slots` then `combine_push` would run one after the other."""
    hidden, top_k = slots.shape[1], recv_ids.shape[1]
    _slot_sum_push_kernel[(ws.world_size * bufs.n_chunks,)](
        slots, slots.stride(0), recv_ids, recv_counts, ws.ptr_table(bufs.partials), ws.ptr_table(bufs.flags),
        ws.rank, epoch, bufs.capacity, bufs.n_chunks, hidden,
        NUM_EXPERTS=num_experts, TOP_K=top_k, BLOCK_N=hidden_block(bufs.chunk, hidden, SUM_PUSH_WARPS // 2),
        WORLD=ws.world_size, CHUNK=bufs.chunk, num_warps=SUM_PUSH_WARPS,
    )


def down_combine(ws: CommWorkspace, bufs: CombineBuffers, epoch: torch.Tensor, gemm: GemmProblem,
                 tiles: ArrivalTiles, recv_ids: torch.Tensor, recv_counts: torch.Tensor, n_comm: int,
                 column_chunks: int):
    """GEMM2 fused with the combine's push: `gemm` (`GemmProblem.down` over the received tokens,
    its routing plan over `tiles.bins` arrival bins: its output holds the weighted slot rows) runs
    in the first programs, in `column_chunks` column chunks (at most one per N block) one after
    another; the last `n_comm` programs sum each received token's slots of a finished column
    chunk (recv_ids [W*C, K], the first recv_counts[s] tokens of each source s) and push the sums
    to the sources' combine buffers, as `combine_push` does; computing programs out of tiles help
    with finished chunks. Local (its waits are on its own programs); no host sync."""
    device = gemm.a.device
    compute = fused_programs(device, n_comm, gemm.max_items(tiles.bins))
    if column_chunks < 1:
        raise ValueError(f"column_chunks: expected >= 1, got {column_chunks}")
    column_chunks = min(column_chunks, triton.cdiv(gemm.n, gemm.cfg.block_n))  # at most one per N block
    n_chunks = bufs.n_chunks
    counters = torch.zeros(2 * column_chunks + ws.world_size * n_chunks, dtype=torch.int64, device=device)
    _down_combine_kernel[(compute + n_comm,)](
        recv_ids, recv_counts, counters, counters[column_chunks:], counters[2 * column_chunks:],
        ws.ptr_table(bufs.partials), ws.ptr_table(bufs.flags), ws.errors,
        ws.rank, epoch, bufs.capacity, n_chunks, ws.max_spins,
        **gemm.kernel_args(), **tiles.kernel_args(), NUM_PROGRAMS=compute, COMM_PROGRAMS=n_comm,
        COLUMN_CHUNKS=column_chunks, WORLD=ws.world_size, CHUNK=bufs.chunk, WAIT_KIND=int(WaitKind.COMBINE_CHUNK),
    )


def combine_reduce(ws: CommWorkspace, bufs: CombineBuffers, epoch: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor,
                   out: torch.Tensor, host_error_table: torch.Tensor) -> torch.Tensor:
    """out[t] = sum over ranks d in order, where mask[d, t], of rank d's partial row at slot[d, t].
    If any wait of this workspace has given up, out is NaN and the error record is copied to the
    host memory at host_error_table[0] (int64 [1] on the workspace's device). Launched even for
    T = 0, so that every call ends with that copy."""
    num_tokens, hidden = out.shape
    block_t = 16
    block_h = max(16, min(triton.next_power_of_2(hidden), 4096 // block_t))
    _combine_reduce_kernel[(max(1, triton.cdiv(num_tokens, block_t)),)](
        out, mask, slot, ws.ptr_table(bufs.partials), ws.ptr_table(bufs.flags), ws.errors, host_error_table,
        ws.rank, epoch, num_tokens, bufs.capacity, hidden, bufs.n_chunks, ws.max_spins,
        WORLD=ws.world_size, CHUNK=bufs.chunk, BLOCK_T=block_t, BLOCK_H=block_h,
        WAIT_KIND=int(WaitKind.COMBINE_CHUNK), ERROR_FIELDS=ws.errors.numel(),
        ERROR_BLOCK=triton.next_power_of_2(ws.errors.numel()), num_warps=4,
    )
    return out
