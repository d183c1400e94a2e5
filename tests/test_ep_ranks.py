"""Expert parallelism against the fp32 reference of the full layer, one process per rank.

gloo ranks run the kernels under the Triton interpreter (buffers in /dev/shm); nccl ranks (where
there are enough GPUs) compile them. Each rank computes the reference of the whole layer on its own
tokens from the full weights (all ranks make them from one seed) and compares its output.
"""
import time

import pytest
import torch
import torch.distributed as dist

import comet
from comet.comm import CommTimeoutError
from comet.reference import experts_reference
from comet.scheduler.ep_plan import plan_sends
from rank_helpers import E, H, TOL, F, backends as _backends, full_weights as _full_weights, launch as _launch
from rank_helpers import local_weights as _local, rank_device as _device, routing as _routing
from rank_helpers import spelled_arrival_bin as _arrival_bin


def _run_calls(seed: int, calls: list, max_tokens: int) -> list:
    """Each call: (tokens per rank, top_k, routing kind, dtype, cfg changes, n_comm); the changes may
    also name `column_chunks` (of the fused GEMM2) and `lead_experts` (of the fused tile order, in
    place of the cost model's). Returns each rank's relative errors. All calls go through one
    state."""
    import comet.kernels.expert_gemm as expert_gemm
    from comet.ep import ExpertParallelState, ep_experts

    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    errors, min_block_m = [], expert_gemm.DESCRIPTOR_MIN_BLOCK_M
    state = ExpertParallelState(max_tokens=max_tokens)
    for i, (tokens, top_k, kind, dtype, changes, n_comm) in enumerate(calls):
        changes = dict(changes)
        column_chunks = changes.pop("column_chunks", None)
        lead = changes.pop("lead_experts", None)
        # Tensor descriptors for the interpreter's small tiles too (on a GPU: tiles of 64+ rows).
        expert_gemm.DESCRIPTOR_MIN_BLOCK_M = 0 if changes.pop("descriptors", False) else min_block_m
        cfg = comet.MoEConfig(**{"hidden_size": H, "ffn_size": F, "num_experts": E, "top_k": top_k, **changes})
        state.reserve(cfg)
        full = _full_weights(seed + i, cfg, device)
        gen = torch.Generator().manual_seed(seed * 7919 + i * 31 + rank)
        num_tokens = tokens[rank]
        x = torch.randn(num_tokens, cfg.hidden_size, generator=gen).to(device, dtype)
        ids, weights = (t.to(device) for t in _routing(gen, num_tokens, top_k, kind))
        with torch.no_grad():
            out = ep_experts(x, ids, weights, _local(full, rank, world, dtype), cfg, state,
                             n_comm=n_comm, column_chunks=column_chunks,
                             lead_experts=lead)
        state.check_errors()
        ref = experts_reference(x.float(), ids, weights, *full[:4], activation=cfg.activation,
                                interleaved=full.interleaved, weight_on_input=cfg.weight_on_input)
        assert out.shape == x.shape and out.dtype == dtype
        err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item() if num_tokens else 0.0
        assert err <= TOL[dtype], f"rank {rank}, call {i} {calls[i]}: rel err {err:.3g}"
        errors.append(err)
    state.close()
    return errors


