"""Randomized expert-parallel stress check: many calls of `comet.ep.ep_experts` through one
workspace, each with a new random routing, every rank's output checked against the fp32 reference.

Every call draws, from (seed, call index) alone so that every rank draws the same:
  - each rank's token count in [0, --max-tokens] (sometimes every rank full, sometimes one rank 0);
  - the routing: top-k distinct experts of random logits plus a per-expert skew of random strength
    (uneven expert load), weights the softmax of the chosen logits; sometimes every token of every
    rank goes to one rank's experts; sometimes a fifth of the slots carry id E (Hugging Face's
    "expert elsewhere", skipped);
  - n_comm, one of --n-comm (0: unfused; "auto": the split's choice; > 0: fused kernels; "N:0":
    N pushing programs with only the dispatch fused), and for the fused kernels the lead experts
    of GEMM1's tile order: half the time the cost model's, else any from 0 to E/W.
Each rank then makes its own tokens and checks its output (every element; any NaN or inf is a
mismatch) against `comet.reference.experts_reference` in fp32 on its device, with the full weights
(made once from the seed on every rank; each rank passes its slice of experts). Relative Frobenius
error must be within bench.common.TOLERANCE (2e-2 for bf16); the largest absolute error is tracked.
`ExpertParallelState.check_errors()` (a host sync) runs every --check-every calls and at the end.

A mismatch prints the call's parameters; `--seed S --replay I` (with the run's other arguments)
runs that call alone through a fresh workspace; `--seed S --calls I+1` repeats the run up to it
(the same calls, so a fault that needs the workspace's earlier state comes back too).

Rank 0 shows a progress bar (a log line per check when not on a terminal), prints a summary
(calls, calls per n_comm, mismatches, worst errors, elapsed), appends a row to
bench/results/ep_stress.csv (copied to $OUT when set) and exits non-zero on any mismatch or
communication error.

    torchrun --nproc-per-node 2 -m tests.ep_stress                          # Qwen3-30B-A3B, 1000 calls, <= 4096 tokens/rank
    torchrun --nproc-per-node 2 -m tests.ep_stress --shape Mixtral-8x7B --calls 300
    torchrun --nproc-per-node 2 -m tests.ep_stress --seed 123 --replay 417  # one call again
    python -m tests.ep_stress --cpu-ranks 2 --calls 6                       # CPU ranks, interpreter, tiny shape
"""
from __future__ import annotations

import os

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

import comet
from bench.common import (
    DTYPES, RESULTS_DIR, RunLog, TOLERANCE, append_csv, environment, init_torchrun_rank, make_weights,
    parse_split, progress, relative_error, within_tolerance,
)
from bench.shapes import MODELS, SMOKE_MODELS, model_shape
from comet.reference import experts_reference

