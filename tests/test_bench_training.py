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
    assert "transformers_eager" in curves  # the noise curve
    assert (tmp_path / "hf_training.png").stat().st_size > 0


@pytest.mark.parametrize("shape_name", ["tiny-gpt-oss", "tiny-deepseek-v3"])
def test_reference_in_expert_chunks_equals_all_at_once(shape_name):
    """The training benchmark's oracle, experts a chunk at a time (the weight gradients on the
    host), is the unchunked autograd's, also where a chunk's experts get no token."""
    import torch

    from bench.common import make_inputs, make_weights
    from bench.shapes import model_shape

    shape = model_shape(shape_name)
    cfg = shape.cfg
    w = make_weights(shape, torch.float32, torch.device("cpu"))
    s = make_inputs(cfg, 5, torch.float32, torch.device("cpu"), torch.zeros(cfg.num_experts))
    s.topk_ids[s.topk_ids == 1] = 0  # expert 1 idle: its one-expert chunk has no token
    grad_out = torch.randn_like(s.x)
    whole = training.reference_grads(s, w, cfg, grad_out, chunk_bytes=1 << 40)
    per_expert = training.reference_grads(s, w, cfg, grad_out, chunk_bytes=1)
    assert len(whole) == len(per_expert) == 3 + sum(t is not None for t in (w.gate_up_bias, w.down_bias)) + 2
    for a, b in zip(whole, per_expert):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (per_expert[3][1] == 0).all() and (per_expert[4][1] == 0).all()
