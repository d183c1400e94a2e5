"""Triton expert kernels against the fp32 reference (interpreter on CPU, compiled on GPU)."""
import pytest
import torch

import comet
from comet.reference import experts_reference
from conftest import DEVICE
from expert_cases import VARIANTS, assert_close, capture_without_host_sync, make_case

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def reference(cfg, x, ids, weights, w):
    out = experts_reference(x.float(), ids, weights, w.gate_up.float(), w.down.float(),
                            None if w.gate_up_bias is None else w.gate_up_bias.float(),
                            None if w.down_bias is None else w.down_bias.float(),
                            activation=cfg.activation, swiglu_alpha=cfg.swiglu_alpha,
                            swiglu_limit=cfg.swiglu_limit, interleaved=w.interleaved,
                            weight_on_input=cfg.weight_on_input)
    return out


def check(cfg, x, ids, weights, w):
    out = comet.moe_experts(x, ids, weights, w, cfg, backend="triton")
    assert out.shape == x.shape and out.dtype == x.dtype
    assert_close(out, reference(cfg, x, ids, weights, w), TOL[x.dtype])
    return out


@pytest.mark.parametrize("activation,bias,interleaved,weight_on_input", VARIANTS)
def test_activation_and_bias_variants(activation, bias, interleaved, weight_on_input):
    check(*make_case(45, 8, 2, activation=activation, bias=bias, interleaved=interleaved,
                     weight_on_input=weight_on_input))


@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (1, 4, 1), (37, 4, 1), (33, 16, 8), (70, 64, 4), (20, 256, 8)])
def test_token_and_expert_counts(T, E, K):
    check(*make_case(T, E, K))


def test_gpt_oss_transposed_interleaved_layout():
    """GPT-OSS stores gate_up as [E, H, 2F] with gate/up interleaved: passed as a transposed view."""
    cfg, x, ids, weights, w = make_case(41, 8, 4, activation="clamped_swiglu", bias=True, interleaved=True)
    hf_layout = w.gate_up.transpose(1, 2).contiguous()  # [E, H, 2F]
    check(cfg, x, ids, weights, w._replace(gate_up=hf_layout.transpose(1, 2),
                                           down=w.down.transpose(1, 2).contiguous().transpose(1, 2)))


@pytest.mark.parametrize("descriptors", [True, False], ids=["descriptor_loads", "pointer_loads"])
@pytest.mark.parametrize("layout", ["standard", "gpt_oss", "transposed"])
def test_weight_load_paths(load_paths, descriptors, layout):
    """Weights and GEMM2's input through tensor descriptors (weights K- or N-contiguous) and
    through plain pointers agree."""
    import comet.kernels.expert_gemm as expert_gemm
    import comet.ops
    from comet.kernels.routing import histogram_bins

    load_paths(descriptors)
    gpt_oss = layout == "gpt_oss"
    cfg, x, ids, weights, w = make_case(37, 8, 2, H=48, F=40, activation="clamped_swiglu" if gpt_oss else "swiglu",
                                        bias=gpt_oss, interleaved=gpt_oss)
    if layout != "standard":  # Hugging Face's [E, H, 2F] / [E, F, H] storage, passed as transposed views
        w = w._replace(gate_up=w.gate_up.transpose(1, 2).contiguous().transpose(1, 2),
                       down=w.down.transpose(1, 2).contiguous().transpose(1, 2))
    layout_mode = 1 if layout == "standard" else 2
    assert expert_gemm.weight_descriptor_mode(w.down, w.down, 16) == layout_mode
    rows = x.shape[0] * 2
    act = torch.empty(rows, 40, device=DEVICE)
    assert expert_gemm.input_descriptor_mode(act, False, 16)
    assert not expert_gemm.input_descriptor_mode(act, True, 16)  # gathered rows: pointers
    # What the kernels get under the configs the layer picks: GEMM2's weights and input, GEMM1's input.
    gemm1_cfg, gemm2_cfg = comet.ops.select_configs(rows, 8, 48, 40, x.dtype, x.device)
    out = torch.empty(rows, 48, device=DEVICE)
    plan = (torch.arange(rows, device=DEVICE), torch.ones(rows, device=DEVICE),
            torch.zeros(histogram_bins(8), dtype=torch.int32, device=DEVICE))
    down = expert_gemm.GemmProblem.down(act, w.down, None, *plan, out, top_k=2, weight_on_input=False, cfg=gemm2_cfg)
    assert down.b_desc == (layout_mode if descriptors else 0)
    assert down.a_desc == descriptors
    gate_up = expert_gemm.GemmProblem.gate_up(x, w.gate_up, None, gpt_oss, *plan, act, top_k=2, activation="swiglu",
                                              alpha=0.0, limit=0.0, weight_on_input=False, cfg=gemm1_cfg)
    assert not gate_up.a_desc  # gathered rows: pointers
    check(cfg, x, ids, weights, w)