GPU_DEFAULTS = dict(shape="Qwen3-30B-A3B", max_tokens=4096, n_comm=["0", "auto", "8", "16", "8:0"])
CPU_DEFAULTS = dict(shape="tiny-mixtral", max_tokens=8, n_comm=["0", "1", "2", "1:0"])
# How often a call takes each special case (drawn independently).
P_ALL_FULL, P_EMPTY_RANK, P_ONE_RANK, P_SKIPPED = 0.1, 0.15, 0.1, 0.1
SKIPPED_SHARE = 0.2  # of the slots, when a call has skipped ids
MAX_SKEW_STD = 1.5  # per-expert logit skew: std drawn in [0, MAX_SKEW_STD) per call


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=1000, help="calls through one workspace (default 1000)")
    p.add_argument("--shape", help=f"model shape (GPU default {GPU_DEFAULTS['shape']}: one of {list(MODELS)}; "
                   f"--cpu-ranks default {CPU_DEFAULTS['shape']}: one of {list(SMOKE_MODELS)})")
    p.add_argument("--max-tokens", type=int, help=f"tokens per rank at most (default {GPU_DEFAULTS['max_tokens']}; "
                   f"--cpu-ranks: {CPU_DEFAULTS['max_tokens']})")
    p.add_argument("--n-comm", nargs="+", help="n_comm values drawn from: 'auto', ints >= 0 or 'N:0' (N pushing "
                   "programs, only the dispatch fused) "
                   f"(default {' '.join(GPU_DEFAULTS['n_comm'])}; --cpu-ranks: {' '.join(CPU_DEFAULTS['n_comm'])})")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--seed", type=int, help="seed of the weights and of every call (default: a fresh one, printed)")
    p.add_argument("--replay", type=int, metavar="CALL", help="run only this call index of the run with --seed")
    p.add_argument("--check-every", type=int, default=50, help="calls between the state's check_errors() (default 50)")
    p.add_argument("--cpu-ranks", type=int, metavar="W", help="W gloo ranks on CPU, kernels interpreted")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where ep_stress.csv goes")
    args = p.parse_args(argv)
    defaults = CPU_DEFAULTS if args.cpu_ranks else GPU_DEFAULTS
    args.shape = args.shape or defaults["shape"]
    names = list(SMOKE_MODELS) + list(MODELS)
    if args.shape not in names:
        p.error(f"--shape: expected one of {names}, got {args.shape!r}")
    args.max_tokens = args.max_tokens or defaults["max_tokens"]
    args.n_comm = args.n_comm or defaults["n_comm"]
    try:
        [parse_split(v) for v in args.n_comm]
    except ValueError:
        p.error(f"--n-comm: expected 'auto', ints >= 0 or 'N:0' with N > 0, got {args.n_comm}")
    for name in ("calls", "max_tokens", "check_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.cpu_ranks is not None and args.cpu_ranks < 1:
        p.error(f"--cpu-ranks: expected a positive int, got {args.cpu_ranks}")
    if args.replay is not None:
        if args.seed is None:
            p.error("--replay: needs the --seed of the run it replays")
        if not 0 <= args.replay < args.calls:
            p.error(f"--replay: expected a call index in [0, --calls={args.calls}), got {args.replay}")
    return args


# ----------------------------------------------------------------------------------------------
# Calls
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CallParams:
    """What one call runs; a function of (seed, index) and the run's settings, the same on every rank."""

    index: int
    counts: tuple[int, ...]  # tokens of each rank
    n_comm: str  # an --n-comm value
    skew_std: float  # std of the per-expert logit skew
    one_rank: int | None  # every token's experts on this rank, or None
    skipped_share: float  # share of slots given id E (skipped)
    lead_experts: int | None  # the fused GEMM1's lead experts (None: the cost model's)

    def describe(self, seed: int) -> str:
        return ", ".join(f"{k}={v}" for k, v in {"seed": seed, **asdict(self)}.items())


def call_params(seed: int, index: int, world: int, max_tokens: int, n_comm_choices: list,
                cfg: comet.MoEConfig) -> CallParams:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)

    def draw() -> float:
        return float(torch.rand((), generator=gen))

    def pick(n: int) -> int:
        return int(torch.randint(n, (), generator=gen))

    # Every value is drawn on every call, so a call's parameters do not depend on earlier branches.
    counts = torch.randint(0, max_tokens + 1, (world,), generator=gen).tolist()
    all_full, empty, empty_rank = draw() < P_ALL_FULL, draw() < P_EMPTY_RANK, pick(world)
    one_rank, target = draw() < P_ONE_RANK, pick(world)
    skipped, skew_std, n_comm = draw() < P_SKIPPED, draw() * MAX_SKEW_STD, n_comm_choices[pick(len(n_comm_choices))]
    if all_full:
        counts = [max_tokens] * world
    if empty:
        counts[empty_rank] = 0
    # One rank's experts can serve every token only if it has top_k of them.
    one_rank = one_rank and cfg.top_k <= cfg.num_experts // world
    model_lead, lead = draw() < 0.5, pick(cfg.num_experts // world + 1)
    return CallParams(index, tuple(counts), n_comm, round(skew_std, 4), target if one_rank else None,
                      SKIPPED_SHARE if skipped else 0.0, None if model_lead else lead)


def rank_inputs(p: CallParams, seed: int, rank: int, world: int, cfg: comet.MoEConfig, dtype: torch.dtype,
                device: torch.device):
    """This rank's x [T, H], topk_ids [T, K] (distinct per token) and fp32 topk_weights for call `p`."""
    num_experts, top_k, num_tokens = cfg.num_experts, cfg.top_k, p.counts[rank]
    # The skew is the layer's (the same on every rank); the tokens are the rank's own.
    skew = torch.randn(num_experts, generator=torch.Generator().manual_seed(seed * 7919 + p.index)) * p.skew_std
    gen = torch.Generator(device).manual_seed((seed * 1_000_003 + p.index) * 1009 + rank)
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device) + skew.to(device)
    if p.one_rank is not None:
        per_rank = num_experts // world
        elsewhere = torch.ones(num_experts, dtype=torch.bool, device=device)
        elsewhere[p.one_rank * per_rank:(p.one_rank + 1) * per_rank] = False
        logits = logits.masked_fill(elsewhere, -math.inf)
    chosen, topk_ids = logits.topk(top_k, dim=1)
    topk_weights = chosen.softmax(dim=1)
    if p.skipped_share:
        skip = torch.rand(num_tokens, top_k, generator=gen, device=device) < p.skipped_share
        topk_ids = topk_ids.masked_fill(skip, num_experts)
    x = torch.randn(num_tokens, cfg.hidden_size, generator=gen, device=device).to(dtype)
    return x, topk_ids, topk_weights


