"""Megatron-Core with expert parallelism (expert_model_parallel_size=2 on 2 gloo ranks): the
patched layers run through `comet.ep` (kernels interpreted) and give the unpatched layer's loss
and gradients on each rank (its own tokens; Megatron's allgather dispatcher, which runs on CPU,
as the reference), whichever dispatcher the patched layer was built with."""
import pytest
import torch

pytest.importorskip("megatron.core")

from conftest import needs_interpreter_loops  # noqa: E402
from rank_helpers import launch  # noqa: E402

H, F_EXPERT, E, K = 32, 16, 4, 2


def _megatron_ep_rank(seed: int, tokens: list, dispatcher: str) -> dict:
    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe import moe_utils
    from megatron.core.transformer.transformer_config import TransformerConfig

    import torch.distributed as dist
    from comet.integrations import megatron as comet_megatron

    torch.cuda.current_device = lambda: torch.device("cpu")  # Megatron's router asks for it on every call
    if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core 0.16 without Transformer Engine
        moe_utils.te_general_gemm = None
    rank, world = dist.get_rank(), dist.get_world_size()
    parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=world)
    def build(dispatcher_type: str):
        torch.manual_seed(seed)  # the same router, shared expert and (per rank) experts every time
        config = TransformerConfig(
            num_layers=1, hidden_size=H, num_attention_heads=4, num_moe_experts=E, moe_router_topk=K,
            moe_ffn_hidden_size=F_EXPERT, ffn_hidden_size=F_EXPERT, gated_linear_unit=True,
            activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
            use_cpu_initialization=True, moe_token_dispatcher_type=dispatcher_type,
            moe_router_load_balancing_type="none", moe_shared_expert_intermediate_size=24,
            expert_model_parallel_size=world, params_dtype=torch.float32,
            init_method=lambda w: torch.nn.init.normal_(w, std=0.3),
            output_layer_init_method=lambda w: torch.nn.init.normal_(w, std=0.3),
        )
        return get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False)(config=config)

    # The reference: Megatron's allgather dispatcher (its alltoall one needs CUDA); the patched
    # layer: built with `dispatcher`, which comet bypasses.
    reference, layer = build("allgather"), build(dispatcher)
    ref_params, params = dict(reference.named_parameters()), dict(layer.named_parameters())
    assert all(torch.equal(p, ref_params[n]) for n, p in params.items())
    assert layer.num_local_experts == E // world and layer.ep_group.size() == world
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    x = torch.randn(tokens[rank], 2, H, generator=gen)  # [S, B, H]
    grad = torch.randn(tokens[rank], 2, H, generator=gen)
    results = []
    comet_megatron.apply(layer, max_tokens_per_rank=2 * max(tokens))
    assert type(layer).__name__ == "CometMoELayer" and layer._comet_ep_state is not None
    for module in (reference, layer):
        xi = x.clone().requires_grad_()
        out, _ = module(xi)
        loss = (out * grad).sum()
        loss.backward()
        results.append([loss.detach(), out.detach(), xi.grad, module.router.weight.grad,
                        *(p.grad for e in module.experts.local_experts for p in e.parameters()),
                        module.shared_experts.linear_fc1.weight.grad])
    layer._comet_ep_state.check_errors()
    comet_megatron.revert(layer)
    # Each tensor's error relative to its largest element; the loss's relative to the sum of the
    # magnitudes it adds up (a sum near zero by cancellation carries its terms' rounding).
    scales = [(results[0][1] * grad).abs().sum()] + [t.abs().max() for t in results[0][1:]]
    errors = []
    for actual, expected, scale in zip(results[1], results[0], scales):
        errors.append(((actual - expected).abs().max() / scale.clamp_min(1e-30)).item())
    parallel_state.destroy_model_parallel()
    return errors


@needs_interpreter_loops
@pytest.mark.parametrize("dispatcher", ["allgather", pytest.param("alltoall", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="Megatron's alltoall dispatcher needs CUDA to be built"))])
def test_expert_parallel_layer_matches_megatron(dispatcher):
    seed = int(torch.randint(1 << 30, ()))
    # Equal token counts: the allgather dispatcher gathers equal shares (comet.ep takes any).
    for errors in launch(_megatron_ep_rank, 2, seed, [4, 4], dispatcher, backend="gloo"):
        assert len(errors) == 4 + 2 * (E // 2) + 1
        assert max(errors) <= 1e-5, (f"seed {seed}", errors)  # the seed reproduces a failure
