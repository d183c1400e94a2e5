"""Random routed-expert problems that the forward and backward kernel tests share."""
import torch

import comet
from conftest import DEVICE

# (activation, bias, interleaved gate/up, weight on the input): every kind of expert the kernels run
VARIANTS = [
    ("swiglu", False, False, False),
    ("swiglu", True, False, False),
    ("geglu", False, False, False),
    ("geglu", True, True, False),
    ("clamped_swiglu", True, True, False),
    ("clamped_swiglu", False, False, False),
    ("swiglu", False, False, True),
    ("swiglu", True, False, True),
]


def make_case(T, E, K, H=64, F=48, dtype=torch.float32, activation="swiglu", bias=False, interleaved=False,
              weight_on_input=False, ids=None, scale=1.0, bias_scale=1.0, swiglu_limit=7.0):
    """(MoEConfig, x [T, H], ids [T, K] (distinct experts per token unless given), routing weights
    [T, K] in [0.1, 1.1), ExpertWeights) of fresh random values; x times `scale`, biases times
    `bias_scale`."""
    cfg = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=K, activation=activation,
                          expert_bias=bias, weight_on_input=weight_on_input, swiglu_limit=swiglu_limit)
    x = (torch.randn(T, H, device=DEVICE) * scale).to(dtype)
    if ids is None:
        ids = torch.rand(T, E, device=DEVICE).argsort(dim=1)[:, :K]
    weights = torch.rand(T, K, device=DEVICE) + 0.1
    w = comet.ExpertWeights(
        (torch.randn(E, 2 * F, H, device=DEVICE) * H**-0.5).to(dtype),
        (torch.randn(E, H, F, device=DEVICE) * F**-0.5).to(dtype),
        (torch.randn(E, 2 * F, device=DEVICE) * bias_scale).to(dtype) if bias else None,
        (torch.randn(E, H, device=DEVICE) * bias_scale).to(dtype) if bias else None,
        interleaved,
    )
    return cfg, x, ids, weights, w


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, name: str = "output") -> float:
    """Finite, and within `tol` in relative Frobenius error of `want`; returns the error."""
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol}"
    return err


def capture_without_host_sync(fn):
    """(CUDA graph, its outputs) of `fn()`: called once with host syncs made errors (a sync fails
    the test), once on a side stream (as capture wants), then captured. CUDA only."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
