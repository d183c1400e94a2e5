"""The fused routed-experts op (`torch.ops.comet.routed_experts`) and the "triton" backend.

Forward: routing analysis -> GEMM1 (gather, gate/up, activation) -> GEMM2 (down, weight) ->
deterministic combine. Registered as a custom op so `torch.compile(fullgraph=True)` sees one node
and CUDA graphs capture it. Backward recomputes the experts through the fp32 reference (correct,
not fast): training works, the kernels speed up inference and the forward of training.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from triton.runtime.interpreter import InterpretedFunction

from comet.backends import register_backend, resolve_backend
from comet.config import MoEConfig
from comet.functional import ExpertWeights
from comet.kernels import combine
from comet.kernels.expert_gemm import down_gemm, gate_up_gemm
from comet.reference import experts_reference
from comet.scheduler.configs import select_configs
from comet.scheduler.routing import analyze_routing
from comet.validation import kernel_ids


@torch.library.custom_op("comet::routed_experts", mutates_args=())
def routed_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: Optional[torch.Tensor],
    down_bias: Optional[torch.Tensor],
    interleaved: bool,
    activation: str,
    swiglu_alpha: float,
    swiglu_limit: float,
    weight_on_input: bool,
) -> torch.Tensor:
    resolve_backend("triton", x.device, x.dtype)  # or a clear error (float64, no GPU nor interpreter)
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, ffn = down.shape
    topk_ids = kernel_ids(topk_ids).contiguous()
    row_weights = topk_weights.reshape(-1).float().contiguous()
    plan = analyze_routing(topk_ids, num_experts)
    cfg1, cfg2 = select_configs(num_tokens * top_k, num_experts, hidden, ffn, x.dtype, x.device)

    act = torch.empty(num_tokens * top_k, ffn, dtype=x.dtype, device=x.device)
    gate_up_gemm(x, gate_up, gate_up_bias, interleaved, plan.sorted_rows, row_weights, plan.hist, act,
                 top_k=top_k, activation=activation, alpha=swiglu_alpha, limit=swiglu_limit,
                 weight_on_input=weight_on_input, cfg=cfg1)
    slots = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    down_gemm(act, down, down_bias, plan.sorted_rows, row_weights, plan.hist, slots, top_k=top_k,
              weight_on_input=weight_on_input, cfg=cfg2)
    return combine.combine_slots(slots, topk_ids, num_experts, x.new_empty(num_tokens, hidden))  # row-major, any x


@routed_experts.register_fake
def _(x, *args):
    return x.new_empty(x.shape)


_DIFFERENTIABLE = (0, 2, 3, 4, 5, 6)  # x, topk_weights, gate_up, down, gate_up_bias, down_bias


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*(inputs[i] for i in range(7)))
    ctx.options = inputs[7:]


def _backward(ctx, grad_out):
    x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias = ctx.saved_tensors
    interleaved, activation, alpha, limit, weight_on_input = ctx.options
    leaves = [x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias]
    wanted = [i for i in _DIFFERENTIABLE if ctx.needs_input_grad[i] and leaves[i] is not None]
    with torch.enable_grad():
        for i in wanted:
            leaves[i] = leaves[i].detach().requires_grad_()
        out = experts_reference(*leaves, activation=activation, swiglu_alpha=alpha, swiglu_limit=limit,
                                interleaved=interleaved, weight_on_input=weight_on_input)
        grads = torch.autograd.grad(out, [leaves[i] for i in wanted], grad_out)
    result = [None] * 12
    for i, g in zip(wanted, grads):
        result[i] = g
    return tuple(result)


routed_experts.register_autograd(_backward, setup_context=_setup_context)


def _triton_backend(x, topk_ids, topk_weights, w: ExpertWeights, cfg: MoEConfig) -> torch.Tensor:
    return routed_experts(x, topk_ids, topk_weights, w.gate_up, w.down, w.gate_up_bias, w.down_bias,
                          w.interleaved, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit, cfg.weight_on_input)


def _triton_unavailable(device: torch.device) -> str | None:
    if device.type == "cuda":
        return _cuda_unavailable(device)
    # Triton fixes interpretation when a kernel is defined: what counts is how comet's were imported.
    if isinstance(combine._combine_kernel, InterpretedFunction):
        return None
    late = ("it was set after they were imported, which has no effect in this process"
            if os.environ.get("TRITON_INTERPRET") == "1" else "setting it later in this process has no effect")
    return (f"needs a CUDA GPU, or TRITON_INTERPRET=1 set before comet's kernels are imported (at the start of the "
            f"process, e.g. `TRITON_INTERPRET=1 python ...`) to run them under the Triton interpreter; {late}")


@functools.lru_cache(maxsize=None)  # asked on every call
def _cuda_unavailable(device: torch.device) -> str | None:
    major, _ = torch.cuda.get_device_capability(device)
    return None if major >= 8 else "needs compute capability 8.0 or newer"


register_backend("triton", _triton_backend, _triton_unavailable, auto_priority=10,
                 dtypes=(torch.float16, torch.bfloat16, torch.float32))
