"""The model shapes the benchmarks run: one routed-experts layer of each model, with its routing rule.

Only the routed experts are described (shared experts, attention and the router's own GEMM are not
part of what `comet.moe_experts` computes). `hf_layout` names how Hugging Face stores the weights:
"standard" (`gate_up_proj [E, 2F, H]`, gate rows first; `down_proj [E, H, F]`) or "gpt_oss"
(transposed and interleaved: `gate_up_proj [E, H, 2F]` with gate at even columns, `down_proj [E, F, H]`).
"""
from __future__ import annotations

from dataclasses import dataclass

from comet.config import MoEConfig


@dataclass(frozen=True)
class ModelShape:
    name: str
    cfg: MoEConfig
    hf_layout: str = "standard"


def _shapes(*shapes: ModelShape) -> dict[str, ModelShape]:
    return {s.name: s for s in shapes}


MODEL_SHAPES = _shapes(
    # softmax over all experts, top-2, renormalised (equal to Mixtral's top-k then softmax).
    ModelShape("Mixtral-8x7B", MoEConfig(hidden_size=4096, ffn_size=14336, num_experts=8, top_k=2,
                                         family="mixtral")),
    ModelShape("Qwen3-30B-A3B", MoEConfig(hidden_size=2048, ffn_size=768, num_experts=128, top_k=8,
                                          family="qwen3_moe")),
    # OLMoE keeps the raw softmax probabilities of its top-8 (no renormalisation).
    ModelShape("OLMoE-1B-7B", MoEConfig(hidden_size=2048, ffn_size=1024, num_experts=64, top_k=8,
                                        norm_topk_prob=False, family="olmoe")),
    # sigmoid scores, 8 groups of 32, the best 4 groups by top-2 sum, correction bias, x2.5.
    ModelShape("DeepSeek-V3", MoEConfig(hidden_size=7168, ffn_size=2048, num_experts=256, top_k=8,
                                        scoring="sigmoid", n_group=8, topk_group=4, group_score="top2_sum",
                                        score_correction_bias=True, routed_scaling_factor=2.5,
                                        family="deepseek_v3")),
    # router bias, top-4 of logits then softmax (= softmax then renormalise), clamped SwiGLU, biases.
    ModelShape("GPT-OSS-20B", MoEConfig(hidden_size=2880, ffn_size=2880, num_experts=32, top_k=4,
                                        router_bias=True, activation="clamped_swiglu", expert_bias=True,
                                        family="gpt_oss"),
               hf_layout="gpt_oss"),
)

# Tiny shapes with the same variety (standard/GPT-OSS layout, group-limited sigmoid routing) for
# `--smoke` runs on CPU.
SMOKE_SHAPES = _shapes(
    ModelShape("tiny-mixtral", MoEConfig(hidden_size=64, ffn_size=96, num_experts=4, top_k=2,
                                         family="mixtral")),
    ModelShape("tiny-deepseek", MoEConfig(hidden_size=32, ffn_size=48, num_experts=16, top_k=4,
                                          scoring="sigmoid", n_group=4, topk_group=2, group_score="top2_sum",
                                          score_correction_bias=True, routed_scaling_factor=2.5,
                                          family="deepseek_v3")),
    ModelShape("tiny-gpt-oss", MoEConfig(hidden_size=64, ffn_size=64, num_experts=8, top_k=2,
                                         router_bias=True, activation="clamped_swiglu", expert_bias=True,
                                         family="gpt_oss"),
               hf_layout="gpt_oss"),
)

TOKEN_COUNTS = (128, 1024, 4096, 16384)
SMOKE_TOKEN_COUNTS = (8, 40)
