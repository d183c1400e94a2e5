"""Hugging Face adapter with expert parallelism under training: `apply(model, process_group=g)`
on 2 gloo ranks (kernels interpreted), each rank its own batch; the loss's gradients match the
unpatched model's on every rank's batch (experts: this rank's slice; replicated parameters:
summed over the ranks, as data parallelism does)."""
import pytest
import torch

pytest.importorskip("transformers")

from conftest import needs_interpreter_loops  # noqa: E402
from rank_helpers import launch  # noqa: E402


def _training_gradients(seed: int, num_tokens: list) -> float:
    import torch.distributed as dist

    from comet.hf_families import find_moe_blocks
    from comet.integrations import hf as comet_hf
    from comet.tiny_models import build_tiny_model

    rank, world = dist.get_rank(), dist.get_world_size()
    full = build_tiny_model("mixtral", seed=seed).eval()  # the same weights on every rank; no dropout
    model = build_tiny_model("mixtral", seed=seed).eval()
    batches, grads = [], []
    for r in range(world):  # every rank's batch and the loss's weights on its logits
        gen = torch.Generator().manual_seed(seed + 1 + r)
        batches.append(torch.randint(3, full.config.vocab_size, (1, num_tokens[r]), generator=gen))
        grads.append(torch.randn(1, num_tokens[r], full.config.vocab_size, generator=gen))
    for ids, g in zip(batches, grads):  # the loss summed over the ranks' batches
        (full(ids).logits * g).sum().backward()
    comet_hf.apply(model, process_group=dist.group.WORLD, max_tokens_per_rank=max(num_tokens))
    (model(batches[rank]).logits * grads[rank]).sum().backward()
    per_rank = find_moe_blocks(full)[0][1].experts.gate_up_proj.shape[0] // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    expected = dict(full.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if ".experts." in name:  # this rank's experts: every rank's tokens' gradients are here
            want = expected[name].grad[part]
        else:
            dist.all_reduce(p.grad)
            want = expected[name].grad
        err = ((p.grad - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-5, (rank, name, err)
        worst = max(worst, err)
    comet_hf.revert(model)
    return worst


@needs_interpreter_loops
def test_expert_parallel_training():
    seed = int(torch.randint(1 << 30, ()))
    assert all(err <= 1e-5 for err in launch(_training_gradients, 2, seed, [7, 4], backend="gloo"))
