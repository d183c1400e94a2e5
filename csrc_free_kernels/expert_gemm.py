"""Persistent grouped GEMM over expert-sorted rows: GEMM1 (gather + gate/up + activation) and
GEMM2 (down projection, routing weight in fp32, rows scattered back to token-slot order).

`GemmProblem` is the one description of such a GEMM (operands, epilogue, tile shape) that every
launcher builds: `GemmProblem.gate_up` / `GemmProblem.down` here, the expert-parallel kernels of
`comet.kernels.ep_dispatch` / `ep_combine` / `ep_tiles` from the same object. Its `kernel_args()`
hands a kernel the whole GEMM as one argument, `gemm` (a `GemmArgs` tuple), which the kernel passes
on to the per-tile body `expert_gemm_tile`; a kernel adds only its tile map (here: one histogram
bin per expert, `_expert_gemm_kernel`; the expert-parallel arrival bins live in
`comet.kernels.ep_tiles`). A new GEMM option is a `GemmArgs` field, its value in `kernel_args()`
and its use in `expert_gemm_tile`: no kernel's signature changes.

One kernel serves both GEMMs; constexpr switches pick the operand source and the epilogue. Work
items are (M tile, N block) pairs; M tiles are numbered expert by expert, and items are walked in
groups of GROUP_M tiles x all N blocks, so tiles of one expert running together share its weight
slab in L2. No launcher syncs the host.
"""
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from comet.device_info import num_sms
from comet.kernels.routing import expert_segments, histogram_bins, locate_tile

ACTIVATION_IDS = {"swiglu": 0, "geglu": 1, "clamped_swiglu": 2}
# How the routing weight of a row enters: not at all, on the accumulator before the bias (the
# expert's input is scaled, Llama4), or after the bias (the expert's output is scaled).
ROW_WEIGHT_NONE, ROW_WEIGHT_INPUT, ROW_WEIGHT_OUTPUT = 0, 1, 2


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    # Weights (and, in the weight gradients, the sorted operand) through tensor descriptors where
    # the layout allows; per GEMM, as the tuned table says (why: docs/performance.md).
    weight_descriptors: bool = True
    # A contiguous (expert-sorted, not gathered) A operand through a tensor descriptor where its
    # layout allows: GEMM2's input, the dgrad of GEMM1's. False: pointer loads, as GPUs without
    # TMA and unaligned layouts take.
    input_descriptors: bool = True

    def weight_mode(self, b: torch.Tensor, b2: torch.Tensor) -> int:
        """How a kernel of this config reads weights b, b2: `weight_descriptor_mode` at this tile
        height where `weight_descriptors` is set, else 0 (pointer loads)."""
        return weight_descriptor_mode(b, b2, self.block_m) if self.weight_descriptors else 0

    def input_mode(self, a: torch.Tensor, gathered: bool) -> bool:
        """Whether a kernel of this config reads A through a descriptor: `input_descriptor_mode`
        at this tile height where `input_descriptors` is set."""
        return self.input_descriptors and input_descriptor_mode(a, gathered, self.block_m)


