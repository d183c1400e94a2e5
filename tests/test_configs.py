"""Tile-config selection: tuned table first (nearest bucket; a missing expert count takes the nearest one's
entry), else the heuristic; shared memory fits."""
import json

import pytest
import torch

from comet.kernels.expert_gemm import GemmConfig
from comet.scheduler import configs


def test_rows_bucket_is_mean_rows_per_expert_rounded_up_to_a_power_of_two():
    assert configs.rows_bucket(1024, 128) == 8
    assert configs.rows_bucket(1025, 128) == 16
    assert configs.rows_bucket(3, 8) == 1


def test_fit_shared_memory_cuts_stages_not_tiles():
    cfg = GemmConfig(128, 128, 64, num_stages=4)
    assert configs.fit_shared_memory(cfg, 2, 2).num_stages == 4  # bf16: 48 KiB a stage
    fp32 = configs.fit_shared_memory(cfg, 4, 2)  # 96 KiB a stage
    assert (fp32.block_m, fp32.block_n, fp32.block_k, fp32.num_stages) == (128, 128, 64, 2)


def test_table_entry_nearest_bucket_wins_over_heuristic(tmp_path, monkeypatch):
    key = configs.shape_key(8, 256, 128, torch.bfloat16)
    g1 = dict(block_m=64, block_n=32, block_k=32, group_m=4, num_warps=4, num_stages=2)
    g2 = dict(block_m=32, block_n=64, block_k=32, group_m=4, num_warps=4, num_stages=2)
    (tmp_path / "interpreter.json").write_text(json.dumps({key: {"4": [g1, g2], "512": [g2, g1]}}))
    monkeypatch.setattr(configs, "TABLE_DIR", tmp_path)
    configs.clear_table_cache()
    try:
        cpu = torch.device("cpu")
        first, second = configs.select_configs(8 * 8, 8, 256, 128, torch.bfloat16, cpu)  # bucket 8 -> "4"
        assert (first.block_m, second.block_m) == (64, 32)
        first, second = configs.select_configs(8 * 300, 8, 256, 128, torch.bfloat16, cpu)  # bucket 512
        assert (first.block_m, second.block_m) == (32, 64)
        other = configs.select_configs(64, 8, 512, 128, torch.bfloat16, cpu)  # no entry: heuristic
        assert other == configs.heuristic_configs(8, cpu)
        # An expert-parallel rank's 4 experts of the same GEMMs: the E=8 entry, same buckets.
        first, second = configs.select_configs(4 * 8, 4, 256, 128, torch.bfloat16, cpu)
        assert (first.block_m, second.block_m) == (64, 32)
    finally:
        configs.clear_table_cache()


def test_shape_entries_nearest_expert_count():
    bf16 = torch.bfloat16
    table = {configs.shape_key(e, 256, 128, bf16): {"1": e} for e in (8, 32, 128)}
    table[configs.shape_key(64, 512, 128, bf16)] = {"1": "other H"}
    table[configs.shape_key(16, 256, 128, torch.float16)] = {"1": "other dtype"}
    nearest = {e: configs.shape_entries(table, e, 256, 128, bf16) for e in (1, 8, 16, 24, 64, 1024)}
    assert nearest == {1: {"1": 8}, 8: {"1": 8}, 16: {"1": 32}, 24: {"1": 32}, 64: {"1": 128}, 1024: {"1": 128}}
    assert configs.shape_entries(table, 8, 256, 64, bf16) is None
    assert configs.shape_entries(table, 64, 512, 128, bf16) == {"1": "other H"}


def test_shipped_h200_table_is_well_formed():
    table = json.loads((configs.TABLE_DIR / "nvidia_h200.json").read_text())
    assert table
    for buckets in table.values():
        for bucket, pair in buckets.items():
            assert int(bucket) & (int(bucket) - 1) == 0  # a power of two
            for cfg in map(lambda c: GemmConfig(**c), pair):
                assert cfg.block_m in (16, 32, 64, 128) and cfg.num_stages >= 1


