"""Expert histogram and expert-sorted row order of a routing, and the tile map every expert GEMM
derives from them.

The histogram has one bin per expert plus two guard bins: bin 0 counts ids < 0 and bin E+1 ids >= E
(Hugging Face's expert-parallel convention marks off-rank experts that way; they are skipped). Sorted
by id, expert e's rows are then the contiguous range [start[e], start[e] + count[e]), so the tile map
(which expert a tile belongs to, which rows it covers) is derived inside each kernel from the
histogram alone: no host sync, no per-call tile arrays. (The fused expert-parallel kernels bin
their rows by arrival instead: `comet.kernels.ep_tiles`.) `gather_padded_rows` copies token rows
into that order with each expert's segment padded with zero rows to a multiple of a block.
"""
import torch
import triton
import triton.language as tl


def histogram_bins(num_experts: int) -> int:
    # Power of two >= E + 3: bins 0 and E+1 are the guards, the last bin takes masked-off lanes.
    return triton.next_power_of_2(num_experts + 3)


@triton.jit
def _expert_histogram_kernel(ids_ptr, hist_ptr, keys_ptr, num_ids, NUM_EXPERTS: tl.constexpr,
                             NUM_BINS: tl.constexpr, BLOCK: tl.constexpr, WRITE_KEYS: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < num_ids, other=0)
    bins = (tl.minimum(tl.maximum(ids, -1), NUM_EXPERTS) + 1).to(tl.int32)  # clamped first: int64 ids stay put
    if WRITE_KEYS:
        tl.store(keys_ptr + offs, bins.to(keys_ptr.dtype.element_ty), mask=offs < num_ids)
    bins = tl.where(offs < num_ids, bins, NUM_BINS - 1)
    counts = tl.histogram(bins, NUM_BINS)
    tl.atomic_add(hist_ptr + tl.arange(0, NUM_BINS), counts, sem="relaxed")


def expert_histogram(topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor | None = None,
                     keys: torch.Tensor | None = None) -> torch.Tensor:
    """int32 [histogram_bins(E)]: bin 0 = ids < 0, bin 1+e = expert e, bin E+1 = ids >= E. `keys`
    (as many as ids, an integer dtype that holds E + 1) also gets each id's bin."""
    num_bins = histogram_bins(num_experts)
    hist = torch.zeros(num_bins, dtype=torch.int32, device=topk_ids.device) if out is None else out.zero_()
    num_ids = topk_ids.numel()
    block = 1024
    _expert_histogram_kernel[(triton.cdiv(num_ids, block),)](
        topk_ids.contiguous(), hist, keys, num_ids, NUM_EXPERTS=num_experts, NUM_BINS=num_bins, BLOCK=block,
        WRITE_KEYS=keys is not None)
    return hist


def sorted_routing_plan(flat_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted rows int64 [n], histogram) of any number of ids, equal to `torch.argsort(ids,
    stable=True)` (where ids are in [-1, E]) and `expert_histogram`. The histogram launch also
    writes each id's bin in the narrowest integer type that holds E + 1: the library's radix sort
    then runs over 8 key bits (16 from 255 experts, 32 from 32767) instead of the ids' 32 or 64."""
    key_type = torch.uint8 if num_experts < 255 else torch.int16 if num_experts < 32767 else torch.int32
    keys = torch.empty(flat_ids.numel(), dtype=key_type, device=flat_ids.device)
    hist = expert_histogram(flat_ids, num_experts, keys=keys)
    return torch.argsort(keys, stable=True), hist


# Up to this many routed rows one program counts and sorts them (a bitonic sort in registers): one
# launch where larger batches take a memset, the histogram kernel and a library sort (measured:
# docs/performance.md).
SMALL_ROUTING_ROWS = 4096


