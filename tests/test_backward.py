"""The routed experts' backward kernels (interpreter on CPU, compiled on GPU) against autograd
through the reference in float64: every gradient (x, routing weights, both weights, both biases),
every activation and layout, odd routings, determinism, and training through the layer."""
import dataclasses

import pytest
import torch

import comet
import comet.reference
from comet.reference import experts_reference
from conftest import DEVICE
import expert_cases
from expert_cases import assert_close, capture_without_host_sync

# Relative Frobenius error per gradient. fp32 allows for TF32 dot products on a GPU.
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 5e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def make_case(T, E, K, H=32, F=24, **kw):
    return expert_cases.make_case(T, E, K, H, F, bias_scale=0.5, swiglu_limit=1.5, **kw)


def leaves_of(x, weights, w):
    return [t for t in (x, weights, w.gate_up, w.down, w.gate_up_bias, w.down_bias) if t is not None]


def kernel_grads(cfg, x, ids, weights, w, grad_out, recompute=False):
    leaves = [t.detach().requires_grad_() for t in leaves_of(x, weights, w)]
    params = leaves[2:] + [None] * (6 - len(leaves))
    experts = comet.ExpertWeights(*params, interleaved=w.interleaved)
    out = comet.moe_experts(leaves[0], ids, leaves[1], experts, cfg, backend="triton", check_values=False,
                            recompute=recompute)
    return [out] + list(torch.autograd.grad(out, leaves, grad_out))


def oracle_grads(cfg, x, ids, weights, w, grad_out):
    """Autograd through the reference on float64 copies of every input."""
    leaves = [t.detach().double().requires_grad_() for t in leaves_of(x, weights, w)]
    params = leaves[2:] + [None] * (6 - len(leaves))
    out = experts_reference(leaves[0], ids, leaves[1], *params, activation=cfg.activation,
                            swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
                            interleaved=w.interleaved, weight_on_input=cfg.weight_on_input)
    return [out] + list(torch.autograd.grad(out, leaves, grad_out.double()))


def check(case, grad_out=None, **kw):
    cfg, x, ids, weights, w = case
    grad_out = torch.randn_like(x) if grad_out is None else grad_out
    got = kernel_grads(cfg, x, ids, weights, w, grad_out, **kw)
    want = oracle_grads(cfg, x, ids, weights, w, grad_out)
    names = ["out", "x", "topk_weights", "gate_up", "down", "gate_up_bias", "down_bias"]
    names = names[:3] + [n for n, t in zip(names[3:], (w.gate_up, w.down, w.gate_up_bias, w.down_bias))
                         if t is not None]
    for name, g, r in zip(names, got, want):
        assert g.shape == r.shape and g.dtype == (weights.dtype if name == "topk_weights" else x.dtype), name
        assert_close(g, r, TOL[x.dtype], name)
    return got


@pytest.mark.parametrize("activation,bias,interleaved,weight_on_input", expert_cases.VARIANTS)
def test_gradients_of_every_variant(activation, bias, interleaved, weight_on_input):
    # scale 3: pre-activations cross the clamped SwiGLU's limits, so its masked gradients are covered
    check(make_case(29, 6, 2, activation=activation, bias=bias, interleaved=interleaved,
                    weight_on_input=weight_on_input, scale=3.0))


@pytest.mark.parametrize("T,E,K", [(1, 4, 2), (1, 4, 1), (37, 4, 1), (19, 16, 8), (50, 8, 3)])
def test_token_and_expert_counts(T, E, K):
    """1 token, K = 1, tokens not a multiple of any tile, experts left without tokens (16 > 19 * 8 / ...)."""
    check(make_case(T, E, K))



@pytest.mark.parametrize("block_n", [64, 128, 256], ids=["epilogue_in_2_slices", "epilogue_in_4_slices",
                                                          "epilogue_in_8_slices"])
