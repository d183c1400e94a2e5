"""The expert-parallel split tuner (`comet.ep_tune`, `comet tune --ep-split`): every candidate
split timed and checked on the ranks of a group, the fastest written to the split table."""
import pytest
import torch

import comet
from comet import __main__ as cli
from comet import ep_tune
from comet.scheduler import ep_split
from rank_helpers import E, F, H, backends, launch, rank_device

CFG = comet.MoEConfig(hidden_size=H, ffn_size=F, num_experts=E, top_k=2)


def _sweep(tokens: list, n_comms: list) -> list:
    return ep_tune.sweep_splits({"tiny": CFG}, tokens, torch.float32, rank_device(), n_comms, warmup=1, reps=1)


@pytest.mark.parametrize("backend", backends(2))
def test_sweep_splits_checks_and_times_every_candidate(backend, tmp_path, monkeypatch):
    rows = launch(_sweep, 2, [8], [1], backend=backend, timeout=600)
    assert rows[0] == rows[1]  # the slowest rank's times and errors, the same on every rank
    rows = rows[0]
    assert [(r["n_comm"], r["column_chunks"]) for r in rows][0] == (0, 1)
    assert [r["n_comm"] for r in rows] == [0, 1, 1] and rows[2]["column_chunks"] == 0
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["world_size"] == 2 for r in rows), rows
    monkeypatch.setattr(ep_split, "TABLE_DIR", tmp_path)
    ep_split.load_table.cache_clear()
    best = ep_tune.best_splits(rows)
    path = ep_tune.write_splits(best, {"tiny": CFG}, 2, torch.float32, "h")
    shape = ep_split.ep_shape(8, H, F, E, 2, 2, torch.float32)
    fastest = min(rows, key=lambda r: r["ms"])
    assert path == tmp_path / "ep_h.json"
    assert ep_split.table_split(ep_split.load_table("h"), shape) == (fastest["n_comm"], fastest["column_chunks"])
    ep_split.load_table.cache_clear()


def test_best_splits_skips_mismatches():
    rows = [dict(shape="a", tokens_per_rank=8, n_comm=0, column_chunks=1, status="ok", ms=2.0),
            dict(shape="a", tokens_per_rank=8, n_comm=4, column_chunks=2, status="mismatch", ms=1.0),
            dict(shape="a", tokens_per_rank=8, n_comm=2, column_chunks=0, status="ok", ms=1.5)]
    assert ep_tune.best_splits(rows) == {("a", 8): (2, 0)}


def test_tune_ep_split_command_line(monkeypatch, capsys):
    """The help names torchrun; outside a torchrun launch it exits saying how to launch it."""
    assert "torchrun --nproc-per-node W -m comet tune --ep-split" in " ".join(
        cli.build_parser()._subparsers._group_actions[0].choices["tune"].format_help().split())
    assert cli.main(["tune", "--ep-split", "--ep-ranks", "2"]) == 2
    assert "leave out --ep-ranks" in capsys.readouterr().out
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(SystemExit, match="launch it with torchrun"):
        cli.main(["tune", "--ep-split", "--shapes", "mixtral-8x7b-shape"])
