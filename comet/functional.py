"""Functional forms of the layer: routed experts on a given routing, and the whole layer."""
from __future__ import annotations

import torch

from comet.backends import resolve_backend
from comet.config import MoEConfig
from comet.reference import route
from comet.validation import check_bool, check_expert_weights, check_hidden, check_routing, check_tensor, check_type
from comet.weights import ExpertWeights


def _check_weights_and_config(weights: ExpertWeights, cfg: MoEConfig):
    check_type(cfg, MoEConfig, "cfg", "a comet.MoEConfig (comet.MoEConfig(**fields))")
    check_type(weights, ExpertWeights, "weights", "a comet.ExpertWeights (comet.ExpertWeights(gate_up, down, ...))")
    check_type(weights.gate_up, torch.Tensor, "weights.gate_up", "a torch.Tensor")  # hidden_states are checked against it


def moe_experts(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    weights: ExpertWeights,
    cfg: MoEConfig,
    backend: str = "auto",
    check_values: bool = True,
    recompute: bool = False,
) -> torch.Tensor:
    """Routed experts on a given routing: x [T, H] -> [T, H]. Differentiable in x, topk_weights
    and the weights.

    `check_values` verifies ids in range and finite weights; it reads them back to the host, so
    hot paths that built the routing themselves pass False. `recompute` (training with a kernel
    backend): the forward saves only the routing plan and the backward runs GEMM1 again, instead
    of saving its [T*K, 2F] activation input.
    """
    _check_weights_and_config(weights, cfg)
    check_bool(check_values, "check_values")
    check_hidden(x, cfg.hidden_size, weights.gate_up, name="x")
    if x.dim() != 2:
        raise ValueError(f"x: expected [tokens, hidden], got shape {tuple(x.shape)}")
    check_routing(topk_ids, topk_weights, x.shape[0], cfg.num_experts, x.device, check_values)
    check_expert_weights(weights, cfg, x)
    if x.shape[0] == 0:
        return torch.empty_like(x)
    return resolve_backend(backend, x.device, x.dtype).fn(x, topk_ids, topk_weights, weights, cfg, recompute=recompute)


def moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    weights: ExpertWeights,
    cfg: MoEConfig,
    router_bias: torch.Tensor | None = None,
    correction_bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Router + routed experts (no shared experts): x [T, H] -> [T, H]."""
    _check_weights_and_config(weights, cfg)
    check_tensor(router_weight, (cfg.num_experts, cfg.hidden_size), "router_weight")
    check_tensor(router_bias, (cfg.num_experts,), "router_bias", optional=True)
    check_tensor(correction_bias, (cfg.num_experts,), "correction_bias", optional=True)
    check_hidden(x, cfg.hidden_size, router_weight, name="x")
    logits = torch.nn.functional.linear(x, router_weight, router_bias)
    topk_weights, topk_ids = route(logits, cfg, correction_bias)
    return moe_experts(x, topk_ids, topk_weights, weights, cfg, backend, check_values=False)