def test_weight_descriptor_mode_falls_back_on_unaligned_strides_and_small_tiles():
    from comet.kernels.expert_gemm import weight_descriptor_mode

    odd = torch.randn(4, 6, 7, device=DEVICE)  # rows of 7 floats: 28 bytes, not a multiple of 16
    assert weight_descriptor_mode(odd, odd, 128) == 0
    assert weight_descriptor_mode(odd[:, :, :4], odd[:, :, :4], 128) == 0
    aligned = torch.randn(4, 8, 8, device=DEVICE)
    assert weight_descriptor_mode(aligned, aligned, 128) == 1
    assert weight_descriptor_mode(aligned, aligned, 16) == 0  # decode-sized tiles stream faster with pointers


def test_kernel_args_are_one_gemm_tuple():
    """A GEMM reaches its kernels as one `gemm` argument (GemmArgs): every field given, the
    constexpr ones as tl.constexpr; without A's address (a_address=False) its a_ptr is None."""
    import triton.language as tl

    from comet.kernels.expert_gemm import GEMM_CONSTEXPRS, GemmArgs, GemmConfig, GemmProblem
    from comet.kernels.routing import histogram_bins

    rows, e, h, f = 12, 4, 32, 16
    problem = GemmProblem.down(torch.randn(rows, f, device=DEVICE), torch.randn(e, h, f, device=DEVICE), None,
                               torch.arange(rows, device=DEVICE), torch.ones(rows, device=DEVICE),
                               torch.zeros(histogram_bins(e), dtype=torch.int32, device=DEVICE),
                               torch.empty(rows, h, device=DEVICE), top_k=2, weight_on_input=False,
                               cfg=GemmConfig(16, 32, 16, num_warps=2, num_stages=1))
    args = problem.kernel_args()
    assert args.keys() == {"gemm", "num_warps", "num_stages"} and (args["num_warps"], args["num_stages"]) == (2, 1)
    gemm = args["gemm"]
    assert isinstance(gemm, GemmArgs) and gemm.a_ptr is problem.a
    for name, value in gemm._asdict().items():
        assert isinstance(value, tl.constexpr) == (name in GEMM_CONSTEXPRS), name
    assert "BLOCK_M" in GEMM_CONSTEXPRS and "N" not in GEMM_CONSTEXPRS
    assert (gemm.BLOCK_M.value, gemm.SCATTER_OUT.value, gemm.N, gemm.K) == (16, True, h, f)
    assert problem.kernel_args(a_address=False)["gemm"].a_ptr is None
    with pytest.raises(TypeError, match="no_such_option"):
        GemmArgs.make(**{name: 0 for name in GemmArgs._fields}, no_such_option=1)


def test_expert_with_no_tokens():
    ids = torch.randint(0, 3, (29, 2), device=DEVICE)  # experts 3..7 get nothing
    ids[:, 1] = (ids[:, 0] + 1) % 3
    check(*make_case(29, 8, 2, ids=ids))


def test_all_tokens_on_one_expert():
    ids = torch.full((50, 1), 5, device=DEVICE)
    check(*make_case(50, 8, 1, ids=ids))


def test_odd_hidden_and_ffn_sizes():
    check(*make_case(19, 8, 2, H=40, F=24))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    check(*make_case(40, 8, 2, dtype=dtype))


def test_hf_expert_parallel_ids_are_skipped():
    """Hugging Face marks experts of other ranks with ids >= E (weight 0); they contribute nothing."""
    cfg, x, ids, weights, w = make_case(30, 8, 2)
    ids[::3, 1] = 8
    out = comet.moe_experts(x, ids, weights, w, cfg, backend="triton", check_values=False)
    ref = reference(cfg, x, ids, weights, w)
    assert torch.isfinite(out).all()
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_deterministic():
    cfg, x, ids, weights, w = make_case(64, 8, 4)
    first = comet.moe_experts(x, ids, weights, w, cfg, backend="triton")
    second = comet.moe_experts(x, ids, weights, w, cfg, backend="triton")
    assert torch.equal(first, second)


