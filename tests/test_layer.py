"""MoELayer and the functional form: shapes, empty input, agreement, and clear errors on bad input."""
import pytest
import torch

import comet
from comet.reference import experts_reference, route

CFG = comet.MoEConfig(hidden_size=32, ffn_size=16, num_experts=8, top_k=2, shared_ffn_size=8)


def make_layer(**changes):
    return comet.MoELayer(CFG.replace(**changes) if changes else CFG, backend="reference")


def test_layer_keeps_leading_shape_and_matches_functional_form():
    layer = make_layer()
    x = torch.randn(2, 3, 5, 32)
    out = layer(x)
    assert out.shape == x.shape
    flat = x.reshape(-1, 32)
    logits = flat @ layer.router.weight.t()
    weights, ids = route(logits, CFG)
    w = layer.experts.weights()
    expected = experts_reference(flat, ids, weights, w.gate_up, w.down) + layer.shared_expert(flat)
    assert torch.allclose(out.reshape(-1, 32), expected, rtol=1e-5, atol=1e-6)
    routed = comet.moe(flat, layer.router.weight, w, CFG, backend="reference")
    assert torch.allclose(routed + layer.shared_expert(flat), out.reshape(-1, 32), rtol=1e-5, atol=1e-6)


def test_empty_input_gives_empty_output():
    layer = make_layer()
    out = layer(torch.randn(0, 32))
    assert out.shape == (0, 32)
    cfg, w = CFG, make_layer().experts.weights()
    out = comet.moe_experts(torch.randn(0, 32), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), w, cfg,
                            backend="reference")
    assert out.shape == (0, 32)


@pytest.mark.parametrize("field,value,message", [
    ("top_k", 9, "top_k (9) must be <= num_experts (8)"),
    ("hidden_size", 0, "hidden_size must be a positive int"),
    ("scoring", "relu", "scoring must be one of"),
    ("activation", "tanh", "activation must be one of"),
    ("n_group", 3, "n_group (3) must divide num_experts (8)"),
    ("shared_expert_gate", True, None),  # valid here: CFG has a shared expert
])
def test_config_validation(field, value, message):
    if message is None:
        CFG.replace(**{field: value})
        return
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CFG.replace(**{field: value})


def test_wrong_hidden_size():
    with pytest.raises(ValueError, match=r"hidden_states: expected last dimension 32 \(hidden_size\), got shape \(4, 31\)"):
        make_layer()(torch.randn(4, 31))


def test_non_floating_input():
    with pytest.raises(TypeError, match="hidden_states: expected a floating-point tensor, got dtype torch.int64"):
        make_layer()(torch.ones(4, 32, dtype=torch.long))


def test_dtype_mismatch():
    with pytest.raises(TypeError, match=r"hidden_states: dtype torch.float64 does not match the layer's weights \(torch.float32\)"):
        make_layer()(torch.randn(4, 32, dtype=torch.float64))


def test_device_mismatch():
    with pytest.raises(ValueError, match="hidden_states: on device meta but the layer's weights are on cpu"):
        make_layer()(torch.empty(4, 32, device="meta"))


def _functional_args(ids=None, weights=None):
    w = make_layer().experts.weights()
    ids = torch.randint(0, 8, (4, 2)) if ids is None else ids
    weights = torch.rand(4, 2) if weights is None else weights
    return torch.randn(4, 32), ids, weights, w, CFG


def test_expert_ids_out_of_range():
    ids = torch.tensor([[0, 1], [2, 8], [3, 4], [5, 6]])
    with pytest.raises(ValueError, match=r"topk_ids: expert ids must lie in \[0, 8\), got values in \[0, 8\]"):
        comet.moe_experts(*_functional_args(ids=ids), backend="reference")
    with pytest.raises(ValueError, match=r"got values in \[-1, 6\]"):
        comet.moe_experts(*_functional_args(ids=ids.clamp(max=6) - (ids == 0).long()), backend="reference")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_router_weights(bad):
    weights = torch.rand(4, 2)
    weights[2, 1] = bad
    with pytest.raises(ValueError, match="topk_weights: contains NaN or Inf"):
        comet.moe_experts(*_functional_args(weights=weights), backend="reference")


def test_top_k_larger_than_experts_in_routing():
    with pytest.raises(ValueError, match="topk_ids: top_k 9 is larger than the number of experts 8"):
        comet.moe_experts(*_functional_args(ids=torch.zeros(4, 9, dtype=torch.long), weights=torch.rand(4, 9)),
                          backend="reference")


def test_routing_shape_and_type_errors():
    with pytest.raises(TypeError, match="topk_ids: expected an integer tensor"):
        comet.moe_experts(*_functional_args(ids=torch.zeros(4, 2)), backend="reference")
    with pytest.raises(ValueError, match=r"topk_weights: expected the shape of topk_ids \(4, 2\), got \(4, 3\)"):
        comet.moe_experts(*_functional_args(weights=torch.rand(4, 3)), backend="reference")
    with pytest.raises(ValueError, match=r"topk_ids: expected shape \[4, top_k\], got \(3, 2\)"):
        comet.moe_experts(*_functional_args(ids=torch.zeros(3, 2, dtype=torch.long)), backend="reference")


def test_weight_shape_error():
    x, ids, weights, w, cfg = _functional_args()
    with pytest.raises(ValueError, match=r"weights.down: expected shape \(8, 32, 16\), got \(8, 16, 32\)"):
        comet.moe_experts(x, ids, weights, w._replace(down=w.down.transpose(1, 2)), cfg, backend="reference")


def test_unknown_backend_and_config_type():
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        comet.MoELayer(CFG, backend="cutlass")
    with pytest.raises(TypeError, match="config: expected a comet.MoEConfig"):
        comet.MoELayer({"hidden_size": 32})


def test_reference_backward_reaches_every_parameter():
    layer = make_layer(shared_expert_gate=True)
    x = torch.randn(6, 32, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