@pytest.mark.parametrize("interleaved,weight_on_input", [(False, False), (True, False), (False, True)])
def test_wide_down_dgrad_tiles(monkeypatch, block_n, interleaved, weight_on_input):
    """down_dgrad tiles of 64, 128 and 256 columns, whose epilogue runs in 32-column slices, over
    F = 72: the last N block is partly and some slices wholly past F."""
    import comet.ops
    from comet.kernels.expert_gemm import GemmConfig

    configs = comet.ops.backward_configs

    def wide(*args):
        return configs(*args)._replace(down_dgrad=GemmConfig(16, block_n, 32, group_m=2))
    monkeypatch.setattr(comet.ops, "backward_configs", wide)
    check(make_case(21, 4, 2, F=72, activation="geglu" if interleaved else "swiglu", bias=True,
                    interleaved=interleaved, weight_on_input=weight_on_input))

def test_expert_without_tokens_and_all_tokens_on_one_expert():
    T, E = 23, 5
    ids = torch.full((T, 1), 3, device=DEVICE)  # every token on expert 3; experts 0, 1, 2, 4 idle
    got = check(make_case(T, E, 1, ids=ids))
    d_gate_up, d_down = got[3], got[4]
    idle = [0, 1, 2, 4]
    assert (d_gate_up[idle] == 0).all() and (d_down[idle] == 0).all()  # written, as zeros


