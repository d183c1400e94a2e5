"""Every supported Hugging Face MoE family: a `MoELayer` built and loaded from one of its blocks
gives the block's output and gradients (fp32, eval mode), on tiny random models."""
import copy

import pytest
import torch

from comet import MoEConfig, MoELayer
from comet.hf_families import FAMILIES, config_from_hf, find_moe_blocks
from comet.reference import route
from comet.tiny_models import TINY_CONFIGS, build_tiny_model, tiny_config

transformers = pytest.importorskip("transformers")

RTOL = 1e-5  # fp32, same math up to summation order


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _fresh_seed() -> int:
    return int(torch.randint(2**31 - 1, ()))


def _hf_output(result, shape) -> torch.Tensor:
    """HF blocks return [B,S,H], [T,H], or a tuple led by one of these."""
    out = result[0] if isinstance(result, tuple) else result
    return out.reshape(shape)


def _to_hf_layout(family: str, name: str, ours: torch.Tensor) -> torch.Tensor:
    """Our gate-rows-first expert tensor (or its gradient) in the family's own layout."""
    fam = FAMILIES[family]
    if name in ("gate_up_proj", "gate_up_proj_bias") and fam.interleaved:
        gate, up = ours.chunk(2, dim=1)
        ours = torch.stack((gate, up), dim=2).flatten(1, 2)
    if name in ("gate_up_proj", "down_proj") and fam.transposed:
        ours = ours.transpose(1, 2)
    return ours


