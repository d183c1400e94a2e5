"""bench/diagnostics/backward_gemms.py's --dw1-presort on a tiny shape (CPU: the Triton
interpreter): dW1 with x gathered and presorted in zero-padded segments, each timed and checked,
one row per config."""
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.diagnostics import backward_gemms  # noqa: E402


@pytest.mark.timeout(180)
def test_smoke_dw1_presort_times_both_paths(tmp_path, capsys):
    rc = backward_gemms.main(["--smoke", "--dw1-presort", "--dw1-configs", "64x64x16-g1w4s1", "--descriptors", "on",
                              "--results-dir", str(tmp_path)])
    log = capsys.readouterr().out
    assert rc == 0, log
    df = pd.read_csv(tmp_path / "backward_dw1_presort.csv")
    assert list(df["which"]) == ["selected", "candidate"]
    assert list(df["config"])[1] == list(df["presorted_config"])[1] == "64x64x16-g1w4s1-desc"
    assert set(df["status"]) == {"ok"}, df[["config", "status", "note"]] if "note" in df else df
    assert (df["rel_err"] < 2e-2).all()
    for column in ("us_gathered", "us_copy", "us_presorted", "us_sum", "us_together", "speedup",
                   "speedup_vs_selected"):
        assert (df[column] > 0).all(), column
    assert (df["us_sum"] - df["us_copy"] - df["us_presorted"]).abs().max() < 1e-6
    assert "(selected, presorted s" in log and "speedup" in log


def test_smoke_defaults_and_no_table_from_the_interpreter():
    args = backward_gemms.parse_args(["--smoke"])
    assert args.shapes == list(backward_gemms.SMOKE_SHAPES) and args.tokens == list(backward_gemms.SMOKE_TOKENS)
    assert args.dw1_configs == list(backward_gemms.SMOKE_DW1_CONFIGS) and args.results_dir != backward_gemms.RESULTS_DIR
    assert backward_gemms.parse_args([]).dw1_configs == list(backward_gemms.DW1_PRESORT_CONFIGS)
    with pytest.raises(SystemExit):
        backward_gemms.parse_args(["--smoke", "--write-table"])


@pytest.mark.timeout(120)
def test_padded_wgrad_probe_checks_every_variant_and_reports_a_wrong_tile(tmp_path, monkeypatch, capsys):
    """bench/experiments/padded_wgrad_probe.py's --smoke: every variant right and written with its
    environment; a gradient wrong in one tile of one expert is found there (exit status 1)."""
    import comet.kernels.expert_backward as eb
    from bench.experiments import padded_wgrad_probe

    args = ["--smoke", "--results-dir", str(tmp_path)]
    assert padded_wgrad_probe.main(args) == 0, capsys.readouterr().out
    df = pd.read_csv(tmp_path / "padded_wgrad_probe.csv")
    assert len(df) == 20 and not df["wrong"].any()
    assert set(df["path"]) == {"padded", "gathered"} and set(df["b_desc"]) == {"on", "off"}
    for column in ("gpu", "torch", "triton", "commit"):
        assert df[column].notna().all(), column

    wgrad = eb.gate_up_wgrad

    def one_wrong_tile(*args, **kwargs):
        wgrad(*args, **kwargs)
        args[5][1, 16:32, :16] += 1.0  # expert 1, M block 1, N block 0 of 16 x 16 tiles

    monkeypatch.setattr(eb, "gate_up_wgrad", one_wrong_tile)
    assert padded_wgrad_probe.main(args) == 1
    df = pd.read_csv(tmp_path / "padded_wgrad_probe.csv").iloc[20:]
    assert df["wrong"].all() and set(df["bad_experts"]) == {"1"}
    assert set(df["m_blocks"]) == {"1"} and set(df["n_blocks"]) == {"0"}
    assert set(df["bad_tiles"].str.split("/").str[0]) == {"1"}
