"""bench/diagnostics/expert_gemms.py's logic on tiny shapes (CPU: the Triton interpreter): every GEMM checked
against its reference and timed, ratios to grouped_mm present, a config the compiler rejects for its
resources skipped, every descriptor variant run, results written."""
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.diagnostics import expert_gemms  # noqa: E402


@pytest.mark.timeout(180)
def test_smoke_profile_checks_times_skips_and_writes(tmp_path, monkeypatch, capsys):
    from triton.runtime.errors import OutOfResources

    import comet.kernels.expert_gemm as expert_gemm

    real_down_gemm = expert_gemm.down_gemm

    def down_gemm_too_big_at_64_rows(*args, cfg, **kwargs):  # as the compiler would reject it
        if cfg.block_m == 64:
            raise OutOfResources(300_000, 232_448, "shared memory")
        return real_down_gemm(*args, cfg=cfg, **kwargs)

    monkeypatch.setattr(expert_gemm, "down_gemm", down_gemm_too_big_at_64_rows)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    seed = str(int(torch.randint(0, 2**31 - 1, ())))  # fresh per test (conftest seeds torch)
    rc = expert_gemms.main(["--smoke", "--runs", "tiny-mixtral:8", "--configs", "64x32x32-g4w4s1",
                            "--results-dir", str(tmp_path), "--seed", seed])
    log = capsys.readouterr().out
    assert rc == 0, log
    df = pd.read_csv(tmp_path / "expert_gemms.csv")

    for column in ("gpu", "torch", "triton", "commit", "shape", "tokens", "gemm", "impl", "config", "variant",
                   "status", "rel_err", "tolerance", "ms", "tflops", "vs_grouped_mm", "b_desc"):
        assert column in df.columns, column
    for column in ("gpu", "torch", "triton", "commit"):
        assert df[column].notna().all(), column
    variants = {"gemm1": 2, "gemm2": len(expert_gemms.descriptor_variants("gemm2"))}
    # Per GEMM: grouped_mm, then (selected + one candidate) x its descriptor variants.
    assert len(df) == sum(1 + 2 * n for n in variants.values())
    skipped = df[df["status"] == "skipped"]
    assert len(skipped) == variants["gemm2"] and set(skipped["gemm"]) == {"gemm2"}
    assert skipped["note"].str.contains("does not fit").all()
    checked = df[df["status"] != "skipped"]
    assert set(checked["status"]) == {"ok"}, checked[["gemm", "impl", "config", "variant", "status", "note"]]
    assert (checked["rel_err"] <= checked["tolerance"]).all()
    assert (checked["ms"] > 0).all() and (checked["tflops"] > 0).all()
    ours = checked[checked["impl"] == "ours"]
    assert ours["vs_grouped_mm"].notna().all() and (ours["vs_grouped_mm"] > 0).all()
    assert ours["shipped"].sum() == 2  # one per GEMM: the selected config as it is
    # Both weight-load paths ran: pointer loads (16-row tiles) and descriptors (64-row tiles, variant on).
    assert set(ours["b_desc"]) >= {0, 1}
    # Both of GEMM2's input paths were set up (the 64-row tiles, whose launch is then rejected).
    assert set(df[(df["impl"] == "ours") & (df["gemm"] == "gemm2")]["a_desc"]) == {0, 1}
    assert "ours shipped" in log and "ours best" in log
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"expert_gemms.csv", "expert_gemms.log"}


def test_expert_parallel_rank_shapes():
    """SHAPE/W: one of W expert-parallel ranks' experts, the same GEMMs; bad W named in the error."""
    from bench.shapes import model_shape

    full, rank = model_shape("tiny-mixtral").cfg, model_shape("tiny-mixtral/2").cfg
    assert rank.num_experts == full.num_experts // 2 and rank.top_k == full.top_k
    assert (rank.hidden_size, rank.ffn_size) == (full.hidden_size, full.ffn_size)
    assert model_shape(f"tiny-mixtral/{full.num_experts}").cfg.top_k == 1  # at most E/W
    args = expert_gemms.parse_args(["--smoke", "--runs", "tiny-mixtral/2:8"])
    assert args.pairs == [("tiny-mixtral/2", 8)]
    for bad in ("tiny-mixtral/3:8", "tiny-mixtral/x:8", "tiny-mixtral/0:8"):
        with pytest.raises(SystemExit):
            expert_gemms.parse_args(["--smoke", "--runs", bad])
