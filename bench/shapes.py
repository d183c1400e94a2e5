"""The model shapes the benchmarks run: the routed experts of one MoE layer of each model.

Each comes from the model's published config (`comet.model_shapes`; for `--smoke`, the tiny models
of `comet.tiny_models`) through `MoEConfig.from_hf`, so sizes and routing rule are the family's own.
Shared experts are left out: the benchmarks time the routed experts (`comet.moe_experts`) alone.
Building a shape imports transformers.
"""
from __future__ import annotations

from dataclasses import dataclass

from comet.config import MoEConfig

# benchmark name -> `comet.model_shapes.SHAPES` key
MODELS = {
    "Mixtral-8x7B": "mixtral-8x7b-shape",
    "Qwen3-30B-A3B": "qwen3-30b-a3b-shape",
    "OLMoE-1B-7B": "olmoe-1b-7b-shape",
    "DeepSeek-V3": "deepseek-v3-shape",
    "GPT-OSS-20B": "gpt-oss-20b-shape",
}
# benchmark name -> `comet.tiny_models.TINY_CONFIGS` family: both weight layouts, group-limited routing
SMOKE_MODELS = {"tiny-mixtral": "mixtral", "tiny-deepseek-v3": "deepseek_v3", "tiny-gpt-oss": "gpt_oss"}

TOKEN_COUNTS = (128, 1024, 4096, 16384)
SMOKE_TOKEN_COUNTS = (8, 40)


@dataclass(frozen=True)
class ModelShape:
    name: str
    cfg: MoEConfig

    @property
    def hf_layout(self) -> str:
        """How Hugging Face stores the experts: "gpt_oss" (`gate_up_proj [E, H, 2F]`, gate at even
        columns; `down_proj [E, F, H]`) or "standard" (`gate_up_proj [E, 2F, H]`, gate rows first;
        `down_proj [E, H, F]`)."""
        return "gpt_oss" if self.cfg.family == "gpt_oss" else "standard"


def _routed_experts(hf_config) -> MoEConfig:
    return MoEConfig.from_hf(hf_config).replace(shared_ffn_size=0, shared_expert_gate=False)


def model_shape(name: str) -> ModelShape:
    """The shape called `name` in MODELS or SMOKE_MODELS; "NAME/W": the routed experts one of W
    expert-parallel ranks keeps (E/W experts, the same GEMMs; top_k at most E/W; plain top-k)."""
    base, _, ranks = name.partition("/")
    if ranks:
        if not ranks.isdecimal() or int(ranks) < 1:
            raise ValueError(f"name: expected NAME/W with W a positive integer, got {name!r}")
        cfg, world = model_shape(base).cfg, int(ranks)
        if cfg.num_experts % world:
            raise ValueError(f"name: {base}'s {cfg.num_experts} experts do not split over {world} ranks")
        return ModelShape(name, cfg.with_experts(cfg.num_experts // world))
    if name in MODELS:
        from comet.model_shapes import shape_config

        return ModelShape(name, _routed_experts(shape_config(MODELS[name])))
    if name in SMOKE_MODELS:
        from comet.tiny_models import tiny_config

        return ModelShape(name, _routed_experts(tiny_config(SMOKE_MODELS[name])))
    raise ValueError(f"name: expected one of {list(MODELS) + list(SMOKE_MODELS)}, got {name!r}")


def shape_names(requested: list[str] | None, smoke: bool) -> list[str]:
    """The benchmark names `requested` (any case; None: all) among MODELS, or SMOKE_MODELS for a
    smoke run. Raises ValueError naming the unknown ones and the choices."""
    names = list(SMOKE_MODELS if smoke else MODELS)
    by_key = {name.lower(): name for name in names}
    unknown = [n for n in requested or [] if n.lower() not in by_key]
    if unknown:
        raise ValueError(f"--shapes: unknown {unknown}; choose from {names}")
    return [by_key[n.lower()] for n in requested] if requested else names
