"""Hugging Face adapter: every supported family's tiny model gives the same logits, router logits
and aux loss through comet (reference backend, fp32), and `revert` restores it exactly."""
import pytest
import torch

pytest.importorskip("transformers")

from comet import backends  # noqa: E402
from comet.hf_families import FAMILIES, find_moe_blocks  # noqa: E402
from comet.integrations import common  # noqa: E402
from comet.integrations import hf as comet_hf  # noqa: E402
from comet.tiny_models import build_tiny_model  # noqa: E402
from conftest import needs_interpreter_loops  # noqa: E402
from rank_helpers import launch as _launch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.fixture
def count_expert_calls(monkeypatch):
    """Counts the calls that reach comet's experts (to know the patched path really ran)."""
    calls = []
    real = common.moe_experts

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend", args[5] if len(args) > 5 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(common, "moe_experts", counting)
    return calls


def forward(model, ids):
    with torch.no_grad():
        return model(ids, output_router_logits=True)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_apply_matches_and_revert_restores(family, count_expert_calls):
    model = build_tiny_model(family, seed=torch.randint(1 << 30, ()).item()).to(DEVICE)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), device=DEVICE)
    implementation = model.config._experts_implementation
    modules = dict(model.named_modules())
    expected = forward(model, ids)

    assert comet_hf.apply(model, backend="reference") is model
    assert comet_hf.is_applied(model)
    actual = forward(model, ids)
    num_blocks = len(find_moe_blocks(model)) if family != "llama4" else len(
        [m for m in model.modules() if isinstance(m, comet_hf.CometLlama4Block)])
    assert num_blocks > 0 and count_expert_calls == ["reference"] * num_blocks
    assert rel_err(actual.logits, expected.logits) <= 1e-5
    # Before transformers 5.24, DeepSeek and Llama4 return no router logits from the causal LM.
    router_logits = getattr(expected, "router_logits", None)
    assert (getattr(actual, "router_logits", None) is None) == (router_logits is None)
    if router_logits is not None:
        # The router is the library's own: the first layer's logits are bit-exact, later ones see
        # the experts' rounding through the residual stream.
        assert len(actual.router_logits) == len(router_logits) > 0
        assert torch.equal(actual.router_logits[0], router_logits[0])
        for a, e in zip(actual.router_logits, router_logits):
            assert rel_err(a, e) <= 1e-5
    if getattr(expected, "aux_loss", None) is not None:
        assert torch.allclose(actual.aux_loss, expected.aux_loss, rtol=1e-6, atol=0)
    if family != "llama4":
        assert model.config._experts_implementation == comet_hf.IMPLEMENTATION

    comet_hf.revert(model)
    assert not comet_hf.is_applied(model)
    assert model.config._experts_implementation == implementation
    restored = dict(model.named_modules())
    assert restored.keys() == modules.keys() and all(restored[k] is modules[k] for k in modules)
    assert not any("_comet" in m.__dict__ for m in model.modules())
    again = forward(model, ids)
    assert torch.equal(again.logits, expected.logits)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "qwen2_moe"])
def test_triton_backend_on_the_library_weights(family):
    """The kernels read the experts' own parameters through views (GPT-OSS: transposed and
    interleaved with biases; Llama4: transposed, weight on the input); fp32 kernels use IEEE dots."""
    model = build_tiny_model(family).to(DEVICE)
    ids = torch.randint(3, model.config.vocab_size, (1, 6), device=DEVICE)
    expected = forward(model, ids).logits
    comet_hf.apply(model, backend="triton")
    assert rel_err(forward(model, ids).logits, expected) <= 1e-5


def test_llama4_block_replacement_keeps_parameters_and_state_dict():
    model = build_tiny_model("llama4")
    keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
    comet_hf.apply(model, backend="reference")
    assert any(isinstance(m, comet_hf.CometLlama4Block) for m in model.modules())
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys  # same tensors, no copy


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_gradients_match_through_the_backend(family, backend):
    model = build_tiny_model(family).to(DEVICE)
    ids = torch.randint(3, model.config.vocab_size, (2, 6), device=DEVICE)
    experts = find_moe_blocks(model)[0][1].experts
    grads = []
    for patched in (False, True):
        if patched:
            comet_hf.apply(model, backend=backend)
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        grads.append((experts.gate_up_proj.grad, experts.down_proj.grad))
    for actual, expected in zip(grads[1], grads[0]):
        assert rel_err(actual, expected) <= 1e-5


