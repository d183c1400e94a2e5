"""The Hugging Face MoE families as data: each one's config fields as `MoEConfig` fields, and
where its MoE block keeps the router, experts and shared experts.

Supported (transformers 5.7+): Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3,
GPT-OSS, Phi-3.5-MoE, Llama4 (text). Imports nothing of comet: `MoEConfig.from_hf` reads it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def moe_config_fields(hf_config) -> dict:
    """The `MoEConfig` fields of one MoE layer of a Hugging Face model config of a supported family."""
    family = family_of(hf_config)
    text = _text_config(hf_config)
    return dict(hidden_size=text.hidden_size, top_k=text.num_experts_per_tok, family=family.name,
                **family.config_fields(text))
