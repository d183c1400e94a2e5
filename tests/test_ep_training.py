"""Expert-parallel training, one process per rank: outputs and gradients (input, routing weights,
expert weights; router and shared experts through the layer) against the fp32 reference of the
full layer on every rank's tokens. Every rank rebuilds every rank's inputs from the seed."""
import pytest
import torch
import torch.distributed as dist

import comet
from comet.reference import experts_reference
from rank_helpers import E, F, H, TOL, backends, full_weights, launch, local_weights, rank_device, routing


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if expected.numel() == 0:
        return 0.0
    return ((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30)).item()


def _rank_inputs(seed: int, call: int, rank: int, tokens: int, top_k: int, kind: str, cfg, dtype, device):
    """Rank `rank`'s x, routing and output gradient of call `call`."""
    gen = torch.Generator().manual_seed(seed * 7919 + call * 31 + rank)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen).to(device, dtype)
    ids, weights = (t.to(device) for t in routing(gen, tokens, top_k, kind))
    grad = torch.randn(tokens, cfg.hidden_size, generator=gen).to(device, dtype)
    return x, ids, weights, grad


def _gradient_calls(seed: int, calls: list, max_tokens: int) -> list:
    """Each call: (tokens per rank, top_k, routing kind, dtype, cfg changes, n_comm), forward and
    backward through one state. Returns each call's worst relative error on this rank."""
    from comet.ep import ExpertParallelState, ep_experts

    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    state = ExpertParallelState(max_tokens=max_tokens)
    worst = []
    for i, (tokens, top_k, kind, dtype, changes, n_comm) in enumerate(calls):
        cfg = comet.MoEConfig(**{"hidden_size": H, "ffn_size": F, "num_experts": E, "top_k": top_k, **changes})
        state.reserve(cfg)
        full = full_weights(seed + i, cfg, device)
        inputs = [_rank_inputs(seed, i, r, tokens[r], top_k, kind, cfg, dtype, device) for r in range(world)]
        x, ids, weights, grad = inputs[rank]
        x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
        local = local_weights(full, rank, world, dtype)
        local = local._replace(**{n: t.requires_grad_() for n, t in local._asdict().items() if torch.is_tensor(t)})
        epoch = state.workspace.epoch.item()
        out = ep_experts(x, ids, weights, local, cfg, state, n_comm=n_comm)
        out.backward(grad)
        state.check_errors()
        assert state.workspace.epoch.item() - epoch == 2, "one epoch forward, one backward"

        # The reference: the full layer on every rank's tokens.
        ref_x = torch.cat([inp[0] for inp in inputs]).float().requires_grad_()
        ref_weights = torch.cat([inp[2] for inp in inputs]).requires_grad_()
        ref_w = [t.float().requires_grad_() if t is not None else None for t in full[:4]]
        ref = experts_reference(ref_x, torch.cat([inp[1] for inp in inputs]), ref_weights, *ref_w,
                                activation=cfg.activation, weight_on_input=cfg.weight_on_input)
        ref.backward(torch.cat([inp[3] for inp in inputs]).float())
        mine = slice(sum(tokens[:rank]), sum(tokens[:rank + 1]))
        per_rank = E // world
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        assert out.shape == x.shape and out.dtype == dtype
        assert x.grad.dtype == dtype and weights.grad.dtype == weights.dtype
        errors = {"out": _rel(out, ref[mine]), "dx": _rel(x.grad, ref_x.grad[mine]),
                  "dweights": _rel(weights.grad, ref_weights.grad[mine])}
        for name, t, r in zip(("gate_up", "down", "gate_up_bias", "down_bias"), local[:4], ref_w):
            if t is not None:
                errors[f"d{name}"] = _rel(t.grad, r.grad[part])
        tol = TOL[dtype] * (1 if dtype == torch.float32 else 2)
        assert max(errors.values()) <= tol, f"rank {rank}, call {i} {calls[i]}: {errors}"
        worst.append(max(errors.values()))
    state.close()
    return worst


