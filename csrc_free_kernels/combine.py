"""Deterministic combine: out[t] = sum over slots k, in order, of the weighted expert outputs."""
import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(y_ptr, stride_ym, stride_yh, ids_ptr, stride_it, stride_ik, out_ptr, stride_ot, stride_oh,
                    num_tokens, H, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    t_mask = offs_t < num_tokens
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        row = offs_t.to(tl.int64) * TOP_K + k
        expert = tl.load(ids_ptr + offs_t.to(tl.int64) * stride_it + k * stride_ik, mask=t_mask, other=-1)
        routed = t_mask & (expert >= 0) & (expert < NUM_EXPERTS)  # skipped ids wrote no row
        y = tl.load(y_ptr + row[:, None] * stride_ym + offs_h[None, :] * stride_yh,
                    mask=routed[:, None] & h_mask[None, :], other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_h[None, :] * stride_oh,
             acc.to(out_ptr.dtype.element_ty), mask=t_mask[:, None] & h_mask[None, :])


def combine_slots(y: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, out: torch.Tensor) -> torch.Tensor:
    """y [T*K, H] (row t*K+k = slot k of token t, weight applied) -> out [T, H]; any strides."""
    num_tokens, top_k = topk_ids.shape
    hidden = out.shape[1]
    block_t, block_h = 16, min(512, triton.next_power_of_2(hidden))
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(hidden, block_h))
    _combine_kernel[grid](y, *y.stride(), topk_ids, *topk_ids.stride(), out, *out.stride(), num_tokens, hidden,
                          NUM_EXPERTS=num_experts, TOP_K=top_k, BLOCK_T=block_t, BLOCK_H=block_h, num_warps=4)
    return out
