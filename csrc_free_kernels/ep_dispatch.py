"""Expert-parallel dispatch: every rank pushes its tokens into the receive buffers of the ranks
that hold their experts, then each rank waits for what it receives.

Receive buffers on every rank (leading 2 = epoch parity, then source rank, then receive slot):
`x` [W, C, H], `ids` int32 [2, W, C, K] (the expert's local id on the receiver, -1 where that
expert lives elsewhere), `weights` fp32 [2, W, C, K], `count` int32 [2, W]. Flags: `meta` [2, W,
ceil(C / META_BLOCK)] (the routing of slots [b*META_BLOCK, (b+1)*META_BLOCK) has arrived; block
0's flag also covers the count, and is raised even when nothing is sent) and `chunk` [2, W,
ceil(C / CHUNK)] (x rows of slots [c*CHUNK, (c+1)*CHUNK) have). The routing moves in blocks dealt
over every pushing program and is received by one program per (source, block) (why:
docs/performance-ep.md). The rows need no second half, so the host never picks one (a CUDA
graph replays whatever it picked): a source that sent the receiver any rows in a call cannot
send the next call's before the receiver's partial rows of them came back, which the receiver
pushes after its GEMM1 has read them; a source that sent none has no rows there to overwrite.

Unfused: `dispatch_push` (routing, then rows; no waits) and `dispatch_receive` (waits for both,
then copies the received routing into local tensors with unused slots marked -1). Fused
(`dispatch_gate_up`): the routing moves first (`push_rows=False`, `wait_rows=False`), every rank
builds its GEMM1 tile plan from it, then one launch pushes the rows in its first programs while
the others run GEMM1 tiles, each waiting for the chunks it reads. No pushing program ever waits,
so no rank's pushes depend on another rank's progress, which the Triton interpreter (programs run
one after another, ranks are processes) needs to finish at all; waiting programs come after the
pushing ones in their launch. The backward of `comet.ep` reuses both launches, the output
gradients as the rows.

`dispatch_buffers` is collective the first time a shape is asked for; the launchers never sync
the host. A wait that gives up leaves the workspace's error record, and `dispatch_receive` then
gives NaN routing weights for what never arrived.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from comet.comm import CommWorkspace, WaitKind
from comet.kernels.ep_tiles import ArrivalTiles, arrival_bin, bin_expert, fused_programs
from comet.kernels.expert_gemm import GemmProblem, expert_gemm_tile, locate_item
from comet.kernels.routing import expert_segments
from comet.kernels.signals import peer_ptr, signal_set, wait_flag_ge, wait_flags_ge


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
    meta_block: int  # receive slots per routing block: a power-of-two number of chunks
    hidden: int

    @property
    def n_chunks(self) -> int:
        return triton.cdiv(self.capacity, self.chunk)

    @property
    def n_meta(self) -> int:
        return triton.cdiv(self.capacity, self.meta_block)

    def received_x(self, ws: CommWorkspace, dtype: torch.dtype) -> torch.Tensor:
        """This rank's receive buffer of rows as [W * C, H] of `dtype` (a view, local)."""
        w, c = ws.world_size, self.capacity
        return row_view(ws.buffer(self.x, (w, c, self.hidden), ROW_STORAGE), dtype, (w * c, self.hidden))


# Row buffers (received rows, partial rows) are sized in fp32 elements, so that one buffer serves
# every dtype of at most 4 bytes: a layer's buffers are made before its dtype is known.
ROW_STORAGE = torch.float32