class GemmArgs(NamedTuple):
    """A `GemmProblem` as its kernels take it: the one argument `gemm` of every grouped-GEMM
    kernel, which reads its fields (`gemm.BLOCK_M`) for its tile map and passes it whole to
    `expert_gemm_tile`. Fields annotated tl.constexpr are compile-time constants (their values
    wrapped in tl.constexpr: `GemmArgs.make`); the others are tensors (device pointers) and
    scalars. Built by `GemmProblem.kernel_args()` (`GemmProblem` says what each operand is).
    In a kernel, read a constexpr field as `gemm.X` or into an annotated local
    (`X: tl.constexpr = gemm.X`): a plain assignment or unpacking makes a tensor of it."""

    a_ptr: torch.Tensor | None  # None: the kernel reaches A another way (`expert_gemm_tile`'s a_ptr)
    stride_am: int
    stride_ak: int
    b_ptr: torch.Tensor
    b2_ptr: torch.Tensor
    stride_be: int
    stride_bn: int
    stride_bk: int
    bias_ptr: torch.Tensor  # b when there is no bias (not read)
    bias2_ptr: torch.Tensor
    stride_bias_e: int
    stride_bias_n: int
    out_ptr: torch.Tensor
    stride_om: int
    sorted_rows_ptr: torch.Tensor
    row_weights_ptr: torch.Tensor
    hist_ptr: torch.Tensor  # the tile map's histogram
    N: int
    K: int
    alpha: float
    limit: float
    TOP_K: tl.constexpr
    BLOCK_M: tl.constexpr
    BLOCK_N: tl.constexpr
    BLOCK_K: tl.constexpr
    GROUP_M: tl.constexpr
    GATHER_A: tl.constexpr
    GATED: tl.constexpr
    INTERLEAVED: tl.constexpr
    ACTIVATION: tl.constexpr  # ACTIVATION_IDS
    HAS_BIAS: tl.constexpr
    ROW_WEIGHT: tl.constexpr  # ROW_WEIGHT_*
    SCATTER_OUT: tl.constexpr
    EVEN_K: tl.constexpr
    DOT_PRECISION: tl.constexpr
    UPCAST_DOT: tl.constexpr  # the interpreter's dot mishandles 16-bit floats
    B_DESC: tl.constexpr  # weight_descriptor_mode
    A_DESC: tl.constexpr  # input_descriptor_mode
    pre_act_ptr: torch.Tensor | None
    stride_pm: int
    SAVE_PRE_ACT: tl.constexpr

    @classmethod
    def make(cls, **fields) -> "GemmArgs":
        """GemmArgs of plain values by field name (every field), the constexpr fields' wrapped in
        tl.constexpr."""
        args = cls._make([_constexpr(fields[name]) if name in GEMM_CONSTEXPRS else fields[name]
                          for name in cls._fields])
        if len(fields) != len(args):
            raise TypeError(f"GemmArgs: no fields {sorted(fields.keys() - set(cls._fields))}")
        return args


# The GemmArgs fields that are compile-time constants (annotated tl.constexpr).
GEMM_CONSTEXPRS = frozenset(name for name, kind in GemmArgs.__annotations__.items()
                            if kind is tl.constexpr or kind == "tl.constexpr")


@functools.lru_cache(maxsize=None, typed=True)
def _constexpr(value) -> tl.constexpr:
    """tl.constexpr(value), made once per value (a launch wraps some twenty)."""
    return tl.constexpr(value)


@triton.jit
def _activation(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        return gate * tl.sigmoid(gate) * up
    elif ACTIVATION == 1:
        return 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)) * up
    else:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * gate * tl.sigmoid(alpha * gate)


