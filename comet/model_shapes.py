"""Models named on the command line (`python -m comet profile --model NAME`), built without a download:

- `<family>-tiny`: the tiny model of a supported family (`comet.tiny_models`), e.g. `mixtral-tiny`;
- `<model>-shape`: a real model's MoE layer shapes (hidden, experts, top-k, expert FFN, attention)
  from its published config, with random weights and only a few decoder layers, built directly on
  the target device in the target dtype (no CPU copy, no checkpoint), e.g. `mixtral-8x7b-shape`;
- a local checkpoint directory, loaded with `AutoModelForCausalLM.from_pretrained`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

# name -> the model's config fields (model_type included). Layer counts are set by `build_shape_model`;
# DeepSeek-V3's first dense layers are dropped so that every built layer is an MoE layer.
SHAPES: dict[str, dict] = {
    "mixtral-8x7b-shape": dict(
        model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, rope_theta=1e6, rms_norm_eps=1e-5),
    "qwen3-30b-a3b-shape": dict(
        model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[]),
    "olmoe-1b-7b-shape": dict(
        model_type="olmoe", hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, num_attention_heads=16, num_key_value_heads=16, vocab_size=50304, rms_norm_eps=1e-5),
    "deepseek-v3-shape": dict(
        model_type="deepseek_v3", hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=0, num_attention_heads=128,
        num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, vocab_size=129280, rms_norm_eps=1e-6),
    "gpt-oss-20b-shape": dict(
        model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088, sliding_window=128,
        swiglu_limit=7.0, rms_norm_eps=1e-5),
}
DEFAULT_LAYERS = 2


def shape_config(name: str, num_layers: int = DEFAULT_LAYERS):
    """The transformers config of `name` (one of `SHAPES`) with `num_layers` decoder layers."""
    if name not in SHAPES:
        raise ValueError(f"name: expected one of {sorted(SHAPES)}, got {name!r}")
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
    from transformers import AutoConfig

    fields = dict(SHAPES[name])
    return AutoConfig.for_model(fields.pop("model_type"), num_hidden_layers=num_layers, **fields)


def build_shape_model(name: str, device="cpu", dtype=torch.bfloat16, num_layers: int = DEFAULT_LAYERS) -> nn.Module:
    """`name`'s architecture with random weights, allocated and initialised on `device` in
    `dtype` (device "meta" builds the structure only), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = shape_config(name, num_layers)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def build_model(spec: str, device="cpu", dtype=torch.float32, num_layers: int = DEFAULT_LAYERS) -> nn.Module:
    """The model a command-line `--model` names (see the module docstring), on `device` in `dtype`."""
    if spec in SHAPES:
        return build_shape_model(spec, device, dtype, num_layers)
    if spec.endswith("-tiny"):
        from comet.tiny_models import TINY_CONFIGS, build_tiny_model

        family = spec.removesuffix("-tiny").replace("-", "_")
        if family not in TINY_CONFIGS:
            raise ValueError(f"model: {spec!r}: no tiny model of {family!r}; families: {sorted(TINY_CONFIGS)}")
        return build_tiny_model(family).to(device=device, dtype=dtype)
    if Path(spec).is_dir():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(spec, dtype=dtype).to(device).eval()
    raise ValueError(
        f"model: {spec!r} is neither <family>-tiny, one of {sorted(SHAPES)}, nor a local checkpoint directory"
    )


def model_names() -> list[str]:
    """Every name `build_model` accepts besides checkpoint directories."""
    from comet.tiny_models import TINY_CONFIGS

    return sorted(SHAPES) + [f"{family}-tiny" for family in sorted(TINY_CONFIGS)]
