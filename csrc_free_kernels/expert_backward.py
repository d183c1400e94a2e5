"""Backward of the routed experts: two persistent grouped GEMMs over the forward's expert-sorted
rows (the data gradients) and one persistent "k-grouped" GEMM that reduces over each expert's rows
(the weight gradients).

Notation as in `expert_gemm`: row r = token * K + slot, sorted position p (rows by expert), h_p the
pre-activation [2F] GEMM1 saved (or recomputed), a_p = act(h_p) [F], w_r the routing weight,
g_t the output gradient of token t.

- `down_dgrad` (dgrad of GEMM2): dA'_p = g_t @ down_e, the g rows gathered in the loads; in the
  epilogue a_p is rebuilt from h_p, the routing-weight gradient dw_r = <dA'_p, a_p> (+ <g_t, b2_e>)
  is reduced per N block into a partial sum (no expert output stored in the forward), and
  dh_p = act'(h_p) * (w_r dA'_p) and a_p are written in sorted order.
- `gate_up_dgrad` (dgrad of GEMM1): dx_r = dh_p @ gate_up_e, contiguous sorted input, rows scattered
  to token-slot order (the forward's combine then sums each token's K slots in a fixed order);
  with the weight on the input (Llama4) dw_r = <dh_p @ gate_up_e, x_t> is reduced here instead.
- `expert_wgrad`: C_e = sum over the expert's rows of A_r^T B_r, each operand gathered by token or
  read in sorted order (through a descriptor over the expert's rows), any output strides (a
  transposed write costs nothing), plus the column sum of A or B, optionally weighted by w_r (the
  bias gradient), from the tiles of the first N / M block. B may instead be sorted in zero-padded
  expert segments (`comet.kernels.routing.gather_padded_rows`): both operands then go through
  descriptors, B's padding zeros cancelling the rows A's tiles read past the expert's end, and the
  column sums are a dot with the row mask on every tile.
"""
import torch
import triton
import triton.language as tl

from comet.kernels.expert_gemm import (
    ACTIVATION_IDS, DESCRIPTOR_MIN_BLOCK_M, GemmConfig, _activation, descriptors_allowed, input_descriptor_mode,
    locate_item, persistent_programs, set_descriptor_allocator, tile_mainloop, tile_rows,
)
from comet.kernels.routing import expert_segments, histogram_bins, padded_segment_start


@triton.jit
def _activation_backward(gate, up, grad, alpha, limit, ACTIVATION: tl.constexpr):
    """(d gate, d up) of `expert_gemm._activation` at (gate, up) for the output gradient `grad`."""
    if ACTIVATION == 0:
        sig = tl.sigmoid(gate)
        silu = gate * sig
        return grad * up * (sig + silu * (1.0 - sig)), grad * silu
    elif ACTIVATION == 1:
        cdf = 0.5 * (1.0 + tl.erf(gate * 0.7071067811865476))
        pdf = tl.exp(-0.5 * gate * gate) * 0.3989422804014327
        return grad * up * (cdf + gate * pdf), grad * gate * cdf
    else:
        # Clamps pass the gradient where the input lies inside them, bounds included (as torch.clamp).
        g = tl.minimum(gate, limit)
        u = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(alpha * g)
        d_gate = grad * (u + 1.0) * (sig + alpha * g * sig * (1.0 - sig))
        d_up = grad * g * sig
        return tl.where(gate <= limit, d_gate, 0.0), tl.where((up >= -limit) & (up <= limit), d_up, 0.0)


