"""Hugging Face MoE families: their configs as `MoEConfig`, their MoE blocks' weights in our layout.

Supported (transformers 5.7+): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3,
GPT-OSS, Phi-3.5-MoE, Llama4 (text). A layer built from a family's config and loaded from one of
its blocks gives the block's output in eval mode. Training-only randomness of the library's
blocks (Mixtral/Phi-3.5 input jitter, Phi-3.5's sampled sparsemixer routing) is not reproduced.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from comet.config import MoEConfig
from comet.functional import ExpertWeights
from comet.reference import split_gate_up

_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def _activation(hf) -> dict:
    act = hf.hidden_act
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"hf_config.hidden_act: {act!r} is not supported for the experts; expected one of "
            f"{sorted(_ACTIVATIONS)}"
        )
    return {"activation": _ACTIVATIONS[act]}


def _mixtral(hf) -> dict:
    return dict(ffn_size=hf.intermediate_size, num_experts=hf.num_local_experts, norm_topk_prob=True,
                **_activation(hf))


def _qwen2_moe(hf) -> dict:
    return dict(ffn_size=hf.moe_intermediate_size, num_experts=hf.num_experts,
                norm_topk_prob=bool(hf.norm_topk_prob), shared_ffn_size=hf.shared_expert_intermediate_size,
                shared_expert_gate=True, **_activation(hf))


def _qwen3_moe(hf) -> dict:
    return dict(ffn_size=hf.moe_intermediate_size, num_experts=hf.num_experts,
                norm_topk_prob=bool(hf.norm_topk_prob), **_activation(hf))


def _olmoe(hf) -> dict:
    return dict(ffn_size=hf.intermediate_size, num_experts=hf.num_experts,
                norm_topk_prob=bool(hf.norm_topk_prob), **_activation(hf))


def _deepseek_shared(hf) -> int:
    if getattr(hf, "mlp_bias", False):
        raise ValueError("hf_config.mlp_bias=True: shared experts with biases are not supported")
    return (hf.n_shared_experts or 0) * hf.moe_intermediate_size


def _deepseek_v2(hf) -> dict:
    # The library's V2 router never renormalises the top-k (it ignores `norm_topk_prob`).
    groups = {}
    if hf.topk_method == "group_limited_greedy":
        groups = dict(n_group=hf.n_group, topk_group=hf.topk_group, group_score="max")
    elif hf.topk_method != "greedy":
        raise ValueError(
            f"hf_config.topk_method: expected 'greedy' or 'group_limited_greedy', got {hf.topk_method!r}"
        )
    return dict(ffn_size=hf.moe_intermediate_size, num_experts=hf.n_routed_experts, norm_topk_prob=False,
                routed_scaling_factor=float(hf.routed_scaling_factor), shared_ffn_size=_deepseek_shared(hf),
                **groups, **_activation(hf))


def _deepseek_v3(hf) -> dict:
    return dict(ffn_size=hf.moe_intermediate_size, num_experts=hf.n_routed_experts, scoring="sigmoid",
                norm_topk_prob=bool(hf.norm_topk_prob), routed_scaling_factor=float(hf.routed_scaling_factor),
                n_group=hf.n_group or 1, topk_group=hf.topk_group or 1, group_score="top2_sum",
                score_correction_bias=True, shared_ffn_size=_deepseek_shared(hf), **_activation(hf))


def _gpt_oss(hf) -> dict:
    # Softmax over the top-k logits == top-k of the softmax, renormalised. Older transformers
    # (5.7) hard-code alpha and limit in the experts module, with these same values.
    return dict(ffn_size=hf.intermediate_size, num_experts=hf.num_local_experts, norm_topk_prob=True,
                router_bias=True, activation="clamped_swiglu", expert_bias=True,
                swiglu_alpha=float(getattr(hf, "swiglu_alpha", 1.702)),
                swiglu_limit=float(getattr(hf, "swiglu_limit", 7.0)))


def _phimoe(hf) -> dict:
    return dict(ffn_size=hf.intermediate_size, num_experts=hf.num_local_experts, scoring="sparsemixer",
                sparsemixer_jitter_eps=float(hf.router_jitter_noise), **_activation(hf))


def _llama4(hf) -> dict:
    # Sigmoid of the top-k logits (== top-k of the sigmoids), not renormalised, scaling the input.
    return dict(ffn_size=hf.intermediate_size, num_experts=hf.num_local_experts, scoring="sigmoid",
                norm_topk_prob=False, weight_on_input=True, shared_ffn_size=hf.intermediate_size,
                **_activation(hf))


@dataclass(frozen=True)
class Family:
    """Where a family keeps things in its MoE block, and how its expert tensors are laid out."""

    name: str
    model_type: str          # the text config's `model_type`
    block_class: str         # class name of the MoE block module
    config_fields: Callable  # hf text config -> MoEConfig fields beyond hidden_size/top_k
    router: str = "gate"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    # Expert tensors stored [E, H, 2F] / [E, F, H] instead of [E, 2F, H] / [E, H, F].
    transposed: bool = False
    # gate_up columns alternate gate, up (GPT-OSS) instead of all gate then all up.
    interleaved: bool = False


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("mixtral", "mixtral", "MixtralSparseMoeBlock", _mixtral),
    Family("qwen2_moe", "qwen2_moe", "Qwen2MoeSparseMoeBlock", _qwen2_moe,
           shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    Family("qwen3_moe", "qwen3_moe", "Qwen3MoeSparseMoeBlock", _qwen3_moe),
    Family("olmoe", "olmoe", "OlmoeSparseMoeBlock", _olmoe),
    Family("deepseek_v2", "deepseek_v2", "DeepseekV2Moe", _deepseek_v2, shared_expert="shared_experts"),
    Family("deepseek_v3", "deepseek_v3", "DeepseekV3MoE", _deepseek_v3, shared_expert="shared_experts"),
    Family("gpt_oss", "gpt_oss", "GptOssMLP", _gpt_oss, router="router", transposed=True, interleaved=True),
    Family("phimoe", "phimoe", "PhimoeSparseMoeBlock", _phimoe, router="router"),
    Family("llama4", "llama4_text", "Llama4TextMoe", _llama4, router="router",
           shared_expert="shared_expert", transposed=True),
)}
_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def _text_config(hf_config):
    """The decoder's config (Llama4's multimodal config keeps it in `text_config`)."""
    get_text_config = getattr(hf_config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else hf_config


def family_of(hf_config) -> Family:
    """The supported family of a Hugging Face config, or ValueError."""
    model_type = getattr(_text_config(hf_config), "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise ValueError(
            f"hf_config: model_type {model_type!r} is not a supported MoE family; supported: "
            f"{sorted(_BY_MODEL_TYPE)} (multimodal configs such as 'llama4' through their text config)"
        )
    return _BY_MODEL_TYPE[model_type]


def config_from_hf(hf_config) -> MoEConfig:
    """`MoEConfig` of one MoE layer of a Hugging Face model config of a supported family."""
    family = family_of(hf_config)
    text = _text_config(hf_config)
    return MoEConfig(hidden_size=text.hidden_size, top_k=text.num_experts_per_tok, family=family.name,
                     **family.config_fields(text))


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