def test_tuner_candidates():
    """The tuner tries weight descriptors on and off where tiles use them, GROUP_M 16 on 128-row
    tiles, no tile much taller than the rows per expert, and only what fits shared memory."""
    from comet.kernels.expert_gemm import DESCRIPTOR_MIN_BLOCK_M
    from comet.scheduler.configs import SHARED_MEMORY_BUDGET
    from comet.scheduler.tune import GATE_UP_CANDIDATES, _candidates

    big = _candidates(GATE_UP_CANDIDATES, 4096, 2, 2)
    assert {c.weight_descriptors for c in big if c.block_m >= DESCRIPTOR_MIN_BLOCK_M} == {True, False}
    assert all(c.weight_descriptors for c in big if c.block_m < DESCRIPTOR_MIN_BLOCK_M)
    assert {c.group_m for c in big if c.block_m == 128} == {8, 16} and {c.group_m for c in big if c.block_m < 128} == {8}
    assert all((c.block_m + 2 * c.block_n) * c.block_k * 2 * c.num_stages <= SHARED_MEMORY_BUDGET for c in big)
    assert max(c.block_m for c in _candidates(GATE_UP_CANDIDATES, 4, 2, 2)) == 16


def test_tuning_shapes_for_expert_parallel_ranks(capsys):
    """`python -m comet tune --ep-ranks W`: each shape also as one rank's E/W experts; W must divide E."""
    from comet import __main__ as cli

    shapes = cli.tuning_shapes(["mixtral-8x7b-shape"], [1, 2, 8])
    e, h, f, k = cli.model_shape("mixtral-8x7b-shape")
    assert shapes == {"mixtral-8x7b-shape": (e, h, f, k, 1), "mixtral-8x7b-shape/2": (e // 2, h, f, k, 2),
                      "mixtral-8x7b-shape/8": (1, h, f, 1, 8)}
    with pytest.raises(ValueError, match="do not split over 3 ranks"):
        cli.tuning_shapes(["mixtral-8x7b-shape"], [3])
    assert cli.main(["tune", "--shapes", "mixtral-8x7b-shape", "--ep-ranks", "3"]) == 2
    assert "do not split over 3 ranks" in capsys.readouterr().out


def test_tuner_stores_expert_parallel_entries_under_the_calls_bucket(monkeypatch):
    """An EP rank's configs are timed on its T*K rows and stored under the bucket of the W*T*K
    receive slots that comet.ep looks configs up for."""
    from comet import __main__ as cli
    from comet.scheduler import tune

    timed = []

    def fake_tune_shape(e, h, f, k, tokens, dtype, device):
        timed.append((e, k, tokens))
        return {"block_m": 128}, {"block_m": 64}, 1.0, 1.0

    monkeypatch.setattr(tune, "tune_shape", fake_tune_shape)
    table = tune.run(cli.tuning_shapes(["mixtral-8x7b-shape"], [1, 2]), [8192], torch.bfloat16,
                     torch.device("cpu"), write=False)
    e, h, f, k = cli.model_shape("mixtral-8x7b-shape")
    assert timed == [(e, k, 8192), (e // 2, k, 8192)]
    assert table[configs.shape_key(e, h, f, torch.bfloat16)] == {
        str(configs.rows_bucket(8192 * k, e)): [{"block_m": 128}, {"block_m": 64}]}
    assert table[configs.shape_key(e // 2, h, f, torch.bfloat16)] == {
        str(configs.rows_bucket(2 * 8192 * k, e // 2)): [{"block_m": 128}, {"block_m": 64}]}


def test_backward_configs_from_their_table_else_the_forward_and_a_heuristic(tmp_path, monkeypatch):
    key = configs.shape_key(8, 256, 128, torch.bfloat16)
    tuned = dict(block_m=64, block_n=64, block_k=32, group_m=1, num_warps=4, num_stages=2, weight_descriptors=False)
    (tmp_path / "backward_interpreter.json").write_text(json.dumps({key: {"8": {"down_wgrad": tuned}}}))
    monkeypatch.setattr(configs, "TABLE_DIR", tmp_path)
    configs.clear_table_cache()
    try:
        cpu = torch.device("cpu")
        got = configs.backward_configs(8 * 8, 8, 256, 128, torch.bfloat16, cpu)
        gemm1, gemm2 = configs.select_configs(8 * 8, 8, 256, 128, torch.bfloat16, cpu)
        assert got.down_wgrad == GemmConfig(**tuned)  # the table's kernel
        assert got.gate_up_wgrad == configs.heuristic_wgrad_configs(cpu)[1]  # not in the table
        assert (got.down_dgrad, got.gate_up_dgrad) == (gemm1, gemm2)  # the forward's shapes
        other = configs.backward_configs(64, 8, 512, 128, torch.bfloat16, cpu)  # no entry at all
        assert other.down_wgrad == configs.heuristic_wgrad_configs(cpu)[0]
    finally:
        configs.clear_table_cache()


def test_weight_gradient_configs_keep_their_stages_at_16_bit(tmp_path, monkeypatch):
    # The table's 5-stage weight-gradient tiles are what was timed: the backward must run them so.
    wgrad = dict(block_m=256, block_n=128, block_k=64, group_m=1, num_warps=8, num_stages=5, weight_descriptors=True)
    table = {configs.shape_key(8, 256, 128, dt): {"8": {"down_wgrad": wgrad, "gate_up_wgrad": wgrad}}
             for dt in (torch.bfloat16, torch.float32)}
    (tmp_path / "backward_interpreter.json").write_text(json.dumps(table))
    monkeypatch.setattr(configs, "TABLE_DIR", tmp_path)
    configs.clear_table_cache()
    try:
        cpu = torch.device("cpu")
        bf16 = configs.backward_configs(8 * 8, 8, 256, 128, torch.bfloat16, cpu)
        assert bf16.down_wgrad == bf16.gate_up_wgrad == GemmConfig(**wgrad)
        fp32 = configs.backward_configs(8 * 8, 8, 256, 128, torch.float32, cpu)  # 96 KiB a stage
        assert fp32.down_wgrad.num_stages == fp32.gate_up_wgrad.num_stages == 2
        assert fp32.down_wgrad.block_m == 256
    finally:
        configs.clear_table_cache()


def test_shipped_backward_table_is_well_formed():
    table = json.loads((configs.TABLE_DIR / "backward_nvidia_h200.json").read_text())
    for buckets in table.values():
        for kernels in buckets.values():
            assert set(kernels) <= set(configs.BackwardConfigs._fields)
            for name, fields in kernels.items():
                if fields is None:  # null: dW1 gathers x by token
                    assert name == "gate_up_wgrad_presorted"
                else:
                    GemmConfig(**fields)


def test_presorted_dw1_config_from_the_table_fitted_or_none(tmp_path, monkeypatch):
    wgrad = dict(block_m=256, block_n=128, block_k=64, group_m=1, num_warps=8, num_stages=5, weight_descriptors=True)
    table = {configs.shape_key(8, 256, 128, torch.bfloat16): {"8": {"gate_up_wgrad_presorted": wgrad}},
             configs.shape_key(8, 512, 128, torch.bfloat16): {"8": {"gate_up_wgrad_presorted": None}}}
    (tmp_path / "backward_interpreter.json").write_text(json.dumps(table))
    monkeypatch.setattr(configs, "TABLE_DIR", tmp_path)
    configs.clear_table_cache()
    try:
        cpu = torch.device("cpu")
        got = configs.backward_configs(8 * 8, 8, 256, 128, torch.bfloat16, cpu).gate_up_wgrad_presorted
        assert got == configs.presorted_wgrad_config(GemmConfig(**wgrad), 2) and got.num_stages == 4
        assert configs.backward_configs(8 * 8, 8, 512, 128, torch.bfloat16, cpu).gate_up_wgrad_presorted is None
    finally:
        configs.clear_table_cache()


def test_presorted_wgrad_config_fits_every_stage_with_both_operands():
    # dW1 reading x presorted holds a tile of both operands per stage (no row-index loads).
    from comet.kernels.expert_backward import SHARED_MEMORY_LIMIT, padded_wgrad_pipeline_bytes

    tuned = GemmConfig(256, 128, 64, group_m=1, num_warps=8, num_stages=5)
    assert configs.presorted_wgrad_config(tuned, 2).num_stages == 4  # 192 KiB + the epilogue's 33
    assert configs.presorted_wgrad_config(tuned, 4).num_stages == 2
    narrow = GemmConfig(256, 128, 32, group_m=1, num_warps=8, num_stages=6)
    assert configs.presorted_wgrad_config(narrow, 2) == narrow
    for size in (2, 4):
        assert padded_wgrad_pipeline_bytes(configs.presorted_wgrad_config(tuned, size), size) < SHARED_MEMORY_LIMIT