@triton.jit
def _small_routing_kernel(ids_ptr, sorted_rows_ptr, hist_ptr, num_ids, NUM_EXPERTS: tl.constexpr,
                          NUM_BINS: tl.constexpr, BLOCK: tl.constexpr, INDEX_BITS: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    valid = offs < num_ids
    ids = tl.load(ids_ptr + offs, mask=valid, other=0)
    bins = (tl.minimum(tl.maximum(ids, -1), NUM_EXPERTS) + 1).to(tl.int32)
    bins = tl.where(valid, bins, NUM_BINS - 1)
    tl.store(hist_ptr + tl.arange(0, NUM_BINS), tl.histogram(bins, NUM_BINS))
    # (bin, row) keys are distinct: sorting them sorts the rows by bin, stably.
    keys = tl.sort((bins << INDEX_BITS) | offs)
    tl.store(sorted_rows_ptr + offs, (keys & ((1 << INDEX_BITS) - 1)).to(tl.int64), mask=valid)


def small_routing_plan(flat_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted rows int64 [n], histogram int32 [histogram_bins(E)]) of n <= SMALL_ROUTING_ROWS ids,
    equal to `torch.argsort(ids, stable=True)` (where ids are in [-1, E]) and `expert_histogram`."""
    num_ids = flat_ids.numel()
    if not 0 < num_ids <= SMALL_ROUTING_ROWS:
        raise ValueError(f"flat_ids: expected 1 to {SMALL_ROUTING_ROWS} ids, got {num_ids}")
    num_bins = histogram_bins(num_experts)
    block = max(16, triton.next_power_of_2(num_ids))
    sorted_rows = torch.empty(num_ids, dtype=torch.int64, device=flat_ids.device)
    hist = torch.empty(num_bins, dtype=torch.int32, device=flat_ids.device)
    _small_routing_kernel[(1,)](flat_ids.contiguous(), sorted_rows, hist, num_ids, NUM_EXPERTS=num_experts, NUM_BINS=num_bins,
                                BLOCK=block, INDEX_BITS=block.bit_length() - 1, num_warps=4 if block <= 1024 else 8)
    return sorted_rows, hist


@triton.jit
def expert_segments(hist_ptr, NUM_EXPERTS: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per-expert vectors over arange(NUM_BINS) (entries >= E are 0): row start in sorted order,
    row count, and the exclusive/inclusive prefix of M tiles; plus the total number of M tiles."""
    idx = tl.arange(0, NUM_BINS)
    valid = idx < NUM_EXPERTS
    counts = tl.load(hist_ptr + idx + 1, mask=valid, other=0)
    row_start = tl.cumsum(counts, axis=0) - counts + tl.load(hist_ptr)
    tiles = tl.cdiv(counts, BLOCK_M)
    tile_end = tl.cumsum(tiles, axis=0)
    return row_start, counts, tile_end - tiles, tile_end, tl.sum(tiles, axis=0)


@triton.jit
def _pick(vec, index, NUM_BINS: tl.constexpr):
    return tl.sum(tl.where(tl.arange(0, NUM_BINS) == index, vec, 0), axis=0)


@triton.jit
def locate_tile(tile, row_start, counts, tile_start, tile_end, NUM_BINS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Global M-tile index -> (expert, first sorted row of the tile, end of the expert's rows)."""
    expert = tl.sum((tile_end <= tile).to(tl.int32), axis=0)
    first = _pick(row_start, expert, NUM_BINS) + (tile - _pick(tile_start, expert, NUM_BINS)) * BLOCK_M
    end = _pick(row_start, expert, NUM_BINS) + _pick(counts, expert, NUM_BINS)
    return expert, first, end


def padded_rows(num_rows: int, num_experts: int, block: int) -> int:
    """Rows a buffer of `num_rows` routed rows in zero-padded expert segments of `block` rows needs
    at most (each of E segments pads fewer than `block` rows; rows of skipped ids take none)."""
    return num_rows + num_experts * (block - 1)


@triton.jit
def padded_segment_start(expert, tile_start, NUM_BINS: tl.constexpr, BLOCK: tl.constexpr):
    """First row of `expert`'s zero-padded segment, from `expert_segments(..., BLOCK)`'s tile
    starts: the segments of the experts before it, each cdiv(count, BLOCK) * BLOCK rows."""
    return _pick(tile_start, expert, NUM_BINS) * BLOCK


@triton.jit
def _gather_padded_rows_kernel(x_ptr, stride_xt, stride_xh, sorted_rows_ptr, row_weights_ptr, hist_ptr, out_ptr,
                               stride_op, stride_oh, H, NUM_EXPERTS: tl.constexpr, NUM_BINS: tl.constexpr,
                               TOP_K: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_H: tl.constexpr, WEIGHTED: tl.constexpr):
    # Segments are whole BLOCK-row tiles and BLOCK_R divides BLOCK: a program's rows lie in one
    # tile of one expert; the tile's rows past the expert's count are the padding (zeros).
    row_start, counts, tile_start, tile_end, num_tiles = expert_segments(hist_ptr, NUM_EXPERTS, NUM_BINS, BLOCK)
    q0 = tl.program_id(0) * BLOCK_R
    tile = q0 // BLOCK
    if tile < num_tiles:
        expert, first, end = locate_tile(tile, row_start, counts, tile_start, tile_end, NUM_BINS, BLOCK)
        positions = first + (q0 - tile * BLOCK) + tl.arange(0, BLOCK_R)
        data = positions < end
        rows = tl.load(sorted_rows_ptr + positions, mask=data, other=0).to(tl.int64)
        src = x_ptr + (rows // TOP_K)[:, None] * stride_xt
        dst = out_ptr + (q0 + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None] * stride_op
        if WEIGHTED:
            w = tl.load(row_weights_ptr + rows, mask=data, other=0.0).to(tl.float32)
        offs_h = tl.arange(0, BLOCK_H)
        for h in range(0, H, BLOCK_H):
            cols = h + offs_h
            col_in = (cols < H)[None, :]
            v = tl.load(src + cols[None, :] * stride_xh, mask=data[:, None] & col_in, other=0.0)
            if WEIGHTED:
                v = (v.to(tl.float32) * w[:, None]).to(out_ptr.dtype.element_ty)
            tl.store(dst + cols[None, :] * stride_oh, v.to(out_ptr.dtype.element_ty), mask=col_in)


def gather_padded_rows(x: torch.Tensor, sorted_rows: torch.Tensor, hist: torch.Tensor, top_k: int,
                       out: torch.Tensor, *, num_experts: int, block: int,
                       row_weights: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] (any strides) -> out [>= padded_rows(T * top_k, E, block), H] (any strides) in
    expert-sorted order with zero-padded segments: expert e's i-th row (sorted position
    start[e] + i of the routing plan: sorted_rows int64 [T * top_k], hist the int32 histogram of
    `expert_histogram`) goes to row padded_start[e] + i, where padded_start[e] is the sum over
    the experts before e of cdiv(count, block) * block (in-kernel: `expert_segments(..., block)`
    and `padded_segment_start`); rows count[e] .. cdiv(count[e], block) * block of each segment
    are written as zeros. `row_weights` fp32 [T * top_k] or None: each row times its routing
    weight (rounded to out's dtype after the product in fp32). Rows of skipped ids take no rows;
    out's rows past the last segment are not written. Returns out. The grid depends on the shapes
    only: no host sync, CUDA-graph capturable."""
    rows = sorted_rows.numel()
    hidden = x.shape[1]
    need = padded_rows(rows, num_experts, block)
    if out.shape[0] < need or out.shape[1] != hidden:
        raise ValueError(f"gather_padded_rows: out needs >= {need} rows of {hidden} (x [T, {hidden}]), "
                         f"got {list(out.shape)}")
    if block < 1 or block & (block - 1):
        raise ValueError(f"gather_padded_rows: block must be a power of two, got {block}")
    block_r, block_h = min(16, block), min(512, triton.next_power_of_2(max(hidden, 1)))
    if rows:
        _gather_padded_rows_kernel[(triton.cdiv(need, block_r),)](
            x, x.stride(0), x.stride(1), sorted_rows, row_weights if row_weights is not None else x, hist, out,
            out.stride(0), out.stride(1), hidden, NUM_EXPERTS=num_experts, NUM_BINS=histogram_bins(num_experts),
            TOP_K=top_k, BLOCK=block, BLOCK_R=block_r, BLOCK_H=block_h, WEIGHTED=row_weights is not None,
            num_warps=4)
    return out