def _calls(world: int, gen: torch.Generator, n_random: int, max_tokens: int) -> list:
    """Every fixed case unfused (n_comm=0) and fused (1 to 3 pushing programs), then random ones."""
    fp32 = torch.float32
    fixed = [
        ([max_tokens] * world, 2, "random", fp32, {}),
        ([max_tokens - r * 3 for r in range(world)], 4, "random", fp32, {}),  # uneven
        ([0] + [5] * (world - 1), 2, "random", fp32, {}),  # a rank with no tokens
        ([7] * world, 2, "one_rank", fp32, {}),  # everything goes to rank 0's experts
        ([max_tokens] * world, 2, "one_rank", fp32, {}),  # and several tiles per expert
        ([9] * world, 3, "skipped", fp32, {}),
        ([max_tokens] * world, 2, "random", fp32,
         dict(expert_bias=True, activation="clamped_swiglu")),
        ([6] * world, 2, "random", fp32, dict(weight_on_input=True)),
        ([max_tokens] * world, 2, "random", torch.bfloat16, {}),
        # GEMM2 in column chunks (3 N blocks of 32 on the interpreter: the last chunk is short)
        ([max_tokens] * world, 2, "random", fp32, dict(hidden_size=96, column_chunks=2)),
        ([max_tokens] * world, 2, "random", fp32, dict(descriptors=True)),  # weights and GEMM2's input
        ([max_tokens - 1] * world, 3, "random", fp32, dict(column_chunks=0)),  # only the dispatch fused
    ]
    # Fused: the cost model's lead experts (on these shapes: all of them) or 0 to 2.
    fixed = [(*c, 0) for c in fixed] + [
        (*c[:4], c[4] if i % 4 == 3 else dict(c[4], lead_experts=i % 4), 1 + i % 3) for i, c in enumerate(fixed)]
    # Then new routings and token counts every call through the same buffers.
    counts = torch.randint(0, max_tokens + 1, (n_random, world), generator=gen).tolist()
    tops = torch.randint(1, 5, (n_random,), generator=gen).tolist()
    leads = torch.randint(0, E // world + 2, (n_random,), generator=gen).tolist()  # E/W + 1 counts as E/W
    return fixed + [(c, k, "random", fp32, {"lead_experts": lead}, i % 4)
                    for i, (c, k, lead) in enumerate(zip(counts, tops, leads))]


@pytest.mark.parametrize("backend", _backends(2))
def test_two_ranks_against_reference(backend):
    seed = int(torch.randint(1 << 30, ()))
    calls = _calls(2, torch.Generator().manual_seed(seed), n_random=40, max_tokens=24)
    for errors in _launch(_run_calls, 2, seed, calls, 24, backend=backend):
        assert len(errors) == len(calls)


@pytest.mark.parametrize("backend", _backends(4))
def test_four_ranks_against_reference(backend):
    seed = int(torch.randint(1 << 30, ()))
    calls = _calls(4, torch.Generator().manual_seed(seed), n_random=4, max_tokens=10)
    # Variants are covered on 2 ranks, but for the paths the split picks between.
    calls = [c for c in calls if c[3] == torch.float32 and set(c[4]) <= {"column_chunks", "lead_experts"}]
    for errors in _launch(_run_calls, 4, seed, calls, 10, backend=backend):
        assert len(errors) == len(calls)


def _graph_replays(seed: int, n_comm, replays: int) -> list:
    """Three layer calls captured in one CUDA graph (an odd count: a replay's first call follows
    the previous replay's last with the other buffer half only if the epoch lives on the device),
    replayed with new tokens and routings copied into the captured inputs."""
    from comet.ep import ExpertParallelState, ep_experts

    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    tokens, top_k, layers = 40, 2, 3
    cfg = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=top_k)
    state = ExpertParallelState(max_tokens=tokens, configs=[cfg])
    full = [_full_weights(seed + i, cfg, device) for i in range(layers)]
    local = [_local(w, rank, world, torch.bfloat16) for w in full]
    xs = [torch.zeros(tokens, H, device=device, dtype=torch.bfloat16) for _ in range(layers)]
    ids = [torch.zeros(tokens, top_k, device=device, dtype=torch.int64) for _ in range(layers)]
    weights = [torch.zeros(tokens, top_k, device=device) for _ in range(layers)]

    def new_inputs(step: int):
        gen = torch.Generator().manual_seed(seed * 31 + step * 7 + rank)
        for x, i, w in zip(xs, ids, weights):
            x.copy_(torch.randn(tokens, H, generator=gen))
            routing = _routing(gen, tokens, top_k, "random")
            i.copy_(routing[0])
            w.copy_(routing[1])

    def forward():
        return [ep_experts(x, i, w, lw, cfg, state, n_comm=n_comm)
                for x, i, w, lw in zip(xs, ids, weights, local)]

    errors = []
    with torch.no_grad():
        new_inputs(0)
        forward()  # makes the workspace's buffers and compiles, outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = forward()
        for step in range(1, replays + 1):
            new_inputs(step)
            graph.replay()
            for out, x, i, w, wf in zip(outs, xs, ids, weights, full):
                ref = experts_reference(x.float(), i, w, *wf[:4], activation=cfg.activation)
                errors.append(((out.float() - ref).norm() / ref.norm()).item())
                assert errors[-1] <= TOL[torch.bfloat16], (step, errors[-1])
    state.check_errors()
    state.close()
    return errors


