"""What the model adapters share: the routed-experts call with its backend (and, later, its
expert-parallel process group), and the guard that makes training through a kernel backend
without a backward fail loudly instead of silently dropping gradients."""
from __future__ import annotations

import torch

from comet.backends import backend_names, resolve_backend
from comet.config import MoEConfig
from comet.functional import ExpertWeights, moe_experts

# Expert parallelism plugs in here: an "ep" backend's fn takes the same arguments as any backend
# plus `process_group=`, and runs only this rank's experts (dispatch and combine inside).
EP_BACKEND = "ep"


def check_process_group(process_group):
    """None (every expert on this rank), or a process group once an expert-parallel backend exists."""
    if process_group is None:
        return
    if EP_BACKEND not in backend_names():
        raise NotImplementedError(
            "process_group: expert parallelism needs the 'ep' backend, which is not registered in "
            "comet.backends (not built yet); pass process_group=None to run every expert on this rank"
        )
    if not isinstance(process_group, torch.distributed.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup, got {type(process_group).__name__}")


class _NoBackward(torch.autograd.Function):
    """Ties a backend's output to its differentiable inputs; backward raises a clear error."""

    @staticmethod
    def forward(ctx, out, backend_name, *inputs):
        ctx.backend_name = backend_name
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError(
            f"the {ctx.backend_name!r} experts backend has no backward pass: train with "
            f"backend='reference' (or a differentiable backend), or run inference under torch.no_grad()"
        )


def guard_backward(out: torch.Tensor, backend: str, inputs: tuple) -> torch.Tensor:
    """`out` unchanged, except that when gradients were asked for (grad mode on and an input that
    requires grad) but the backend returned a tensor outside the autograd graph, a backward
    through it raises instead of leaving the weights silently without gradients."""
    if out.requires_grad or not torch.is_grad_enabled():
        return out
    tracked = [t for t in inputs if t is not None and t.requires_grad]
    if not tracked:
        return out
    name = resolve_backend(backend, out.device).name
    return _NoBackward.apply(out, name, *tracked)


def run_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: ExpertWeights,
    cfg: MoEConfig,
    backend: str,
    process_group=None,
) -> torch.Tensor:
    """Routed experts of an adapted model: x [T, H] -> [T, H], no host sync."""
    if process_group is None:
        out = moe_experts(x, topk_ids, topk_weights, weights, cfg, backend, check_values=False)
        backend_used = backend
    else:
        out = resolve_backend(EP_BACKEND, x.device).fn(
            x, topk_ids, topk_weights, weights, cfg, process_group=process_group
        )
        backend_used = EP_BACKEND
    tensors = (x, topk_weights, weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias)
    return guard_backward(out, backend_used, tensors)
