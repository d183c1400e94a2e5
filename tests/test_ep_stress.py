"""tests/ep_stress.py: the randomized expert-parallel stress check, on 2 CPU ranks with a tiny shape,
and its call drawing and report in-process."""
import math
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

import comet
from conftest import needs_interpreter_loops

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import ep_stress  # noqa: E402

CFG = comet.MoEConfig(hidden_size=16, ffn_size=8, num_experts=8, top_k=2)


@needs_interpreter_loops
def test_cpu_ranks_run_and_replay(tmp_path, monkeypatch):
    """A few calls on 2 CPU ranks match the reference; a replay runs one call of the same run."""
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    seed = int(torch.randint(1 << 30, ()))
    common = ["--cpu-ranks", "2", "--seed", str(seed), "--results-dir", str(tmp_path), "--max-tokens", "6"]
    assert ep_stress.main(common + ["--calls", "6"]) == 0
    assert ep_stress.main(common + ["--calls", "6", "--replay", "4"]) == 0
    table = pd.read_csv(tmp_path / "ep_stress.csv")
    assert table["status"].tolist() == ["ok", "ok"] and table["calls"].tolist() == [6, 1]
    assert table["mismatches"].tolist() == [0, 0] and (table["worst_rel_err"] <= 2e-2).all()
    assert table["world_size"].tolist() == [2, 2] and table["seed"].tolist() == [seed, seed]
    assert table["replay"].fillna(-1).tolist() == [-1, 4]
    assert table["commit"].notna().all() and table["shape"].eq("tiny-mixtral").all()
    assert sum(int(part.split("=")[1]) for part in table["calls_per_n_comm"][0].split()) == 6
    assert (tmp_path / "out" / "ep_stress.csv").is_file() and (tmp_path / "out" / "ep_stress.log").is_file()


def test_calls_are_reproducible_and_cover_the_special_cases():
    """A call's parameters depend on (seed, index) only; over many calls every special case and
    every n_comm value comes up."""
    world, max_tokens, choices = 2, 10, [0, "auto", 3]
    calls = [ep_stress.call_params(7, i, world, max_tokens, choices, CFG) for i in range(300)]
    assert ep_stress.call_params(7, 123, world, max_tokens, choices, CFG) == calls[123]
    assert ep_stress.call_params(8, 123, world, max_tokens, choices, CFG) != calls[123]
    assert {p.n_comm for p in calls} == set(choices)
    assert all(0 <= n <= max_tokens for p in calls for n in p.counts)
    assert any(p.counts == (max_tokens,) * world for p in calls)
    assert any(0 in p.counts for p in calls)
    assert {p.one_rank for p in calls} == {None, 0, 1}
    assert any(p.skipped_share for p in calls)
    assert {p.lead_experts for p in calls} == {None, *range(CFG.num_experts // world + 1)}
    # top_k above a rank's experts: no call can send every token to one rank
    wide = CFG.replace(top_k=5)
    assert all(ep_stress.call_params(7, i, world, max_tokens, choices, wide).one_rank is None for i in range(100))


def test_rank_inputs_follow_the_call():
    base = ep_stress.CallParams(index=3, counts=(9, 0), n_comm=0, skew_std=1.0, one_rank=None, skipped_share=0.0,
                                lead_experts=None)
    x, ids, weights = ep_stress.rank_inputs(base, 5, 0, 2, CFG, torch.bfloat16, torch.device("cpu"))
    assert x.shape == (9, 16) and x.dtype == torch.bfloat16 and ids.shape == weights.shape == (9, 2)
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all()  # distinct experts per token
    assert torch.allclose(weights.sum(dim=1), torch.ones(9)) and weights.dtype == torch.float32
    again = ep_stress.rank_inputs(base, 5, 0, 2, CFG, torch.bfloat16, torch.device("cpu"))
    assert torch.equal(again[1], ids) and torch.equal(again[0], x)
    assert ep_stress.rank_inputs(base, 5, 1, 2, CFG, torch.bfloat16, torch.device("cpu"))[0].shape == (0, 16)
    _, ids, _ = ep_stress.rank_inputs(replace(base, one_rank=1), 5, 0, 2, CFG, torch.bfloat16, torch.device("cpu"))
    assert ((ids >= 4) & (ids < 8)).all()  # rank 1's experts only
    _, ids, _ = ep_stress.rank_inputs(replace(base, counts=(200, 0), skipped_share=0.5), 5, 0, 2, CFG,
                                      torch.bfloat16, torch.device("cpu"))
    assert (ids == CFG.num_experts).any() and (ids < CFG.num_experts).any()


def test_output_errors_flag_non_finite_values():
    ref = torch.ones(3, 4)
    assert ep_stress.output_errors(ref.bfloat16(), ref) == (0.0, 0.0)
    bad = ref.clone()
    bad[1, 2] = math.nan
    assert ep_stress.output_errors(bad, ref) == (math.inf, math.inf)
    assert ep_stress.output_errors(torch.ones(0, 4), torch.ones(0, 4)) == (0.0, 0.0)


def test_mismatch_report_exits_non_zero(tmp_path, capsys, monkeypatch):
    """A mismatching call: exit code 1, the CSV says so, the log names the call's parameters."""
    monkeypatch.delenv("OUT", raising=False)
    args = ep_stress.parse_args(["--cpu-ranks", "2", "--seed", "11", "--calls", "2", "--results-dir", str(tmp_path)])
    table = pd.DataFrame([
        dict(rank=r, call=c, n_comm=n, tokens=4, rel_err=e, abs_err=10 * e, ok=e <= 2e-2)
        for r in range(2) for c, n, e in ((0, "0", 0.01), (1, "2", 0.5 if r else 0.01))])
    params = {i: ep_stress.call_params(11, i, 2, args.max_tokens, args.n_comm, CFG) for i in range(2)}
    summary = dict(env={"gpu": "cpu", "commit": "x"}, world=2, cfg=CFG, seed=11, table=table, failures=[],
                   elapsed_s=1.0, params=params)
    assert ep_stress.report(summary, args) == 1
    row = pd.read_csv(tmp_path / "ep_stress.csv").iloc[0]
    assert (row["status"], row["mismatches"], str(row["mismatch_calls"]), row["worst_rel_err"]) == ("mismatch", 1,
                                                                                                     "1", 0.5)
    assert row["calls_per_n_comm"] == "0=1 2=1"
    printed = capsys.readouterr().out
    assert "MISMATCH call 1: rank 1 rel 0.5" in printed and params[1].describe(11) in printed
    assert "--seed 11 --replay <call>" in printed
