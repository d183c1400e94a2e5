"""Megatron-Core adapter: a tiny MoELayer (one process, gloo, every parallel size 1) patched by
`comet.integrations.megatron.apply` gives Megatron's own output (fp32), and `revert` restores it."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.fusions.fused_bias_geglu import quick_gelu  # noqa: E402
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec  # noqa: E402
from megatron.core.transformer.moe import experts as mcore_experts  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402
from megatron.core.transformer.moe.moe_layer import MoELayer  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from comet.integrations import megatron as comet_megatron  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
H, F_EXPERT, E, K = 32, 16, 4, 2


@pytest.fixture(scope="module", autouse=True)
def model_parallel(tmp_path_factory):
    """A one-rank world with every model-parallel size 1. Without a GPU, two shims: Megatron's
    router moves its weights to `torch.cuda.current_device()` on every call, and megatron-core
    0.16 without Transformer Engine reads an undefined `te_general_gemm`."""
    patches = pytest.MonkeyPatch()
    if not torch.cuda.is_available():
        patches.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    if not hasattr(moe_utils, "te_general_gemm"):
        patches.setattr(moe_utils, "te_general_gemm", None, raising=False)
    init_file = tmp_path_factory.mktemp("dist") / "init"
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                            init_method=f"file://{init_file}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    patches.undo()


def build_layer(grouped=False, use_te=False, **overrides) -> MoELayer:
    fields = dict(
        num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
        moe_ffn_hidden_size=F_EXPERT, ffn_hidden_size=F_EXPERT, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, bias_activation_fusion=False, use_cpu_initialization=True,
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none",
        params_dtype=torch.float32, init_method=lambda w: torch.nn.init.normal_(w, std=0.3),
        output_layer_init_method=lambda w: torch.nn.init.normal_(w, std=0.3),
    )
    fields.update(overrides)
    # A ModuleSpec in megatron-core 0.16, a functools.partial over MoELayer in 0.19: both build when called.
    build_moe = get_moe_module_spec(use_te=use_te, num_experts=E, moe_grouped_gemm=grouped)
    layer = build_moe(config=TransformerConfig(**fields)).to(DEVICE)
    with torch.no_grad():  # non-zero biases, so that the adapter has to honour them
        for name, p in layer.named_parameters():
            if name.endswith("bias") or "expert_bias" in name:
                p.normal_(std=0.3)
    return layer


def assert_close(actual, expected, rel=1e-5):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * scale, f"max abs err {err:.3e} vs scale {scale:.3e}"


def run_both(layer, x, backend="reference"):
    """(Megatron's output, the patched output) of one layer on one input."""
    with torch.no_grad():
        expected, _ = layer(x)
        comet_megatron.apply(layer, backend=backend)
        actual, bias = layer(x)
    assert bias is None
    return expected, actual


CASES = {
    "swiglu": {},
    "geglu_bias": dict(activation_func=F.gelu, add_bias_linear=True),
    "shared_expert_gate": dict(moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True),
    "sigmoid_expert_bias_scaled": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                       moe_router_topk_scaling_factor=2.5),
    "gpt_oss_clamp": dict(activation_func=quick_gelu, activation_func_clamp_value=7.0, glu_linear_offset=1.0,
                          add_bias_linear=True),
    "probs_on_input_top1": dict(moe_router_topk=1, moe_router_pre_softmax=True, moe_apply_probs_on_input=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_layer_matches_megatron(case):
    layer = build_layer(**CASES[case])
    x = torch.randn(6, 3, H, device=DEVICE)
    expected, actual = run_both(layer, x)
    assert type(layer).__name__ == "CometMoELayer"
    assert_close(actual, expected)


@pytest.mark.parametrize("case", ["swiglu", "gpt_oss_clamp"])
def test_triton_backend_through_the_adapter(case):
    """The kernels on the stacked Megatron weights (under the interpreter without a GPU)."""
    layer = build_layer(**CASES[case])
    x = torch.randn(4, 2, H, device=DEVICE)
    expected, actual = run_both(layer, x, backend="triton")
    assert type(layer).__name__ == "CometMoELayer"
    assert_close(actual, expected)


def test_revert_restores_class_and_output():
    layer = build_layer()
    x = torch.randn(5, 2, H, device=DEVICE)
    expected, _ = run_both(layer, x)
    comet_megatron.revert(layer)
    assert type(layer) is MoELayer and "_comet_config" not in layer.__dict__
    with torch.no_grad():
        again, _ = layer(x)
    assert torch.equal(again, expected)
    with pytest.raises(ValueError, match="not patched"):
        comet_megatron.revert(layer)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_match_megatron(backend):
    """Both backends are differentiable: input, expert and router gradients equal Megatron's."""
    layer = build_layer(moe_shared_expert_intermediate_size=24)
    x = torch.randn(4, 2, H, device=DEVICE)
    grad_out = torch.randn_like(x)
    grads = []
    for patched in (False, True):
        if patched:
            comet_megatron.apply(layer, backend=backend)
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        out.backward(grad_out)
        grads.append((xi.grad, layer.experts.local_experts[1].linear_fc1.weight.grad, layer.router.weight.grad))
    for actual, expected in zip(grads[1], grads[0]):
        assert_close(actual, expected)


@pytest.mark.skipif(not hasattr(mcore_experts, "GroupedMLP"), reason="GroupedMLP is gone in this megatron-core")
def test_grouped_mlp_layout(monkeypatch):
    """Legacy GroupedMLP (0.16): Megatron's own forward, with only its grouped-GEMM kernel (the
    grouped_gemm package, absent here) replaced by a loop, against the patched layer."""
    from megatron.core.transformer.moe import grouped_gemm_util as gg

    def gmm(x, w, tokens_per_expert, trans_b=False):
        rows = torch.split(x, tokens_per_expert.tolist())
        return torch.cat([r @ (w[e].t() if trans_b else w[e]) for e, r in enumerate(rows)])

    monkeypatch.setattr(gg, "assert_grouped_gemm_is_available", lambda: None)
    monkeypatch.setattr(gg, "ops", type("ops", (), {"gmm": staticmethod(gmm)}), raising=False)
    layer = build_layer(grouped=True, bf16=True)  # GroupedMLP asserts bf16 mode; params stay fp32
    assert isinstance(layer.experts, mcore_experts.GroupedMLP)
    x = torch.randn(6, 2, H, device=DEVICE)
    expected, actual = run_both(layer, x)
    assert_close(actual, expected)


@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
                    reason="TEGroupedMLP needs a GPU and Transformer Engine")
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_te_grouped_mlp(backend):
    layer = build_layer(grouped=True, use_te=True, add_bias_linear=False)
    assert isinstance(layer.experts, mcore_experts.TEGroupedMLP)
    x = torch.randn(8, 2, H, device=DEVICE)
    expected, actual = run_both(layer, x, backend=backend)
    assert_close(actual, expected, rel=2e-3)  # Transformer Engine may run fp32 GEMMs in TF32


def test_unsupported_configs_raise():
    layer = build_layer(gated_linear_unit=False)
    with pytest.raises(NotImplementedError, match="activation"):
        comet_megatron.apply(layer)
    # Options new in megatron-core 0.19, set on a built layer's config so that 0.16 checks them too.
    for field, value in (("expert_gtp_weight_remat_size", 2), ("moe_expert_rank_capacity_factor", 1.0)):
        layer = build_layer()
        setattr(layer.config, field, value)
        with pytest.raises(NotImplementedError, match=field):
            comet_megatron.apply(layer)
    with pytest.raises(ValueError, match="no megatron.core MoELayer"):
        comet_megatron.apply(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        comet_megatron.apply(build_layer(), backend="nope")


def test_routing_from_map_pads_short_rows_with_zero_weight():
    routing_map = torch.tensor([[True, False, True, False], [False, False, False, True], [False] * 4])
    probs = torch.tensor([[0.6, 0.0, 0.4, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0] * 4])
    ids, weights = comet_megatron.routing_from_map(probs, routing_map, 2)
    dense = torch.zeros(3, 4).scatter_add(1, ids, weights)
    assert torch.equal(dense, probs)