def _calls(world: int, max_tokens: int) -> list:
    fp32 = torch.float32
    full = [max_tokens] * world
    cases = [
        ([max_tokens - 2 * r for r in range(world)], 2, "random", fp32, {}, 0),  # uneven
        ([0] + [5] * (world - 1), 2, "random", fp32, {}, 0),  # a rank with no tokens
        (full, 2, "one_rank", fp32, {}, 0),  # every token on rank 0's experts
    ]
    if world == 2:  # the variants on 2 ranks only (CI time)
        cases += [
            ([7] * world, 3, "skipped", fp32, {}, 0),  # ids = E: no expert, no gradient
            (full, 2, "random", fp32, {}, 2),  # fused asked for: under autograd the unfused path runs
            (full, 2, "random", fp32, dict(expert_bias=True, activation="clamped_swiglu"), 0),
            ([6] * world, 2, "random", fp32, dict(weight_on_input=True), 0),
            (full, 2, "random", torch.bfloat16, {}, 0),
        ]
    return cases


@pytest.mark.parametrize("backend", backends(2))
def test_two_ranks_gradients(backend):
    seed = int(torch.randint(1 << 30, ()))
    calls = _calls(2, 12)
    assert all(len(w) == len(calls) for w in launch(_gradient_calls, 2, seed, calls, 12, backend=backend))


@pytest.mark.parametrize("backend", backends(4))
def test_four_ranks_gradients(backend):
    seed = int(torch.randint(1 << 30, ()))
    calls = _calls(4, 8)
    assert all(len(w) == len(calls) for w in launch(_gradient_calls, 4, seed, calls, 8, backend=backend))


def _training_steps(seed: int, steps: int, max_tokens: int) -> list:
    """`steps` SGD steps of a full layer (reference backend, every rank's tokens) and of this
    rank's expert-parallel layer (one state for all steps; router and shared expert gradients
    summed over the ranks, as data parallelism does): new tokens, token counts and, as the
    weights move, routings every step; outputs, gradients and weights must keep matching."""
    from comet.ep import ExpertParallelState

    rank, world, device = dist.get_rank(), dist.get_world_size(), rank_device()
    torch.manual_seed(seed)
    cfg = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=2, shared_ffn_size=8)
    full = comet.MoELayer(cfg, backend="reference").to(device)
    state = ExpertParallelState(max_tokens=max_tokens)
    layer = comet.MoELayer.expert_parallel_from(full, dist.group.WORLD, ep_state=state)
    assert layer.ep_state is state
    part = slice(layer.expert_range.start, layer.expert_range.stop)
    worst, lr = [], 0.02
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed + 1000 * step)
        counts = torch.randint(0, max_tokens + 1, (world,), generator=gen).tolist()
        counts[step % world] = max(counts[step % world], 1)  # the full layer needs a token to backpropagate
        xs = [torch.randn(n, H, generator=gen).to(device) for n in counts]
        grads = [torch.randn(n, H, generator=gen).to(device) for n in counts]
        for module in (full, layer):
            module.zero_grad(set_to_none=True)
        x = xs[rank].clone().requires_grad_()
        out = layer(x)
        out.backward(grads[rank])
        for name, p in layer.named_parameters():  # data parallel: the replicated parameters' gradients summed
            if not name.startswith("experts."):
                dist.all_reduce(p.grad)
        ref_x = torch.cat(xs).requires_grad_()
        ref = full(ref_x)
        ref.backward(torch.cat(grads))
        assert ref.isfinite().all(), f"step {step}: the full layer diverged"
        mine = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        errors = {"out": _rel(out.detach(), ref.detach()[mine]), "dx": _rel(x.grad, ref_x.grad[mine])}
        full_params = dict(full.named_parameters())
        for name, p in layer.named_parameters():
            expected = full_params[name].grad
            errors[name] = _rel(p.grad, expected[part] if name.startswith("experts.") else expected)
        assert max(errors.values()) <= 1e-4, f"rank {rank}, step {step} (tokens {counts}): {errors}"
        worst.append(max(errors.values()))
        with torch.no_grad():  # the same step on both (the full layer's weights, so that no rounding accumulates)
            for name, p in layer.named_parameters():
                q = full_params[name]
                q -= lr * q.grad
                p.copy_(q[part] if name.startswith("experts.") else q)
    state.check_errors()
    state.close()
    return worst


@pytest.mark.parametrize("backend", backends(2))
def test_training_steps_through_one_state(backend):
    seed = int(torch.randint(1 << 30, ()))
    assert all(len(w) == 20 for w in launch(_training_steps, 2, seed, 20, 10, backend=backend))
