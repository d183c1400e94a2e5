"""Profiler (`comet.profile`), the `-shape` models, and the command line (`python -m comet`)."""
import subprocess
import sys

import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")

import comet  # noqa: E402
from comet.__main__ import main  # noqa: E402
from comet.hf_families import config_from_hf, find_moe_blocks  # noqa: E402
from comet.integrations import hf as comet_hf  # noqa: E402
from comet.model_shapes import SHAPES, build_model  # noqa: E402
from comet.tiny_models import build_tiny_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("family", ["mixtral", "llama4"])
def test_profile_table_and_files(family, tmp_path):
    model = build_tiny_model(family).to(DEVICE)
    implementation = model.config._experts_implementation
    input_ids = torch.randint(3, model.config.vocab_size, (2, 5), device=DEVICE)
    table = comet.profile(model, {"input_ids": input_ids}, backend="reference", out_dir=tmp_path, repeats=1, warmup=0)

    names = [name for name, _ in find_moe_blocks(model)]
    assert list(table["layer"]) == names and len(names) == model.config.num_hidden_layers
    cfg = config_from_hf(model.config)
    assert (table["family"] == family).all() and (table["tokens"] == 10).all()
    assert (table["experts"] == cfg.num_experts).all() and (table["top_k"] == cfg.top_k).all()
    assert (table["original ms"] > 0).all() and (table["ours ms"] > 0).all()
    assert torch.allclose(torch.tensor(table["speedup"].values),
                          torch.tensor((table["original ms"] / table["ours ms"]).values))
    assert (table["max rel diff"] <= 1e-5).all() and (table["backend"] == "reference").all()
    for column in ("gpu", "torch", "triton", "commit", "timing"):
        assert table[column].notna().all()
    if DEVICE == "cpu":
        assert "not representative" in table["timing"][0]
    assert not comet_hf.is_applied(model) and model.config._experts_implementation == implementation

    on_disk = pd.read_csv(tmp_path / "profile.csv")
    assert list(on_disk["layer"]) == names
    assert (tmp_path / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_other_baselines_and_bad_arguments():
    model = build_tiny_model("qwen3_moe").to(DEVICE)
    input_ids = torch.randint(3, model.config.vocab_size, (1, 6), device=DEVICE)
    table = comet.profile(model, input_ids, baselines=("grouped_mm", "original"), backend="reference",
                          repeats=1, warmup=0)
    assert {"grouped_mm ms", "original ms"} <= set(table.columns) and (table["baseline"] == "grouped_mm").all()
    assert (table["max rel diff"] <= 1e-5).all()
    with pytest.raises(ValueError, match="baselines"):
        comet.profile(model, input_ids, baselines=("nope",))
    with pytest.raises(ValueError, match="baselines"):
        comet.profile(model, input_ids, baselines="original")
    comet_hf.apply(model, backend="reference")
    with pytest.raises(ValueError, match="already patched"):
        comet.profile(model, input_ids)


# Published shapes: (hidden, expert ffn, experts, top-k).
REAL_SHAPES = {
    "mixtral-8x7b-shape": (4096, 14336, 8, 2),
    "qwen3-30b-a3b-shape": (2048, 768, 128, 8),
    "olmoe-1b-7b-shape": (2048, 1024, 64, 8),
    "deepseek-v3-shape": (7168, 2048, 256, 8),
    "gpt-oss-20b-shape": (2880, 2880, 32, 4),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_models_have_the_real_layer_shapes(name):
    model = build_model(name, device="meta", dtype=torch.bfloat16, num_layers=2)  # structure only, no memory
    cfg = config_from_hf(model.config)
    assert (cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.top_k) == REAL_SHAPES[name]
    blocks = find_moe_blocks(model)
    assert len(blocks) == 2  # every built layer is an MoE layer
    experts = blocks[0][1].experts
    assert experts.gate_up_proj.dtype == torch.bfloat16 and experts.gate_up_proj.device.type == "meta"


def test_build_model_names():
    assert build_model("olmoe-tiny", dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="no tiny model"):
        build_model("nope-tiny")
    with pytest.raises(ValueError, match="neither"):
        build_model("/no/such/dir")


def test_cli_in_process(capsys):
    assert main(["demo", "--backend", "reference", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp" in out and "OK" in out
    if DEVICE == "cpu":
        assert "say nothing about GPU speed" in out
    assert main(["profile", "--model", "mixtral-tiny", "--tokens", "4", "--ep", "2"]) == 2
    assert "torchrun" in capsys.readouterr().err


def test_cli_expert_parallel_path(monkeypatch, capsys):
    """Under torchrun (here: a one-rank world from the environment) `--ep` runs the experts
    expert-parallel through the adapter (apply, time, revert) and matches the original model."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port)).items():
        monkeypatch.setenv(key, value)
    try:
        assert main(["profile", "--model", "mixtral-tiny", "--tokens", "4", "--ep", "1", "--dtype", "fp32"]) == 0
    finally:
        if dist.is_initialized():  # the adapter's revert closed the expert-parallel state
            dist.destroy_process_group()
    out = capsys.readouterr().out
    assert "model.layers.1.mlp" in out and "max rel diff" in out


def run_cli(*args, cwd):
    result = subprocess.run([sys.executable, "-m", "comet", *args], capture_output=True, text=True, cwd=cwd,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_cli_subprocess(tmp_path):
    usage = run_cli("--help", cwd=tmp_path)
    assert all(name in usage for name in ("info", "demo", "profile"))
    info = run_cli("info", cwd=tmp_path)
    assert "torch" in info and "reference" in info and "symmetric memory" in info
    out = run_cli("profile", "--model", "mixtral-tiny", "--tokens", "16", "--out", str(tmp_path / "p"), cwd=tmp_path)
    assert "model.layers.0.mlp" in out and "model.layers.1.mlp" in out
    assert len(pd.read_csv(tmp_path / "p" / "profile.csv")) == 2 and (tmp_path / "p" / "speedup.png").exists()


def test_cli_profile_verdict_and_what_was_compared(monkeypatch, capsys):
    """The profile table gives each layer's tolerance and verdict, the run an overall one (and its
    exit code), and says when comet's reference, not the kernels, was measured."""
    from comet import __main__ as cli

    assert main(["profile", "--model", "mixtral-tiny", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.lstrip().startswith("layer"))
    assert header.split()[-2:] == ["tolerance", "verdict"]
    rows = [line.split() for line in out.splitlines() if line.lstrip().startswith("model.layers.")]
    assert len(rows) == 2 and all(r[-1] == "OK" and float(r[-2]) == cli.TOLERANCE[torch.bfloat16] for r in rows)
    assert "outputs against original: OK" in out
    assert ("PyTorch reference" in out) == (DEVICE == "cpu")  # "auto" runs the kernels on a GPU only
    assert main(["profile", "--model", "mixtral-tiny", "--tokens", "8", "--backend", "reference"]) == 0
    assert "comet ran its PyTorch reference (--backend reference)" in capsys.readouterr().out
    monkeypatch.setitem(cli.TOLERANCE, torch.bfloat16, -1.0)  # nothing passes
    assert main(["profile", "--model", "mixtral-tiny", "--tokens", "8"]) == 1
    out = capsys.readouterr().out
    assert "outputs against original: FAIL" in out and out.count(" FAIL") >= 2


def test_cli_profile_progress_counts_layers(tmp_path):
    """One progress bar per timed step, each over the model's 2 MoE layers."""
    result = subprocess.run([sys.executable, "-m", "comet", "profile", "--model", "mixtral-tiny", "--tokens", "4",
                             "--backend", "reference"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "original: 100%" in result.stderr and "ours: 100%" in result.stderr, result.stderr
    assert "2/2" in result.stderr and "4/4" not in result.stderr, result.stderr
