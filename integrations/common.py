"""What the model adapters share: the routed-experts call (through a backend on this rank, or
expert-parallel through `comet.ep`), and the guard that makes training through a kernel backend
without a backward fail loudly instead of silently dropping gradients."""
from __future__ import annotations

import torch

from comet.backends import resolve_backend
from comet.config import MoEConfig
from comet.functional import moe_experts
from comet.weights import ExpertWeights


def check_process_group(process_group, backend: str):
    """None (every expert on this rank), or a process group for expert parallelism, which runs
    the Triton kernels (`backend` "auto" or "triton")."""
    if process_group is None:
        return
    if not isinstance(process_group, torch.distributed.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup, got {type(process_group).__name__}")
    if backend not in ("auto", "triton"):
        raise ValueError(f"backend: expert parallelism runs the Triton kernels ('auto' or 'triton'), got {backend!r}")


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
    ep_state=None,
) -> torch.Tensor:
    """Routed experts of an adapted model: x [T, H] -> [T, H], no host sync. With `ep_state` (a
    `comet.ep.ExpertParallelState`), expert-parallel: `weights` are this rank's experts, `cfg`
    and `topk_ids` count all of them, and the call is collective (forward and backward)."""
    if ep_state is not None:
        from comet.ep import ep_experts  # lazily: the kernels load on first use

        return ep_experts(x, topk_ids, topk_weights, weights, cfg, ep_state)
    out = moe_experts(x, topk_ids, topk_weights, weights, cfg, backend, check_values=False)
    tensors = (x, topk_weights, weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias)
    return guard_backward(out, backend, tensors)
