"""The fused routed-experts ops (`torch.ops.comet.routed_experts`, `routed_experts_train`,
`routed_experts_backward`) and the "triton" backend.

Forward: routing analysis -> GEMM1 (gather, gate/up, activation) -> GEMM2 (down, weight) ->
deterministic combine. Backward (`comet.kernels.expert_backward`): dgrad of GEMM2 with the
activation's backward and the routing-weight gradient, weight gradients of both GEMMs, dgrad of
GEMM1 and the same deterministic combine into dx. Custom ops, so `torch.compile(fullgraph=True)`
sees one node each and CUDA graphs capture them; no host sync anywhere.
"""
from __future__ import annotations

import functools
import os

import torch
from triton.runtime.interpreter import InterpretedFunction

from comet.backend_registry import BACKENDS, register_backend
from comet.config import MoEConfig
from comet.kernels import combine
from comet.kernels.expert_backward import down_dgrad, down_wgrad, dw_partial_blocks, gate_up_dgrad, gate_up_wgrad
from comet.kernels.expert_gemm import down_gemm, gate_up_gemm
from comet.kernels.routing import gather_padded_rows, histogram_bins, padded_rows
from comet.scheduler.configs import backward_configs, select_configs
from comet.scheduler.routing import RoutingPlan, analyze_routing
from comet.validation import kernel_ids
from comet.weights import ExpertWeights


def _forward(x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, interleaved, activation,
             swiglu_alpha, swiglu_limit, weight_on_input, pre_act=None, plan=None):
    """The forward's kernels: (output [T, H], routing plan). `pre_act` [T*K, 2F] or None also
    gets GEMM1's activation input; `plan` (from `analyze_routing`) is computed if not given."""
    BACKENDS["triton"].check(x.device, x.dtype)  # or a clear error (float64, no GPU nor interpreter)
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, ffn = down.shape
    topk_ids = kernel_ids(topk_ids).contiguous()
    row_weights = topk_weights.reshape(-1).float().contiguous()
    if plan is None:
        plan = analyze_routing(topk_ids, num_experts)
    cfg1, cfg2 = select_configs(num_tokens * top_k, num_experts, hidden, ffn, x.dtype, x.device)

    act = torch.empty(num_tokens * top_k, ffn, dtype=x.dtype, device=x.device)
    gate_up_gemm(x, gate_up, gate_up_bias, interleaved, plan.sorted_rows, row_weights, plan.hist, act,
                 top_k=top_k, activation=activation, alpha=swiglu_alpha, limit=swiglu_limit,
                 weight_on_input=weight_on_input, cfg=cfg1, pre_act=pre_act)
    slots = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    down_gemm(act, down, down_bias, plan.sorted_rows, row_weights, plan.hist, slots, top_k=top_k,
              weight_on_input=weight_on_input, cfg=cfg2)
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    return combine.combine_slots(slots, topk_ids, num_experts, out), plan


# The ops' schemas: the expert tensors, then the layer's options (the same for all three ops).
_TENSORS = ("Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor gate_up, Tensor down, Tensor? gate_up_bias, "
            "Tensor? down_bias")
_OPTIONS = "bool interleaved, str activation, float swiglu_alpha, float swiglu_limit, bool weight_on_input"


@torch.library.custom_op("comet::routed_experts", mutates_args=(), schema=f"({_TENSORS}, {_OPTIONS}) -> Tensor")
def routed_experts(*inputs) -> torch.Tensor:
    """The routed experts' output [T, H] for (x [T, H], topk_ids [T, K], topk_weights [T, K],
    gate_up [E, 2F, H], down [E, H, F], gate_up_bias [E, 2F] or None, down_bias [E, H] or None,
    interleaved, activation, swiglu_alpha, swiglu_limit, weight_on_input). Differentiable; its
    backward computes the routing plan and GEMM1's activation input again (training through
    `MoELayer` saves them instead)."""
    return _forward(*inputs)[0]


@routed_experts.register_fake
def _(x, topk_ids, *args):
    return x.new_empty(topk_ids.shape[0], x.shape[1])


@torch.library.custom_op("comet::routed_experts_train", mutates_args=(),
                         schema=f"({_TENSORS}, {_OPTIONS}, bool save_pre_act) -> (Tensor, Tensor, Tensor, Tensor)")