@triton.jit
def _act_backward_slice(acc, w, n0, m_mask, N, pre_rows, d_pre_rows, act_rows, alpha, limit,
                        WIDTH: tl.constexpr, INTERLEAVED: tl.constexpr, ACTIVATION: tl.constexpr,
                        WEIGHT_GRAD: tl.constexpr):
    """The activation backward of columns [n0, n0 + WIDTH) of a down_dgrad tile, acc = dA' there
    (unweighted): rebuilds a = act(h) from h's gate/up columns (gate_up's order), stores w * a
    (a with the weight on the input) and dh; returns the row sums of dA' * a (zeros unless
    WEIGHT_GRAD), this slice's share of the routing weights' gradient."""
    offs_n = n0 + tl.arange(0, WIDTH)
    mask = m_mask[:, None] & (offs_n < N)[None, :]
    if INTERLEAVED:  # gate/up pairs side by side: 2 * WIDTH contiguous columns, split in registers
        offs_h = 2 * n0 + tl.arange(0, 2 * WIDTH)
        h_mask = m_mask[:, None] & (offs_h < 2 * N)[None, :]
        h = tl.load(pre_rows + offs_h[None, :], mask=h_mask, other=0.0).to(tl.float32)
        gate, up = tl.split(tl.reshape(h, (acc.shape[0], WIDTH, 2)))
    else:
        gate = tl.load(pre_rows + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        up = tl.load(pre_rows + N + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    act = _activation(gate, up, alpha, limit, ACTIVATION)
    # w * a: GEMM2's input as its weight gradient sees it (the weight scales the output)
    tl.store(act_rows + offs_n[None, :], (act * w[:, None] if WEIGHT_GRAD else act).to(act_rows.dtype.element_ty),
             mask=mask)
    if WEIGHT_GRAD:
        dw = tl.sum(tl.where(mask, acc * act, 0.0), axis=1)
        acc = acc * w[:, None]
    else:
        dw = tl.zeros_like(w)
    d_gate, d_up = _activation_backward(gate, up, acc, alpha, limit, ACTIVATION)
    if INTERLEAVED:
        d_h = tl.reshape(tl.join(d_gate, d_up), (acc.shape[0], 2 * WIDTH))
        tl.store(d_pre_rows + offs_h[None, :], d_h.to(d_pre_rows.dtype.element_ty), mask=h_mask)
    else:
        tl.store(d_pre_rows + offs_n[None, :], d_gate.to(d_pre_rows.dtype.element_ty), mask=mask)
        tl.store(d_pre_rows + N + offs_n[None, :], d_up.to(d_pre_rows.dtype.element_ty), mask=mask)
    return dw


@triton.jit
def _column_halves(x):
    """(x[:, :W/2], x[:, W/2:]) of a [M, W] tile."""
    return tl.split(tl.permute(tl.reshape(x, (x.shape[0], 2, x.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _act_backward_part(acc, w, n0, WIDTH: tl.constexpr, HALVES: tl.constexpr, m_mask, N, pre_rows, d_pre_rows,
                       act_rows, alpha, limit, INTERLEAVED: tl.constexpr, ACTIVATION: tl.constexpr,
                       WEIGHT_GRAD: tl.constexpr):
    """`_act_backward_slice` of columns [n0, n0 + WIDTH), whole or in two halves."""
    if HALVES:
        lo, hi = _column_halves(acc)
        dw = _act_backward_slice(lo, w, n0, m_mask, N, pre_rows, d_pre_rows, act_rows, alpha, limit, WIDTH // 2,
                                 INTERLEAVED, ACTIVATION, WEIGHT_GRAD)
        dw += _act_backward_slice(hi, w, n0 + WIDTH // 2, m_mask, N, pre_rows, d_pre_rows, act_rows, alpha, limit,
                                  WIDTH // 2, INTERLEAVED, ACTIVATION, WEIGHT_GRAD)
        return dw
    return _act_backward_slice(acc, w, n0, m_mask, N, pre_rows, d_pre_rows, act_rows, alpha, limit, WIDTH,
                               INTERLEAVED, ACTIVATION, WEIGHT_GRAD)


@triton.jit
def _expert_dgrad_kernel(
    a_ptr, stride_am, stride_ak, b_ptr, stride_be, stride_bn, stride_bk,
    out_ptr, stride_om, sorted_rows_ptr, row_weights_ptr, hist_ptr, dw_partial_ptr, num_rows,
    pre_act_ptr, stride_pm, act_ptr, stride_actm, x_ptr, stride_xm, stride_xk,
    bias_ptr, stride_bias_e, stride_bias_n,
    N, K, alpha, limit,
    NUM_EXPERTS: tl.constexpr, NUM_BINS: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, EVEN_K: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    B_DESC: tl.constexpr, A_DESC: tl.constexpr,
    ACT_BACKWARD: tl.constexpr,  # True: dgrad of GEMM2 (+ activation backward); False: dgrad of GEMM1
    INTERLEAVED: tl.constexpr, ACTIVATION: tl.constexpr, WEIGHT_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    EPILOGUE_SPLIT: tl.constexpr,  # column slices of the activation-backward epilogue: 1, 2, 4 or 8
):
    row_start, counts, tile_start, tile_end, num_tiles = expert_segments(hist_ptr, NUM_EXPERTS, NUM_BINS, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    for item in range(tl.program_id(0), num_tiles * num_n, NUM_PROGRAMS):
        expert, first_row, end_row, n_block = locate_item(
            item, row_start, counts, tile_start, tile_end, num_tiles, num_n, NUM_BINS, BLOCK_M, GROUP_M)
        offs_m, m_mask, rows, a_rows = tile_rows(first_row, end_row, sorted_rows_ptr, TOP_K, BLOCK_M, ACT_BACKWARD)
        acc, _ = tile_mainloop(
            expert, first_row, end_row, n_block, a_rows,
            a_ptr, stride_am, stride_ak, b_ptr, b_ptr, stride_be, stride_bn, stride_bk, N, K,
            BLOCK_M, BLOCK_N, BLOCK_K, False, False, EVEN_K, DOT_PRECISION, UPCAST_DOT, B_DESC, A_DESC)
        positions = offs_m.to(tl.int64)[:, None]
        w = tl.load(row_weights_ptr + rows, mask=m_mask, other=0.0).to(tl.float32)
        if ACT_BACKWARD:
            # acc = dA' (unweighted) for activation columns offs_n, in EPILOGUE_SPLIT column slices
            # (each loads its h columns, so fewer values are live at once).
            pre_rows = pre_act_ptr + positions * stride_pm
            d_pre_rows = out_ptr + positions * stride_om
            act_rows = act_ptr + positions * stride_actm
            n0 = n_block * BLOCK_N
            if EPILOGUE_SPLIT <= 2:
                dw = _act_backward_part(acc, w, n0, BLOCK_N, EPILOGUE_SPLIT == 2, m_mask, N, pre_rows, d_pre_rows,
                                        act_rows, alpha, limit, INTERLEAVED, ACTIVATION, WEIGHT_GRAD)
            else:  # 4 quarters, each whole (4) or in halves (8)
                QUARTER: tl.constexpr = BLOCK_N // 4
                EIGHTHS: tl.constexpr = EPILOGUE_SPLIT == 8
                lo, hi = _column_halves(acc)
                q0, q1 = _column_halves(lo)
                q2, q3 = _column_halves(hi)
                dw = _act_backward_part(q0, w, n0, QUARTER, EIGHTHS, m_mask, N, pre_rows, d_pre_rows, act_rows,
                                        alpha, limit, INTERLEAVED, ACTIVATION, WEIGHT_GRAD)
                dw += _act_backward_part(q1, w, n0 + QUARTER, QUARTER, EIGHTHS, m_mask, N, pre_rows, d_pre_rows,
                                         act_rows, alpha, limit, INTERLEAVED, ACTIVATION, WEIGHT_GRAD)
                dw += _act_backward_part(q2, w, n0 + 2 * QUARTER, QUARTER, EIGHTHS, m_mask, N, pre_rows,
                                         d_pre_rows, act_rows, alpha, limit, INTERLEAVED, ACTIVATION, WEIGHT_GRAD)
                dw += _act_backward_part(q3, w, n0 + 3 * QUARTER, QUARTER, EIGHTHS, m_mask, N, pre_rows,
                                         d_pre_rows, act_rows, alpha, limit, INTERLEAVED, ACTIVATION, WEIGHT_GRAD)
            if WEIGHT_GRAD:  # the weight scales the output: dw = <g, y> = <dA', a> (+ <g, b2>)
                if HAS_BIAS:
                    if n_block == 0:
                        offs_k = tl.arange(0, BLOCK_K)
                        bias_dot = tl.zeros((BLOCK_M,), dtype=tl.float32)
                        for k in range(0, K, BLOCK_K):
                            k_mask = offs_k < K - k
                            g = tl.load(a_ptr + a_rows[:, None] * stride_am + (k + offs_k)[None, :] * stride_ak,
                                        mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                            b2 = tl.load(bias_ptr + expert.to(tl.int64) * stride_bias_e + (k + offs_k) * stride_bias_n,
                                         mask=k_mask, other=0.0).to(tl.float32)
                            bias_dot += tl.sum(g * b2[None, :], axis=1)
                        dw += bias_dot
                tl.store(dw_partial_ptr + n_block.to(tl.int64) * num_rows + rows, dw, mask=m_mask)
        else:
            # acc = dh @ gate_up_e for hidden columns offs_n; rows go back to token-slot order.
            offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = m_mask[:, None] & (offs_n < N)[None, :]
            if WEIGHT_GRAD:  # the weight scales the input: dw = <dh @ gate_up_e, x>
                x = tl.load(x_ptr + (rows // TOP_K)[:, None] * stride_xm + offs_n[None, :] * stride_xk, mask=mask,
                            other=0.0).to(tl.float32)
                tl.store(dw_partial_ptr + n_block.to(tl.int64) * num_rows + rows,
                         tl.sum(tl.where(mask, acc * x, 0.0), axis=1), mask=m_mask)
                acc = acc * w[:, None]
            tl.store(out_ptr + rows[:, None] * stride_om + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=mask)


def _dgrad_args(a, a_gathered, b, out, sorted_rows, row_weights, hist, dw_partial, *, top_k, n, k,
                cfg: GemmConfig):
    """The kernel arguments every dgrad launch shares; `b` [E, N, K] (any strides)."""
    if a.is_cuda:
        set_descriptor_allocator()
    num_experts = b.shape[0]
    return dict(
        a_ptr=a, stride_am=a.stride(0), stride_ak=a.stride(1),
        b_ptr=b, stride_be=b.stride(0), stride_bn=b.stride(1), stride_bk=b.stride(2),
        out_ptr=out, stride_om=out.stride(0), sorted_rows_ptr=sorted_rows, row_weights_ptr=row_weights,
        hist_ptr=hist, dw_partial_ptr=dw_partial, num_rows=sorted_rows.numel(), N=n, K=k,
        NUM_EXPERTS=num_experts, NUM_BINS=histogram_bins(num_experts), TOP_K=top_k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        EVEN_K=k % cfg.block_k == 0, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        UPCAST_DOT=a.device.type != "cuda",  # the interpreter's dot mishandles 16-bit floats
        B_DESC=cfg.weight_mode(b, b), A_DESC=cfg.input_mode(a, a_gathered),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    ), (triton.cdiv(sorted_rows.numel(), cfg.block_m) + num_experts) * triton.cdiv(n, cfg.block_n)


def _launch_dgrad(args: dict, max_items: int, **epilogue):
    programs = persistent_programs(args["a_ptr"].device, max_items)
    _expert_dgrad_kernel[(programs,)](**args, **epilogue, NUM_PROGRAMS=programs)


def _epilogue_split(cfg: GemmConfig) -> int:
    """Column slices of down_dgrad's epilogue: 32 columns each. A whole 128-column tile's gate, up,
    a and dh at once spill registers (STACK in `python -m bench.diagnostics.kernel_resources`)."""
    return max(1, min(8, cfg.block_n // 32))


def dw_partial_blocks(n: int, cfg: GemmConfig) -> int:
    """Rows of the routing-weight gradient's partial sums a dgrad launch over N columns writes."""
    return triton.cdiv(n, cfg.block_n)


def down_dgrad(grad_out, down, down_bias, pre_act, sorted_rows, row_weights, hist, d_pre_act, act, dw_partial, *,
               top_k, interleaved, activation, alpha, limit, weight_on_input, cfg: GemmConfig):
    """dgrad of GEMM2 with the activation's backward.

    grad_out [T, H] (rows gathered by token); down [E, H, F]; down_bias [E, H] or None;
    pre_act [T*K, 2F] sorted (GEMM1's saved activation input); row_weights fp32 [T*K].
    Writes, at the sorted positions of the experts' rows: d_pre_act [T*K, 2F] (gate_up's column
    order) and act [T*K, F] = act(pre_act), times the row's weight unless `weight_on_input` (the
    input of GEMM2's weight gradient); and unless `weight_on_input`,
    dw_partial fp32 [dw_partial_blocks(F, cfg), T*K] (zeroed by the caller), whose column sums are
    the routing weights' gradient. No host sync."""
    num_experts, hidden, ffn = down.shape
    args, items = _dgrad_args(grad_out, True, down.transpose(1, 2), d_pre_act, sorted_rows, row_weights, hist,
                              dw_partial, top_k=top_k, n=ffn, k=hidden, cfg=cfg)
    has_bias = down_bias is not None and not weight_on_input
    _launch_dgrad(args, items, pre_act_ptr=pre_act, stride_pm=pre_act.stride(0), act_ptr=act,
                  stride_actm=act.stride(0), x_ptr=grad_out, stride_xm=0, stride_xk=0,
                  bias_ptr=down_bias if has_bias else down, stride_bias_e=down_bias.stride(0) if has_bias else 0,
                  stride_bias_n=down_bias.stride(1) if has_bias else 0, alpha=alpha, limit=limit,
                  ACT_BACKWARD=True, INTERLEAVED=interleaved, ACTIVATION=ACTIVATION_IDS[activation],
                  WEIGHT_GRAD=not weight_on_input, HAS_BIAS=has_bias, EPILOGUE_SPLIT=_epilogue_split(cfg))


def gate_up_dgrad(d_pre_act, gate_up, x, sorted_rows, row_weights, hist, slots, dw_partial, *, top_k,
                  weight_on_input, cfg: GemmConfig):
    """dgrad of GEMM1: slots[r] = d_pre_act[p] @ gate_up_e (times w_r with `weight_on_input`) in
    token-slot order [T*K, H] (rows of skipped ids are not written); with `weight_on_input`
    also dw_partial fp32 [dw_partial_blocks(H, cfg), T*K] (zeroed by the caller). x [T, H] is read
    only then. No host sync."""
    num_experts, two_f, hidden = gate_up.shape
    args, items = _dgrad_args(d_pre_act, False, gate_up.transpose(1, 2), slots, sorted_rows, row_weights, hist,
                              dw_partial, top_k=top_k, n=hidden, k=two_f, cfg=cfg)
    _launch_dgrad(args, items, pre_act_ptr=d_pre_act, stride_pm=0, act_ptr=slots, stride_actm=0,
                  x_ptr=x, stride_xm=x.stride(0), stride_xk=x.stride(1),
                  bias_ptr=gate_up, stride_bias_e=0, stride_bias_n=0, alpha=0.0, limit=0.0,
                  ACT_BACKWARD=False, INTERLEAVED=False, ACTIVATION=0, WEIGHT_GRAD=weight_on_input, HAS_BIAS=False,
                  EPILOGUE_SPLIT=1)


@triton.jit
def _wgrad_operand(ptr, desc, tokens, positions, r0, r_mask, cols, col0, col_in, stride_r, stride_c,
                   GATHER: tl.constexpr, DESC: tl.constexpr):
    """A [BLOCK_K rows, columns] tile of a weight-gradient operand: rows gathered by token, or
    sorted rows (`positions`, from r0; in a zero-padded B, its padded rows) through a descriptor
    over the whole operand (rows past the expert's end are the next expert's, or a padded B's
    zeros; the other operand's zeros there cancel them) or masked pointers."""
    if DESC:
        return desc.load([r0, col0])
    else:
        r = tokens if GATHER else positions.to(tl.int64)
        return tl.load(ptr + r[:, None] * stride_r + cols[None, :] * stride_c, mask=r_mask[:, None] & col_in[None, :],
                       other=0.0)


# Width of the dot that sums a bias gradient's columns with a padded B (the narrowest MMA N).
BIAS_DOT_N = tl.constexpr(16)


@triton.jit
def _expert_wgrad_kernel(
    a_ptr, stride_ar, stride_am, b_ptr, stride_br, stride_bn,
    out_ptr, stride_oe, stride_om, stride_on, bias_grad_ptr, stride_ge, stride_gn,
    sorted_rows_ptr, row_weights_ptr, hist_ptr, M, N,
    NUM_EXPERTS: tl.constexpr, NUM_BINS: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, A_DESC: tl.constexpr, B_DESC: tl.constexpr,
    OUT_DESC: tl.constexpr, SCALE_A: tl.constexpr, SCALE_B: tl.constexpr,
    PADDED_B: tl.constexpr,  # B sorted in zero-padded segments of BLOCK_K rows (`gather_padded_rows`)
    BIAS_OPERAND: tl.constexpr,  # 0: no bias gradient; 1: column sums of A ([E, M]); 2: of B ([E, N])
    WEIGHTED_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    # One flat loop over this program's (tile, k-step) pairs, tiles pid, pid + P, ... in expert
    # order: the pipeline runs on across tiles instead of draining at each tile's few k-steps.
    # The tile's indices are updated at the top of an iteration only, from loop-carried scalars,
    # so the loads of later iterations can be issued before this one's epilogue.
    # (tile_start, num_k_tiles: a zero-padded B's segments, in BLOCK_K-row tiles, as its gather's)
    row_start, counts, tile_start, _, num_k_tiles = expert_segments(hist_ptr, NUM_EXPERTS, NUM_BINS, BLOCK_K)
    idx = tl.arange(0, NUM_BINS)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_expert = num_m * num_n
    expert_steps = tl.maximum(tl.cdiv(counts, BLOCK_K), 1)  # an expert without rows: one step, zero tiles
    first_item = idx * per_expert
    my_items = ((first_item + per_expert - 1 - pid + NUM_PROGRAMS) // NUM_PROGRAMS
                - (first_item - 1 - pid + NUM_PROGRAMS) // NUM_PROGRAMS)
    total_steps = tl.sum(tl.where(idx < NUM_EXPERTS, my_items * expert_steps, 0), axis=0)
    # A sorted operand's descriptor ends with the last expert's rows: rows past it (skipped ids)
    # were never written, and a tile reading past its expert's end reads zeros there.
    sorted_end = tl.load(hist_ptr) + tl.sum(counts, axis=0)
    a_desc = None
    b_desc = None
    out_desc = None
    if A_DESC:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[sorted_end, M], strides=[stride_ar, 1],
                                           block_shape=[BLOCK_K, BLOCK_M])
    # A zero-padded B's descriptor ends with the last segment: an expert without rows reads its
    # one step there, all zeros (out of bounds).
    padded_end = num_k_tiles * BLOCK_K
    if B_DESC:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[padded_end if PADDED_B else sorted_end, N],
                                           strides=[stride_br, 1], block_shape=[BLOCK_K, BLOCK_N])
    if OUT_DESC:
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[NUM_EXPERTS, M, N], strides=[stride_oe, stride_om, 1],
                                             block_shape=[1, BLOCK_M, BLOCK_N])
    offs_r = tl.arange(0, BLOCK_K)
    item = pid - NUM_PROGRAMS
    step = 0
    tile_steps = 1
    expert = 0
    m_block = 0
    n_block = 0
    start = 0
    end = 0
    b_start = 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    col_sum = tl.zeros((BLOCK_M if BIAS_OPERAND == 1 else BLOCK_N,), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_M if BIAS_OPERAND == 1 else BLOCK_N, BIAS_DOT_N), dtype=tl.float32)
    for _ in range(0, total_steps):
        step = tl.where(step == tile_steps - 1, 0, step + 1)
        if step == 0:  # the next tile
            item += NUM_PROGRAMS
            expert = item // per_expert
            m_block = (item % per_expert) // num_n
            n_block = item % num_n
            start = tl.sum(tl.where(idx == expert, row_start, 0), axis=0)
            end = start + tl.sum(tl.where(idx == expert, counts, 0), axis=0)
            tile_steps = tl.maximum(tl.cdiv(end - start, BLOCK_K), 1)
            if PADDED_B:
                b_start = tl.where(end > start, padded_segment_start(expert, tile_start, NUM_BINS, BLOCK_K),
                                   padded_end)
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        m_in = offs_m < M
        n_in = offs_n < N
        r0 = start + step * BLOCK_K
        positions = r0 + offs_r
        r_mask = positions < end
        rows = tl.load(sorted_rows_ptr + positions, mask=r_mask, other=0).to(tl.int64)
        tokens = rows // TOP_K
        r0_b = r0
        if PADDED_B:
            r0_b = b_start + step * BLOCK_K
        a = _wgrad_operand(a_ptr, a_desc, tokens, positions, r0, r_mask, offs_m, m_block * BLOCK_M, m_in,
                           stride_ar, stride_am, GATHER_A, A_DESC)
        b = _wgrad_operand(b_ptr, b_desc, tokens, r0_b + offs_r, r0_b, r_mask, offs_n, n_block * BLOCK_N, n_in,
                           stride_br, stride_bn, GATHER_B, B_DESC)
        if SCALE_A or SCALE_B or WEIGHTED_BIAS:
            w = tl.load(row_weights_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)[:, None]
        if SCALE_A:
            a = (a.to(tl.float32) * w).to(a_ptr.dtype.element_ty)
        if SCALE_B:
            b = (b.to(tl.float32) * w).to(b_ptr.dtype.element_ty)
        # Bias: column sums over the expert's rows, masked (a descriptor tile's rows past the
        # expert's end are the next expert's), in registers from the tiles of the first block.
        if BIAS_OPERAND == 1 and not PADDED_B:
            if n_block == 0:
                summed = tl.where(r_mask[:, None], a.to(tl.float32), 0.0)
                col_sum += tl.sum(summed * w if WEIGHTED_BIAS else summed, axis=0)
        if BIAS_OPERAND == 2 and not PADDED_B:
            if m_block == 0:
                summed = tl.where(r_mask[:, None], b.to(tl.float32), 0.0)
                col_sum += tl.sum(summed * w if WEIGHTED_BIAS else summed, axis=0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if BIAS_OPERAND != 0 and PADDED_B:
            # With a padded B, on every tile, as a dot with the row mask in column 0: register
            # sums of a tile in this loop gave wrong weight gradients on an H200 (Triton 3.6;
            # docs/performance.md), the tensor cores' sum of the same tile does not.
            mask_column = (r_mask[:, None] & (tl.arange(0, BIAS_DOT_N) == 0)[None, :]).to(a.dtype)
            summed_op = a if BIAS_OPERAND == 1 else b
            bias_acc = tl.dot(tl.trans(summed_op), mask_column, bias_acc, input_precision=DOT_PRECISION)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
        if step == tile_steps - 1:  # the tile's epilogue
            e64 = expert.to(tl.int64)
            if BIAS_OPERAND != 0 and PADDED_B:
                col_sum = tl.sum(bias_acc, axis=1)  # column 0: the others are zeros
            if OUT_DESC:
                out_desc.store([expert, m_block * BLOCK_M, n_block * BLOCK_N],
                               tl.reshape(acc.to(out_ptr.dtype.element_ty), (1, BLOCK_M, BLOCK_N)))
            else:
                tl.store(out_ptr + e64 * stride_oe + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                         acc.to(out_ptr.dtype.element_ty), mask=m_in[:, None] & n_in[None, :])
            if BIAS_OPERAND == 1:
                if n_block == 0:
                    tl.store(bias_grad_ptr + e64 * stride_ge + offs_m * stride_gn,
                             col_sum.to(bias_grad_ptr.dtype.element_ty), mask=m_in)
            if BIAS_OPERAND == 2:
                if m_block == 0:
                    tl.store(bias_grad_ptr + e64 * stride_ge + offs_n * stride_gn,
                             col_sum.to(bias_grad_ptr.dtype.element_ty), mask=n_in)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            col_sum = tl.zeros_like(col_sum)
            if BIAS_OPERAND != 0 and PADDED_B:
                bias_acc = tl.zeros_like(bias_acc)


def _sorted_descriptor(t: torch.Tensor, gathered: bool, other_cancels: bool) -> bool:
    """A weight-gradient operand goes through one descriptor over all its rows where it is
    sorted, its layout allows, and the other operand's zeros cancel the rows a tile reads past
    its expert's end (a gathered operand's masked loads, or a zero-padded B's padding)."""
    return other_cancels and input_descriptor_mode(t, gathered, DESCRIPTOR_MIN_BLOCK_M)


def _output_descriptor(out: torch.Tensor) -> bool:
    """Whether the weight gradient [E, M, N] is written through a descriptor (its tile staged in
    shared memory for the copy engine): 16-bit (an fp32 tile would not fit beside the pipeline),
    N contiguous, the other strides and the base 16-byte aligned."""
    size = out.element_size()
    return (size == 2 and out.stride(2) == 1 and all((s * size) % 16 == 0 for s in out.stride()[:2])
            and descriptors_allowed(out, DESCRIPTOR_MIN_BLOCK_M))


# Shared memory a thread block may take on sm_90 (H100, H200), in bytes.
SHARED_MEMORY_LIMIT = 232448
# With `padded_b` no row-index loads take pipeline stages: each of num_stages holds an A and a B
# tile. Pointer stores of the output take a layout-conversion buffer (32 KiB at 8 warps, compiled
# offline: `python -m bench.diagnostics.kernel_resources --kernels gate_up_wgrad_presorted`).
PADDED_WGRAD_EPILOGUE_BYTES = 33 * 1024


def padded_wgrad_pipeline_bytes(cfg: GemmConfig, element_size: int) -> int:
    """Shared memory of `expert_wgrad`'s pipeline with `padded_b`: num_stages tiles of both operands."""
    return cfg.num_stages * (cfg.block_m + cfg.block_n) * cfg.block_k * element_size


def _padded_output_descriptor(cfg: GemmConfig, element_size: int, out: torch.Tensor) -> bool:
    """With `padded_b`, the output's descriptor where its staged tile fits beside the pipeline."""
    staged = cfg.block_m * cfg.block_n * out.element_size() + 1024
    return padded_wgrad_pipeline_bytes(cfg, element_size) + staged <= SHARED_MEMORY_LIMIT


def expert_wgrad(a, gather_a, b, gather_b, out, bias_grad, sorted_rows, row_weights, hist, *, top_k,
                 scale="none", bias_of="b", weighted_bias=False, padded_b=False, cfg: GemmConfig):
    """out[e] = sum over expert e's rows r (sorted position p) of A_r^T B_r, for every expert (zeros
    for one with no rows): the weight gradient of a grouped GEMM.

    a [rows_a, M], b [rows_b, N]: row r of an operand is its row token (r // top_k) if gathered,
    else its row p (expert-sorted). With `padded_b` (a sorted, b not gathered) b is in zero-padded
    expert segments (`comet.kernels.routing.gather_padded_rows` at block = cfg.block_k): expert
    e's i-th row at padded_start[e] + i, its segment's rows past the expert's count zeros (they
    cancel the rows A's tiles read past its end); rows past the last segment are not read; every
    stage then holds both operands' tiles, and the output goes through its descriptor only where
    the staged tile fits beside them (else pointer stores). `scale` ("none", "a" or "b")
    multiplies that operand's row by row_weights[r]. out [E, M, N] (any strides; written through
    a descriptor where N is contiguous); bias_grad None, or the column sums of `bias_of` ("a":
    [E, M], "b": [E, N]) over the expert's rows, times row_weights[r] if `weighted_bias` (not
    with `padded_b`: its sums run through the tensor cores, in the operands' dtype). Non-finite values in a sorted
    operand's rows can reach the neighbouring expert's gradient where that operand is read
    through a descriptor. No host sync; deterministic (each output element is one program's)."""
    num_experts, m, n = out.shape
    if scale not in ("none", "a", "b") or bias_of not in ("a", "b"):
        raise ValueError(f"expert_wgrad: scale must be 'none', 'a' or 'b' and bias_of 'a' or 'b', "
                         f"got {scale!r}, {bias_of!r}")
    if a.is_cuda:
        set_descriptor_allocator()
    items = num_experts * triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    programs = persistent_programs(a.device, items)
    has_bias = bias_grad is not None
    use_desc = cfg.weight_descriptors
    if padded_b and (gather_a or gather_b):
        raise ValueError("expert_wgrad: padded_b needs a and b sorted (gather_a = gather_b = False)")
    if padded_b and weighted_bias:
        raise ValueError("expert_wgrad: padded_b takes no weighted_bias (its bias sums run in the operands' dtype)")
    _expert_wgrad_kernel[(programs,)](
        a, a.stride(0), a.stride(1), b, b.stride(0), b.stride(1),
        out, out.stride(0), out.stride(1), out.stride(2),
        bias_grad if has_bias else out, bias_grad.stride(0) if has_bias else 0, bias_grad.stride(1) if has_bias else 0,
        sorted_rows, row_weights, hist, m, n,
        NUM_EXPERTS=num_experts, NUM_BINS=histogram_bins(num_experts), TOP_K=top_k,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_PROGRAMS=programs,
        GATHER_A=gather_a, GATHER_B=gather_b,
        A_DESC=use_desc and _sorted_descriptor(a, gather_a, gather_b or padded_b),
        B_DESC=use_desc and _sorted_descriptor(b, gather_b, gather_a or padded_b),
        OUT_DESC=use_desc and _output_descriptor(out) and (
            not padded_b or _padded_output_descriptor(cfg, a.element_size(), out)),
        SCALE_A=scale == "a", SCALE_B=scale == "b", PADDED_B=padded_b,
        BIAS_OPERAND=(1 if bias_of == "a" else 2) if has_bias else 0,
        WEIGHTED_BIAS=weighted_bias,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", UPCAST_DOT=a.device.type != "cuda",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def down_wgrad(grad_out, act, sorted_rows, row_weights, hist, d_down, d_down_bias, *, top_k, weight_on_input,
               cfg: GemmConfig):
    """Weight gradient of GEMM2: d_down[e] = sum over e's rows of g_t^T a'_p [E, H, F], where
    act [T*K, F] sorted holds a'_p (`down_dgrad` wrote it: w_r a_p unless `weight_on_input`);
    d_down_bias [E, H] or None gets sum w_r g_t (sum g_t with `weight_on_input`). No host sync."""
    expert_wgrad(grad_out, True, act, False, d_down, d_down_bias, sorted_rows, row_weights, hist, top_k=top_k,
                 bias_of="a", weighted_bias=not weight_on_input, cfg=cfg)


def gate_up_wgrad(d_pre_act, x, sorted_rows, row_weights, hist, d_gate_up, d_gate_up_bias, *, top_k,
                  weight_on_input, cfg: GemmConfig, x_padded=None):
    """Weight gradient of GEMM1: d_gate_up[e] = sum over e's rows of dh_p^T x_t [E, 2F, H] (x_t
    times w_r with `weight_on_input`), d_pre_act [T*K, 2F] sorted; d_gate_up_bias [E, 2F] or None
    gets sum dh_p. x [T, H] rows are gathered by token; or `x_padded` is read instead (x is then
    not read): `gather_padded_rows(x, sorted_rows, hist, top_k, out, num_experts=E,
    block=cfg.block_k, row_weights=row_weights if weight_on_input else None)`, x in sorted order
    in zero-padded expert segments, the weight already applied. No host sync."""
    if x_padded is None:
        expert_wgrad(d_pre_act, False, x, True, d_gate_up, d_gate_up_bias, sorted_rows, row_weights, hist,
                     top_k=top_k, scale="b" if weight_on_input else "none", bias_of="a", cfg=cfg)
    else:
        expert_wgrad(d_pre_act, False, x_padded, False, d_gate_up, d_gate_up_bias, sorted_rows, row_weights, hist,
                     top_k=top_k, bias_of="a", padded_b=True, cfg=cfg)
