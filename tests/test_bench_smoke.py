"""bench/single_gpu.py's logic on CPU: tiny shapes, every implementation checked and timed, results
written; a wrong backend is reported as a mismatch, a missing one is skipped."""
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from comet import backends

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import single_gpu  # noqa: E402
from bench.shapes import SMOKE_MODELS, SMOKE_TOKEN_COUNTS  # noqa: E402


def _run(tmp_path, monkeypatch, *args):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    seed = str(int(torch.randint(0, 2**31 - 1, ())))  # fresh per test (conftest seeds torch)
    rc = single_gpu.main(["--smoke", "--results-dir", str(tmp_path), "--seed", seed, *args])
    return rc, pd.read_csv(tmp_path / "single_gpu.csv")


@pytest.mark.timeout(120)
def test_smoke_run_checks_times_and_writes_results(tmp_path, monkeypatch, capsys):
    rc, df = _run(tmp_path, monkeypatch)
    log = capsys.readouterr().out
    assert rc == 0, log
    assert len(df) == len(SMOKE_MODELS) * len(SMOKE_TOKEN_COUNTS) * len(single_gpu.IMPLS)
    graphed = df["impl"] == "ours_graph"
    assert (df.loc[graphed, "status"] == "missing").all()  # CUDA graphs: GPU only
    assert df.loc[graphed, "note"].str.contains("CUDA").all()
    timed = df[~graphed]
    assert set(timed["status"]) == {"ok"}, timed[["shape", "tokens", "impl", "status", "note"]]
    assert (timed["rel_err"] <= timed["tolerance"]).all()
    assert (timed["ms"] > 0).all() and (timed["tflops"] > 0).all()
    for column in ("gpu", "torch", "triton", "commit"):
        assert df[column].notna().all(), column
    ours = df[df["impl"] == "ours"]
    assert ours["speedup_vs_grouped_mm"].notna().all() and ours["speedup_vs_hf"].notna().all()
    assert "ours TF/s" in log
    assert (tmp_path / "single_gpu.png").stat().st_size > 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"single_gpu.csv", "single_gpu.png",
                                                              "single_gpu.log"}
    # A second run appends.
    rc, df2 = _run(tmp_path, monkeypatch, "--shapes", "tiny-gpt-oss", "--tokens", "4")
    assert rc == 0 and len(df2) == len(df) + len(single_gpu.IMPLS)


@pytest.mark.timeout(120)
def test_wrong_backend_is_reported_as_mismatch(tmp_path, monkeypatch, capsys):
    def off_by_a_bit(x, topk_ids, topk_weights, weights, cfg, recompute=False):
        return backends.resolve_backend("reference", x.device).fn(x, topk_ids, topk_weights, weights, cfg) * 1.1

    monkeypatch.setitem(backends.BACKENDS, "bench_broken",
                        backends.Backend("bench_broken", off_by_a_bit, lambda device: None, -1))
    rc, df = _run(tmp_path, monkeypatch, "--shapes", "tiny-mixtral", "--tokens", "8", "--backend", "bench_broken")
    assert rc == 1
    status = dict(zip(df["impl"], df["status"]))
    assert status == {"grouped_mm": "ok", "hf": "ok", "ours": "mismatch", "ours_graph": "missing"}
    assert "!!! MISMATCH: ours" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_missing_backend_is_named_and_the_rest_runs(tmp_path, monkeypatch, capsys):
    rc, df = _run(tmp_path, monkeypatch, "--shapes", "tiny-deepseek-v3", "--tokens", "8", "--backend", "nope")
    log = capsys.readouterr().out
    assert rc == 0
    status = dict(zip(df["impl"], df["status"]))
    assert status == {"grouped_mm": "ok", "hf": "ok", "ours": "missing", "ours_graph": "missing"}
    assert "backend 'nope' is MISSING" in log and "MISSING: ours: backend 'nope' is not registered" in log


@pytest.mark.timeout(120)
def test_host_overhead_smoke_profiles_and_writes_a_row(tmp_path, monkeypatch, capsys):
    from bench.diagnostics import host_overhead

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert host_overhead.main(["--smoke", "--results-dir", str(tmp_path), "--top", "5"]) == 0
    df = pd.read_csv(tmp_path / "host_overhead.csv")
    assert sorted(df["variant"]) == ["library_sort", "ours"] and (df["status"] == "ok").all()
    assert (df["host_us_per_call"] > 0).all() and df["gpu_us_per_call"].isna().all()
    assert "function calls" in capsys.readouterr().out  # the cProfile listing
    assert len(list((tmp_path / "out").glob("host_profile_*.txt"))) == 1
    for column in ("gpu", "torch", "triton", "commit"):
        assert df[column].notna().all()
