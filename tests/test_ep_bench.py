"""bench/ep.py's logic on CPU ranks: the smoke run, the Megatron-Core baseline, the table it writes."""
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from comet.scheduler import ep_split
from conftest import needs_interpreter_loops
from rank_helpers import launch as _launch, local_weights as _local


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
