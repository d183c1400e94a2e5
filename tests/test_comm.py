"""Communication workspace and multi-rank harness, one process per rank.

gloo: CPU ranks, buffers in /dev/shm, the probe kernel under the Triton interpreter (forced in the
ranks even on a GPU machine). nccl (where there are enough GPUs): one GPU per rank, symmetric
memory, the kernel compiled. The rank functions are module-level so that the ranks can import them.
"""
import importlib
import multiprocessing
import os
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from comet.comm import CommTimeoutError, CommWorkspace, SharedMemoryWorkspace
from comet.kernels.comm_probe import comm_probe
from comet.multiprocess import RankError, run_ranks
from conftest import needs_interpreter_loops
from rank_helpers import backends as _backends, launch as _launch


# (elements, dtype, programs, chunk elements) of consecutive calls through one workspace: new data
# every call, the same buffers again every other call, uneven chunks and more chunks than programs.
CALLS = [(1000, torch.float32, 2, None), (1000, torch.float32, 3, 128), (1000, torch.float32, 2, 256),
         (300, torch.bfloat16, 2, 64), (1000, torch.float32, 1, None)]


def _rank_data(seed: int, call: int, rank: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """What `rank` sends in `call`: every rank can compute every peer's."""
    gen = torch.Generator().manual_seed(seed * 1009 + call * 101 + rank)
    return torch.randn(n, generator=gen).to(dtype)


def _exchange(seed: int, calls) -> dict:
    ws = CommWorkspace.create()
    w = ws.world_size
    for call, (n, dtype, programs, chunk) in enumerate(calls):
        data = _rank_data(seed, call, ws.rank, n, dtype).to(ws.device)
        got = comm_probe(ws, data, num_programs=programs, chunk_elems=chunk, block=64).cpu()
        assert got.shape == (w, n) and got.dtype == dtype
        for src in range(w):
            want = _rank_data(seed, call, src, n, dtype)
            assert torch.equal(got[src], want), f"rank {ws.rank}, call {call}: wrong data from rank {src}"
    epoch = int(ws.epoch.item())
    ws.close()
    return {"epoch": epoch}


def _workspace_api(seed: int) -> str:
    ws = CommWorkspace.create()
    local = ws.buffer("x", (3, 5), torch.float32)
    assert local.device == ws.device
    assert torch.equal(local.cpu(), torch.zeros(3, 5)), "buffers start zeroed"
    assert ws.buffer("x", (3, 5), torch.float32) is local, "asking again returns the same buffer"
    local.copy_(torch.full((3, 5), float(ws.rank + seed % 7)))
    ws.barrier()
    for peer in range(ws.world_size):
        assert torch.equal(ws.peer_buffer("x", peer).cpu(), torch.full((3, 5), float(peer + seed % 7)))
        assert ws.ptr_table("x")[peer].item() == ws.peer_buffer("x", peer).data_ptr()
    with pytest.raises(ValueError, match="exists with shape"):
        ws.buffer("x", (4, 5), torch.float32)
    with pytest.raises(ValueError, match="same name, shape and dtype"):
        ws.buffer("y", (2 + ws.rank,), torch.float32)  # a collective call that disagrees across ranks
    ws.close()
    with pytest.raises(RuntimeError, match="after close"):
        ws.buffer("x", (3, 5), torch.float32)
    if isinstance(ws, SharedMemoryWorkspace):
        folder, prefix = os.path.split(ws._prefix)
        leftovers = [f for f in os.listdir(folder) if f.startswith(prefix)]
        assert not leftovers, f"files left behind: {leftovers}"
    return "ok"


def _silent_peer(max_spins: int):
    """After one call together (which makes the buffers), rank 1 stops sending. Rank 0 must time
    out with a clear error, and fail fast on the next call."""
    ws = CommWorkspace.create()  # the default limit: the call together must not time out
    data = torch.ones(256, device=ws.device)
    comm_probe(ws, data, num_programs=2, block=64)
    ws.barrier()
    outcome = None
    if ws.rank == 0:
        ws.max_spins = max_spins
        start = time.monotonic()
        with pytest.raises(CommTimeoutError) as first:
            comm_probe(ws, data, num_programs=2, block=64)
        first_s = time.monotonic() - start
        start = time.monotonic()
        with pytest.raises(CommTimeoutError):  # the broken workspace gives up at once
            comm_probe(ws, data, num_programs=2, block=64)
        outcome = (str(first.value), first_s, time.monotonic() - start)
    ws.close()
    return outcome


@pytest.mark.parametrize("backend", _backends(2))
def test_probe_two_ranks_consecutive_calls(backend):
    seed = int(torch.randint(1 << 30, ()))
    results = _launch(_exchange, 2, seed, CALLS, backend=backend)
    assert results == [{"epoch": len(CALLS)}] * 2


@pytest.mark.parametrize("backend", _backends(4))
def test_probe_four_ranks(backend):
    seed = int(torch.randint(1 << 30, ()))
    results = _launch(_exchange, 4, seed, CALLS[:3], backend=backend)
    assert results == [{"epoch": 3}] * 4


@pytest.mark.parametrize("backend", _backends(2))
def test_workspace_buffers_and_checks(backend):
    seed = int(torch.randint(1 << 30, ()))
    assert _launch(_workspace_api, 2, seed, backend=backend) == ["ok", "ok"]


@pytest.mark.parametrize("backend", _backends(2))
def test_silent_peer_times_out_clearly(backend):
    max_spins = 300
    message, first_s, second_s = _launch(_silent_peer, 2, max_spins, backend=backend, timeout=120)[0]
    assert message.startswith("rank 0 timed out waiting for rank 1's probe chunk 0 (epoch 2, its flag reads 0)")
    assert f"after {max_spins} polls" in message
    # 300 polls take well under a second (interpreter) or a millisecond (GPU); a hang takes minutes.
    assert first_s < 30 and second_s < 10, (first_s, second_s)


# ----------------------------------------------------------------------------------------------
# The harness itself
# ----------------------------------------------------------------------------------------------
def _ranks_and_args(x):
    return dist.get_rank(), dist.get_world_size(), x, os.environ.get("COMET_RANKS_TEST")


def _rank_1_raises():
    if dist.get_rank() == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 waits for rank 1 forever: it must be killed, not waited for


def _rank_0_dies_rank_1_hangs():
    if dist.get_rank() == 0:
        os._exit(3)
    time.sleep(3600)


def _everyone_hangs():
    time.sleep(3600)


def test_run_ranks_returns_results_in_rank_order():
    got = run_ranks(_ranks_and_args, 2, "x", env={"COMET_RANKS_TEST": "42"})
    assert got == [(0, 2, "x", "42"), (1, 2, "x", "42")]
    assert "COMET_RANKS_TEST" not in os.environ


def test_run_ranks_reports_the_failing_rank():
    with pytest.raises(RankError, match=r"rank 1 of 2 failed:\n(.|\n)*ValueError: boom on purpose") as err:
        run_ranks(_rank_1_raises, 2, timeout=120)
    assert err.value.rank == 1
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 0 exited \(exit code 3\) without returning a result"):
        run_ranks(_rank_0_dies_rank_1_hangs, 2, timeout=120)
    assert time.monotonic() - start < 60
    assert not multiprocessing.active_children()


def test_run_ranks_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[0, 1\] did not finish within 8"):
        run_ranks(_everyone_hangs, 2, timeout=8)
    assert time.monotonic() - start < 30
    assert not multiprocessing.active_children()


# ----------------------------------------------------------------------------------------------
# The GPU benchmark's logic, on CPU ranks
# ----------------------------------------------------------------------------------------------
def _bench_probe(name: str, tmp_path, monkeypatch):
    """bench/experiments/<name>.py, importable, with $OUT pointing into tmp_path."""
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        monkeypatch.syspath_prepend(root)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    return importlib.import_module(f"bench.experiments.{name}")


@needs_interpreter_loops
def test_bench_smoke(tmp_path, monkeypatch, capsys):
    bench = _bench_probe("comm_probe", tmp_path, monkeypatch)
    assert bench.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "comm_probe.csv")
    assert list(table["programs"]) == [1, 3]
    assert (table["us_per_call"] > 0).all() and (table["ns_per_poll"] > 0).all()
    assert table[["gpu", "torch", "triton", "commit"]].notna().all().all()
    assert (tmp_path / "out" / "comm_probe.csv").is_file()
    assert "GB/s each rank pushes to its peers" in capsys.readouterr().out


@needs_interpreter_loops
def test_overlap_probe_smoke(tmp_path, monkeypatch, capsys):
    """bench/experiments/overlap_probe.py's logic on 2 CPU ranks: both movers run alone and beside GEMM1, what
    arrives is checked, and a row per mover is written."""
    overlap_probe = _bench_probe("overlap_probe", tmp_path, monkeypatch)
    assert overlap_probe.main(["--smoke", "--results-dir", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "overlap_probe.csv")
    assert list(table["mover"]) == ["push 2", "push 2 cs", "copy"] and (table["world_size"] == 2).all()
    times = table[["gemm_full_us", "gemm_alone_us", "move_alone_us", "pair_us", "gemm_in_pair_us", "move_in_pair_us"]]
    assert (times > 0).all().all() and (table["pair_us"] >= table["gemm_in_pair_us"]).all()
    assert table[["gpu", "torch", "triton", "commit"]].notna().all().all()
    assert (tmp_path / "out" / "overlap_probe.csv").is_file()
    assert "hidden: 1 - (pair - GEMM1 on every SM) / move alone" in capsys.readouterr().out
