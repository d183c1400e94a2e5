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