def output_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error, max abs error) of `out` against the fp32 `ref`; inf if `out`
    has any NaN or inf."""
    rel = relative_error(out, ref)
    if math.isnan(rel):
        return math.inf, math.inf
    return rel, float((out.float() - ref).abs().max()) if out.numel() else 0.0


# ----------------------------------------------------------------------------------------------
# One rank
# ----------------------------------------------------------------------------------------------
def _agreed_seed(seed: int | None) -> int:
    """`seed`, or a fresh one drawn on rank 0 and sent to every rank."""
    box = [seed if seed is not None else int.from_bytes(os.urandom(4), "little") >> 1]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _comm_failed(failure: str | None, device: torch.device) -> bool:
    """Collective: whether any rank's check_errors failed, so that all ranks stop together."""
    flag = torch.tensor([failure is not None], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def run(args) -> dict | None:
    """One rank's part (the process group is up): rank 0 returns the summary, others None."""
    from comet.comm import CommTimeoutError
    from comet.ep import ExpertParallelState, ep_experts

    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    dtype, shape = DTYPES[args.dtype], model_shape(args.shape)
    cfg, seed = shape.cfg, _agreed_seed(args.seed)
    if cfg.num_experts % world:
        raise ValueError(f"--shape {args.shape}: {cfg.num_experts} experts do not split over {world} ranks")
    log = RunLog("ep_stress") if rank == 0 else None
    env = environment(device)
    if log is not None:
        log(" ".join(f"{k}={v}" for k, v in env.items()) + f" world_size={world}")
        log(f"ep stress: {args.shape} (E{cfg.num_experts} K{cfg.top_k} H{cfg.hidden_size} F{cfg.ffn_size}) "
            f"{args.dtype}, <= {args.max_tokens} tokens/rank, n_comm from {args.n_comm}, seed {seed}")
    torch.manual_seed(seed)  # the same full weights on every rank
    full = make_weights(shape, dtype, device)
    per_rank = cfg.num_experts // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    names = [n for n in ("gate_up", "down", "gate_up_bias", "down_bias") if getattr(full, n) is not None]
    local = full._replace(**{n: getattr(full, n)[part] for n in names})
    # fp32 once (the bf16 values exactly), so the reference converts nothing per call.
    ref_w = full._replace(**{n: getattr(full, n).float() for n in names})
    del full

    indices = [args.replay] if args.replay is not None else list(range(args.calls))
    state = ExpertParallelState(max_tokens=args.max_tokens, configs=[cfg])
    bar = progress(len(indices), "ep stress") if log is not None else None
    records, failure, start = [], None, time.perf_counter()
    with torch.inference_mode():
        for done, index in enumerate(indices, 1):
            p = call_params(seed, index, world, args.max_tokens, args.n_comm, cfg)
            x, ids, weights = rank_inputs(p, seed, rank, world, cfg, dtype, device)
            n_comm, column_chunks = parse_split(p.n_comm)
            out = ep_experts(x, ids, weights, local, cfg, state, n_comm=n_comm,
                             column_chunks=column_chunks, lead_experts=p.lead_experts)
            ref = experts_reference(x.float(), ids, weights, *ref_w[:4], activation=cfg.activation,
                                    swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
                                    interleaved=ref_w.interleaved, weight_on_input=cfg.weight_on_input)
            rel, abs_err = output_errors(out, ref)
            ok = within_tolerance(rel, dtype)
            records.append(dict(rank=rank, call=index, n_comm=str(p.n_comm), tokens=p.counts[rank], rel_err=rel,
                                abs_err=abs_err, ok=ok))
            if not ok:
                print(f"!!! MISMATCH rank {rank}, call {index}: rel err {rel:.3g} (tolerance {TOLERANCE[dtype]}), "
                      f"max abs err {abs_err:.3g}; {p.describe(seed)}", flush=True)
            if done % args.check_every == 0 or done == len(indices):
                try:
                    state.check_errors()
                except CommTimeoutError as exc:
                    failure = f"rank {rank}: {exc}"
                    print(f"!!! {failure}", flush=True)
                if _comm_failed(failure, device):  # this rank's or another's: all stop here
                    break
            if bar is not None:
                bar.update()
                if done % args.check_every == 0:
                    mine = pd.DataFrame(records)
                    status = (f"rank 0: {int((~mine['ok']).sum())} mismatches, worst rel err "
                              f"{mine['rel_err'].max():.2g}")
                    if bar.disable:  # not a terminal (a log): a line per check instead
                        log(f"{done}/{len(indices)} calls, {time.perf_counter() - start:.0f} s, {status}")
                    bar.set_postfix_str(status)
    elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if len(records) == len(indices):  # every rank finished, so all are in step for this collective
        state.close()
    gathered = [None] * world if rank == 0 else None
    dist.gather_object((records, failure), gathered, dst=0)
    if rank != 0:
        return None
    log.close()
    failures = [f for _, f in gathered if f is not None]
    table = pd.DataFrame([r for rs, _ in gathered for r in rs])
    return dict(env=env, world=world, cfg=cfg, seed=seed, table=table, failures=failures, elapsed_s=elapsed,
                params={i: call_params(seed, i, world, args.max_tokens, args.n_comm, cfg) for i in indices})


# ----------------------------------------------------------------------------------------------
# Report (rank 0)
# ----------------------------------------------------------------------------------------------
def report(summary: dict, args) -> int:
    """Print the summary, append the CSV row; the exit code: 1 on any mismatch or failure."""
    log = RunLog("ep_stress")
    table, cfg, seed, dtype = summary["table"], summary["cfg"], summary["seed"], DTYPES[args.dtype]
    per_call = table.groupby("call").agg(n_comm=("n_comm", "first"), ok=("ok", "all"), rel_err=("rel_err", "max"),
                                         abs_err=("abs_err", "max"))
    bad = per_call[~per_call["ok"]]
    by_n_comm = per_call.groupby("n_comm", sort=False).agg(
        calls=("ok", "size"), mismatches=("ok", lambda ok: int((~ok).sum())), worst_rel_err=("rel_err", "max"),
        worst_abs_err=("abs_err", "max"))
    by_n_comm = by_n_comm.reindex([str(v) for v in args.n_comm]).dropna().astype({"calls": int, "mismatches": int})
    for call, r in bad.iterrows():
        ranks = table[(table["call"] == call) & ~table["ok"]]
        errors = ", ".join(f"rank {int(q['rank'])} rel {q['rel_err']:.3g} abs {q['abs_err']:.3g}"
                           for _, q in ranks.iterrows())
        log(f"!!! MISMATCH call {call}: {errors}; {summary['params'][call].describe(seed)}")
    if len(bad):
        log(f"to replay a call: this run's arguments with --seed {seed} --replay <call> "
            f"(or --seed {seed} --calls <call + 1> to rerun every call up to it)")
    for failure in summary["failures"]:
        log(f"!!! COMMUNICATION ERROR {failure}")
    worst_rel, worst_abs = (float(per_call[c].max()) if len(per_call) else 0.0 for c in ("rel_err", "abs_err"))
    log(f"\nep stress, {args.shape}, {args.dtype}, {summary['world']} ranks, <= {args.max_tokens} tokens/rank, "
        f"seed {seed}" + (f", replay of call {args.replay}" if args.replay is not None else ""))
    log(by_n_comm.to_string(float_format=lambda v: f"{v:.3g}"))
    log(f"calls {len(per_call)}, mismatches {len(bad)}, worst rel err {worst_rel:.3g} (tolerance {TOLERANCE[dtype]}), "
        f"worst abs err {worst_abs:.3g}, elapsed {summary['elapsed_s']:.1f} s")
    status = "error" if summary["failures"] else "mismatch" if len(bad) else "ok"
    row = {**summary["env"], "world_size": summary["world"], "shape": args.shape, "E": cfg.num_experts,
           "K": cfg.top_k, "H": cfg.hidden_size, "F": cfg.ffn_size, "dtype": args.dtype,
           "max_tokens_per_rank": args.max_tokens, "seed": seed,
           "replay": args.replay if args.replay is not None else "", "calls": len(per_call),
           "calls_per_n_comm": " ".join(f"{n}={int(r['calls'])}" for n, r in by_n_comm.iterrows()),
           "mismatches": len(bad), "mismatch_calls": " ".join(str(c) for c in bad.index),
           "worst_rel_err": worst_rel, "worst_abs_err": worst_abs, "tolerance": TOLERANCE[dtype],
           "elapsed_s": round(summary["elapsed_s"], 2), "status": status, "note": " | ".join(summary["failures"])[:300]}
    csv = args.results_dir / "ep_stress.csv"
    append_csv(csv, [row])
    log(f"{status}: appended a row to {csv}")
    log.close()
    return 0 if status == "ok" else 1


def _cpu_rank(args) -> dict | None:
    torch.set_num_threads(1)  # tiny CPU ops on a shared machine
    return run(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_ranks:
        from comet.multiprocess import run_ranks

        summary = run_ranks(_cpu_rank, args.cpu_ranks, args, env={"TRITON_INTERPRET": "1"}, timeout=3600)[0]
        return report(summary, args)
    init_torchrun_rank("tests.ep_stress", "--cpu-ranks 2")
    try:
        summary = run(args)
        return report(summary, args) if summary is not None else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