def test_kernel_backend_without_backward_raises_in_backward_only(monkeypatch):
    """A backend whose output is outside the autograd graph: inference works, backward raises."""
    reference = backends.resolve_backend("reference", torch.device(DEVICE)).fn

    def no_grad_backend(*args, **options):
        with torch.no_grad():
            return reference(*args, **options)

    monkeypatch.setitem(backends.BACKENDS, "nograd", backends.Backend("nograd", no_grad_backend, lambda d: None, -1))
    model = build_tiny_model("qwen3_moe").to(DEVICE)
    ids = torch.randint(3, model.config.vocab_size, (1, 5), device=DEVICE)
    expected = forward(model, ids).logits
    comet_hf.apply(model, backend="nograd")
    assert rel_err(forward(model, ids).logits, expected) <= 1e-5
    loss = model(ids, labels=ids).loss  # grad mode on: forward still works
    with pytest.raises(RuntimeError, match="'nograd' experts backend has no backward"):
        loss.backward()


def test_expert_parallel_sentinels_are_skipped():
    """HF's expert parallelism passes experts of other ranks as ids >= E with weight 0."""
    model = build_tiny_model("mixtral").to(DEVICE)
    experts = find_moe_blocks(model)[0][1].experts
    comet_hf.apply(model, backend="reference")
    num_experts = experts.gate_up_proj.shape[0]
    x = torch.randn(7, model.config.hidden_size, device=DEVICE)
    ids = torch.randint(0, num_experts, (7, 2), device=DEVICE)
    weights = torch.rand(7, 2, device=DEVICE)
    off_rank = torch.rand(7, 2, device=DEVICE) < 0.4
    with torch.no_grad():
        expected = experts(x, ids, weights.masked_fill(off_rank, 0.0))
        actual = experts(x, ids.masked_fill(off_rank, num_experts), weights.masked_fill(off_rank, 0.0))
    assert rel_err(actual, expected) <= 1e-6  # a different row count per GEMM changes the rounding


def test_set_experts_implementation_by_hand():
    """Registering at import is enough for transformers' own switch (state built on first call)."""
    model = build_tiny_model("olmoe").to(DEVICE)
    ids = torch.randint(3, model.config.vocab_size, (1, 5), device=DEVICE)
    expected = forward(model, ids).logits
    model.set_experts_implementation(comet_hf.IMPLEMENTATION)
    assert rel_err(forward(model, ids).logits, expected) <= 1e-5
    assert all("_comet" in block.experts.__dict__ for _, block in find_moe_blocks(model))


def test_reapply_and_bad_arguments():
    model = build_tiny_model("mixtral")
    implementation = model.config._experts_implementation
    comet_hf.apply(model, backend="reference")
    comet_hf.apply(model, backend="auto")  # re-applies over the first patch
    assert find_moe_blocks(model)[0][1].experts._comet.backend == "auto"
    comet_hf.revert(model)
    assert model.config._experts_implementation == implementation
    with pytest.raises(ValueError, match="not patched"):
        comet_hf.revert(model)
    with pytest.raises(ValueError, match="backend"):
        comet_hf.apply(model, backend="nope")
    with pytest.raises(TypeError, match="process_group: expected a torch.distributed.ProcessGroup"):
        comet_hf.apply(model, process_group=object())
    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(ValueError, match="not a supported MoE family"):
        comet_hf.apply(dense)


def _expert_parallel_logits(seed: int, num_tokens: list) -> float:
    """One rank of `test_expert_parallel_model`: the unpatched model's logits on this rank's batch,
    then the same model applied with the group (data-parallel attention, this rank's experts),
    then reverted (the full experts again)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_tiny_model("mixtral", seed=seed)  # the same weights on every rank
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    ids = torch.randint(3, model.config.vocab_size, (1, num_tokens[rank]), generator=gen)
    expected = forward(model, ids).logits
    blocks = find_moe_blocks(model)
    full = [block.experts.gate_up_proj.detach().clone() for _, block in blocks]
    comet_hf.apply(model, process_group=dist.group.WORLD, max_tokens_per_rank=max(num_tokens))
    per_rank = full[0].shape[0] // world
    for (_, block), weights in zip(blocks, full):  # this rank's experts only
        assert torch.equal(block.experts.gate_up_proj, weights[rank * per_rank:(rank + 1) * per_rank])
    actual = forward(model, ids).logits
    comet_hf.revert(model)  # collective: the experts gathered back from every rank
    for (_, block), weights in zip(blocks, full):
        assert torch.equal(block.experts.gate_up_proj, weights)
    assert torch.equal(forward(model, ids).logits, expected)
    return rel_err(actual, expected)


@needs_interpreter_loops
def test_expert_parallel_model():
    """apply(model, process_group=g) on 2 gloo ranks (kernels interpreted): each rank's logits
    match the unpatched model's on its own batch (different sizes per rank)."""
    seed = int(torch.randint(1 << 30, ()))
    assert all(err <= 1e-5 for err in _launch(_expert_parallel_logits, 2, seed, [7, 4], backend="gloo"))