def test_kernels_write_every_output_element():
    """Poisoned buffers: every element the kernels own is overwritten, nothing else is touched."""
    from comet.kernels.combine import combine_slots
    from comet.kernels.expert_gemm import down_gemm, gate_up_gemm
    from comet.scheduler.configs import select_configs
    from comet.scheduler.routing import analyze_routing

    cfg, x, ids, weights, w = make_case(23, 8, 2)
    ids[0, 1] = 8  # a skipped slot: its row must stay untouched
    T, K, E, F, H = 23, 2, 8, cfg.ffn_size, cfg.hidden_size
    plan = analyze_routing(ids, E)
    c1, c2 = select_configs(T * K, E, H, F, x.dtype, x.device)
    rw = weights.reshape(-1).float()
    act = torch.full((T * K, F), float("nan"), device=DEVICE)
    gate_up_gemm(x, w.gate_up, None, False, plan.sorted_rows, rw, plan.hist, act, top_k=K, activation="swiglu",
                 alpha=0.0, limit=0.0, weight_on_input=False, cfg=c1)
    assert torch.isfinite(act[:-1]).all() and torch.isnan(act[-1]).all()  # the skipped row sorts last
    slots = torch.full((T * K, H), float("nan"), device=DEVICE)
    down_gemm(act, w.down, None, plan.sorted_rows, rw, plan.hist, slots, top_k=K, weight_on_input=False, cfg=c2)
    assert torch.isnan(slots[1]).all()
    assert torch.isfinite(slots[torch.arange(T * K, device=DEVICE) != 1]).all()
    out = combine_slots(slots, ids, E, torch.full((T, H), float("nan"), device=DEVICE))
    assert torch.isfinite(out).all()


def test_routing_histogram_guards():
    from comet.kernels.routing import expert_histogram

    ids = torch.tensor([[0, 3], [3, 9], [-1, 2], [2, 2]], device=DEVICE)
    hist = expert_histogram(ids, 4)
    assert hist[:6].tolist() == [1, 1, 0, 3, 2, 1]
    assert hist[6:-1].sum().item() == 0  # the last bin only takes masked-off lanes
    far = expert_histogram(torch.tensor([2**32, -(2**32) + 1, 3], device=DEVICE), 4)  # int64 ids past int32
    assert far[:6].tolist() == [1, 0, 0, 0, 1, 1]


