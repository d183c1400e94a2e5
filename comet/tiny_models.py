"""Tiny Hugging Face models of every supported MoE family, built offline with random weights.

For tests, `make demo` and the profiler (`--model mixtral-tiny`): hidden size 64, two decoder
layers, 8-16 experts, each family's own top-k rule. Built in fp32 and eval mode.
"""
from __future__ import annotations

import torch
from torch import nn

from comet.config import MoEConfig
from comet.hf_families import config_from_hf, find_moe_blocks
from comet.hf_family_table import FAMILIES

_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DEEPSEEK = dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=4,
                 n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4)

# family -> keyword arguments of its Hugging Face config (model_type included).
TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(_COMMON, model_type="mixtral", intermediate_size=32, num_local_experts=8,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(_COMMON, model_type="qwen2_moe", intermediate_size=96, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False),
    "qwen3_moe": dict(_COMMON, model_type="qwen3_moe", intermediate_size=96, moe_intermediate_size=32,
                      num_experts=16, num_experts_per_tok=4, norm_topk_prob=True, head_dim=16),
    "olmoe": dict(_COMMON, model_type="olmoe", intermediate_size=32, num_experts=16, num_experts_per_tok=4,
                  norm_topk_prob=False),
    # Greedy top-k, as DeepSeek-V2-Lite: transformers 5.7's block fails on "group_limited_greedy".
    "deepseek_v2": dict(_COMMON, **_DEEPSEEK, model_type="deepseek_v2", n_shared_experts=2,
                        topk_method="greedy", routed_scaling_factor=1.5),
    "deepseek_v3": dict(_COMMON, **_DEEPSEEK, model_type="deepseek_v3", n_shared_experts=1, norm_topk_prob=True,
                        routed_scaling_factor=2.5),
    "gpt_oss": dict(_COMMON, model_type="gpt_oss", intermediate_size=32, num_local_experts=8,
                    num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "phimoe": dict(_COMMON, model_type="phimoe", intermediate_size=32, num_local_experts=8,
                   num_experts_per_tok=2),
    "llama4": dict(_COMMON, model_type="llama4_text", intermediate_size=32, intermediate_size_mlp=96,
                   num_local_experts=8, num_experts_per_tok=1, head_dim=16, attention_chunk_size=16),
}


def tiny_config(family: str, **overrides):
    """The Hugging Face config of a tiny model of `family` (one of `TINY_CONFIGS`), with any of
    its fields overridden."""
    if family not in TINY_CONFIGS:
        raise ValueError(f"family: expected one of {sorted(TINY_CONFIGS)}, got {family!r}")
    from transformers import AutoConfig

    kwargs = {**TINY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def _randomise_moe_block(block: nn.Module, cfg: MoEConfig):
    """Unit-scale random weights (the library's init is tiny and zeroes biases and the correction
    bias): router logits of spread ~1, expert pre-activations large enough to reach GPT-OSS's
    clamp, and every bias non-zero so that loading and the reference both have to honour it."""
    fam = FAMILIES[cfg.family]
    router = getattr(block, fam.router)
    nn.init.normal_(router.weight, std=cfg.hidden_size**-0.5)
    for name in ("bias", "e_score_correction_bias"):
        if getattr(router, name, None) is not None:
            nn.init.normal_(getattr(router, name), std=0.1)
    experts = block.experts
    nn.init.normal_(experts.gate_up_proj, std=3 * cfg.hidden_size**-0.5)
    nn.init.normal_(experts.down_proj, std=cfg.ffn_size**-0.5)
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        if getattr(experts, name, None) is not None:
            nn.init.normal_(getattr(experts, name), std=0.5)
    for attr in (fam.shared_expert, fam.shared_expert_gate):
        if attr is None:
            continue
        for linear in getattr(block, attr).modules():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=linear.in_features**-0.5)


def build_tiny_model(family: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny causal LM of `family` (config fields overridden by `overrides`) with random weights,
    deterministic in `seed` (the global torch RNG is left as it was), fp32, in eval mode."""
    config = tiny_config(family, **overrides)
    moe_cfg = config_from_hf(config)
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for _, block in find_moe_blocks(model):
                _randomise_moe_block(block, moe_cfg)
    return model.eval()