@pytest.mark.parametrize("n_comm", [0, 4])
def test_cuda_graph_replays(n_comm):
    """Captured expert-parallel calls replay correctly with new inputs (the epoch lives on the device)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    seed = int(torch.randint(1 << 30, ()))
    for errors in _launch(_graph_replays, 2, seed, n_comm, 5, backend="nccl"):
        assert len(errors) == 15


def _dispatch_rounds(seed: int, token_counts: list) -> int:
    """Dispatch alone, call after call with new token counts: every source's tokens arrive at
    their slots, and the slots past each count are marked unused (not last-but-one call's). Every
    other call numbers the experts in arrival order (the fused path's). The received rows are
    single-buffered and a full call's combine is what keeps the next call's rows from
    overwriting them: without one, each round ends with a barrier."""
    from comet.comm import CommWorkspace
    from comet.kernels.ep_dispatch import dispatch_buffers, dispatch_push, dispatch_receive
    from comet.kernels.ep_tiles import ArrivalTiles

    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    ws, capacity, top_k, per_rank = CommWorkspace.create(), 9, 3, E // world
    bufs = dispatch_buffers(ws, capacity, H, top_k, chunk=4)

    def sent_by(src: int, call: int):
        gen = torch.Generator().manual_seed(seed + 101 * call + src)
        n = token_counts[call][src]
        x = torch.randn(n, H, generator=gen)
        ids, weights = _routing(gen, n, top_k, "skipped")
        return x.to(device), ids.to(device), weights.to(device)

    for call in range(len(token_counts)):
        x, ids, weights = sent_by(rank, call)
        plan = plan_sends(ids, E, world)
        epoch = ws.next_epoch()
        dispatch_push(ws, bufs, epoch, x, ids, weights, plan.send_tokens, plan.counts, per_rank, num_programs=2)
        arrival, lead = call % 2 == 1, call % (per_rank + 1)
        got_ids, got_weights, got_counts = dispatch_receive(
            ws, bufs, epoch, top_k, tiles=ArrivalTiles(per_rank, world, lead) if arrival else None)
        ws.check_errors()
        recv_x = bufs.received_x(ws, torch.float32).view(world, capacity, H)
        for src in range(world):
            x, ids, weights = sent_by(src, call)
            local = ids - rank * per_rank
            mine = (local >= 0) & (local < per_rank)
            tokens = mine.any(dim=1)
            n = int(tokens.sum())
            assert got_counts[src].item() == n, (call, src)
            assert torch.equal(recv_x[src, :n], x[tokens])
            # Rank d pushes to d, d+1, ... in turn: source src's rows reach this rank at step rank - src.
            expected = torch.where(mine, _arrival_bin(local, (rank - src) % world, lead, per_rank, world), -1)
            assert torch.equal(got_ids[src, :n], (expected if arrival else torch.where(mine, local, -1))[tokens].int())
            assert torch.equal(got_weights[src, :n], weights[tokens])
            assert (got_ids[src, n:] == -1).all() and (got_weights[src, n:] == 0).all(), (call, src)
        ws.barrier()
    ws.close()
    return len(token_counts)


@pytest.mark.parametrize("backend", _backends(4))
def test_dispatch_alone(backend):
    seed = int(torch.randint(1 << 30, ()))
    counts = [[9, 9, 4, 0], [9, 2, 9, 9], [0, 9, 1, 3], [3, 0, 0, 9], [9, 9, 9, 9], [1, 1, 0, 2]]
    assert _launch(_dispatch_rounds, 4, seed, counts, backend=backend) == [len(counts)] * 4


def _layer_pair(cfg: comet.MoEConfig, max_tokens: int):
    """The full single-process layer and this rank's expert-parallel layer with the same weights."""
    full = comet.MoELayer(cfg, backend="reference").to(_device())
    return full, comet.MoELayer.expert_parallel_from(full, dist.group.WORLD, max_tokens_per_rank=max_tokens)


def _layer_matches_full_layer(seed: int) -> list:
    """MoELayer(process_group=...) on every rank vs the full single-process layer on its tokens;
    two layers of different shapes, each with its own state (made, and on a GPU its rates
    measured, with the layer), take turns."""

    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    torch.manual_seed(seed)
    full, layer = _layer_pair(comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=2, shared_ffn_size=24,
                                              shared_expert_gate=True), max_tokens=16)
    assert layer.expert_range == range(rank * E // world, (rank + 1) * E // world)
    assert layer.experts.gate_up_proj.shape[0] == E // world
    other_full, other = _layer_pair(comet.MoEConfig(hidden_size=H, ffn_size=24, num_experts=E, top_k=3,
                                                    expert_bias=True), max_tokens=20)
    layers = (layer, other)

    def epochs() -> int:
        return sum(int(m.ep_state.workspace.epoch.item()) for m in layers)

    first_epoch, errors = epochs(), []
    for call, shape in enumerate([(2, 5), (16,), (0, 3), (1, 7), (3, 4)]):
        for ref_layer, ep_layer in ((full, layer), (other_full, other)):
            ep_layer.ep_n_comm = ("auto", 0, 2)[call % 3]  # the split's choice, unfused, fused kernels
            gen = torch.Generator().manual_seed(seed + 17 * call + rank)
            x = torch.randn(*shape, H, generator=gen).to(device)
            with torch.no_grad():
                out, ref = ep_layer(x), ref_layer(x)
            assert out.shape == x.shape
            errors.append(((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() if x.numel() else 0.0)
            assert errors[-1] <= TOL[torch.float32], (call, errors)
    assert epochs() - first_epoch == 10  # one epoch per layer call
    with pytest.raises(ValueError, match="expected a full layer"):
        comet.MoELayer.expert_parallel_from(layer, dist.group.WORLD)
    with pytest.raises(ValueError, match="max_tokens=16"):
        layer(torch.randn(17, H, device=device))  # every rank fails the same check: no collective started
    for m in layers:
        m.ep_state.close()
    return errors


@pytest.mark.parametrize("backend", _backends(2))
def test_layer_with_process_group(backend):
    seed = int(torch.randint(1 << 30, ()))
    assert len(_launch(_layer_matches_full_layer, 2, seed, backend=backend)) == 2


def _silent_peer(max_spins: int, n_comm: int):
    """After one call together, rank 1 stops calling: rank 0's call must give up, return NaN
    (no exception there: no host sync), `check_errors` and the next call must say so."""
    from comet.ep import ExpertParallelState, ep_experts

    rank, device = dist.get_rank(), _device()
    cfg = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=2)
    state = ExpertParallelState(max_tokens=4, configs=[cfg])  # on a GPU also measures the rates
    local = _local(_full_weights(0, cfg, device), rank, 2, torch.float32)
    x = torch.randn(4, H, device=device)
    ids, weights = torch.tensor([[0, 7]] * 4, device=device), torch.ones(4, 2, device=device)
    with torch.no_grad():
        ep_experts(x, ids, weights, local, cfg, state)
        state.check_errors()
        state.workspace.barrier()
        outcome, epoch = None, state.workspace.epoch.item()
        if rank == 0:
            state.workspace.max_spins = max_spins
            start = time.monotonic()
            out = ep_experts(x, ids, weights, local, cfg, state, n_comm=n_comm)  # the fused kernels give up too
            all_nan = bool(out.isnan().all())
            with pytest.raises(CommTimeoutError) as err:
                state.check_errors()
            seconds = time.monotonic() - start
            with pytest.raises(CommTimeoutError) as again:  # the next call, from the host copy of the record
                ep_experts(x, ids, weights, local, cfg, state, n_comm=n_comm)
            outcome = (str(err.value), str(again.value), epoch + 1, seconds, time.monotonic() - start - seconds,
                       all_nan)
    state.close()
    return outcome


@pytest.mark.parametrize("n_comm", [0, 1])
@pytest.mark.parametrize("backend", _backends(2))
def test_silent_peer_times_out_clearly(backend, n_comm):
    message, next_call, epoch, first_s, second_s, all_nan = _launch(_silent_peer, 2, 300, n_comm, backend=backend,
                                                                    timeout=120)[0]
    assert message.startswith(f"rank 0 timed out waiting for rank 1's dispatch metadata 0 (epoch {epoch}, its flag "
                              "reads 0)")
    assert first_s < 30 and second_s < 30, (first_s, second_s)  # 300 polls: under a second; a hang: minutes
    assert all_nan, "the call that timed out returned numbers"
    assert next_call == message


def _setup_without_peer(timeout_s: float):
    """Rank 1 never makes its state: rank 0's setup must give up within `timeout_s`."""
    from comet.ep import ExpertParallelState

    if dist.get_rank() != 0:
        return None
    start = time.monotonic()
    with pytest.raises(CommTimeoutError) as err:
        ExpertParallelState(max_tokens=4, setup_timeout=timeout_s)
    return str(err.value), time.monotonic() - start


def test_setup_without_a_peer_times_out():
    message, seconds = _launch(_setup_without_peer, 2, 2.0, backend="gloo", timeout=60)[0]
    assert message.startswith("rank 0 timed out after 2 s waiting for rank(s) [1] to make their ExpertParallelState")
    assert seconds < 20, seconds


def _too_many_tokens() -> str:
    from comet.ep import ExpertParallelState, ep_experts

    cfg = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=2)
    local = _local(_full_weights(0, cfg, "cpu"), 0, 1, torch.float32)
    x, ids, weights = torch.randn(5, H), torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2)
    with ExpertParallelState(max_tokens=4) as state:
        with pytest.raises(ValueError, match="5 tokens exceed max_tokens=4"):
            ep_experts(x, ids, weights, local, cfg, state)
        with pytest.raises(ValueError, match="state: no buffers for hidden_size=32, top_k=2"):
            ep_experts(x[:4], ids[:4], weights[:4], local, cfg, state)
    return "ok"


def test_argument_errors():
    """Checked before anything collective happens: no process group needed (but for the
    capacity, which the state knows: one rank)."""
    from comet.ep import ExpertParallelState, ep_experts

    cfg = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=2)
    local = _local(_full_weights(0, cfg, "cpu"), 0, 2, torch.float32)
    x, ids, weights = torch.randn(5, H), torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2)
    with pytest.raises(ValueError, match="n_comm: expected a non-negative int or 'auto'"):
        ep_experts(x, ids, weights, local, cfg, None, n_comm=-1)
    with pytest.raises(ValueError, match="n_comm: expected a non-negative int or 'auto', got 'fast'"):
        ep_experts(x, ids, weights, local, cfg, None, n_comm="fast")
    with pytest.raises(ValueError, match="column_chunks: expected a non-negative int or None"):
        ep_experts(x, ids, weights, local, cfg, None, column_chunks=-1)
    with pytest.raises(ValueError, match="lead_experts: expected a non-negative int or None"):
        ep_experts(x, ids, weights, local, cfg, None, lead_experts=-1)
    with pytest.raises(ValueError, match="max_tokens: expected a positive int"):
        ExpertParallelState(max_tokens=0)
    with pytest.raises(ValueError, match=r"topk_ids: expected shape \[5, top_k\]"):
        ep_experts(x, ids[:3], weights[:3], local, cfg, None)
    with pytest.raises(TypeError, match="state: expected a comet.ep.ExpertParallelState, got NoneType"):
        ep_experts(x, ids, weights, local, cfg, None)
    assert _launch(_too_many_tokens, 1, backend="gloo") == ["ok"]
