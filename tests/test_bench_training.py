"""bench/training.py and bench/hf_training.py on tiny shapes (CPU: the Triton interpreter): every
implementation's gradients checked, the table and the loss curves written."""
import pandas as pd
import pytest

from bench import hf_training, training


@pytest.mark.timeout(300)
def test_training_benchmark_checks_and_writes_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    rc = training.main(["--smoke", "--shapes", "tiny-gpt-oss", "--tokens", "8", "--results-dir", str(tmp_path)])
    assert rc == 0
    df = pd.read_csv(tmp_path / "training.csv")
    status = dict(zip(df["impl"], df["status"]))
    assert status == {"ours": "ok", "ours_recompute": "ok", "grouped_mm": "ok", "hf": "ok", "liger": "missing"}
    ours = df[df["impl"] == "ours"].iloc[0]
    assert ours["max_rel_err"] < 2e-2 and ours["speedup_vs_grouped_mm"] > 0  # bf16 against the fp32 reference
    assert {"gpu", "torch", "triton", "commit", "ms_fwd", "ms_fwd_bwd", "tflops", "saved_gb"} <= set(df.columns)
    assert (tmp_path / "training.png").stat().st_size > 0


@pytest.mark.timeout(300)
def test_hf_training_curves_agree(tmp_path, capsys):
    assert hf_training.main(["--smoke", "--steps", "2", "--results-dir", str(tmp_path)]) == 0
    df = pd.read_csv(tmp_path / "hf_training.csv")
    curves = df.pivot(index="step", columns="variant", values="loss")
    assert len(curves) == 2 and (curves["comet"] - curves["transformers"]).abs().max() < 1e-4
    assert (tmp_path / "hf_training.png").stat().st_size > 0
