"""Helpers of the multi-rank tests: which backends a test runs on, launching its ranks, and the
expert-parallel tests' shapes, weights and routings (every rank can rebuild every rank's)."""
import pytest
import torch
import torch.distributed as dist

import comet
from comet.multiprocess import run_ranks
from conftest import needs_interpreter_loops

H, F, E = 32, 16, 8
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def backends(world_size: int):
    """gloo (CPU ranks, the kernels interpreted) and nccl where there are `world_size` GPUs."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [pytest.param("gloo", marks=needs_interpreter_loops),
            pytest.param("nccl", marks=pytest.mark.skipif(gpus < world_size, reason=f"needs {world_size} GPUs"))]


def launch(fn, world_size: int, *args, backend: str, timeout: float = 300.0):
    """gloo ranks run the kernels in the interpreter; nccl ranks compile them."""
    env = {"TRITON_INTERPRET": "1" if backend == "gloo" else None}
    return run_ranks(fn, world_size, *args, backend=backend, timeout=timeout, env=env)


def rank_device():
    """The device of this rank's expert-parallel workspace."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def full_weights(seed: int, cfg: comet.MoEConfig, device) -> comet.ExpertWeights:
    """All E experts' weights, the same on every rank for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    e, f, h = cfg.num_experts, cfg.ffn_size, cfg.hidden_size
    tensors = [torch.randn(e, 2 * f, h, generator=gen) * h**-0.5, torch.randn(e, h, f, generator=gen) * f**-0.5]
    if cfg.expert_bias:
        tensors += [torch.randn(e, 2 * f, generator=gen), torch.randn(e, h, generator=gen)]
    return comet.ExpertWeights(*(t.to(device) for t in tensors))


def local_weights(w: comet.ExpertWeights, rank: int, world: int, dtype) -> comet.ExpertWeights:
    """Rank `rank`'s E/W experts of `w`, in `dtype`."""
    per_rank = w.num_experts // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    names = [n for n in ("gate_up", "down", "gate_up_bias", "down_bias") if getattr(w, n) is not None]
    return w._replace(**{name: getattr(w, name)[part].to(dtype) for name in names})


def routing(gen: torch.Generator, num_tokens: int, top_k: int, kind: str):
    """Distinct experts per token; "one_rank": all of rank 0's experts; "skipped": some ids = E
    (Hugging Face's marker for experts handled elsewhere)."""
    world = dist.get_world_size()
    pool = E // world if kind == "one_rank" else E
    ids = torch.rand(num_tokens, pool, generator=gen).argsort(dim=1)[:, :top_k]
    if kind == "skipped":
        ids = torch.where(torch.rand(num_tokens, top_k, generator=gen) < 0.3, E, ids)
    return ids, torch.rand(num_tokens, top_k, generator=gen) + 0.1


def spelled_arrival_bin(expert: torch.Tensor, position: int, lead: int, experts: int, world: int) -> torch.Tensor:
    """The fused tile map's bins, spelled out: the own rows (position 0) of the first `lead`
    experts, then every later expert's rows of each position, then the first experts' other rows."""
    late = lead + (experts - lead) * world + expert * (world - 1) + position - 1
    return torch.where(expert >= lead, lead + (expert - lead) * world + position, expert if position == 0 else late)