def routed_experts_train(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`routed_experts` for training, with `save_pre_act` after its inputs: (output [T, H],
    pre-activation [T*K, 2F] in expert-sorted order, or [0, 2F] unless `save_pre_act`, sorted rows
    int64 [T*K], histogram int32). The last three are what its backward reads: the routing plan is
    computed once per step."""
    *inputs, save_pre_act = args
    x, topk_ids, _, gate_up = inputs[:4]
    rows, two_f = topk_ids.numel(), gate_up.shape[1]
    pre_act = x.new_empty(rows if save_pre_act else 0, two_f)
    out, plan = _forward(*inputs, pre_act=pre_act if save_pre_act else None)
    return out, pre_act, plan.sorted_rows, plan.hist


@routed_experts_train.register_fake
def _(x, topk_ids, topk_weights, gate_up, down, *args):
    save_pre_act = args[-1]
    rows = topk_ids.numel()
    return (x.new_empty(topk_ids.shape[0], x.shape[1]), x.new_empty(rows if save_pre_act else 0, gate_up.shape[1]),
            topk_ids.new_empty(rows, dtype=torch.int64),
            topk_ids.new_empty(histogram_bins(gate_up.shape[0]), dtype=torch.int32))


@torch.library.custom_op(
    "comet::routed_experts_backward", mutates_args=(),
    schema=f"(Tensor grad_out, {_TENSORS}, Tensor pre_act, Tensor sorted_rows, Tensor hist, {_OPTIONS}, "
           "bool need_x_grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
def routed_experts_backward(grad_out, x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, pre_act,
                            sorted_rows, hist, interleaved, activation, swiglu_alpha, swiglu_limit, weight_on_input,
                            need_x_grad) -> tuple[torch.Tensor, ...]:
    """Gradients of `routed_experts` for grad_out [T, H]: (x [T, H] (empty unless `need_x_grad`
    or `weight_on_input`), topk_weights [T, K], gate_up, down, gate_up_bias, down_bias (the bias
    gradients empty where there is no bias)). `pre_act` is GEMM1's saved activation input, or
    [0, 2F] to compute it again; (sorted_rows, hist) the forward's routing plan. No host sync."""
    return experts_backward(grad_out, x, topk_ids, topk_weights, ExpertWeights(gate_up, down, gate_up_bias, down_bias,
                                                                                  interleaved),
                            RoutingPlan(sorted_rows, hist), pre_act, activation=activation, alpha=swiglu_alpha,
                            limit=swiglu_limit, weight_on_input=weight_on_input, need_x_grad=need_x_grad)


@routed_experts_backward.register_fake
def _(grad_out, x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias, *args):
    need_x = args[-1] or args[-2]
    return (x.new_empty(x.shape[0] if need_x else 0, x.shape[1]), topk_weights.new_empty(topk_weights.shape),
            gate_up.new_empty(gate_up.shape), down.new_empty(down.shape),
            gate_up.new_empty(gate_up_bias.shape if gate_up_bias is not None else (0,)),
            down.new_empty(down_bias.shape if down_bias is not None else (0,)))


def experts_backward(grad_out, x, topk_ids, topk_weights, w: ExpertWeights, plan: RoutingPlan, pre_act, *,
                     activation, alpha, limit, weight_on_input, need_x_grad=True):
    """The backward kernels (see `comet.kernels.expert_backward`) on one routing: returns the
    gradients of (x, topk_weights, gate_up, down, gate_up_bias, down_bias) as
    `routed_experts_backward` does. Rows whose id lies outside [0, E) get zero weight gradients
    and add nothing to x's. No host sync."""
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden, ffn = w.down.shape
    rows = num_tokens * top_k
    device, dtype = x.device, x.dtype
    row_weights = topk_weights.reshape(-1).float().contiguous()
    cfgs = backward_configs(rows, num_experts, hidden, ffn, dtype, device)
    act = torch.empty(rows, ffn, dtype=dtype, device=device)
    if pre_act.shape[0] == 0:
        cfg1 = select_configs(rows, num_experts, hidden, ffn, dtype, device)[0]
        pre_act = torch.empty(rows, 2 * ffn, dtype=dtype, device=device)
        gate_up_gemm(x, w.gate_up, w.gate_up_bias, w.interleaved, plan.sorted_rows, row_weights, plan.hist, act,
                     top_k=top_k, activation=activation, alpha=alpha, limit=limit, weight_on_input=weight_on_input,
                     cfg=cfg1, pre_act=pre_act)
    d_pre_act = torch.empty(rows, 2 * ffn, dtype=dtype, device=device)
    dw_partial = torch.zeros(dw_partial_blocks(hidden, cfgs.gate_up_dgrad) if weight_on_input else
                             dw_partial_blocks(ffn, cfgs.down_dgrad), rows, dtype=torch.float32, device=device)
    down_dgrad(grad_out, w.down, w.down_bias, pre_act, plan.sorted_rows, row_weights, plan.hist, d_pre_act, act,
               dw_partial, top_k=top_k, interleaved=w.interleaved, activation=activation, alpha=alpha, limit=limit,
               weight_on_input=weight_on_input, cfg=cfgs.down_dgrad)

    # dW2_e = sum_p g_t^T (w_r a_p) [E, H, F] (act holds w_r a_p); db2_e = sum_p w_r g_t
    d_down = torch.empty(w.down.shape, dtype=dtype, device=device)
    d_down_bias = torch.empty(w.down_bias.shape if w.down_bias is not None else (0,), dtype=dtype, device=device)
    down_wgrad(grad_out, act, plan.sorted_rows, row_weights, plan.hist, d_down,
               d_down_bias if w.down_bias is not None else None, top_k=top_k, weight_on_input=weight_on_input,
               cfg=cfgs.down_wgrad)
    # dW1_e = sum_p dh_p^T x_t [E, 2F, H] (x_t w_r with the weight on the input); db1_e = sum_p dh_p
    d_gate_up = torch.empty(w.gate_up.shape, dtype=dtype, device=device)
    d_gate_up_bias = torch.empty(w.gate_up_bias.shape if w.gate_up_bias is not None else (0,), dtype=dtype,
                                 device=device)
    x_padded, wgrad_cfg = None, cfgs.gate_up_wgrad
    if cfgs.gate_up_wgrad_presorted is not None:  # x (times w_r with the weight on the input) in padded segments
        wgrad_cfg = cfgs.gate_up_wgrad_presorted
        block = wgrad_cfg.block_k
        x_padded = gather_padded_rows(
            x, plan.sorted_rows, plan.hist, top_k,
            torch.empty(padded_rows(rows, num_experts, block), hidden, dtype=dtype, device=device),
            num_experts=num_experts, block=block, row_weights=row_weights if weight_on_input else None)
    gate_up_wgrad(d_pre_act, x, plan.sorted_rows, row_weights, plan.hist, d_gate_up,
                  d_gate_up_bias if w.gate_up_bias is not None else None, top_k=top_k,
                  weight_on_input=weight_on_input, cfg=wgrad_cfg, x_padded=x_padded)
    del x_padded

    dx = x.new_empty(0, hidden)
    if need_x_grad or weight_on_input:
        slots = torch.empty(rows, hidden, dtype=dtype, device=device)
        gate_up_dgrad(d_pre_act, w.gate_up, x, plan.sorted_rows, row_weights, plan.hist, slots, dw_partial,
                      top_k=top_k, weight_on_input=weight_on_input, cfg=cfgs.gate_up_dgrad)
        dx = combine.combine_slots(slots, kernel_ids(topk_ids).contiguous(), num_experts,
                           torch.empty(num_tokens, hidden, dtype=dtype, device=device))
    d_weights = dw_partial.sum(dim=0).view(num_tokens, top_k).to(topk_weights.dtype)
    return dx, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias


_OPTION_INPUTS = slice(7, 12)  # interleaved, activation, swiglu_alpha, swiglu_limit, weight_on_input


def _input_grads(ctx, grads) -> tuple:
    """The op's backward result: each differentiable input's gradient where it is wanted."""
    dx, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias = grads
    per_input = (dx, None, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias)  # then the options
    per_input += (None,) * (len(ctx.needs_input_grad) - len(per_input))
    return tuple(g if needed else None for g, needed in zip(per_input, ctx.needs_input_grad))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.options = inputs[_OPTION_INPUTS]


def _backward(ctx, grad_out):
    x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias = ctx.saved_tensors
    plan = analyze_routing(kernel_ids(topk_ids).contiguous(), down.shape[0])
    grads = routed_experts_backward(grad_out, x, topk_ids, topk_weights, gate_up, down, gate_up_bias, down_bias,
                                    x.new_empty(0, gate_up.shape[1]), plan.sorted_rows, plan.hist, *ctx.options,
                                    ctx.needs_input_grad[0])
    return _input_grads(ctx, grads)


routed_experts.register_autograd(_backward, setup_context=_setup_context)


def _train_setup_context(ctx, inputs, output):
    _, pre_act, sorted_rows, hist = output
    ctx.save_for_backward(*inputs[:7], pre_act, sorted_rows, hist)
    ctx.options = inputs[_OPTION_INPUTS]
    ctx.set_materialize_grads(False)


def _train_backward(ctx, grad_out, *_):
    grads = routed_experts_backward(grad_out, *ctx.saved_tensors, *ctx.options, ctx.needs_input_grad[0])
    return _input_grads(ctx, grads)


routed_experts_train.register_autograd(_train_backward, setup_context=_train_setup_context)


def _triton_backend(x, topk_ids, topk_weights, w: ExpertWeights, cfg: MoEConfig, recompute: bool = False) -> torch.Tensor:
    args = (x, topk_ids, topk_weights, w.gate_up, w.down, w.gate_up_bias, w.down_bias, w.interleaved,
            cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit, cfg.weight_on_input)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:7]):
        return routed_experts_train(*args, not recompute)[0]
    return routed_experts(*args)


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