@pytest.mark.parametrize("num_ids,num_experts", [(1, 4), (37, 8), (300, 256), (4096, 64)])
def test_small_routing_plan_matches_sort_and_histogram(num_ids, num_experts, monkeypatch):
    """The one-launch plan of small batches: the stable argsort and the histogram of larger ones."""
    from comet.kernels import routing
    from comet.scheduler.routing import analyze_routing

    ids = torch.randint(-1, num_experts + 1, (num_ids,), device=DEVICE)  # with both guards
    ids[: num_ids // 2] = torch.randint(0, 2, (num_ids // 2,), device=DEVICE)  # crowded experts: ties
    small = analyze_routing(ids, num_experts)
    monkeypatch.setattr(routing, "SMALL_ROUTING_ROWS", 0)
    large = analyze_routing(ids, num_experts)
    assert torch.equal(small.sorted_rows, torch.argsort(ids, stable=True))
    assert torch.equal(small.sorted_rows, large.sorted_rows)
    # The last bin also counts masked-off lanes, differently per path: compare the real bins.
    assert torch.equal(small.hist[: num_experts + 2], large.hist[: num_experts + 2])


def test_backward_matches_reference():
    cfg, x, ids, weights, w = make_case(21, 8, 2, bias=True)
    leaves = [x, weights, w.gate_up, w.down, w.gate_up_bias, w.down_bias]
    for t in leaves:
        t.requires_grad_()
    g = torch.randn_like(x)
    grads = torch.autograd.grad((comet.moe_experts(x, ids, weights, w, cfg, backend="triton") * g).sum(), leaves)
    ref_grads = torch.autograd.grad((reference(cfg, x, ids, weights, w) * g).sum(), leaves)
    for a, b in zip(grads, ref_grads):
        assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_layer_with_triton_backend_matches_reference():
    cfg = comet.MoEConfig(hidden_size=64, ffn_size=32, num_experts=8, top_k=2, shared_ffn_size=16,
                          shared_expert_gate=True)
    layer = comet.MoELayer(cfg, backend="triton").to(DEVICE)
    x = torch.randn(3, 7, 64, device=DEVICE)
    ref_layer = comet.MoELayer(cfg, backend="reference").to(DEVICE)
    ref_layer.load_state_dict(layer.state_dict())
    out, ref = layer(x), ref_layer(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_compiles_without_graph_breaks():
    cfg, x, ids, weights, w = make_case(16, 8, 2)
    fn = torch.compile(lambda *a: comet.moe_experts(*a, cfg, backend="triton", check_values=False),
                       fullgraph=True, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    out = fn(x, ids, weights, w)
    assert ((out - reference(cfg, x, ids, weights, w)).norm() / out.norm()).item() <= 1e-5


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs and sync checks need a GPU")
def test_cuda_graph_replay_with_new_routings_and_no_host_sync():
    cfg, x, ids, weights, w = make_case(256, 16, 4, H=256, F=128, dtype=torch.bfloat16)
    fn = lambda: comet.moe_experts(x, ids, weights, w, cfg, backend="triton", check_values=False)  # noqa: E731
    graph, out = capture_without_host_sync(fn)
    for _ in range(5):
        ids.copy_(torch.rand(256, 16, device=DEVICE).argsort(dim=1)[:, :4])
        weights.copy_(torch.rand(256, 4, device=DEVICE))
        x.copy_(torch.randn_like(x))
        graph.replay()
        ref = reference(cfg, x, ids, weights, w)
        assert ((out.float() - ref).norm() / ref.norm()).item() <= TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inputs_of_any_strides(dtype):
    """x (column-major, strided columns, strided rows), the routing and the weights as views
    (transposed, sliced) give the reference's result; the output is row-major whatever x's strides."""
    T, E, K, H, F = 29, 8, 2, 64, 48
    cfg, x, ids, weights, w = make_case(T, E, K, H=H, F=F, dtype=dtype, bias=True)
    ids = torch.stack([ids, torch.zeros_like(ids)], dim=0)[0].t().contiguous().t()  # column-major ids
    weights = weights.t().contiguous().t()
    w = w._replace(gate_up=torch.cat([w.gate_up, torch.randn_like(w.gate_up)], dim=2)[:, :, :H],  # row stride 2H
                   down=w.down.transpose(1, 2).contiguous().transpose(1, 2),
                   gate_up_bias=w.gate_up_bias.t().contiguous().t(), down_bias=w.down_bias.t().contiguous().t())
    for view in (x.t().contiguous().t(),  # column-major
                 torch.stack([x, torch.randn_like(x)], dim=-1)[..., 0],  # column stride 2
                 torch.cat([x, torch.randn_like(x)], dim=1)[:, :H]):  # row stride 2H
        out = check(cfg, view, ids, weights, w)
        assert out.is_contiguous()


def test_layer_with_column_major_hidden_states():
    cfg = comet.MoEConfig(hidden_size=64, ffn_size=32, num_experts=8, top_k=2)
    layer = comet.MoELayer(cfg, backend="triton").to(DEVICE)
    ref_layer = comet.MoELayer(cfg, backend="reference").to(DEVICE)
    ref_layer.load_state_dict(layer.state_dict())
    for x in (torch.randn(64, 19, device=DEVICE).t(), torch.randn(5, 64, 3, device=DEVICE).transpose(1, 2)):
        out, ref = layer(x), ref_layer(x)
        assert out.shape == x.shape
        assert ((out - ref).norm() / ref.norm()).item() <= TOL[torch.float32]


def test_routing_plan_of_strided_ids():
    """A column of a wider routing (a strided view) is sorted as its values, on both paths."""
    from comet.kernels import routing
    from comet.scheduler.routing import analyze_routing

    ids = torch.randint(0, 8, (37, 2), device=DEVICE)[:, 1:]  # [37, 1], stride 2: reshape(-1) is a strided view
    expected = torch.argsort(ids.reshape(-1), stable=True)
    assert torch.equal(analyze_routing(ids, 8).sorted_rows, expected)
    saved = routing.SMALL_ROUTING_ROWS
    try:
        routing.SMALL_ROUTING_ROWS = 0
        plan = analyze_routing(ids, 8)
    finally:
        routing.SMALL_ROUTING_ROWS = saved
    assert torch.equal(plan.sorted_rows, expected)
    assert plan.hist[1:9].tolist() == torch.bincount(ids.reshape(-1), minlength=8).tolist()


def test_combine_of_strided_buffers():
    from comet.kernels.combine import combine_slots

    T, K, H, E = 21, 3, 40, 8
    ids = torch.randint(-1, E + 1, (K, T), device=DEVICE).t()  # column-major, with skipped ids
    y = torch.randn(H, T * K, device=DEVICE).t()
    out = combine_slots(y, ids, E, torch.full((H, T), float("nan"), device=DEVICE).t())
    routed = ((ids >= 0) & (ids < E)).unsqueeze(-1)
    expected = (y.reshape(T, K, H) * routed).sum(dim=1)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_gemm_launcher_refuses_an_output_it_cannot_address():
    from comet.kernels.expert_gemm import gate_up_gemm
    from comet.scheduler.configs import select_configs
    from comet.scheduler.routing import analyze_routing

    cfg, x, ids, weights, w = make_case(9, 4, 2)
    plan = analyze_routing(ids, 4)
    c1, _ = select_configs(18, 4, 64, 48, x.dtype, x.device)
    act = torch.empty(48, 18, device=DEVICE).t()  # column-major
    with pytest.raises(ValueError, match=r"out: expected unit stride along its last dimension, got strides \(1, 18\)"):
        gate_up_gemm(x, w.gate_up, None, False, plan.sorted_rows, weights.reshape(-1), plan.hist, act, top_k=2,
                     activation="swiglu", alpha=0.0, limit=0.0, weight_on_input=False, cfg=c1)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32])
def test_expert_ids_of_unsigned_dtypes(dtype):
    """Unsigned ids (signed ones of any width worked already) on both backends."""
    cfg, x, ids, weights, w = make_case(23, 8, 2)
    ref = reference(cfg, x, ids, weights, w)
    for backend in ("triton", "reference"):
        out = comet.moe_experts(x, ids.to(dtype), weights, w, cfg, backend=backend)
        assert ((out - ref).norm() / ref.norm()).item() <= TOL[torch.float32], backend


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bool_and_uint64_ids_are_refused(backend):
    cfg, x, ids, weights, w = make_case(6, 4, 2)
    with pytest.raises(TypeError, match="topk_ids: expected integer expert ids, got a torch.bool mask"):
        comet.moe_experts(x, ids > 1, weights, w, cfg, backend=backend)
    with pytest.raises(TypeError, match="topk_ids: torch.uint64 ids are not supported"):
        comet.moe_experts(x, ids.to(torch.uint64), weights, w, cfg, backend=backend)


def test_kernels_refuse_float64():
    cfg, x, ids, weights, w = make_case(7, 4, 2)
    x, w = x.double(), w._replace(gate_up=w.gate_up.double(), down=w.down.double())
    message = "backend 'triton' computes float16, bfloat16, float32, not float64"
    with pytest.raises(TypeError, match=message):
        comet.moe_experts(x, ids, weights, w, cfg, backend="triton")
    with pytest.raises(TypeError, match=message):  # the custom op called directly
        torch.ops.comet.routed_experts(x, ids, weights, w.gate_up, w.down, None, None, False, "swiglu", 1.702, 7.0,
                                       False)
    layer = comet.MoELayer(cfg, backend="triton").to(DEVICE, torch.float64)
    with pytest.raises(TypeError, match=message):
        layer(x)


@pytest.mark.skipif(DEVICE != "cuda", reason="'auto' picks the kernels on a GPU only")
def test_auto_backend_takes_the_reference_for_float64():
    cfg, x, ids, weights, w = make_case(7, 4, 2)
    x, w = x.double(), w._replace(gate_up=w.gate_up.double(), down=w.down.double())
    out = comet.moe_experts(x, ids, weights, w, cfg, backend="auto")
    assert out.dtype == torch.float64
    assert torch.allclose(out, experts_reference(x, ids, weights, w.gate_up, w.down), rtol=1e-12, atol=1e-12)
