"""Expert parallelism against the fp32 reference of the full layer, one process per rank.

gloo ranks run the kernels under the Triton interpreter (buffers in /dev/shm); nccl ranks (where
there are enough GPUs) compile them. Each rank computes the reference of the whole layer on its own
tokens from the full weights (all ranks make them from one seed) and compares its output.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import triton
import triton.language as tl

import comet
from comet.comm import CommTimeoutError
from comet.kernels.routing import arrival_bin, bin_expert
from comet.reference import experts_reference
from comet.scheduler import ep_split
from comet.scheduler.ep_plan import plan_sends
from conftest import DEVICE, needs_interpreter_loops
from test_comm import _backends, _launch

H, F, E = 32, 16, 8
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _full_weights(seed: int, cfg: comet.MoEConfig, device) -> comet.ExpertWeights:
    gen = torch.Generator().manual_seed(seed)
    e, f, h = cfg.num_experts, cfg.ffn_size, cfg.hidden_size
    tensors = [torch.randn(e, 2 * f, h, generator=gen) * h**-0.5, torch.randn(e, h, f, generator=gen) * f**-0.5]
    if cfg.expert_bias:
        tensors += [torch.randn(e, 2 * f, generator=gen), torch.randn(e, h, generator=gen)]
    return comet.ExpertWeights(*(t.to(device) for t in tensors))


def _local(w: comet.ExpertWeights, rank: int, world: int, dtype) -> comet.ExpertWeights:
    per_rank = w.num_experts // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    names = [n for n in ("gate_up", "down", "gate_up_bias", "down_bias") if getattr(w, n) is not None]
    return w._replace(**{name: getattr(w, name)[part].to(dtype) for name in names})


def _routing(gen: torch.Generator, num_tokens: int, top_k: int, kind: str):
    """Distinct experts per token; "one_rank": all of rank 0's experts; "skipped": some ids = E
    (Hugging Face's marker for experts handled elsewhere)."""
    world = dist.get_world_size()
    pool = E // world if kind == "one_rank" else E
    ids = torch.rand(num_tokens, pool, generator=gen).argsort(dim=1)[:, :top_k]
    if kind == "skipped":
        ids = torch.where(torch.rand(num_tokens, top_k, generator=gen) < 0.3, E, ids)
    return ids, torch.rand(num_tokens, top_k, generator=gen) + 0.1


def _run_calls(seed: int, calls: list, max_tokens: int) -> list:
    """Each call: (tokens per rank, top_k, routing kind, dtype, cfg changes, n_comm); the changes may
    also name `column_chunks` (of the fused GEMM2) and `lead_experts` (of the fused tile order, in
    place of the cost model's). Returns each rank's relative errors. All calls go through one
    workspace."""
    import comet.kernels.expert_gemm as expert_gemm
    from comet.ep import check_errors, ep_experts, release_workspace


    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    errors, min_block_m = [], expert_gemm.DESCRIPTOR_MIN_BLOCK_M
    for i, (tokens, top_k, kind, dtype, changes, n_comm) in enumerate(calls):
        changes = dict(changes)
        column_chunks = changes.pop("column_chunks", None)
        lead = changes.pop("lead_experts", None)
        # Tensor descriptors for the interpreter's small tiles too (on a GPU: tiles of 64+ rows).
        expert_gemm.DESCRIPTOR_MIN_BLOCK_M = 0 if changes.pop("descriptors", False) else min_block_m
        cfg = comet.MoEConfig(**{"hidden_size": H, "ffn_size": F, "num_experts": E, "top_k": top_k, **changes})
        full = _full_weights(seed + i, cfg, device)
        gen = torch.Generator().manual_seed(seed * 7919 + i * 31 + rank)
        num_tokens = tokens[rank]
        x = torch.randn(num_tokens, cfg.hidden_size, generator=gen).to(device, dtype)
        ids, weights = (t.to(device) for t in _routing(gen, num_tokens, top_k, kind))
        with torch.no_grad():
            out = ep_experts(x, ids, weights, _local(full, rank, world, dtype), cfg, max_tokens=max_tokens,
                             n_comm=n_comm, column_chunks=column_chunks,
                             lead_experts=lead)
        check_errors()
        ref = experts_reference(x.float(), ids, weights, *full[:4], activation=cfg.activation,
                                interleaved=full.interleaved, weight_on_input=cfg.weight_on_input)
        assert out.shape == x.shape and out.dtype == dtype
        err = ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item() if num_tokens else 0.0
        assert err <= TOL[dtype], f"rank {rank}, call {i} {calls[i]}: rel err {err:.3g}"
        errors.append(err)
    release_workspace()
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
    from comet.ep import check_errors, ep_experts, release_workspace

    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    tokens, top_k, layers = 40, 2, 3
    cfg = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=top_k)
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
        return [ep_experts(x, i, w, lw, cfg, max_tokens=tokens, n_comm=n_comm)
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
    check_errors()
    release_workspace()
    return errors


@pytest.mark.parametrize("n_comm", [0, 4])
def test_cuda_graph_replays(n_comm):
    """Captured expert-parallel calls replay correctly with new inputs (the epoch lives on the device)."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    seed = int(torch.randint(1 << 30, ()))
    for errors in _launch(_graph_replays, 2, seed, n_comm, 5, backend="nccl"):
        assert len(errors) == 15


def _arrival_bin(expert: torch.Tensor, position: int, lead: int, experts: int, world: int) -> torch.Tensor:
    """The fused tile map's bins, spelled out: the own rows (position 0) of the first `lead`
    experts, then every later expert's rows of each position, then the first experts' other rows."""
    late = lead + (experts - lead) * world + expert * (world - 1) + position - 1
    return torch.where(expert >= lead, lead + (expert - lead) * world + position, expert if position == 0 else late)


@triton.jit
def _bins_round_trip(out_ptr, lead, EXPERTS: tl.constexpr, SOURCES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    expert, position = offs // SOURCES, offs % SOURCES
    valid = offs < EXPERTS * SOURCES
    bins = arrival_bin(expert, position, lead, EXPERTS, SOURCES)
    back_expert, back_position = bin_expert(bins, lead, EXPERTS, EXPERTS * SOURCES)
    tl.store(out_ptr + offs * 3, bins, mask=valid)
    tl.store(out_ptr + offs * 3 + 1, back_expert, mask=valid)
    tl.store(out_ptr + offs * 3 + 2, back_position, mask=valid)


def test_arrival_bins_invert():
    """routing.bin_expert inverts routing.arrival_bin: every bin once, for each lead."""
    for experts, world in [(4, 2), (3, 4), (5, 1)]:
        for lead in range(experts + 1):
            out = torch.full((experts * world, 3), -7, dtype=torch.int32, device=DEVICE)
            block = triton.next_power_of_2(experts * world)
            _bins_round_trip[(1,)](out, lead, EXPERTS=experts, SOURCES=world, BLOCK=block)
            expert, position = torch.arange(experts * world) // world, torch.arange(experts * world) % world
            spelled = torch.stack([_arrival_bin(e, int(p), lead, experts, world) for e, p in zip(expert, position)])
            out = out.cpu()
            assert torch.equal(out[:, 0], spelled.int()), (experts, world, lead)
            assert sorted(out[:, 0].tolist()) == list(range(experts * world)), (experts, world, lead)
            assert torch.equal(out[:, 1], expert.int()), (experts, world, lead)
            assert torch.equal(out[:, 2], position.int()), (experts, world, lead)


def _dispatch_rounds(seed: int, token_counts: list) -> int:
    """Dispatch alone, call after call with new token counts: every source's tokens arrive at
    their slots, and the slots past each count are marked unused (not last-but-one call's). Every
    other call numbers the experts in arrival order (the fused path's). The received rows are
    single-buffered and a full call's combine is what keeps the next call's rows from
    overwriting them: without one, each round ends with a barrier."""
    from comet.ep import group_workspace, release_workspace
    from comet.kernels.ep_dispatch import dispatch_buffers, dispatch_push, dispatch_receive

    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    ws, capacity, top_k, per_rank = group_workspace(), 9, 3, E // world
    bufs = dispatch_buffers(ws, capacity, H, top_k, torch.float32, chunk=4)

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
        got_ids, got_weights, got_counts = dispatch_receive(ws, bufs, epoch, top_k,
                                                            arrival_experts=per_rank if arrival else 0,
                                                            lead_experts=lead)
        ws.check_errors()
        recv_x = ws.buffer(bufs.x, (world, capacity, H), torch.float32)
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
    release_workspace()
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
    two layers of different shapes take turns through the group's one workspace."""
    from comet.ep import group_workspace, release_workspace
    from comet.scheduler.ep_calibrate import group_rates

    rank, world, device = dist.get_rank(), dist.get_world_size(), _device()
    torch.manual_seed(seed)
    full, layer = _layer_pair(comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=2, shared_ffn_size=24,
                                              shared_expert_gate=True), max_tokens=16)
    assert layer.expert_range == range(rank * E // world, (rank + 1) * E // world)
    assert layer.experts.gate_up_proj.shape[0] == E // world
    other_full, other = _layer_pair(comet.MoEConfig(hidden_size=H, ffn_size=24, num_experts=E, top_k=3,
                                                    expert_bias=True), max_tokens=20)
    # On a GPU, "auto" measures the group's rates on its first call, through the workspace's epochs.
    group_rates(group_workspace())
    first_epoch, errors = group_workspace().epoch.item(), []
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
    assert group_workspace().epoch.item() - first_epoch == 10  # one epoch per layer call
    with pytest.raises(ValueError, match="expected a full layer"):
        comet.MoELayer.expert_parallel_from(layer, dist.group.WORLD)
    with pytest.raises(ValueError, match="max_tokens=16"):
        layer(torch.randn(17, H, device=device))  # every rank fails the same check: no collective started
    with pytest.raises(NotImplementedError, match="forward-only"):
        layer(torch.randn(3, H, device=device))  # gradients enabled
    release_workspace()
    return errors


@pytest.mark.parametrize("backend", _backends(2))
def test_layer_with_process_group(backend):
    seed = int(torch.randint(1 << 30, ()))
    assert len(_launch(_layer_matches_full_layer, 2, seed, backend=backend)) == 2


def _silent_peer(max_spins: int):
    """After one call together, rank 1 stops calling: rank 0's waits must give up, and say so."""
    from comet.ep import check_errors, ep_experts, group_workspace, release_workspace

    rank, device = dist.get_rank(), _device()
    cfg = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=2)
    local = _local(_full_weights(0, cfg, device), rank, 2, torch.float32)
    x = torch.randn(4, H, device=device)
    ids, weights = torch.tensor([[0, 7]] * 4, device=device), torch.ones(4, 2, device=device)
    with torch.no_grad():
        ep_experts(x, ids, weights, local, cfg, max_tokens=4)  # on a GPU also measures the rates (epochs)
        check_errors()
        group_workspace().barrier()
        outcome, epoch = None, group_workspace().epoch.item()
        if rank == 0:
            group_workspace().max_spins = max_spins
            start = time.monotonic()
            ep_experts(x, ids, weights, local, cfg, max_tokens=4)
            with pytest.raises(CommTimeoutError) as err:
                check_errors()
            seconds = time.monotonic() - start
            ep_experts(x, ids, weights, local, cfg, max_tokens=4, n_comm=1)  # the fused kernels give up too
            with pytest.raises(CommTimeoutError):
                check_errors()
            outcome = (str(err.value), epoch + 1, seconds, time.monotonic() - start - seconds)
    release_workspace()
    return outcome


@pytest.mark.parametrize("backend", _backends(2))
def test_silent_peer_times_out_clearly(backend):
    message, epoch, first_s, second_s = _launch(_silent_peer, 2, 300, backend=backend, timeout=120)[0]
    assert message.startswith(f"rank 0 timed out waiting for rank 1's dispatch metadata 0 (epoch {epoch}, its flag "
                              "reads 0)")
    assert first_s < 30 and second_s < 30, (first_s, second_s)  # 300 polls: under a second; a hang: minutes


def test_send_plan():
    world, num_tokens = 4, 23
    ids = torch.rand(num_tokens, E).argsort(dim=1)[:, :3]
    ids[::5, 0] = E  # skipped
    plan = plan_sends(ids, E, world)
    for d in range(world):
        tokens = [t for t in range(num_tokens) if any(0 <= e < E and e // (E // world) == d for e in ids[t].tolist())]
        assert plan.mask[d].nonzero().flatten().tolist() == tokens
        assert plan.counts[d].item() == len(tokens)
        assert plan.send_tokens[d, :len(tokens)].tolist() == tokens
        assert sorted(plan.send_tokens[d].tolist()) == list(range(num_tokens))  # every entry written
        assert plan.slot[d, tokens].tolist() == list(range(len(tokens)))
    # The fused path's own rank gets every token, slot t = token t; the others' plans are unchanged.
    everything = plan_sends(ids, E, world, every_token_to=1)
    assert everything.mask[1].all() and everything.counts[1].item() == num_tokens
    assert everything.slot[1].tolist() == everything.send_tokens[1].tolist() == list(range(num_tokens))
    for d in (0, 2, 3):
        assert torch.equal(everything.mask[d], plan.mask[d]) and torch.equal(everything.counts[d], plan.counts[d])
    with pytest.raises(ValueError, match="every_token_to"):
        plan_sends(ids, E, world, every_token_to=world)
    empty = plan_sends(ids[:0], E, world)
    assert empty.counts.tolist() == [0] * world and empty.mask.shape == (world, 0)
    with pytest.raises(ValueError, match="multiple of the group size"):
        plan_sends(ids, E, 3)


@needs_interpreter_loops
def test_bench_smoke(tmp_path, monkeypatch):
    """bench/ep.py's logic on 2 CPU ranks: both implementations match the reference."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        monkeypatch.syspath_prepend(root)
    from bench import ep as bench

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert bench.main(["--smoke", "--shapes", "tiny-mixtral", "--tokens", "6", "--results-dir", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "ep2.csv")
    assert list(table["series"]) == ["a2a_grouped_mm", "megatron_alltoall", "ours", "ours_auto", "ours_fused n_comm=1",
                                     "ours_fused n_comm=2", "ours_fused_dispatch n_comm=1",
                                     "ours_fused_dispatch n_comm=2", "comm_only", "compute_only"]
    assert table["status"].tolist() == ["ok"] + ["missing"] + ["ok"] * 8  # Megatron's dispatcher needs CUDA
    assert not table["cuda_graph"].any()
    ran = table[table["status"] == "ok"]
    assert (ran["ms"] > 0).all() and ran["rel_err"].iloc[:7].notna().all()
    ours = table[table["impl"].isin(bench.OURS)]
    assert ours["comm_hidden"].notna().all() and ours["speedup_vs_a2a_grouped_mm"].notna().all()
    assert ours["n_comm"].tolist() == [0, 0, 1, 2, 1, 2]  # auto: unfused off a GPU
    assert ours["column_chunks"].tolist()[-2:] == [0, 0]
    assert (tmp_path / "out" / "ep2.csv").is_file()


def test_argument_errors():
    """Checked before anything collective happens: no process group needed."""
    from comet.ep import ep_experts

    cfg = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=2)
    local = _local(_full_weights(0, cfg, "cpu"), 0, 2, torch.float32)
    x, ids, weights = torch.randn(5, H), torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2)
    with pytest.raises(ValueError, match="n_comm: expected a non-negative int or 'auto'"):
        ep_experts(x, ids, weights, local, cfg, max_tokens=8, n_comm=-1)
    with pytest.raises(ValueError, match="n_comm: expected a non-negative int or 'auto', got 'fast'"):
        ep_experts(x, ids, weights, local, cfg, max_tokens=8, n_comm="fast")
    with pytest.raises(ValueError, match="column_chunks: expected a non-negative int or None"):
        ep_experts(x, ids, weights, local, cfg, max_tokens=8, column_chunks=-1)
    with pytest.raises(ValueError, match="lead_experts: expected a non-negative int or None"):
        ep_experts(x, ids, weights, local, cfg, max_tokens=8, lead_experts=-1)
    with pytest.raises(ValueError, match="max_tokens: expected a positive int"):
        ep_experts(x, ids, weights, local, cfg, max_tokens=0)
    with pytest.raises(ValueError, match="5 tokens exceed max_tokens=4"):
        ep_experts(x, ids, weights, local, cfg, max_tokens=4)
    with pytest.raises(ValueError, match=r"topk_ids: expected shape \[5, top_k\]"):
        ep_experts(x, ids[:3], weights[:3], local, cfg, max_tokens=8)


def _compile_ep_kernels() -> list:
    """Compile every EP kernel for sm_90 (no GPU needed): catches what the interpreter accepts and
    the compiler does not. Run in a process without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from comet.kernels import ep_combine, ep_dispatch

    tables = {name: "*i64" for name in ("recv_x_table", "recv_ids_table", "recv_weights_table", "recv_count_table",
                                        "meta_table", "chunk_table", "partials_table", "flags_table", "error_ptr",
                                        "column_done_ptr", "claims_ptr", "chunk_done_ptr", "epoch_ptr")}
    pointers = dict(tables, x_ptr="*bf16", topk_ids_ptr="*i64", topk_weights_ptr="*fp32", send_tokens_ptr="*i32",
                    send_counts_ptr="*i32", ids_out_ptr="*i32", weights_out_ptr="*fp32", counts_out_ptr="*i32",
                    recv_counts_ptr="*i32", recv_ids_ptr="*i32", partial_ptr="*bf16", counts_ptr="*i32",
                    mask_ptr="*i1", slot_ptr="*i32", slots_ptr="*bf16", a_ptr="*bf16", b_ptr="*bf16", b2_ptr="*bf16", bias_ptr="*bf16",
                    bias2_ptr="*bf16", out_ptr="*bf16", sorted_rows_ptr="*i64", row_weights_ptr="*fp32",
                    hist_ptr="*i32", alpha="fp32", limit="fp32")
    gemm = dict(NUM_EXPERTS=16, NUM_BINS=32, TOP_K=8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                NUM_PROGRAMS=100, GATHER_A=True, GATED=True, INTERLEAVED=False, ACTIVATION=0, HAS_BIAS=False,
                ROW_WEIGHT=0, SCATTER_OUT=False, EVEN_K=True, DOT_PRECISION="tf32", UPCAST_DOT=False, B_DESC=1,
                A_DESC=False, WEIGHT_EXPERTS=8)
    comm = dict(WORLD=2, TOP_K=8, CHUNK=16, BLOCK_H=512, BLOCK_K=8, META_BLOCK=128, NUM_PROGRAMS=132,
                META_KIND=2, CHUNK_KIND=3, WAIT_KIND=3, COMM_PROGRAMS=16, BLOCK_T=16, WAIT_BLOCK=64, SOURCES_P2=2)
    cases = [
        (ep_dispatch._dispatch_push_kernel, dict(comm, PUSH_ROWS=True)),
        (ep_dispatch._dispatch_push_kernel, dict(comm, PUSH_ROWS=False)),
        (ep_dispatch._dispatch_receive_kernel, dict(comm, WAIT_ROWS=True, ARRIVAL_EXPERTS=0)),
        (ep_dispatch._dispatch_receive_kernel, dict(comm, WAIT_ROWS=False, ARRIVAL_EXPERTS=8)),
        (ep_dispatch._dispatch_gate_up_kernel, dict(comm, **gemm)),
        (ep_combine._down_combine_kernel, {**comm, **gemm, "GATHER_A": False, "GATED": False, "ROW_WEIGHT": 2,
                                           "SCATTER_OUT": True, "A_DESC": True}),
        (ep_combine._combine_push_kernel, comm),
        (ep_combine._slot_sum_push_kernel, dict(comm, NUM_EXPERTS=16, BLOCK_N=256)),
        (ep_combine._combine_reduce_kernel, dict(comm, BLOCK_H=256)),
    ]
    compiled = []
    for fn, values in cases:
        declared = {fn.arg_names[i] for i in fn.constexprs}
        consts = {name: values[name] for name in fn.arg_names if name in declared}
        signature = {name: "constexpr" if name in consts else pointers.get(name, "i32") for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))
        compiled.append((fn.__name__, "cubin" in kernel.asm))
    return compiled


def test_kernels_compile_for_hopper(tmp_path):
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    # "0", not unset: importing the tests' conftest would set it to "1" again.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_ep; "
            f"print(test_ep._compile_ep_kernels())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("True") == 9, done.stdout


def test_split_table_then_model(tmp_path, monkeypatch):
    """The tuned table's nearest token bucket wins; without an entry, the cost model; off a GPU, unfused."""
    monkeypatch.setattr(ep_split, "TABLE_DIR", tmp_path)
    ep_split.load_table.cache_clear()
    mixtral = ep_split.ep_shape(4096, 4096, 14336, 8, 2, 2, torch.bfloat16)
    assert ep_split.table_split(ep_split.load_table("h"), mixtral) is None
    ep_split.write_table_entry("h", mixtral._replace(tokens=1024), ep_split.EpSplit(16, 4))
    ep_split.write_table_entry("h", mixtral._replace(tokens=16384), ep_split.EpSplit(0, 1))
    table = ep_split.load_table("h")
    assert list(table) == ["E8_H4096_F14336_K2_W2_B2"] and set(table["E8_H4096_F14336_K2_W2_B2"]) == {"1024", "16384"}
    assert ep_split.table_split(table, mixtral._replace(tokens=1500)) == (16, 4)  # bucket 2048: nearest 1024
    assert ep_split.table_split(table, mixtral._replace(tokens=8000)) == (0, 1)  # bucket 8192: nearest 16384
    assert ep_split.table_split(table, mixtral._replace(world=4)) is None
    assert ep_split.choose_split(mixtral, torch.device("cpu")) == (0, 1)
    # On a GPU: the table where it has the shape, else the model fed the measured rates (asked
    # for only then).
    monkeypatch.setattr(ep_split, "gpu_key", lambda device: "h")
    asked = []

    def rates():
        asked.append(1)
        # A link that 8 programs already saturate: fused hides it, unfused pays it in full.
        return ep_split.H200_RATES._replace(push_gbps=((8, 100.0), (132, 100.0)))

    gpu = torch.device("cuda")
    assert ep_split.choose_split(mixtral._replace(tokens=1024), gpu, rates) == (16, 4) and not asked
    qwen = ep_split.ep_shape(8192, 2048, 768, 128, 8, 2, torch.bfloat16)
    assert ep_split.choose_split(qwen, gpu, rates).n_comm > 0 and len(asked) == 1
    assert ep_split.model_split(qwen) == (0, 1)  # at the H200's rates
    ep_split.load_table.cache_clear()


def test_split_cost_model(monkeypatch):
    # Bandwidth: the probe's points, linear between them, per program below them, capped above.
    points = dict(ep_split.H200_RATES.push_gbps)
    for programs, gbps in points.items():
        assert ep_split.push_bytes_per_s(programs) == pytest.approx(gbps * 1e9)
    fewest = min(points)
    assert ep_split.push_bytes_per_s(fewest / 2) == pytest.approx(points[fewest] / 2 * 1e9)
    assert ep_split.push_bytes_per_s(24) == pytest.approx((points[16] + points[32]) / 2 * 1e9)
    assert ep_split.push_bytes_per_s(500) == pytest.approx(points[132] * 1e9)
    # A token reaches a rank when one of its K distinct experts lives there.
    shape = ep_split.ep_shape(8192, 4096, 14336, 8, 2, 2, torch.bfloat16)
    assert ep_split.share_per_rank(shape) == pytest.approx(1 - 6 / 28)
    assert ep_split.share_per_rank(shape._replace(world=1)) == 1.0
    assert ep_split.share_per_rank(shape._replace(num_experts=4, top_k=3)) == 1.0
    # Mixtral on 2 GPUs: the GEMMs dominate, fewer compute SMs cost more than the hidden pushes.
    assert ep_split.model_split(shape) == (0, 1)
    for n in (8, 16, 32):
        assert ep_split.fused_seconds(shape, n, 1) > ep_split.unfused_seconds(shape)
    assert ep_split.fused_seconds(shape, 132, 1) == float("inf")
    # Qwen3-30B-A3B: with the fused kernels' measured costs the model predicts a loss for 8 pushing
    # programs (measured: 11%, bench/results/ep2.csv); without them, a gain (smaller since the
    # unfused slot sum pushes its sums itself).
    qwen = ep_split.ep_shape(8192, 2048, 768, 128, 8, 2, torch.bfloat16)
    assert ep_split.model_split(qwen) == (0, 1)
    assert ep_split.fused_seconds(qwen, 8, 4) > ep_split.unfused_seconds(qwen)
    monkeypatch.setattr(ep_split, "FUSED_STRUCTURE", 0.0)
    assert 1 - ep_split.fused_seconds(qwen, 8, 4) / ep_split.unfused_seconds(qwen) > 0.05
    assert ep_split.model_split(qwen._replace(tokens=0)) == (0, 1)


def test_lead_experts():
    """The fused GEMM1's lead: own rows of enough experts to cover the dispatch, as measured."""
    qwen = ep_split.ep_shape(8192, 2048, 768, 128, 8, 2, torch.bfloat16)
    mixtral = ep_split.ep_shape(8192, 4096, 14336, 8, 2, 2, torch.bfloat16)
    deepseek = ep_split.ep_shape(8192, 7168, 2048, 256, 8, 2, torch.bfloat16)
    # Measured on 2 x H200 with 8 pushing programs (bench/results/ep_kernels.csv, commit 3cca3d7):
    # Qwen3's fused GEMM1 took 891 us with all own rows first, 956 us with half; DeepSeek-V3's
    # 8363-8480 us with a lead of 64-80 experts, 8694 us without one. Mixtral's long GEMMs get a lead too.
    assert ep_split.lead_experts(qwen, 8) == 64
    assert ep_split.lead_experts(mixtral, 8) < 4 and ep_split.lead_experts(deepseek, 8) < 128
    for shape in (qwen, mixtral, deepseek):
        experts = shape.num_experts // shape.world
        leads = [ep_split.lead_experts(shape, n) for n in (1, 4, 8, 16, 32, 64)]
        assert all(1 <= lead <= experts for lead in leads)
        assert leads == sorted(leads, reverse=True)  # more pushing programs, earlier arrivals
        assert ep_split.lead_experts(shape._replace(world=1, num_experts=experts), 8) == experts
        assert ep_split.lead_experts(shape, 0) == experts  # unfused: not used


def test_split_model_picks_the_fastest_fused(monkeypatch):
    monkeypatch.setattr(ep_split, "FUSED_MARGIN", 0.0)
    monkeypatch.setattr(ep_split, "FUSED_STRUCTURE", 0.0)  # a machine where fusing pays
    qwen = ep_split.ep_shape(8192, 2048, 768, 128, 8, 2, torch.bfloat16)
    n_comm, chunks = ep_split.model_split(qwen)
    assert n_comm in ep_split.N_COMM_CANDIDATES and chunks in ep_split.COLUMN_CHUNK_CANDIDATES
    best = min(ep_split.fused_seconds(qwen, n, c) for n in ep_split.N_COMM_CANDIDATES
               for c in ep_split.COLUMN_CHUNK_CANDIDATES if c * 128 <= qwen.hidden)
    assert ep_split.fused_seconds(qwen, n_comm, chunks) == pytest.approx(best)
    # Column chunks: never more than one per 128 columns.
    assert ep_split.best_column_chunks(qwen._replace(hidden=128), 16) in (0, 1)


def _megatron_baseline(seed: int) -> float:
    """bench/ep.py's Megatron-Core baseline (allgather dispatcher here: alltoall needs CUDA) on
    this rank's experts and the benchmark's routing, against the fp32 reference."""
    from megatron.core.transformer.moe import moe_utils

    from bench import ep as bench
    from bench.common import relative_error
    from bench.shapes import model_shape
    from bench.single_gpu import make_inputs, make_weights, reference_output

    torch.cuda.current_device = lambda: torch.device("cpu")  # Megatron's router asks for it on every call
    if not hasattr(moe_utils, "te_general_gemm"):  # megatron-core 0.16 without Transformer Engine
        moe_utils.te_general_gemm = None
    rank, world = dist.get_rank(), dist.get_world_size()
    bench.init_megatron(world)
    cfg = model_shape("tiny-mixtral").cfg
    torch.manual_seed(seed)
    full = make_weights(model_shape("tiny-mixtral"), torch.float32, torch.device("cpu"))
    layer = bench.megatron_layer(cfg, _local(full, rank, world, torch.float32), torch.float32, torch.device("cpu"),
                                 dispatcher="allgather")
    torch.manual_seed(seed + 1 + rank)
    s = make_inputs(cfg, 9, torch.float32, torch.device("cpu"), torch.zeros(cfg.num_experts))
    probs, routing_map = bench.megatron_routing(s, cfg.num_experts)
    layer.route = lambda hidden_states, padding_mask=None: (probs, routing_map)
    with torch.inference_mode():
        out = layer(s.x.unsqueeze(1))[0].squeeze(1)
    return relative_error(out, reference_output(s, full, cfg, 9))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on GPUs bench/ep.py checks this baseline itself (alltoall)")
def test_bench_megatron_baseline(monkeypatch):
    pytest.importorskip("megatron.core")
    root = str(Path(__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    seed = int(torch.randint(1 << 30, ()))
    assert all(err < 1e-5 for err in _launch(_megatron_baseline, 2, seed, backend="gloo"))


def test_bench_write_table(tmp_path, monkeypatch):
    """--write-table: per (shape, tokens) the fastest checked of ours and ours_fused goes to the table."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        monkeypatch.syspath_prepend(root)
    from bench import ep as bench

    monkeypatch.setattr(ep_split, "TABLE_DIR", tmp_path)
    ep_split.load_table.cache_clear()
    base = dict(shape="tiny-mixtral", world_size=2, status="ok")
    rows = [dict(base, tokens_per_rank=8, impl="ours", n_comm=0, column_chunks=1, ms=2.0),
            dict(base, tokens_per_rank=8, impl="ours_fused", n_comm=2, column_chunks=2, ms=1.5),
            dict(base, tokens_per_rank=8, impl="ours_fused", n_comm=4, column_chunks=1, ms=1.0, status="mismatch"),
            dict(base, tokens_per_rank=8, impl="a2a_grouped_mm", n_comm=None, column_chunks=None, ms=0.5),
            dict(base, tokens_per_rank=64, impl="ours", n_comm=0, column_chunks=1, ms=3.0),
            dict(base, tokens_per_rank=64, impl="ours_fused", n_comm=2, column_chunks=2, ms=3.5),
            dict(base, tokens_per_rank=256, impl="ours", n_comm=0, column_chunks=1, ms=3.0),
            dict(base, tokens_per_rank=256, impl="ours_fused_dispatch", n_comm=8, column_chunks=0, ms=2.5)]
    path = bench.write_table(rows, torch.device("cpu"), torch.float32)
    assert path == tmp_path / "ep_interpreter.json"
    cfg = bench.model_shape("tiny-mixtral").cfg
    shape = ep_split.ep_shape(8, cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.top_k, 2, torch.float32)
    table = ep_split.load_table("interpreter")
    assert ep_split.table_split(table, shape) == (2, 2)  # the mismatching row does not count
    assert ep_split.table_split(table, shape._replace(tokens=64)) == (0, 1)
    assert ep_split.table_split(table, shape._replace(tokens=256)) == (8, 0)
    ep_split.load_table.cache_clear()
