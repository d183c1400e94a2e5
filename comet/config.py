"""`MoEConfig`: the shape and the rules of one MoE layer, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from comet.hf_family_table import moe_config_fields
from comet.validation import as_int, as_real, check_bool, check_choice

SCORINGS = ("softmax", "sigmoid", "sparsemixer")
GROUP_SCORES = ("max", "top2_sum")
ACTIVATIONS = ("swiglu", "geglu", "clamped_swiglu")
# field -> smallest value; field -> (bound, whether the bound itself is allowed): finite floats.
INT_FIELDS = {"hidden_size": 1, "ffn_size": 1, "num_experts": 1, "top_k": 1, "n_group": 1, "topk_group": 1,
              "shared_ffn_size": 0}
REAL_FIELDS = {"routed_scaling_factor": (0.0, False), "swiglu_alpha": (0.0, False), "swiglu_limit": (0.0, False),
               "sparsemixer_jitter_eps": (0.0, True)}
BOOL_FIELDS = ("norm_topk_prob", "router_bias", "score_correction_bias", "expert_bias", "weight_on_input",
               "shared_expert_gate")


@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer.

    Routing: ``scoring`` turns router logits into scores (``softmax``; ``sigmoid``; Phi-3.5's
    ``sparsemixer``). With ``n_group > 1`` the top-k is group-limited: experts are split into
    ``n_group`` groups, each group is scored by ``group_score`` (``max`` of its scores, DeepSeek-V2;
    ``top2_sum``, DeepSeek-V3) and only the best ``topk_group`` groups are eligible. A
    ``score_correction_bias`` (DeepSeek-V3) shifts the choice but not the weights. The chosen
    weights are renormalised if ``norm_topk_prob`` and multiplied by ``routed_scaling_factor``.
    ``weight_on_input`` (Llama4) scales each expert's input by its weight instead of its output.

    Experts: ``activation`` is ``swiglu`` (silu(gate) * up), ``geglu`` (gelu(gate) * up) or
    ``clamped_swiglu`` (GPT-OSS: gate clamped above at ``swiglu_limit``, up clamped to
    +-``swiglu_limit``, ``(up + 1) * gate * sigmoid(swiglu_alpha * gate)``). ``expert_bias`` adds
    per-expert biases to both projections.

    Shared experts: an always-on gated MLP of width ``shared_ffn_size`` (0 = none) with the same
    ``activation``, optionally scaled by ``sigmoid(shared_expert_gate(x))`` (Qwen2-MoE).

    Checked on construction, naming the field: sizes and counts are ints >= 1 (``shared_ffn_size``
    >= 0; numpy integers are stored as int), ``routed_scaling_factor``, ``swiglu_alpha`` and
    ``swiglu_limit`` finite and > 0, ``sparsemixer_jitter_eps`` finite and >= 0, flags bools.
    """

    hidden_size: int
    ffn_size: int
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    group_score: str = "max"
    router_bias: bool = False
    score_correction_bias: bool = False
    sparsemixer_jitter_eps: float = 0.01
    activation: str = "swiglu"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_bias: bool = False
    weight_on_input: bool = False
    shared_ffn_size: int = 0
    shared_expert_gate: bool = False
    family: str = "custom"

    def __post_init__(self):
        # Types and ranges of each field (numpy numbers are taken and stored as int / float).
        for name, minimum in INT_FIELDS.items():
            object.__setattr__(self, name, as_int(getattr(self, name), f"MoEConfig.{name}", minimum))
        for name, (minimum, minimum_allowed) in REAL_FIELDS.items():
            object.__setattr__(self, name, as_real(getattr(self, name), f"MoEConfig.{name}", minimum, minimum_allowed))
        for name in BOOL_FIELDS:
            check_bool(getattr(self, name), f"MoEConfig.{name}")
        for name, choices in (("scoring", SCORINGS), ("group_score", GROUP_SCORES), ("activation", ACTIVATIONS)):
            check_choice(getattr(self, name), f"MoEConfig.{name}", choices)
        if not isinstance(self.family, str):
            raise TypeError(f"MoEConfig.family must be a str, got {self.family!r} ({type(self.family).__name__})")
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"
            )
        if self.num_experts % self.n_group:
            raise ValueError(
                f"MoEConfig.n_group ({self.n_group}) must divide num_experts ({self.num_experts})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(
                f"MoEConfig.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})"
            )
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            if self.top_k > self.topk_group * per_group:
                raise ValueError(
                    f"MoEConfig.top_k ({self.top_k}) exceeds the experts in topk_group "
                    f"({self.topk_group}) groups of {per_group}"
                )
            if self.group_score == "top2_sum" and per_group < 2:
                raise ValueError("MoEConfig.group_score='top2_sum' needs >= 2 experts per group")
        if self.scoring == "sparsemixer" and self.top_k != 2:
            raise ValueError(f"MoEConfig.scoring='sparsemixer' needs top_k=2, got {self.top_k}")
        if self.shared_expert_gate and not self.shared_ffn_size:
            raise ValueError("MoEConfig.shared_expert_gate needs shared_ffn_size > 0")

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)

    def with_experts(self, num_experts: int) -> "MoEConfig":
        """This layer's config for a part that holds `num_experts` of its experts (an expert-parallel
        rank's, a shard's): top_k at most `num_experts`, plain top-k (the experts read no routing rule)."""
        return self.replace(num_experts=num_experts, top_k=min(self.top_k, num_experts), n_group=1, topk_group=1)

    @classmethod
    def from_hf(cls, hf_config) -> "MoEConfig":
        """Build from a Hugging Face model config of a supported family (see `comet.hf_family_table`)."""
        return cls(**moe_config_fields(hf_config))
