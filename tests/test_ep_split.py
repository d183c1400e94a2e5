"""The expert-parallel split (`comet.scheduler.ep_split`): tuned table, cost model, lead experts."""
import pytest
import torch

from comet.scheduler import ep_split


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
