"""Hugging Face MoE families (`comet.hf_family_table`): their configs as `MoEConfig`, their MoE
blocks found in a model, their blocks' weights in our layout and loaded into a layer.

A layer built from a family's config and loaded from one of its blocks gives the block's output in
eval mode. Training-only randomness of the library's blocks (Mixtral/Phi-3.5 input jitter,
Phi-3.5's sampled sparsemixer routing) is not reproduced.
"""
from __future__ import annotations

import torch
from torch import nn

from comet.config import MoEConfig
from comet.hf_family_table import FAMILIES, Family, family_of
from comet.weights import ExpertWeights, split_gate_up


def config_from_hf(hf_config) -> MoEConfig:
    """`MoEConfig` of one MoE layer of a Hugging Face model config of a supported family."""
    return MoEConfig.from_hf(hf_config)


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every MoE block of a Hugging Face model of a supported family."""
    block_class = family_of(model.config).block_class
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == block_class]


# ----------------------------------------------------------------------------------------------
# Expert layouts
# ----------------------------------------------------------------------------------------------
def experts_from_hf_layout(
    family: str,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> ExpertWeights:
    """A family's expert tensors (parameters, or their gradients) as `ExpertWeights` views, no copy."""
    fam = FAMILIES[family]
    if fam.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    return ExpertWeights(gate_up, down, gate_up_bias, down_bias, interleaved=fam.interleaved)


def gate_rows_first(w: ExpertWeights) -> ExpertWeights:
    """`w` with gate_up (and its bias) reordered gate rows first; unchanged if already so."""
    if not w.interleaved:
        return w

    def deinterleave(t):
        return torch.cat(split_gate_up(t, interleaved=True), dim=-2)

    bias = None if w.gate_up_bias is None else deinterleave(w.gate_up_bias.unsqueeze(-1)).squeeze(-1)
    return ExpertWeights(deinterleave(w.gate_up), w.down, bias, w.down_bias)


# ----------------------------------------------------------------------------------------------
# Loading a block into a layer
# ----------------------------------------------------------------------------------------------
def _copy(dst: torch.Tensor | None, src: torch.Tensor | None, name: str):
    """dst <- src, after checking both exist or neither, shapes, and finiteness."""
    if dst is None and src is None:
        return
    if dst is None or src is None:
        where = "the Hugging Face block" if src is None else "the layer's config"
        raise ValueError(f"{name}: missing in {where}; the block does not match the layer's config")
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(
            f"{name}: shape {tuple(src.shape)} (in comet's layout) does not match the layer's {tuple(dst.shape)}"
        )
    if not bool(torch.isfinite(src).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    with torch.no_grad():
        dst.copy_(src)


def _submodule(block: nn.Module, attr: str) -> nn.Module:
    module = getattr(block, attr, None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"block: {type(block).__name__} has no submodule {attr!r}")
    return module


def _load_router(layer, block: nn.Module, family: Family):
    router = _submodule(block, family.router)
    _copy(layer.router.weight, router.weight, f"{family.router}.weight")
    _copy(layer.router.bias, getattr(router, "bias", None), f"{family.router}.bias")
    _copy(layer.router.e_score_correction_bias, getattr(router, "e_score_correction_bias", None),
          f"{family.router}.e_score_correction_bias")


def _load_experts(layer, block: nn.Module, family: Family):
    experts = _submodule(block, "experts")
    tensors = [getattr(experts, name, None) for name in ("gate_up_proj", "down_proj")]
    if any(not isinstance(t, torch.Tensor) or t.dim() != 3 for t in tensors):
        raise ValueError(
            f"block.experts: expected 3-D gate_up_proj and down_proj tensors (the layout of "
            f"transformers >= 5), got a {type(experts).__name__} without them"
        )
    hf = gate_rows_first(experts_from_hf_layout(
        family.name, *tensors, getattr(experts, "gate_up_proj_bias", None), getattr(experts, "down_proj_bias", None)))
    ours = layer.experts
    _copy(ours.gate_up_proj, hf.gate_up, "experts.gate_up_proj")
    _copy(ours.down_proj, hf.down, "experts.down_proj")
    _copy(ours.gate_up_bias, hf.gate_up_bias, "experts.gate_up_proj_bias")
    _copy(ours.down_bias, hf.down_bias, "experts.down_proj_bias")


def _load_shared(layer, block: nn.Module, family: Family):
    shared = None if family.shared_expert is None else getattr(block, family.shared_expert, None)
    if (shared is None) != (layer.shared_expert is None):
        raise ValueError(
            f"{family.shared_expert or 'shared_expert'}: the block {'has a' if shared is not None else 'has no'} "
            f"shared expert but the layer's config says shared_ffn_size={layer.config.shared_ffn_size}"
        )
    if shared is None:
        return
    for proj in ("gate_proj", "up_proj", "down_proj"):
        src = _submodule(shared, proj)
        if src.bias is not None:
            raise ValueError(f"{family.shared_expert}.{proj}.bias: shared experts with biases are not supported")
        _copy(getattr(layer.shared_expert, proj).weight, src.weight, f"{family.shared_expert}.{proj}.weight")
    if family.shared_expert_gate is not None:
        gate = _submodule(block, family.shared_expert_gate)
        _copy(layer.shared_expert.gate.weight, gate.weight, f"{family.shared_expert_gate}.weight")


def load_hf_block(layer, block: nn.Module):
    """Copy the router, routed experts and shared experts of a Hugging Face MoE block into `layer`
    (a `comet.MoELayer` whose config came from the same family's config)."""
    cfg = layer.config
    if cfg.family not in FAMILIES:
        raise ValueError(
            f"layer: its config's family is {cfg.family!r}; build it with MoEConfig.from_hf(hf_config) "
            f"to load a Hugging Face block (families: {sorted(FAMILIES)})"
        )
    family = FAMILIES[cfg.family]
    if not isinstance(block, nn.Module):
        raise TypeError(f"block: expected a torch.nn.Module, got {type(block).__name__}")
    if all(c.__name__ != family.block_class for c in type(block).__mro__):
        raise ValueError(
            f"block: expected a {family.block_class} (the {family.name} MoE block of the layer's config), "
            f"got {type(block).__name__}"
        )
    _load_router(layer, block, family)
    _load_experts(layer, block, family)
    _load_shared(layer, block, family)
