"""Functional forms of the layer: routed experts on a given routing, and the whole layer."""
from __future__ import annotations

from typing import NamedTuple

import torch

from comet.backends import register_backend, resolve_backend
from comet.config import MoEConfig
from comet.reference import experts_reference, route
from comet.validation import check_bool, check_hidden, check_routing, check_tensor, check_type


class ExpertWeights(NamedTuple):
    """The routed experts' parameters. Any strides (views of other layouts are fine).

    gate_up [E, 2F, H]: gate rows first, or gate at even rows if `interleaved`;
    down [E, H, F]; gate_up_bias [E, 2F] (same row order); down_bias [E, H].
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    interleaved: bool = False

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


def _experts_reference_backend(x, topk_ids, topk_weights, w: ExpertWeights, cfg: MoEConfig):
    return experts_reference(
        x, topk_ids, topk_weights, w.gate_up, w.down, w.gate_up_bias, w.down_bias,
        activation=cfg.activation, swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
        interleaved=w.interleaved, weight_on_input=cfg.weight_on_input,
    )


register_backend("reference", _experts_reference_backend)


def check_expert_weights(w: ExpertWeights, cfg: MoEConfig, like: torch.Tensor):
    check_bool(w.interleaved, "weights.interleaved")
    e, f, h = cfg.num_experts, cfg.ffn_size, cfg.hidden_size
    expected = {"gate_up": (e, 2 * f, h), "down": (e, h, f), "gate_up_bias": (e, 2 * f), "down_bias": (e, h)}
    for name, shape in expected.items():
        t = getattr(w, name)
        if not check_tensor(t, shape, f"weights.{name}", optional=name.endswith("bias")):
            continue
        if t.dtype != like.dtype:
            raise TypeError(f"weights.{name}: dtype {t.dtype} does not match hidden_states ({like.dtype})")
        if t.device != like.device:
            raise ValueError(f"weights.{name}: on device {t.device} but hidden_states is on {like.device}")


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
) -> torch.Tensor:
    """Routed experts on a given routing: x [T, H] -> [T, H].

    `check_values` verifies ids in range and finite weights; it reads them back to the host, so
    hot paths that built the routing themselves pass False.
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
    return resolve_backend(backend, x.device, x.dtype).fn(x, topk_ids, topk_weights, weights, cfg)


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