def row_view(storage: torch.Tensor, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """The first elements of a row buffer `storage` viewed as `dtype` in `shape`."""
    if dtype.itemsize > storage.element_size():
        raise TypeError(f"dtype: {dtype} is wider than the {storage.dtype} the row buffers are sized for")
    count = 1
    for s in shape:
        count *= s
    return storage.view(-1).view(torch.uint8)[: count * dtype.itemsize].view(dtype).view(shape)


# Chunks per routing block. The interpreter's are small so that its tiny shapes cross several.
META_CHUNKS = {"cpu": 2, "cuda": 8}


def dispatch_buffers(ws: CommWorkspace, capacity: int, hidden: int, top_k: int, chunk: int) -> DispatchBuffers:
    """Collective on first use: the receive buffers for `capacity` tokens per source of rows of
    `hidden` elements of any dtype up to 4 bytes, with `top_k` routing slots each."""
    w = ws.world_size
    meta_block = META_CHUNKS[ws.device.type] * chunk
    n_chunks, n_meta = triton.cdiv(capacity, chunk), triton.cdiv(capacity, meta_block)
    names = DispatchBuffers(
        f"ep.recv_x.C{capacity}.H{hidden}", f"ep.recv_ids.C{capacity}.K{top_k}",
        f"ep.recv_weights.C{capacity}.K{top_k}", "ep.recv_count", f"ep.dispatch_meta_flags.{n_meta}",
        f"ep.dispatch_chunk_flags.{n_chunks}", capacity, chunk, meta_block, hidden)
    ws.buffer(names.x, (w, capacity, hidden), ROW_STORAGE)
    ws.buffer(names.ids, (2, w, capacity, top_k), torch.int32)
    ws.buffer(names.weights, (2, w, capacity, top_k), torch.float32)
    ws.buffer(names.count, (2, w), torch.int32)
    ws.flags(names.meta_flags, (2, w, n_meta))
    ws.flags(names.chunk_flags, (2, w, n_chunks))
    return names


@triton.jit
def push_rows(pid, num_programs, x_ptr, stride_x, send_tokens_ptr, send_counts_ptr, recv_x_table, chunk_table,
              rank, epoch, num_tokens, capacity, hidden, n_chunks,
              WORLD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr, FIRST_DST: tl.constexpr):
    """Program `pid` of `num_programs` pushes its chunks of x rows to every destination, raising a
    flag per chunk. Chunks are dealt round-robin; destinations start with this rank and rotate by
    rank, so that the sources spread over the targets. FIRST_DST = 1 skips this rank itself."""
    parity = epoch % 2
    for j in range(FIRST_DST, WORLD):
        dst = (rank + j) % WORLD
        count = tl.load(send_counts_ptr + dst)
        recv_x = peer_ptr(recv_x_table, dst, x_ptr) + tl.cast(rank, tl.int64) * capacity * hidden
        flags = peer_ptr(chunk_table, dst, chunk_table) + (parity * WORLD + rank) * n_chunks
        for c in range(pid, tl.cdiv(count, CHUNK), num_programs):
            slots = c * CHUNK + tl.arange(0, CHUNK)
            s_mask = slots < count
            tokens = tl.load(send_tokens_ptr + dst * num_tokens + slots, mask=s_mask, other=0).to(tl.int64)
            for h in range(0, hidden, BLOCK_H):
                offs_h = h + tl.arange(0, BLOCK_H)
                m = s_mask[:, None] & (offs_h < hidden)[None, :]
                row = tl.load(x_ptr + tokens[:, None] * stride_x + offs_h[None, :], mask=m)
                tl.store(recv_x + slots.to(tl.int64)[:, None] * hidden + offs_h[None, :], row, mask=m)
            signal_set(flags + c, epoch)


@triton.jit(do_not_specialize=["rank", "num_tokens"])
def _dispatch_push_kernel(
    x_ptr, stride_x, topk_ids_ptr, topk_weights_ptr,
    send_tokens_ptr, send_counts_ptr,  # the send plan: int32 [W, T], int32 [W]
    recv_x_table, recv_ids_table, recv_weights_table, recv_count_table, meta_table, chunk_table,
    rank, epoch_ptr, num_tokens, capacity, hidden, experts_per_rank, n_chunks, n_meta,
    WORLD: tl.constexpr, TOP_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr, META_BLOCK: tl.constexpr, NUM_PROGRAMS: tl.constexpr, PUSH_ROWS: tl.constexpr,
):
    epoch = tl.load(epoch_ptr)
    pid = tl.program_id(0)
    parity = epoch % 2
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < TOP_K
    # Routing first, in (destination, block) units dealt over the programs: the routing of the
    # block's tokens (ids as the destination's local ids) and, with block 0, the count; then the
    # block's meta flag. Block 0 goes even when nothing does (it carries the count).
    for unit in range(pid, WORLD * n_meta, NUM_PROGRAMS):
        dst = (rank + unit // n_meta) % WORLD
        block = unit % n_meta
        count = tl.load(send_counts_ptr + dst)
        if (block == 0) | (block * META_BLOCK < count):
            base = tl.cast(parity * WORLD + rank, tl.int64) * capacity * TOP_K
            slots = block * META_BLOCK + tl.arange(0, META_BLOCK)
            s_mask = slots < count
            tokens = tl.load(send_tokens_ptr + dst * num_tokens + slots, mask=s_mask, other=0).to(tl.int64)
            route_off = tokens[:, None] * TOP_K + offs_k[None, :]
            route_mask = s_mask[:, None] & k_mask[None, :]
            local = tl.load(topk_ids_ptr + route_off, mask=route_mask, other=-1).to(tl.int32) - dst * experts_per_rank
            local = tl.where((local >= 0) & (local < experts_per_rank), local, -1)
            recv_off = slots.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]
            tl.store(peer_ptr(recv_ids_table, dst, send_counts_ptr) + base + recv_off, local, mask=route_mask)
            tl.store(peer_ptr(recv_weights_table, dst, topk_weights_ptr) + base + recv_off,
                     tl.load(topk_weights_ptr + route_off, mask=route_mask), mask=route_mask)
            if block == 0:
                tl.store(peer_ptr(recv_count_table, dst, send_counts_ptr) + parity * WORLD + rank, count)
            signal_set(peer_ptr(meta_table, dst, meta_table) + (parity * WORLD + rank) * n_meta + block, epoch)
    if PUSH_ROWS:
        push_rows(pid, NUM_PROGRAMS, x_ptr, stride_x, send_tokens_ptr, send_counts_ptr, recv_x_table, chunk_table,
                  rank, epoch, num_tokens, capacity, hidden, n_chunks, WORLD, CHUNK, BLOCK_H, 0)


@triton.jit(do_not_specialize=["rank", "max_spins", "lead_experts"])
def _dispatch_receive_kernel(
    recv_ids_table, recv_weights_table, recv_count_table, meta_table, chunk_table, error_ptr,
    ids_out_ptr, weights_out_ptr, counts_out_ptr,  # local: int32 [W, C, K], fp32 [W, C, K], int32 [W]
    rank, epoch_ptr, capacity, n_chunks, n_meta, max_spins, lead_experts,
    WORLD: tl.constexpr, TOP_K: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, META_BLOCK: tl.constexpr,
    META_KIND: tl.constexpr, CHUNK_KIND: tl.constexpr, WAIT_ROWS: tl.constexpr, ARRIVAL_EXPERTS: tl.constexpr,
):
    epoch = tl.load(epoch_ptr)
    # Program (j, b) receives routing block b from source (rank - j) mod W: this rank itself first.
    src = (rank - tl.program_id(0) + WORLD) % WORLD
    block = tl.program_id(1)
    parity = epoch % 2
    row = parity * WORLD + src
    meta = peer_ptr(meta_table, rank, meta_table) + row * n_meta
    arrived_meta = wait_flag_ge(meta, epoch, max_spins, error_ptr, META_KIND, src, 0)
    # Clamped: after a timed-out wait the count may be stale; it must still index inside the buffers.
    count = tl.minimum(tl.load(peer_ptr(recv_count_table, rank, counts_out_ptr) + row, volatile=True), capacity)
    if block == 0:
        tl.store(counts_out_ptr + src, count)
    start = block * META_BLOCK
    if (block > 0) & (start < count):
        arrived_meta = wait_flag_ge(meta + block, epoch, max_spins, error_ptr, META_KIND, src, block)
    if WAIT_ROWS:
        BLOCK_CHUNKS: tl.constexpr = META_BLOCK // CHUNK
        c = block * BLOCK_CHUNKS + tl.arange(0, BLOCK_CHUNKS)
        wait_flags_ge(peer_ptr(chunk_table, rank, chunk_table) + row * n_chunks + c, c * CHUNK < count, epoch,
                      max_spins, error_ptr, CHUNK_KIND, src, c)
    base = tl.cast(row, tl.int64) * capacity * TOP_K
    recv_ids = peer_ptr(recv_ids_table, rank, ids_out_ptr) + base
    recv_w = peer_ptr(recv_weights_table, rank, weights_out_ptr) + base
    out_base = tl.cast(src, tl.int64) * capacity * TOP_K
    offs_k = tl.arange(0, BLOCK_K)
    slots = start + tl.arange(0, META_BLOCK)
    off = slots.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]
    in_buffer = (slots < capacity)[:, None] & (offs_k < TOP_K)[None, :]
    arrived = in_buffer & (slots < count)[:, None]
    # Slots past the count hold older calls' data: mark them unused.
    ids = tl.load(recv_ids + off, mask=arrived, other=-1)
    if ARRIVAL_EXPERTS > 0:  # the tile-map bin of (expert, the source's place in arrival order): ep_tiles
        ids = tl.where(ids >= 0, arrival_bin(ids, (rank - src + WORLD) % WORLD, lead_experts, ARRIVAL_EXPERTS, WORLD),
                       -1)
    tl.store(ids_out_ptr + out_base + off, ids, mask=in_buffer)
    weights = tl.load(recv_w + off, mask=arrived, other=0.0)
    # A routing that never came: NaN weights, so that nothing computed from it looks plausible.
    weights = tl.where(arrived_meta, weights, float("nan"))
    tl.store(weights_out_ptr + out_base + off, weights, mask=in_buffer)