@triton.jit
def locate_item(item, row_start, counts, tile_start, tile_end, num_tiles, num_n,
                NUM_BINS: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """Work item -> (expert, first sorted row, end of the expert's rows, N block)."""
    items_per_group = GROUP_M * num_n
    first_tile = (item // items_per_group) * GROUP_M
    group_size = tl.minimum(num_tiles - first_tile, GROUP_M)
    tile = first_tile + (item % items_per_group) % group_size
    n_block = (item % items_per_group) // group_size
    expert, first_row, end_row = locate_tile(tile, row_start, counts, tile_start, tile_end, NUM_BINS, BLOCK_M)
    return expert, first_row, end_row, n_block


@triton.jit
def _expert_gemm_kernel(gemm, NUM_EXPERTS: tl.constexpr, NUM_BINS: tl.constexpr, NUM_PROGRAMS: tl.constexpr):
    # The tile map: one histogram bin per expert (`expert_tile_map`), tiles walked persistently.
    row_start, counts, tile_start, tile_end, num_tiles = expert_segments(
        gemm.hist_ptr, NUM_EXPERTS, NUM_BINS, gemm.BLOCK_M)
    num_n = tl.cdiv(gemm.N, gemm.BLOCK_N)
    for item in range(tl.program_id(0), num_tiles * num_n, NUM_PROGRAMS):
        expert, first_row, end_row, n_block = locate_item(
            item, row_start, counts, tile_start, tile_end, num_tiles, num_n, NUM_BINS, gemm.BLOCK_M, gemm.GROUP_M)
        expert_gemm_tile(expert, first_row, end_row, n_block, gemm)


@triton.jit
def _load_b(src, n0, k, offs_k, K, EVEN_K: tl.constexpr, B_DESC: tl.constexpr):
    """A [BLOCK_K, N tile] weight tile: from pointers (`src` already at step k) or a descriptor."""
    if B_DESC == 1:
        return tl.trans(src.load([n0, k]))
    elif B_DESC == 2:
        return src.load([k, n0])
    elif EVEN_K:
        return tl.load(src)
    else:
        return tl.load(src, mask=(offs_k < K - k)[:, None], other=0.0)


@triton.jit
def tile_rows(first_row, end_row, sorted_rows_ptr, TOP_K: tl.constexpr, BLOCK_M: tl.constexpr,
              GATHER_A: tl.constexpr):
    """Rows of a tile over sorted positions [first_row, first_row + BLOCK_M) of one expert, which
    ends at `end_row`: (sorted positions, their mask, row ids token * TOP_K + slot, A row of each).
    Positions past the expert's end repeat its last row (always a valid address, whatever A's
    base; the fused EP kernel's may lie before its rows) and are not stored."""
    offs_m = first_row + tl.arange(0, BLOCK_M)
    m_mask = offs_m < end_row
    rows = tl.load(sorted_rows_ptr + tl.minimum(offs_m, end_row - 1)).to(tl.int64)
    a_rows = rows // TOP_K if GATHER_A else tl.where(m_mask, offs_m, 0).to(tl.int64)
    return offs_m, m_mask, rows, a_rows


@triton.jit
def tile_mainloop(
    expert, first_row, end_row, n_block, a_rows,
    a_ptr, stride_am, stride_ak, b_ptr, b2_ptr, stride_be, stride_bn, stride_bk, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
    INTERLEAVED: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    B_DESC: tl.constexpr, A_DESC: tl.constexpr,
):
    """fp32 accumulators of A[a_rows] @ B_e[:, block] over all of K: (acc [BLOCK_M, TILE_N],
    acc2 [BLOCK_M, BLOCK_N]). B_e[k, n] = b[expert, n, k]; with GATED and not INTERLEAVED, acc2
    holds the product with b2 (the up rows); with INTERLEAVED, acc holds 2*BLOCK_N adjacent
    columns of the one [2N, K] matrix (gate at even columns)."""
    # B columns of this block: with INTERLEAVED gate/up (gate at even rows of one [2N, K]
    # matrix) one tile of 2*BLOCK_N adjacent rows holds both, read contiguously.
    if INTERLEAVED:
        offs_bn = (2 * n_block * BLOCK_N + tl.arange(0, 2 * BLOCK_N)) % (2 * N)
    else:
        offs_bn = (n_block * BLOCK_N + tl.arange(0, BLOCK_N)) % N  # in-bounds loads; extra columns not stored
    offs_k = tl.arange(0, BLOCK_K)
    if A_DESC:
        # Contiguous A (expert-sorted input): one descriptor over this expert's rows, so the copy
        # engine zero-fills past them and past K.
        a_desc = tl.make_tensor_descriptor(a_ptr + first_row.to(tl.int64) * stride_am, shape=[end_row - first_row, K],
                                           strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    else:
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    SECOND_B: tl.constexpr = GATED and not INTERLEAVED
    TILE_N: tl.constexpr = 2 * BLOCK_N if INTERLEAVED else BLOCK_N
    b_base = b_ptr + expert.to(tl.int64) * stride_be
    b2_base = b2_ptr + expert.to(tl.int64) * stride_be
    if B_DESC == 0:
        b_off = offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn
        b_ptrs = b_base + b_off
        b2_ptrs = b2_base + b_off
    else:
        # Weights through tensor descriptors (TMA on Hopper): the copy engine zero-fills past the
        # expert's N rows and past K, so no masks; one descriptor per tile, over this expert only.
        b_rows = 2 * N if INTERLEAVED else N
        if B_DESC == 1:  # K contiguous: [N, K] tiles, transposed for the dot
            b_desc = tl.make_tensor_descriptor(b_base, shape=[b_rows, K], strides=[stride_bn, 1],
                                               block_shape=[TILE_N, BLOCK_K])
            if SECOND_B:
                b2_desc = tl.make_tensor_descriptor(b2_base, shape=[b_rows, K], strides=[stride_bn, 1],
                                                    block_shape=[TILE_N, BLOCK_K])
        else:  # N contiguous: [K, N] tiles as they are
            b_desc = tl.make_tensor_descriptor(b_base, shape=[K, b_rows], strides=[stride_bk, 1],
                                               block_shape=[BLOCK_K, TILE_N])
            if SECOND_B:
                b2_desc = tl.make_tensor_descriptor(b2_base, shape=[K, b_rows], strides=[stride_bk, 1],
                                                    block_shape=[BLOCK_K, TILE_N])

    acc = tl.zeros((BLOCK_M, TILE_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if A_DESC:
            a = a_desc.load([0, k])
        elif EVEN_K:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(offs_k < K - k)[None, :], other=0.0)
        b = _load_b(b_ptrs if B_DESC == 0 else b_desc, n_block * TILE_N, k, offs_k, K, EVEN_K, B_DESC)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if SECOND_B:
            b2 = _load_b(b2_ptrs if B_DESC == 0 else b2_desc, n_block * TILE_N, k, offs_k, K, EVEN_K, B_DESC)
            if UPCAST_DOT:
                b2 = b2.to(tl.float32)
            acc2 = tl.dot(a, b2, acc2, input_precision=DOT_PRECISION)
            if B_DESC == 0:
                b2_ptrs += BLOCK_K * stride_bk
        if not A_DESC:
            a_ptrs += BLOCK_K * stride_ak
        if B_DESC == 0:
            b_ptrs += BLOCK_K * stride_bk
    return acc, acc2


@triton.jit
def expert_gemm_tile(expert, first_row, end_row, n_block, gemm, a_ptr=None, stride_am=None):
    """One [BLOCK_M, BLOCK_N] output tile of `gemm` (GemmArgs): rows [first_row, end_row) of
    `expert` (sorted order), N block `n_block`. `a_ptr`, `stride_am`: A's address and row stride,
    for a kernel that reads A from elsewhere than `gemm.a_ptr` (None: gemm's).
    With SAVE_PRE_ACT (GATED only) the pre-activation (after bias and input weight) is also stored
    at the tile's sorted positions of `pre_act_ptr` [rows, 2N], in the weights' gate/up order."""
    BLOCK_M: tl.constexpr = gemm.BLOCK_M
    BLOCK_N: tl.constexpr = gemm.BLOCK_N
    GATED: tl.constexpr = gemm.GATED
    INTERLEAVED: tl.constexpr = gemm.INTERLEAVED
    ROW_WEIGHT: tl.constexpr = gemm.ROW_WEIGHT
    pre_act_ptr = gemm.pre_act_ptr
    offs_m, m_mask, rows, a_rows = tile_rows(first_row, end_row, gemm.sorted_rows_ptr, gemm.TOP_K, BLOCK_M,
                                             gemm.GATHER_A)
    acc, acc2 = tile_mainloop(
        expert, first_row, end_row, n_block, a_rows,
        gemm.a_ptr if a_ptr is None else a_ptr, gemm.stride_am if a_ptr is None else stride_am, gemm.stride_ak,
        gemm.b_ptr, gemm.b2_ptr, gemm.stride_be, gemm.stride_bn, gemm.stride_bk, gemm.N, gemm.K,
        BLOCK_M, BLOCK_N, gemm.BLOCK_K, GATED, INTERLEAVED, gemm.EVEN_K, gemm.DOT_PRECISION, gemm.UPCAST_DOT,
        gemm.B_DESC, gemm.A_DESC)
    SECOND_B: tl.constexpr = GATED and not INTERLEAVED
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    if INTERLEAVED:
        offs_bn = (2 * n_block * BLOCK_N + tl.arange(0, 2 * BLOCK_N)) % (2 * gemm.N)
    else:
        offs_bn = offs_n % gemm.N
    if ROW_WEIGHT != 0:
        w = tl.load(gemm.row_weights_ptr + rows, mask=m_mask, other=0.0).to(tl.float32)[:, None]
    if ROW_WEIGHT == 1:
        acc = acc * w
        if SECOND_B:
            acc2 = acc2 * w
    if gemm.HAS_BIAS:
        bias_off = expert.to(tl.int64) * gemm.stride_bias_e + offs_bn * gemm.stride_bias_n
        acc += tl.load(gemm.bias_ptr + bias_off).to(tl.float32)[None, :]
        if SECOND_B:
            acc2 += tl.load(gemm.bias2_ptr + bias_off).to(tl.float32)[None, :]
    if gemm.SAVE_PRE_ACT:
        pre_rows = pre_act_ptr + offs_m.to(tl.int64)[:, None] * gemm.stride_pm
        if INTERLEAVED:
            offs_pn = 2 * n_block * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
            tl.store(pre_rows + offs_pn[None, :], acc.to(pre_act_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & (offs_pn < 2 * gemm.N)[None, :])
        else:
            pre_mask = m_mask[:, None] & (offs_n < gemm.N)[None, :]
            tl.store(pre_rows + offs_n[None, :], acc.to(pre_act_ptr.dtype.element_ty), mask=pre_mask)
            tl.store(pre_rows + gemm.N + offs_n[None, :], acc2.to(pre_act_ptr.dtype.element_ty), mask=pre_mask)
    if GATED:
        if INTERLEAVED:
            gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
            acc = _activation(gate, up, gemm.alpha, gemm.limit, gemm.ACTIVATION)
        else:
            acc = _activation(acc, acc2, gemm.alpha, gemm.limit, gemm.ACTIVATION)
    if ROW_WEIGHT == 2:
        acc = acc * w

    out_ptr = gemm.out_ptr
    out_rows = rows if gemm.SCATTER_OUT else offs_m.to(tl.int64)
    out_ptrs = out_ptr + out_rows[:, None] * gemm.stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & (offs_n < gemm.N)[None, :])


# Below this tile height (decode-sized batches, few rows per expert) pointer loads stream the
# weights faster (measured: docs/performance.md).
DESCRIPTOR_MIN_BLOCK_M = 64


def descriptors_allowed(t: torch.Tensor, block_m: int) -> bool:
    """Descriptors need compute capability 9.0 or newer (on a GPU), tiles at least
    DESCRIPTOR_MIN_BLOCK_M tall, and a 16-byte aligned base and leading stride."""
    if block_m < DESCRIPTOR_MIN_BLOCK_M:
        return False
    if t.is_cuda and not _has_tensor_memory_accelerator(t.device):
        return False
    return t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0


@functools.lru_cache(maxsize=None)
def _has_tensor_memory_accelerator(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def weight_descriptor_mode(b: torch.Tensor, b2: torch.Tensor, block_m: int = DESCRIPTOR_MIN_BLOCK_M) -> int:
    """How weights b, b2 [E, N, K] can be read, as their layout and the tile height allow (whether
    they are is the config's: `GemmConfig.weight_descriptors`): 0: pointer loads; 1: descriptors
    over K-contiguous weights; 2: over N-contiguous weights (the other of the two strides 16-byte
    aligned too)."""
    if not all(descriptors_allowed(t, block_m) for t in (b, b2)):
        return 0
    size = b.element_size()
    if b.stride(2) == 1 and (b.stride(1) * size) % 16 == 0:
        return 1
    if b.stride(1) == 1 and (b.stride(2) * size) % 16 == 0:
        return 2
    return 0


def input_descriptor_mode(a: torch.Tensor, gathered: bool, block_m: int) -> bool:
    """Whether A [rows, K] can be read through descriptors (whether it is is the config's:
    `GemmConfig.input_descriptors`): only where its rows are not gathered (a tile's rows are then
    contiguous) and K is contiguous."""
    return not gathered and a.stride(1) == 1 and descriptors_allowed(a, block_m)


def set_descriptor_allocator():
    """Device-side tensor descriptors live in global scratch memory that Triton asks the host for.
    Triton keeps the allocator per thread (autograd runs backward kernels on a thread of its own),
    so every launcher sets it."""
    triton.set_allocator(_descriptor_scratch)


def _descriptor_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def persistent_programs(device: torch.device, upper_bound: int) -> int:
    """Programs of a persistent launch with `upper_bound` work items: one per SM at most."""
    return max(1, min(num_sms(device), upper_bound))


@dataclass(frozen=True, eq=False)
class GemmProblem:
    """One grouped GEMM over expert-sorted rows, as every grouped-GEMM kernel runs it:
    for each sorted position p of expert e's rows,

        out[p'] = epilogue(A[p_a] @ B_e^T),   p_a = sorted_rows[p] // top_k if gather_a else p,
                                              p'  = sorted_rows[p] if scatter_out else p.

    Operands (device tensors, any dtype the kernels take; nothing is copied):
      a [rows_a, K], its last dim contiguous unless read through pointers anyway;
      b [E, N, K] (any strides), or with `interleaved` the one [E, 2N, K] matrix of gate (even rows)
      and up (odd rows); b2 the up weights [E, N, K] of a gated, non-interleaved GEMM, else b;
      bias, bias2 [E, N] (or [E, 2N] interleaved) or None (both or neither);
      out [rows, N], unit stride along N; sorted_rows int64 [rows] (row ids token * top_k + slot
      by expert); row_weights fp32 [rows] (unit stride, indexed by row id); hist int32, the
      histogram of the tile map's bins (`comet.kernels.routing.expert_histogram`, or the
      expert-parallel arrival bins of `comet.kernels.ep_tiles`).
    Epilogue: `row_weight` (ROW_WEIGHT_*: how the routing weight enters), bias, with `gated` the
    activation (`activation`, `alpha`, `limit`: clamped SwiGLU's) of (gate, up); `pre_act`
    [rows, 2N] (gated only; columns contiguous) or None also gets the activation's input in
    sorted order, columns in the weights' gate/up order.

    Build it with `GemmProblem.gate_up` (GEMM1) or `GemmProblem.down` (GEMM2); a kernel gets it
    as one argument from `kernel_args()` and its tile map from its own launcher. Whether the
    operands go through tensor descriptors is the config's (`b_desc`, `a_desc`).
    """

    a: torch.Tensor
    gather_a: bool
    b: torch.Tensor
    b2: torch.Tensor
    bias: torch.Tensor | None
    bias2: torch.Tensor | None
    out: torch.Tensor
    sorted_rows: torch.Tensor
    row_weights: torch.Tensor
    hist: torch.Tensor
    top_k: int
    cfg: GemmConfig
    gated: bool = False
    interleaved: bool = False
    activation: str = "swiglu"
    alpha: float = 0.0
    limit: float = 0.0
    row_weight: int = ROW_WEIGHT_NONE
    scatter_out: bool = False
    pre_act: torch.Tensor | None = None

    def __post_init__(self):
        for name, t in (("out", self.out), ("row_weights", self.row_weights)):  # stepped through by 1
            if t.stride(-1) != 1:
                raise ValueError(f"{name}: expected unit stride along its last dimension, got strides {t.stride()}")
        if self.pre_act is not None and not self.gated:
            raise ValueError("pre_act: only a gated GEMM (GEMM1) has a pre-activation")

    @classmethod
    def gate_up(cls, x, gate_up, gate_up_bias, interleaved, sorted_rows, row_weights, hist, out, *, top_k,
                activation, alpha, limit, weight_on_input, cfg: GemmConfig, pre_act=None) -> "GemmProblem":
        """GEMM1: out[p] = act(x[row_p // top_k] @ gate_e.T (+b), x[..] @ up_e.T (+b)).

        x [T, H]; gate_up [E, 2F, H] (any strides; gate rows first, or interleaved); gate_up_bias
        [E, 2F] or None; out [T*top_k, F] in expert-sorted order; pre_act [T*top_k, 2F] or None.
        With `weight_on_input` (Llama4) the routing weight scales the input."""
        two_f = gate_up.shape[1]
        if interleaved:
            b, b2, bias, bias2 = gate_up, gate_up, gate_up_bias, gate_up_bias
        else:
            b, b2 = gate_up[:, : two_f // 2], gate_up[:, two_f // 2:]
            bias, bias2 = (None, None) if gate_up_bias is None else (
                gate_up_bias[:, : two_f // 2], gate_up_bias[:, two_f // 2:])
        return cls(x, True, b, b2, bias, bias2, out, sorted_rows, row_weights, hist, top_k, cfg, gated=True,
                   interleaved=interleaved, activation=activation, alpha=alpha, limit=limit,
                   row_weight=ROW_WEIGHT_INPUT if weight_on_input else ROW_WEIGHT_NONE, pre_act=pre_act)

    @classmethod
    def down(cls, act, down, down_bias, sorted_rows, row_weights, hist, out, *, top_k, weight_on_input,
             cfg: GemmConfig) -> "GemmProblem":
        """GEMM2: out[row_p] = (act[p] @ down_e.T (+b)) * weight[row_p], expert-sorted in, token-slot
        order out (no weight with `weight_on_input`). act [T*top_k, F]; down [E, H, F]; down_bias
        [E, H] or None; out [T*top_k, H]."""
        return cls(act, False, down, down, down_bias, down_bias, out, sorted_rows, row_weights, hist, top_k, cfg,
                   row_weight=ROW_WEIGHT_NONE if weight_on_input else ROW_WEIGHT_OUTPUT, scatter_out=True)

    @property
    def num_experts(self) -> int:
        """E: the experts of the weights."""
        return self.b.shape[0]

    @property
    def n(self) -> int:
        return self.b.shape[1] // 2 if self.interleaved else self.b.shape[1]

    @property
    def k(self) -> int:
        return self.b.shape[2]

    def max_items(self, bins: int | None = None) -> int:
        """An upper bound on the work items of a tile map over `bins` histogram bins (None: one
        per expert): M tiles (each bin's last one partial) times N blocks."""
        bins = self.num_experts if bins is None else bins
        return (triton.cdiv(self.sorted_rows.numel(), self.cfg.block_m) + bins) * triton.cdiv(self.n, self.cfg.block_n)

    @property
    def b_desc(self) -> int:
        """How the kernel reads the weights: `weight_descriptor_mode` where the config asks for
        descriptors (`GemmConfig.weight_descriptors`), else 0 (pointer loads)."""
        return self.cfg.weight_mode(self.b, self.b2)

    @property
    def a_desc(self) -> bool:
        """Whether the kernel reads A through a descriptor: `input_descriptor_mode` where the config
        asks for it (`GemmConfig.input_descriptors`)."""
        return self.cfg.input_mode(self.a, self.gather_a)

    def kernel_args(self, *, a_address: bool = True) -> dict:
        """Every grouped-GEMM kernel's arguments of this GEMM, by name: `gemm` (its `GemmArgs`,
        which the kernel passes to `expert_gemm_tile`) and the launch options num_warps and
        num_stages; a kernel adds its tile map and program count. `a_address=False` leaves out A's
        address (`gemm.a_ptr` is None) for a kernel that reaches A another way (a workspace pointer
        table) and takes only its strides. Sets the descriptor allocator of this thread (CUDA
        tensors)."""
        a, b, b2, cfg = self.a, self.b, self.b2, self.cfg
        if a.is_cuda:
            set_descriptor_allocator()
        has_bias = self.bias is not None
        pre_act = self.pre_act
        gemm = GemmArgs.make(
            a_ptr=a if a_address else None, stride_am=a.stride(0), stride_ak=a.stride(1),
            b_ptr=b, b2_ptr=b2, stride_be=b.stride(0), stride_bn=b.stride(1), stride_bk=b.stride(2),
            bias_ptr=self.bias if has_bias else b, bias2_ptr=self.bias2 if has_bias else b,
            stride_bias_e=self.bias.stride(0) if has_bias else 0, stride_bias_n=self.bias.stride(1) if has_bias else 0,
            out_ptr=self.out, stride_om=self.out.stride(0),
            sorted_rows_ptr=self.sorted_rows, row_weights_ptr=self.row_weights, hist_ptr=self.hist,
            N=self.n, K=self.k, alpha=self.alpha, limit=self.limit, TOP_K=self.top_k,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            GATHER_A=self.gather_a, GATED=self.gated, INTERLEAVED=self.interleaved,
            ACTIVATION=ACTIVATION_IDS[self.activation], HAS_BIAS=has_bias, ROW_WEIGHT=self.row_weight,
            SCATTER_OUT=self.scatter_out, EVEN_K=self.k % cfg.block_k == 0,
            DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
            # The interpreter's dot mishandles 16-bit floats (it multiplies their bit patterns).
            UPCAST_DOT=a.device.type != "cuda",
            B_DESC=self.b_desc, A_DESC=self.a_desc,
            pre_act_ptr=pre_act, stride_pm=0 if pre_act is None else pre_act.stride(0), SAVE_PRE_ACT=pre_act is not None,
        )
        return dict(gemm=gemm, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def expert_tile_map(num_experts: int) -> dict:
    """The tile-map arguments of `_expert_gemm_kernel`: one histogram bin per expert."""
    return dict(NUM_EXPERTS=num_experts, NUM_BINS=histogram_bins(num_experts))


def launch_gemm(problem: GemmProblem, max_programs: int | None = None):
    """Run `problem` with `_expert_gemm_kernel` (one histogram bin per expert): one persistent
    program per SM, or at most `max_programs` (leaving SMs to a kernel on another stream).
    Asynchronous; no host sync."""
    max_items = problem.max_items()
    num_programs = persistent_programs(problem.a.device, max_items)
    if max_programs is not None:
        if max_programs < 1:
            raise ValueError(f"max_programs: expected >= 1, got {max_programs}")
        num_programs = min(num_programs, max_programs)
    _expert_gemm_kernel[(num_programs,)](**problem.kernel_args(), **expert_tile_map(problem.num_experts),
                                         NUM_PROGRAMS=num_programs)


def gate_up_gemm(x, gate_up, gate_up_bias, interleaved, sorted_rows, row_weights, hist, out, *, top_k,
                 activation, alpha, limit, weight_on_input, cfg: GemmConfig, pre_act=None):
    """GEMM1 (`GemmProblem.gate_up`, which says what each argument is), launched."""
    launch_gemm(GemmProblem.gate_up(x, gate_up, gate_up_bias, interleaved, sorted_rows, row_weights, hist, out,
                                    top_k=top_k, activation=activation, alpha=alpha, limit=limit,
                                    weight_on_input=weight_on_input, cfg=cfg, pre_act=pre_act))


def down_gemm(act, down, down_bias, sorted_rows, row_weights, hist, out, *, top_k, weight_on_input,
              cfg: GemmConfig):
    """GEMM2 (`GemmProblem.down`, which says what each argument is), launched."""
    launch_gemm(GemmProblem.down(act, down, down_bias, sorted_rows, row_weights, hist, out, top_k=top_k,
                                 weight_on_input=weight_on_input, cfg=cfg))
