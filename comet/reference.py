"""Plain PyTorch reference of every router rule and expert variant, accumulating in fp32 (in fp64
for fp64 inputs).

Everything else (Triton kernels, expert-parallel path, integrations) is tested against these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from comet.config import MoEConfig
from comet.weights import split_gate_up


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """What the reference computes `t`'s dtype in: float64 for float64, else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Router rules
# ----------------------------------------------------------------------------------------------
def _group_limited_mask(choice: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Boolean [T, E]: experts in the `topk_group` best of `n_group` groups."""
    t = choice.shape[0]
    grouped = choice.view(t, cfg.n_group, -1)
    if cfg.group_score == "max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    best = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    return group_mask.unsqueeze(-1).expand_as(grouped).reshape(t, -1)


def _sparsemixer_top2(logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Phi-3.5-MoE's sparsemixer, inference form: each pick masks experts far from the max."""
    scores = logits
    ids, weights = [], []
    for _ in range(2):
        top_val, top_idx = scores.max(dim=-1, keepdim=True)
        factor = logits.abs().clamp(min=top_val.abs())
        far = (top_val - logits) / factor > 2 * eps
        weights.append(torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1).gather(1, top_idx))
        ids.append(top_idx)
        scores = scores.scatter(1, top_idx, float("-inf"))
    return torch.cat(weights, dim=1), torch.cat(ids, dim=1)


def route(
    logits: torch.Tensor, cfg: MoEConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (topk_weights fp32 [T, K] (fp64 for fp64 logits), topk_ids int64 [T, K])."""
    logits = logits.to(accumulation_dtype(logits))
    if cfg.scoring == "sparsemixer":
        weights, ids = _sparsemixer_top2(logits, cfg.sparsemixer_jitter_eps)
        return weights * cfg.routed_scaling_factor, ids
    scores = logits.softmax(dim=-1) if cfg.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.to(scores.dtype)
    if cfg.n_group > 1:
        choice = choice.masked_fill(~_group_limited_mask(choice, cfg), float("-inf"))
    ids = choice.topk(cfg.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, ids


# ----------------------------------------------------------------------------------------------
# Experts
# ----------------------------------------------------------------------------------------------
def activation_reference(
    gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    if activation == "swiglu":
        return F.silu(gate) * up
    if activation == "geglu":
        return F.gelu(gate) * up
    if activation == "clamped_swiglu":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * gate * torch.sigmoid(alpha * gate)
    raise ValueError(f"activation must be one of swiglu, geglu, clamped_swiglu; got {activation!r}")


def experts_reference(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
    *,
    activation: str = "swiglu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    interleaved: bool = False,
    weight_on_input: bool = False,
) -> torch.Tensor:
    """Routed experts in fp32 (fp64 for fp64 x): out[t] = sum_k w[t,k] * down_e(act(gate_up_e(x[t]))), e = ids[t,k].

    x [T, H]; topk_ids [T, K] (ids outside [0, E) are skipped: Hugging Face's expert-parallel
    convention); topk_weights [T, K]; gate_up [E, 2F, H] (gate rows first, or interleaved);
    down [E, H, F]; gate_up_bias [E, 2F]; down_bias [E, H]. Returns [T, H] in x's dtype.
    """
    num_experts = gate_up.shape[0]
    acc = accumulation_dtype(x)
    xf = x.to(acc)
    out = torch.zeros(x.shape[0], down.shape[1], dtype=acc, device=x.device)
    for e in range(num_experts):
        token, slot = torch.where(topk_ids == e)
        if token.numel() == 0:
            continue
        w = topk_weights[token, slot].to(acc).unsqueeze(-1)
        inp = xf[token] * w if weight_on_input else xf[token]
        h = inp @ gate_up[e].to(acc).t()
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].to(acc)
        gate, up = split_gate_up(h.t(), interleaved)
        a = activation_reference(gate.t(), up.t(), activation, swiglu_alpha, swiglu_limit)
        y = a @ down[e].to(acc).t()
        if down_bias is not None:
            y = y + down_bias[e].to(acc)
        out = out.index_add(0, token, y if weight_on_input else y * w)
    return out.to(x.dtype)