def test_skipped_ids_get_zero_weight_gradients():
    """Ids outside [0, E) (Hugging Face's expert-parallel convention) are skipped: their slots add
    nothing and their routing weights get a zero gradient."""
    cfg, x, ids, weights, w = make_case(17, 4, 2)
    ids[::3, 1] = -1
    ids[1::4, 0] = 4
    got = check((cfg, x, ids, weights, w))
    skipped = (ids < 0) | (ids >= 4)
    assert (got[2][skipped] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_gradients(dtype):
    check(make_case(40, 8, 2, dtype=dtype, bias=True))


def test_strided_and_transposed_inputs():
    """x as a column-major view, GPT-OSS's weights as transposed views of [E, H, 2F] / [E, F, H]."""
    cfg, x, ids, weights, w = make_case(21, 4, 2, activation="clamped_swiglu", bias=True, interleaved=True)
    x_col = x.t().contiguous().t()
    w_t = w._replace(gate_up=w.gate_up.transpose(1, 2).contiguous().transpose(1, 2),
                     down=w.down.transpose(1, 2).contiguous().transpose(1, 2))
    check((cfg, x_col, ids, weights, w_t))


def _wgrad_reference(sorted_op, gathered_op, sorted_rows, sorted_ids, top_k, num_experts, *,
                     gathered_weights=None, bias_weights=None):
    """fp64 oracle of a weight gradient: out[e] = sum over expert e's sorted positions p (row r) of
    sorted_op[p]^T gathered_op[r // top_k] (times gathered_weights[r]), bias[e] = sum of
    sorted_op[p] (times bias_weights[r]); skipped ids (outside 0..E-1) count nowhere."""
    s = sorted_op.double()
    g = gathered_op.double()[sorted_rows // top_k]
    if gathered_weights is not None:
        g = g * gathered_weights.double()[sorted_rows][:, None]
    bias_w = torch.ones_like(s[:, 0]) if bias_weights is None else bias_weights.double()[sorted_rows]
    out = s.new_zeros(num_experts, s.shape[1], g.shape[1])
    bias = s.new_zeros(num_experts, s.shape[1])
    for e in range(num_experts):
        rows = sorted_ids == e
        out[e] = s[rows].T @ g[rows]
        bias[e] = (s[rows] * bias_w[rows][:, None]).sum(0)
    return out, bias


@pytest.mark.parametrize("sorted_operand", ["a", "b"])
def test_weight_gradient_reads_no_unwritten_rows(sorted_operand):
    """`expert_wgrad` straight: ragged experts (one without rows), skipped ids whose sorted rows were
    never written (NaN here), the gathered operand and the bias on either side; poisoned outputs."""
    from comet.kernels.expert_backward import expert_wgrad
    from comet.kernels.expert_gemm import GemmConfig
    from comet.kernels.routing import sorted_routing_plan

    T, K, E, cols_sorted, cols_gathered = 19, 2, 4, 40, 24
    ids = torch.randint(0, E, (T, K), device=DEVICE)
    ids[ids == 2] = 1  # expert 2 gets no rows
    ids[0::5, 0] = -1
    ids[1::4, 1] = E
    sorted_rows, hist = sorted_routing_plan(ids.flatten(), E)
    sorted_ids = ids.flatten()[sorted_rows]
    s = torch.randn(T * K, cols_sorted, device=DEVICE)
    s[(sorted_ids < 0) | (sorted_ids >= E)] = float("nan")
    g = torch.randn(T, cols_gathered, device=DEVICE)
    w = torch.rand(T * K, device=DEVICE) + 0.1
    want, want_bias = _wgrad_reference(s, g, sorted_rows, sorted_ids, K, E, bias_weights=w)
    cfg = GemmConfig(16, 32, 16, group_m=1) if DEVICE == "cpu" else GemmConfig(64, 64, 32, group_m=1)
    if sorted_operand == "a":
        out = torch.full((E, cols_sorted, cols_gathered), float("nan"), device=DEVICE)
        operands, bias_of = (s, False, g, True), "a"
    else:
        out = torch.full((E, cols_gathered, cols_sorted), float("nan"), device=DEVICE)
        operands, bias_of = (g, True, s, False), "b"
        want = want.transpose(1, 2)
    bias = torch.full((E, cols_sorted), float("nan"), device=DEVICE)
    expert_wgrad(*operands, out, bias, sorted_rows, w, hist, top_k=K, bias_of=bias_of, weighted_bias=True, cfg=cfg)
    assert (out[2] == 0).all() and (bias[2] == 0).all()
    assert_close(out, want, TOL[torch.float32], "weight gradient")
    assert_close(bias, want_bias, TOL[torch.float32], "bias gradient")


def _odd_routing(kind):
    """(T, K, E, ids): "ragged": the middle expert without rows and skipped ids (< 0 and >= E, whose
    sorted rows lie before and after the experts'), "last_idle": the last expert without rows,
    "one_expert": every token on expert 3 of 5, "one_token": a single token; rows per expert not a
    multiple of any tile."""
    if kind == "one_expert":
        return 23, 1, 5, torch.full((23, 1), 3, device=DEVICE)
    if kind == "one_token":
        return 1, 2, 4, torch.tensor([[2, 0]], device=DEVICE)
    T, K, E = 19, 2, 4
    ids = torch.randint(0, E, (T, K), device=DEVICE)
    idle = 2 if kind == "ragged" else E - 1
    ids[ids == idle] = 1
    if kind == "ragged":
        ids[0::5, 0] = -1
        ids[1::4, 1] = E
    return T, K, E, ids


def _padded_layout(sorted_rows, hist, E, block):
    """[(expert, first sorted position, count, first padded row, padded rows)] of each expert."""
    layout, position, padded = [], int(hist[0]), 0
    for e in range(E):
        count = int(hist[1 + e])
        layout.append((e, position, count, padded, -(-count // block) * block))
        position, padded = position + count, padded + layout[-1][-1]
    return layout


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["ragged", "last_idle", "one_expert", "one_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gather_padded_rows_zero_pads_each_expert(kind, dtype, weighted):
    """x (column-major here) copied into sorted order in zero-padded expert segments of `block`
    rows (times the routing weights, rounded once); the rows past the last segment are left as
    they were (NaN)."""
    from comet.kernels.routing import gather_padded_rows, padded_rows, sorted_routing_plan

    T, K, E, ids = _odd_routing(kind)
    H, block = 40, 16
    sorted_rows, hist = sorted_routing_plan(ids.flatten(), E)
    x = torch.randn(H, T, device=DEVICE).to(dtype).t()
    w = torch.rand(T * K, device=DEVICE) + 0.1
    out = torch.full((padded_rows(T * K, E, block), H), float("nan"), dtype=dtype, device=DEVICE)
    assert gather_padded_rows(x, sorted_rows, hist, K, out, num_experts=E, block=block,
                              row_weights=w if weighted else None) is out
    end = 0
    for e, position, count, first, size in _padded_layout(sorted_rows, hist, E, block):
        rows = sorted_rows[position:position + count]
        want = x[rows // K]
        if weighted:  # one rounding to dtype (the interpreter's may round another way than torch's)
            want = (want.float() * w[rows][:, None]).to(dtype)
            torch.testing.assert_close(out[first:first + count], want, rtol=2 ** -7, atol=0, msg=str(e))
        else:
            assert torch.equal(out[first:first + count], want), e
        assert (out[first + count:first + size] == 0).all(), e
        end = first + size
    assert out[end:].isnan().all()
    with pytest.raises(ValueError):
        gather_padded_rows(x, sorted_rows, hist, K, out[:-1], num_experts=E, block=block)


@pytest.mark.parametrize("descriptors", [True, False], ids=["descriptor_loads", "pointer_loads"])
@pytest.mark.parametrize("weight_on_input", [False, True], ids=["weight_on_output", "weight_on_input"])
@pytest.mark.parametrize("kind", ["ragged", "last_idle", "one_expert", "one_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_padded_gate_up_wgrad_reads_no_unwritten_rows(kind, dtype, weight_on_input, descriptors):
    """`gate_up_wgrad` with x copied into zero-padded expert segments (both operands sorted, B's
    padding cancelling A's rows past each expert's end): its weight gradient equal to the gathered
    x's, it and the bias gradient within tolerance of the reference. NaN: the unwritten rows of
    d_pre_act (skipped ids), the padded buffer's rows past what the gather writes, the outputs
    before the call."""
    from comet.kernels.expert_backward import gate_up_wgrad
    from comet.kernels.expert_gemm import GemmConfig
    from comet.kernels.routing import gather_padded_rows, padded_rows, sorted_routing_plan

    T, K, E, ids = _odd_routing(kind)
    H, two_f = (24, 40) if DEVICE == "cpu" else (160, 96)  # neither a multiple of the tiles
    sorted_rows, hist = sorted_routing_plan(ids.flatten(), E)
    flat_ids = ids.flatten()
    sorted_ids = flat_ids[sorted_rows]
    x = torch.randn(T, H, device=DEVICE).to(dtype)
    d_pre = torch.randn(T * K, two_f, device=DEVICE).to(dtype)
    d_pre[(sorted_ids < 0) | (sorted_ids >= E)] = float("nan")
    w = torch.rand(T * K, device=DEVICE) + 0.1
    want, want_bias = _wgrad_reference(d_pre, x, sorted_rows, sorted_ids, K, E,
                                       gathered_weights=w if weight_on_input else None)
    cfg = GemmConfig(16, 32, 16, group_m=1) if DEVICE == "cpu" else GemmConfig(64, 64, 32, group_m=1)
    cfg = dataclasses.replace(cfg, weight_descriptors=descriptors)
    x_padded = torch.full((padded_rows(T * K, E, cfg.block_k), H), float("nan"), dtype=dtype, device=DEVICE)
    gather_padded_rows(x, sorted_rows, hist, K, x_padded, num_experts=E, block=cfg.block_k,
                       row_weights=w if weight_on_input else None)
    idle = [e for e in range(E) if not (flat_ids == e).any()]
    got = {}
    for path, xp in (("gathered", None), ("padded", x_padded)):
        out = torch.full((E, two_f, H), float("nan"), dtype=dtype, device=DEVICE)
        bias = torch.full((E, two_f), float("nan"), dtype=dtype, device=DEVICE)
        gate_up_wgrad(d_pre, x, sorted_rows, w, hist, out, bias, top_k=K, weight_on_input=weight_on_input, cfg=cfg,
                      x_padded=xp)
        assert (out[idle] == 0).all() and (bias[idle] == 0).all(), path
        assert_close(out, want, TOL[dtype], f"{path} weight gradient")
        assert_close(bias, want_bias, TOL[dtype], f"{path} bias gradient")
        got[path] = out
    # the same products in the same order (the bias sums differ: a dot with the padded B)
    assert torch.equal(got["padded"], got["gathered"]), "padded vs gathered weight gradient"


def _presorted_dw1(monkeypatch) -> list:
    """The backward's configs with dW1 over presorted x (`gate_up_wgrad_presorted`: the gathered
    path's config on CPU, 32 x 32 x 32 on a GPU) from now on; returns the list of the padded
    gathers' outputs it then runs."""
    import comet.ops

    from comet.kernels.expert_gemm import GemmConfig

    # the gathered path's tiles on CPU; on a GPU 32 x 32 (the gathered ones' stages need not fit
    # both operands); partial tiles on both ([2F, H] = [48, 32])
    configs, gather, gathered = comet.ops.backward_configs, comet.ops.gather_padded_rows, []
    on_gpu = GemmConfig(32, 32, 32, group_m=1)

    def presorted(*args):
        cfgs = configs(*args)
        return cfgs._replace(gate_up_wgrad_presorted=cfgs.gate_up_wgrad if DEVICE == "cpu" else on_gpu)

    monkeypatch.setattr(comet.ops, "backward_configs", presorted)
    monkeypatch.setattr(comet.ops, "gather_padded_rows",
                        lambda *args, **kwargs: gathered.append(gather(*args, **kwargs)) or gathered[-1])
    return gathered


@pytest.mark.parametrize("T,E,K,dtype,variant", [
    (1, 4, 2, torch.float32, {}),
    (37, 4, 1, torch.float32, dict(bias=True)),
    (29, 6, 2, torch.float32, dict(bias=True, weight_on_input=True)),
    (23, 5, 1, torch.float32, dict(ids="one_expert")),
    (40, 8, 2, torch.bfloat16, dict(bias=True)),
], ids=["one_token", "odd_tokens_bias", "weight_on_input", "one_expert", "bf16"])
@pytest.mark.parametrize("descriptors", [True, False], ids=["descriptor_loads", "pointer_loads"])
def test_presorted_wgrad_input_through_the_backward(monkeypatch, load_paths, T, E, K, dtype, variant, descriptors):
    """The backward with `BackwardConfigs.gate_up_wgrad_presorted`: x copied into zero-padded expert
    segments (a buffer of padded_rows(T*K, E, block_k) rows) before dW1: every gradient as the
    reference's."""
    from comet.kernels.routing import padded_rows

    load_paths(descriptors)
    gathered = _presorted_dw1(monkeypatch)
    variant = dict(variant)
    if variant.pop("ids", None) == "one_expert":
        variant["ids"] = torch.full((T, K), 3, device=DEVICE)
    check(make_case(T, E, K, dtype=dtype, **variant))
    import comet.ops

    block = comet.ops.backward_configs(T * K, E, 32, 24, dtype, torch.device(DEVICE)).gate_up_wgrad_presorted.block_k
    assert len(gathered) == 1 and gathered[0].shape == (padded_rows(T * K, E, block), 32)


@pytest.mark.skipif(DEVICE == "cpu", reason="a compiled pipeline's case (the interpreter runs none)")
@pytest.mark.parametrize("tiles", [(128, 256), (256, 128)], ids=["128x256", "256x128"])
def test_padded_gate_up_wgrad_with_bias_at_gpt_oss_size(tiles):
    """dW1 over presorted x with its bias gradient at GPT-OSS-20B's [2F, H] = [5760, 2880] (partial
    tiles both ways with 256-wide ones), 2048 tokens on 4 of 32 experts, 8 warps, 3 stages: where
    column sums of A's tiles in registers gave wrong weight gradients on an H200. The weight
    gradient bit-identical to the gathered x's (the same products in the same order), both
    gradients within bf16 tolerance of the oracle."""
    from comet.kernels.expert_backward import gate_up_wgrad
    from comet.kernels.expert_gemm import GemmConfig
    from comet.kernels.routing import gather_padded_rows, padded_rows, sorted_routing_plan

    T, K, E, H, two_f = 2048, 4, 32, 2880, 5760
    cfg = GemmConfig(*tiles, 64, group_m=1, num_warps=8, num_stages=3)
    ids = torch.rand(T, E, device=DEVICE).topk(K, dim=1).indices
    sorted_rows, hist = sorted_routing_plan(ids.flatten(), E)
    x = torch.randn(T, H, device=DEVICE).bfloat16()
    d_pre = torch.randn(T * K, two_f, device=DEVICE).bfloat16()
    want, want_bias = _wgrad_reference(d_pre, x, sorted_rows, ids.flatten()[sorted_rows], K, E)
    x_padded = gather_padded_rows(x, sorted_rows, hist, K, torch.empty(padded_rows(T * K, E, 64), H, dtype=x.dtype,
                                                                      device=DEVICE), num_experts=E, block=64)
    got = {}
    for path, xp in (("gathered", None), ("padded", x_padded)):
        out = torch.full((E, two_f, H), float("nan"), dtype=x.dtype, device=DEVICE)
        bias = torch.full((E, two_f), float("nan"), dtype=x.dtype, device=DEVICE)
        gate_up_wgrad(d_pre, x, sorted_rows, torch.ones(T * K, device=DEVICE), hist, out, bias, top_k=K,
                      weight_on_input=False, cfg=cfg, x_padded=xp)
        assert_close(out, want, TOL[torch.bfloat16], f"{path} weight gradient")
        assert_close(bias, want_bias, TOL[torch.bfloat16], f"{path} bias gradient")
        got[path] = out
    assert torch.equal(got["padded"], got["gathered"])


def test_padded_wgrad_refuses_a_weighted_bias():
    from comet.kernels.expert_backward import expert_wgrad
    from comet.kernels.expert_gemm import GemmConfig

    hist = torch.tensor([0, 4, 0, 0, 0, 0, 0, 0], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="padded_b takes no weighted_bias"):
        expert_wgrad(torch.ones(4, 16, device=DEVICE), False, torch.ones(16, 16, device=DEVICE), False,
                     torch.empty(4, 16, 16, device=DEVICE), torch.empty(4, 16, device=DEVICE),
                     torch.arange(4, device=DEVICE), torch.ones(4, device=DEVICE), hist, top_k=1,
                     weighted_bias=True, padded_b=True, cfg=GemmConfig(16, 16, 16, group_m=1))


def test_backward_configs_map_gemms_maps_every_config_and_keeps_none():
    import comet.ops
    from comet.kernels.expert_gemm import GemmConfig

    cfgs = comet.ops.backward_configs(64, 8, 32, 24, torch.float32, torch.device(DEVICE))
    if DEVICE == "cpu":
        assert cfgs.gate_up_wgrad_presorted is None  # the interpreter's heuristic gathers
    for presorted in (None, cfgs.gate_up_wgrad):
        mapped = cfgs._replace(gate_up_wgrad_presorted=presorted).map_gemms(
            lambda c: dataclasses.replace(c, num_stages=1))
        assert all(isinstance(c, GemmConfig) and c.num_stages == 1 for c in mapped[:4])
        assert (mapped.gate_up_wgrad_presorted is None) == (presorted is None)
        assert presorted is None or mapped.gate_up_wgrad_presorted.num_stages == 1


@pytest.mark.parametrize("descriptors", [True, False], ids=["descriptor_loads", "pointer_loads"])
def test_descriptor_and_pointer_loads(load_paths, descriptors):
    """Weights and the contiguous sorted operands through tensor descriptors, or plain pointers."""
    load_paths(descriptors)
    check(make_case(27, 4, 2, bias=True))


def test_recompute_gives_the_same_gradients():
    """Saving only the routing plan (GEMM1 again in the backward) gives bit-identical gradients."""
    cfg, x, ids, weights, w = make_case(25, 8, 2, bias=True)
    g = torch.randn_like(x)
    saved = kernel_grads(cfg, x, ids, weights, w, g)
    recomputed = kernel_grads(cfg, x, ids, weights, w, g, recompute=True)
    for a, b in zip(saved, recomputed):
        assert torch.equal(a, b)


def test_backward_is_deterministic():
    cfg, x, ids, weights, w = make_case(33, 4, 3, bias=True)
    g = torch.randn_like(x)
    first = kernel_grads(cfg, x, ids, weights, w, g)
    second = kernel_grads(cfg, x, ids, weights, w, g)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_backward_does_not_run_the_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the backward recomputed through comet.reference.experts_reference")

    cfg, x, ids, weights, w = make_case(12, 4, 2)
    g = torch.randn_like(x)
    want = oracle_grads(cfg, x, ids, weights, w, g)
    monkeypatch.setattr(comet.reference, "experts_reference", fail)
    for module in ("comet.ops", "comet.functional"):
        import importlib

        mod = importlib.import_module(module)
        if hasattr(mod, "experts_reference"):
            monkeypatch.setattr(mod, "experts_reference", fail)
    got = kernel_grads(cfg, x, ids, weights, w, g)
    assert ((got[1].double() - want[1]).norm() / want[1].norm()).item() <= TOL[x.dtype]


def test_direct_op_call_is_differentiable():
    """`torch.ops.comet.routed_experts` (inference op) also has a backward: it computes the plan and
    GEMM1's output again."""
    cfg, x, ids, weights, w = make_case(14, 4, 2)
    g = torch.randn_like(x)
    leaves = [t.detach().requires_grad_() for t in (x, weights, w.gate_up, w.down)]
    out = torch.ops.comet.routed_experts(leaves[0], ids, leaves[1], leaves[2], leaves[3], None, None, False,
                                         "swiglu", cfg.swiglu_alpha, cfg.swiglu_limit, False)
    got = torch.autograd.grad(out, leaves, g)
    want = oracle_grads(cfg, x, ids, weights, w, g)[1:]
    for a, b in zip(got, want):
        assert ((a.double() - b).norm() / b.norm()).item() <= TOL[x.dtype]


def _layer_pair(cfg):
    layer = comet.MoELayer(cfg, backend="triton").to(DEVICE)
    ref = comet.MoELayer(cfg, backend="reference").to(DEVICE)
    ref.load_state_dict(layer.state_dict())
    return layer, ref


def test_layer_with_shared_experts_trains_through_the_kernels():
    cfg = comet.MoEConfig(hidden_size=32, ffn_size=16, num_experts=8, top_k=2, shared_ffn_size=16,
                          shared_expert_gate=True)
    layer, ref = _layer_pair(cfg)
    x = torch.randn(3, 5, 32, device=DEVICE)
    for model in (layer, ref):
        (model(x) ** 2).sum().backward()
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        assert p.grad is not None, name
        assert ((p.grad - q.grad).norm() / q.grad.norm()).item() <= 1e-4, name


def test_compiled_training_step_without_graph_breaks():
    """The layer compiled with fullgraph=True (router, custom ops, shared expert in one graph); the
    backward runs AOTAutograd's compiled backward, which calls the backward op."""
    cfg = comet.MoEConfig(hidden_size=32, ffn_size=16, num_experts=4, top_k=2, shared_ffn_size=8)
    layer, ref = _layer_pair(cfg)
    x = torch.randn(9, 32, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    for _ in range(2):  # the second step reuses the compiled graphs
        for model in (compiled, ref):
            model.zero_grad()
            loss = (model(x) ** 2).mean()
            loss.backward()
        for p, q in zip(layer.parameters(), ref.parameters()):
            assert ((p.grad - q.grad).norm() / q.grad.norm()).item() <= 1e-4


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and sync checks need a GPU")
def test_cuda_graph_training_step_replays_without_host_sync():
    cfg, x, ids, weights, w = make_case(512, 16, 4, H=256, F=128, dtype=torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in leaves_of(x, weights, w)]
    g = torch.randn_like(x)
    experts = comet.ExpertWeights(*leaves[2:])

    def step():
        out = comet.moe_experts(leaves[0], ids, leaves[1], experts, cfg, backend="triton", check_values=False)
        return torch.autograd.grad(out, leaves, g)

    graph, grads = capture_without_host_sync(step)
    for _ in range(3):
        ids.copy_(torch.rand(512, 16, device=DEVICE).argsort(dim=1)[:, :4])
        for t in leaves[:2]:
            t.detach().copy_(torch.rand_like(t))
        graph.replay()
        want = oracle_grads(cfg, leaves[0].detach(), ids, leaves[1].detach(), w._replace(
            gate_up=leaves[2].detach(), down=leaves[3].detach()), g)[1:]
        for a, b in zip(grads, want):
            assert ((a.double() - b).norm() / b.norm()).item() <= TOL[torch.bfloat16]