def _grad(p: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad


def _gradient_pairs(family: str, layer: MoELayer, block):
    """(name, our gradient in the family's layout, the block's gradient) for every loaded weight."""
    fam = FAMILIES[family]
    router = getattr(block, fam.router)
    yield "router.weight", _grad(layer.router.weight), _grad(router.weight)
    if layer.router.bias is not None:
        yield "router.bias", _grad(layer.router.bias), _grad(router.bias)
    ours = {"gate_up_proj": layer.experts.gate_up_proj, "down_proj": layer.experts.down_proj,
            "gate_up_proj_bias": layer.experts.gate_up_bias, "down_proj_bias": layer.experts.down_bias}
    for name, p in ours.items():
        if p is not None:
            yield f"experts.{name}", _to_hf_layout(family, name, _grad(p)), _grad(getattr(block.experts, name))
    if fam.shared_expert is not None:
        shared = getattr(block, fam.shared_expert)
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield (f"shared.{proj}", _grad(getattr(layer.shared_expert, proj).weight),
                   _grad(getattr(shared, proj).weight))
    if fam.shared_expert_gate is not None:
        yield ("shared_gate", _grad(layer.shared_expert.gate.weight),
               _grad(getattr(block, fam.shared_expert_gate).weight))


def _check_block(family: str, config, block):
    layer = MoELayer.from_hf_block(block, config, backend="reference")
    assert layer.config.family == family
    x = torch.randn(2, 7, layer.config.hidden_size)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_hf = _hf_output(block(x_hf), x.shape)
    out = layer(x_ours)
    assert _rel(out, out_hf) <= RTOL, f"{family}: output differs"

    g = torch.randn_like(out)
    (out_hf * g).sum().backward()
    (out * g).sum().backward()
    assert _rel(x_ours.grad, x_hf.grad) <= RTOL, f"{family}: input gradient differs"
    for name, ours, theirs in _gradient_pairs(family, layer, block):
        assert ours.shape == theirs.shape, name
        assert _rel(ours, theirs) <= RTOL, f"{family}: gradient of {name} differs"


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_family_matches_hf_block(family):
    model = build_tiny_model(family, seed=_fresh_seed())
    blocks = find_moe_blocks(model)
    assert blocks, f"{family}: no MoE block found"
    for _, block in blocks:
        _check_block(family, model.config, block)


@pytest.mark.parametrize("family, overrides", [
    ("mixtral", dict(num_experts_per_tok=1)),            # top-1, renormalised to weight 1
    ("qwen2_moe", dict(hidden_act="gelu")),              # geglu, in the shared expert too
    ("qwen3_moe", dict(norm_topk_prob=False)),
    ("deepseek_v2", dict(topk_method="group_limited_greedy")),  # group_score "max"
    ("deepseek_v3", dict(norm_topk_prob=False, n_shared_experts=2)),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_family_variant_matches_hf_block(family, overrides):
    model = build_tiny_model(family, seed=_fresh_seed(), **overrides)
    for _, block in find_moe_blocks(model):
        if overrides.get("topk_method") == "group_limited_greedy" and not _hf_runs(block, model.config):
            pytest.skip(f"transformers {transformers.__version__}: DeepseekV2Moe fails on group_limited_greedy")
        _check_block(family, model.config, block)


def _hf_runs(block, config) -> bool:
    try:
        block(torch.zeros(1, 1, config.hidden_size))
    except AttributeError:  # transformers 5.7 reads a `num_experts` its DeepseekV2Moe does not set
        return False
    return True


def test_tiny_models_are_offline_deterministic_fp32_eval():
    for family in TINY_CONFIGS:
        a, b = build_tiny_model(family, seed=3), build_tiny_model(family, seed=3)
        assert not a.training and all(p.dtype == torch.float32 for p in a.parameters()), family
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), f"{family}: {name} differs between two builds with one seed"
        expected = 1 if family.startswith("deepseek") else 2  # first_k_dense_replace=1
        assert len(find_moe_blocks(a)) == expected, family
        logits = a(torch.randint(0, a.config.vocab_size, (1, 6))).logits
        assert logits.shape == (1, 6, a.config.vocab_size) and torch.isfinite(logits).all(), family


def test_sparsemixer_matches_phimoe():
    """Phi-3.5's inference routing, on logits that put many experts inside the mask threshold."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    cfg = config_from_hf(tiny_config("phimoe"))
    logits = torch.cat([torch.randn(512, 8), torch.randn(512, 8) * 0.02 - 3, torch.randn(512, 8) * 0.02 + 1])
    weights, ids = route(logits, cfg)
    hf_weights, hf_ids = sparsemixer(logits, jitter_eps=cfg.sparsemixer_jitter_eps, training=False)
    assert torch.equal(ids, hf_ids)
    assert _rel(weights, hf_weights) <= RTOL


def test_llama4_multimodal_config_uses_text_config():
    text = {k: v for k, v in TINY_CONFIGS["llama4"].items() if k != "model_type"}
    full = transformers.AutoConfig.for_model("llama4", text_config=text)
    assert config_from_hf(full) == config_from_hf(tiny_config("llama4"))


def test_unsupported_config_raises():
    with pytest.raises(ValueError, match=r"'llama'.*supported.*mixtral"):
        config_from_hf(transformers.AutoConfig.for_model("llama"))
    with pytest.raises(ValueError, match="model_type None"):
        config_from_hf(object())
    with pytest.raises(ValueError, match="hidden_act.*'relu'"):
        config_from_hf(tiny_config("mixtral", hidden_act="relu"))
    with pytest.raises(ValueError, match="topk_method.*'noaux_tc'"):
        config_from_hf(tiny_config("deepseek_v2", topk_method="noaux_tc"))


def test_load_rejects_mismatched_or_bad_blocks():
    model = build_tiny_model("mixtral")
    config = model.config
    block = find_moe_blocks(model)[0][1]
    with pytest.raises(ValueError, match=r"experts.gate_up_proj: shape \(8, 64, 64\).*\(8, 96, 64\)"):
        MoELayer(config_from_hf(config).replace(ffn_size=48)).load_hf_block(block)
    with pytest.raises(ValueError, match="family is 'custom'"):
        MoELayer(MoEConfig(hidden_size=64, ffn_size=32, num_experts=8, top_k=2)).load_hf_block(block)
    with pytest.raises(ValueError, match="block: expected a Qwen2MoeSparseMoeBlock.*got MixtralSparseMoeBlock"):
        MoELayer(config_from_hf(config).replace(family="qwen2_moe")).load_hf_block(block)
    legacy = copy.deepcopy(block)
    legacy.experts = torch.nn.ModuleList()  # per-expert modules, as before transformers 5
    with pytest.raises(ValueError, match="block.experts: expected 3-D gate_up_proj and down_proj"):
        MoELayer.from_hf_block(legacy, config)
    with torch.no_grad():
        block.experts.down_proj[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="experts.down_proj: contains NaN or Inf"):
        MoELayer.from_hf_block(block, config)
    with pytest.raises(TypeError, match="block: expected a torch.nn.Module"):
        MoELayer(config_from_hf(config)).load_hf_block("not a block")