# Chunk flags one poll reads; the interpreter's few chunks still cross blocks.
WAIT_BLOCK = {"cpu": 4, "cuda": 64}


@triton.jit
def _wait_source_chunks(flags_ptr, start, end, epoch, max_spins, error_ptr, src,
                        WAIT_KIND: tl.constexpr, WAIT_BLOCK: tl.constexpr):
    """Wait for one source's chunk flags [start, end), WAIT_BLOCK per poll."""
    for c0 in range(start, end, WAIT_BLOCK):
        c = c0 + tl.arange(0, WAIT_BLOCK)
        wait_flags_ge(flags_ptr + c, c < end, epoch, max_spins, error_ptr, WAIT_KIND, src, c)


# Program counts are plain arguments here: a new n_comm or grid must not compile a new kernel.
@triton.jit(do_not_specialize=["rank", "num_tokens", "max_spins", "lead_experts", "NUM_PROGRAMS", "COMM_PROGRAMS"])
def _dispatch_gate_up_kernel(
    x_ptr, stride_x, send_tokens_ptr, send_counts_ptr, recv_x_table, chunk_table,
    error_ptr,
    rank, epoch_ptr, num_tokens, capacity, hidden, n_chunks, max_spins,
    gemm,  # GemmProblem.kernel_args(a_address=False) of GEMM1 (A: this rank's receive buffer, through recv_x_table)
    # ep_tiles.ArrivalTiles.kernel_args(): the tile map
    lead_experts, EXPERTS: tl.constexpr, BINS: tl.constexpr, NUM_BINS: tl.constexpr,
    NUM_PROGRAMS, COMM_PROGRAMS, WORLD: tl.constexpr, CHUNK: tl.constexpr, BLOCK_H: tl.constexpr,
    WAIT_KIND: tl.constexpr, WAIT_BLOCK: tl.constexpr, SOURCES_P2: tl.constexpr,  # next power of 2 >= WORLD
):
    epoch = tl.load(epoch_ptr)
    # Programs below COMM_PROGRAMS push to the other ranks (they never wait); the others, which
    # may wait on them, run GEMM1's persistent loop over the arrival bins. This rank's own tokens
    # (arrival position 0) are read from x in place: its send slot t is token t
    # (`plan_sends(every_token_to=rank)`), so they are neither copied nor waited for.
    pid = tl.program_id(0)
    if pid < COMM_PROGRAMS:
        push_rows(pid, COMM_PROGRAMS, x_ptr, stride_x, send_tokens_ptr, send_counts_ptr, recv_x_table, chunk_table,
                  rank, epoch, num_tokens, capacity, hidden, n_chunks, WORLD, CHUNK, BLOCK_H, 1)
    else:
        received = peer_ptr(recv_x_table, rank, gemm.b_ptr)
        own = x_ptr - tl.cast(rank * capacity, tl.int64) * stride_x  # virtual token rank*C + t -> x row t
        flags = peer_ptr(chunk_table, rank, chunk_table) + (epoch % 2) * WORLD * n_chunks
        # A remote tile's rows come from one source, in slot order, so it reads chunks up to its
        # last row's. Chunks go out in about that order, and a program remembers per source
        # (arrival position) how many it has seen arrive, so it polls only past that: a few
        # polls per source and program, not a few per tile (each a system-scope atomic).
        positions = tl.arange(0, SOURCES_P2)
        seen = tl.zeros([SOURCES_P2], dtype=tl.int32)
        BLOCK_M: tl.constexpr = gemm.BLOCK_M
        TOP_K: tl.constexpr = gemm.TOP_K
        row_start, counts, tile_start, tile_end, num_tiles = expert_segments(gemm.hist_ptr, BINS, NUM_BINS, BLOCK_M)
        num_n = tl.cdiv(gemm.N, gemm.BLOCK_N)
        for item in range(pid - COMM_PROGRAMS, num_tiles * num_n, NUM_PROGRAMS):
            bin, first_row, end_row, n_block = locate_item(
                item, row_start, counts, tile_start, tile_end, num_tiles, num_n, NUM_BINS, BLOCK_M, gemm.GROUP_M)
            expert, position = bin_expert(bin, lead_experts, EXPERTS, BINS)
            if position == 0:
                a_ptr = own
                a_stride = stride_x
            else:
                src = (rank - position + WORLD) % WORLD
                last_token = tl.load(gemm.sorted_rows_ptr + tl.minimum(first_row + BLOCK_M, end_row) - 1) // TOP_K
                needed = ((last_token % capacity) // CHUNK + 1).to(tl.int32)
                arrived = tl.sum(tl.where(positions == position, seen, 0), axis=0)
                if arrived < needed:
                    _wait_source_chunks(flags + src * n_chunks, arrived, needed, epoch, max_spins, error_ptr, src,
                                        WAIT_KIND, WAIT_BLOCK)
                    seen = tl.where(positions == position, needed, seen)
                a_ptr = received
                a_stride = gemm.stride_am
            expert_gemm_tile(expert, first_row, end_row, n_block, gemm, a_ptr, a_stride)


# Warps of the push-only launches. A pushing program is bound by the latency of its loads (one
# [CHUNK, BLOCK_H] tile in flight at a time), so tiles are as large as the registers allow
# (docs/performance-ep.md).
PUSH_WARPS = 8


def hidden_block(chunk: int, hidden: int, num_warps: int) -> int:
    """BLOCK_H of a [chunk, BLOCK_H] copy tile: 4K elements per warp (16 registers of 16-bit
    values per thread), the whole row if shorter."""
    return max(16, min(triton.next_power_of_2(hidden), 4096 * num_warps // chunk))


def dispatch_push(ws: CommWorkspace, bufs: DispatchBuffers, epoch: torch.Tensor, x: torch.Tensor,
                  topk_ids: torch.Tensor, topk_weights: torch.Tensor, send_tokens: torch.Tensor,
                  send_counts: torch.Tensor, experts_per_rank: int, num_programs: int, push_rows: bool = True):
    """Push this rank's tokens (x [T, H], routing [T, K] with global ids; the send plan of
    `comet.scheduler.ep_plan`) into every destination's receive buffers, flags raised to `epoch`.
    Without `push_rows`, only the counts and routing (the rows follow in `dispatch_gate_up`)."""
    num_tokens, top_k = topk_ids.shape
    hidden = x.shape[1]
    _dispatch_push_kernel[(num_programs,)](
        x, x.stride(0), topk_ids, topk_weights, send_tokens, send_counts,
        ws.ptr_table(bufs.x), ws.ptr_table(bufs.ids), ws.ptr_table(bufs.weights), ws.ptr_table(bufs.count),
        ws.ptr_table(bufs.meta_flags), ws.ptr_table(bufs.chunk_flags),
        ws.rank, epoch, num_tokens, bufs.capacity, hidden, experts_per_rank, bufs.n_chunks, bufs.n_meta,
        WORLD=ws.world_size, TOP_K=top_k, CHUNK=bufs.chunk, BLOCK_H=hidden_block(bufs.chunk, hidden, PUSH_WARPS),
        BLOCK_K=triton.next_power_of_2(top_k), META_BLOCK=bufs.meta_block, NUM_PROGRAMS=num_programs,
        PUSH_ROWS=push_rows, num_warps=PUSH_WARPS,
    )


def dispatch_receive(ws: CommWorkspace, bufs: DispatchBuffers, epoch: torch.Tensor, top_k: int, wait_rows: bool = True,
                     tiles: ArrivalTiles | None = None):
    """Wait for every source's tokens of call `epoch` (without `wait_rows`, only for their
    routing); return the received routing as local tensors: ids int32 [W, C, K] (local expert
    ids, -1 for unused slots and other ranks' experts), weights fp32 [W, C, K], counts int32 [W]
    (tokens from each source). Local (waits only on the flags); no host sync.

    With `tiles` (the fused kernels' tile map, `tiles.sources` = W), ids become its bins
    `ep_tiles.arrival_bin(local id, (rank - s) mod W, tiles.lead_experts)` for source s (its place
    in the order the sources push to this rank): sorted by them, the own rows of the first
    `lead_experts` experts come first, then each later expert's rows of every source, then the
    first experts' rows from the other sources."""
    w, c = ws.world_size, bufs.capacity
    ids = torch.empty(w, c, top_k, dtype=torch.int32, device=ws.device)
    weights = torch.empty(w, c, top_k, dtype=torch.float32, device=ws.device)
    counts = torch.empty(w, dtype=torch.int32, device=ws.device)
    _dispatch_receive_kernel[(w, bufs.n_meta)](
        ws.ptr_table(bufs.ids), ws.ptr_table(bufs.weights), ws.ptr_table(bufs.count),
        ws.ptr_table(bufs.meta_flags), ws.ptr_table(bufs.chunk_flags), ws.errors,
        ids, weights, counts,
        ws.rank, epoch, c, bufs.n_chunks, bufs.n_meta, ws.max_spins, 0 if tiles is None else tiles.lead_experts,
        WORLD=w, TOP_K=top_k, CHUNK=bufs.chunk, BLOCK_K=triton.next_power_of_2(top_k), META_BLOCK=bufs.meta_block,
        META_KIND=int(WaitKind.DISPATCH_METADATA), CHUNK_KIND=int(WaitKind.DISPATCH_CHUNK), WAIT_ROWS=wait_rows,
        ARRIVAL_EXPERTS=0 if tiles is None else tiles.experts, num_warps=4,
    )
    return ids, weights, counts


def dispatch_gate_up(ws: CommWorkspace, bufs: DispatchBuffers, epoch: torch.Tensor, x: torch.Tensor,
                     send_tokens: torch.Tensor, send_counts: torch.Tensor, gemm: GemmProblem, tiles: ArrivalTiles,
                     n_comm: int):
    """Dispatch fused with GEMM1: the first `n_comm` programs push this rank's x rows [T, H] to the
    other ranks (after `dispatch_push(push_rows=False)` and `dispatch_receive(wait_rows=False,
    tiles=tiles)` moved the routing), the others run the tiles of `gemm`
    (`GemmProblem.gate_up` over the receive buffer viewed [W*C, H], its routing plan over
    `tiles.bins` bins; this rank's own rows are read from x), each first waiting for the chunks
    of rows it reads. Every rank makes this call in the same epoch (its peers wait on its
    pushes); no host sync."""
    compute = fused_programs(x.device, n_comm, gemm.max_items(tiles.bins))
    hidden = x.shape[1]
    _dispatch_gate_up_kernel[(n_comm + compute,)](
        x, x.stride(0), send_tokens, send_counts, ws.ptr_table(bufs.x), ws.ptr_table(bufs.chunk_flags),
        ws.errors,
        ws.rank, epoch, x.shape[0], bufs.capacity, hidden, bufs.n_chunks, ws.max_spins,
        # A is reached through the pointer table: a tensor argument would be written back by the interpreter
        **gemm.kernel_args(a_address=False), **tiles.kernel_args(),
        NUM_PROGRAMS=compute, COMM_PROGRAMS=n_comm, WORLD=ws.world_size, CHUNK=bufs.chunk,
        BLOCK_H=hidden_block(bufs.chunk, hidden, gemm.cfg.num_warps), WAIT_KIND=int(WaitKind.DISPATCH_CHUNK),
        WAIT_BLOCK=WAIT_BLOCK[x.device.type], SOURCES_P2=triton.next_power_of_2(ws.world_size),
    )
