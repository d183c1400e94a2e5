"""MoELayer and the functional form: shapes, empty input, agreement, and clear errors on bad input."""
import dataclasses
import os
import re
import subprocess
import sys

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


@pytest.mark.parametrize("field,value,error,message", [
    ("routed_scaling_factor", float("inf"), ValueError, "routed_scaling_factor must be a finite number > 0, got inf"),
    ("routed_scaling_factor", 0, ValueError, "routed_scaling_factor must be a finite number > 0, got 0"),
    ("routed_scaling_factor", "2", TypeError, "routed_scaling_factor must be a real number, got '2' (str)"),
    ("swiglu_alpha", float("nan"), ValueError, "swiglu_alpha must be a finite number > 0, got nan"),
    ("swiglu_limit", -5, ValueError, "swiglu_limit must be a finite number > 0, got -5"),
    ("sparsemixer_jitter_eps", -1, ValueError, "sparsemixer_jitter_eps must be a finite number >= 0, got -1"),
    ("shared_ffn_size", 8.5, TypeError, "shared_ffn_size must be an int, got 8.5 (float)"),
    ("shared_ffn_size", -1, ValueError, "shared_ffn_size must be an int >= 0, got -1"),
    ("ffn_size", True, TypeError, "ffn_size must be an int, got True (bool)"),
    ("norm_topk_prob", "no", TypeError, "norm_topk_prob must be a bool (True or False), got 'no' (str)"),
    ("expert_bias", 1, TypeError, "expert_bias must be a bool (True or False), got 1 (int)"),
    ("family", 3, TypeError, "family must be a str, got 3 (int)"),
])
def test_config_field_types_and_ranges(field, value, error, message):
    with pytest.raises(error, match=re.escape(f"MoEConfig.{message}")):
        CFG.replace(**{field: value})


def test_config_takes_numpy_numbers_as_python_ones():
    np = pytest.importorskip("numpy")
    cfg = comet.MoEConfig(hidden_size=np.int64(32), ffn_size=np.int32(16), num_experts=np.int64(8), top_k=np.int8(2),
                          routed_scaling_factor=np.float32(2.5), shared_ffn_size=np.uint16(8))
    assert cfg == CFG.replace(routed_scaling_factor=2.5)
    assert all(type(getattr(cfg, f)) is int for f in ("hidden_size", "ffn_size", "num_experts", "top_k", "shared_ffn_size"))
    assert type(cfg.routed_scaling_factor) is float
    x = torch.randn(5, 32)
    assert comet.MoELayer(cfg, backend="reference")(x).shape == x.shape


def _fp64_oracle(x, ids, weights, gate_up, down):
    """Token by token, slot by slot, in float64 (SwiGLU, gate rows first)."""
    f = down.shape[2]
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            h = gate_up[e] @ x[t]
            out[t] += weights[t, k] * (down[e] @ (torch.nn.functional.silu(h[:f]) * h[f:]))
    return out


def test_reference_computes_float64_in_float64():
    x = torch.randn(9, 32, dtype=torch.float64)
    ids = torch.rand(9, 8).argsort(dim=1)[:, :2]
    weights = torch.rand(9, 2, dtype=torch.float64)
    gate_up = torch.randn(8, 32, 32, dtype=torch.float64) / 32**0.5
    down = torch.randn(8, 32, 16, dtype=torch.float64) / 4
    expected = _fp64_oracle(x, ids, weights, gate_up, down)
    out = experts_reference(x, ids, weights, gate_up, down)
    assert out.dtype == torch.float64
    assert ((out - expected).norm() / expected.norm()).item() <= 1e-13
    layer = make_layer(shared_ffn_size=0).double()
    routed_weights, routed_ids = route(x @ layer.router.weight.t(), CFG)
    assert routed_weights.dtype == torch.float64
    w = layer.experts.weights()
    expected = _fp64_oracle(x, routed_ids, routed_weights, w.gate_up.detach(), w.down.detach())
    out = layer(x).detach()
    assert ((out - expected).norm() / expected.norm()).item() <= 1e-13


def test_functional_argument_types():
    x, ids, weights, w, cfg = _functional_args()
    with pytest.raises(TypeError, match=r"weights: expected a comet.ExpertWeights \(comet.ExpertWeights\(gate_up, "
                                        r"down, ...\)\), got tuple"):
        comet.moe_experts(x, ids, weights, tuple(w), cfg, backend="reference")
    with pytest.raises(TypeError, match=r"cfg: expected a comet.MoEConfig \(comet.MoEConfig\(\*\*fields\)\), got dict"):
        comet.moe_experts(x, ids, weights, w, dataclasses.asdict(cfg), backend="reference")
    with pytest.raises(TypeError, match="weights.down: expected a torch.Tensor, got NoneType"):
        comet.moe_experts(x, ids, weights, w._replace(down=None), cfg, backend="reference")
    with pytest.raises(TypeError, match="weights.gate_up: expected a torch.Tensor, got list"):
        comet.moe_experts(x, ids, weights, w._replace(gate_up=[1.0]), cfg, backend="reference")
    with pytest.raises(TypeError, match="weights.interleaved must be a bool"):
        comet.moe_experts(x, ids, weights, w._replace(interleaved="yes"), cfg, backend="reference")
    with pytest.raises(TypeError, match="check_values must be a bool"):
        comet.moe_experts(x, ids, weights, w, cfg, backend="reference", check_values=None)
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        comet.moe_experts(x, ids, weights, w, cfg, backend=None)
    router = torch.randn(8, 32)
    with pytest.raises(TypeError, match="cfg: expected a comet.MoEConfig"):
        comet.moe(x, router, w, {"hidden_size": 32})
    with pytest.raises(ValueError, match=r"router_weight: expected shape \(8, 32\), got \(32, 8\)"):
        comet.moe(x, router.t(), w, cfg)
    with pytest.raises(TypeError, match="router_bias: expected a torch.Tensor, got float"):
        comet.moe(x, router, w, cfg, router_bias=0.0)
    with pytest.raises(ValueError, match=r"correction_bias: expected shape \(8,\), got \(7,\)"):
        comet.moe(x, router, w, cfg, correction_bias=torch.zeros(7))
    out = comet.moe(x, router, w, cfg, router_bias=torch.zeros(8), backend="reference")
    weights, ids = route(x @ router.t(), cfg)
    assert torch.allclose(out, experts_reference(x, ids, weights, w.gate_up, w.down), rtol=1e-5, atol=1e-6)


def test_layer_argument_types():
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        comet.MoELayer(CFG, backend=None)
    with pytest.raises(TypeError, match="process_group: expected a torch.distributed.ProcessGroup, got str"):
        comet.MoELayer(CFG, process_group="world")


INTERPRETER_LATE = """
import os, torch, comet
layer = comet.MoELayer(comet.MoEConfig(hidden_size=8, ffn_size=4, num_experts=2, top_k=1), backend="triton")
for attempt in range(2):
    try:
        layer(torch.randn(3, 8))
    except RuntimeError as exc:
        print("error:", exc)
    os.environ["TRITON_INTERPRET"] = "1"  # too late: the kernels were imported by the first call
"""


def test_interpreter_set_too_late_is_explained():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path on any machine
    result = subprocess.run([sys.executable, "-c", INTERPRETER_LATE], env=env, capture_output=True, text=True,
                            timeout=300)
    errors = [line for line in result.stdout.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, result.stdout + result.stderr
    assert all("TRITON_INTERPRET=1 set before comet's kernels are imported" in e for e in errors), errors
    assert "setting it later in this process has no effect" in errors[0]
    assert "it was set after they were imported" in errors[1]
