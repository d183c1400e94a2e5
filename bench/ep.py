#!/usr/bin/env python3
"""Expert-parallel benchmark: routed experts spread over W GPUs, each rank with its own tokens.

  a2a_grouped_mm  PyTorch + NCCL: per-(token, slot) all_to_all of rows to the experts' ranks (split
                  sizes read back to the host, as Megatron's all-to-all dispatcher does), the
                  `torch._grouped_mm` pipeline of bench/baselines.py on the local experts,
                  all_to_all back, weighted sum per token
  ours            `comet.ep.ep_experts` with n_comm=0: dispatch kernel (each token once per
                  destination rank), the persistent expert GEMMs, combine kernel; no host sync
  ours_fused      the same with n_comm > 0 (--n-comm, one row each): routing first, then the token
                  rows pushed by the first n_comm programs of GEMM1's launch while the others compute,
                  and the partial rows pushed by the last n_comm programs of GEMM2's launch

and two diagnostic rows (not checked, not plotted) from which each row's `comm_hidden`, the share
of the communication hidden behind computation, 1 - (t - t_compute_only) / t_comm_only, follows:

  comm_only       ours without the expert computation (ep_experts(experts=False)): the same traffic
  compute_only    the expert computation alone on the batch this rank receives (comet.ops.routed_experts
                  on every source's tokens that use this rank's experts, padded as ours pads them)

Every rank makes the same full expert weights (one seed) and keeps its slice; its tokens differ.
Each output is checked against the fp32 reference of the full layer on the rank's first
`--check-rows` tokens before timing. Times are CUDA events per call with a fixed repeat count (every
rank makes the same collective calls); a row reports the slowest rank's median. Appends
bench/results/ep.csv and writes ep.png (copied to $OUT when set).

    torchrun --nproc-per-node 2 bench/ep.py                      # 4 shapes x 1024..16384 tokens per rank, bf16
    torchrun --nproc-per-node 2 bench/ep.py --quick --shapes Mixtral-8x7B --tokens 4096
    python bench/ep.py --smoke                                   # 2 CPU ranks, interpreter, tiny shapes
"""
from __future__ import annotations

import os

# Before torch.distributed starts: NVLink multicast (NVLS) is never used.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import comet  # noqa: E402
from bench.baselines import grouped_mm_experts, grouped_mm_missing  # noqa: E402
from bench.common import (  # noqa: E402
    DTYPES, RESULTS_DIR, TOLERANCE, append_csv, environment, plot_panels, publish, relative_error, time_calls,
    within_tolerance,
)
from bench.shapes import SMOKE_MODELS, model_shape  # noqa: E402
from comet.ops import routed_experts  # noqa: E402
from comet.scheduler.ep_plan import plan_sends  # noqa: E402
from bench.single_gpu import ROUTER_SKEW_STD, expert_flops, make_inputs, make_weights, reference_output  # noqa: E402

SHAPES = ("Mixtral-8x7B", "Qwen3-30B-A3B", "OLMoE-1B-7B", "DeepSeek-V3")
TOKENS = (1024, 4096, 16384)
SMOKE_TOKENS = (8, 12)
DIAGNOSTICS = ("comm_only", "compute_only")  # timed only, for comm_hidden
# (warm-up calls, timed calls): fixed, so that every rank makes the same collective calls.
TIMINGS = {"default": (3, 20), "quick": (2, 8), "smoke": (1, 2)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", help=f"model shapes (default: {', '.join(SHAPES)})")
    p.add_argument("--tokens", nargs="+", type=int, help=f"tokens per rank (default {list(TOKENS)})")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--n-comm", type=int, nargs="+", help="pushing programs of ours_fused (default 8 16 32; "
                   "--smoke: 1 2)")
    p.add_argument("--input-sets", type=int, default=3, help="input sets rotated between calls (default 3)")
    p.add_argument("--check-rows", type=int, default=128, help="tokens per rank checked against the reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--smoke", action="store_true", help="2 CPU ranks, kernels interpreted, tiny shapes, temp dir")
    p.add_argument("--results-dir", type=Path, help="where ep.csv and ep.png go (default bench/results)")
    args = p.parse_args(argv)
    names = list(SMOKE_MODELS) if args.smoke else list(SHAPES)
    args.shapes = args.shapes or names
    unknown = [s for s in args.shapes if s not in names]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {names}")
    args.tokens = args.tokens or list(SMOKE_TOKENS if args.smoke else TOKENS)
    args.n_comm = args.n_comm or ([1, 2] if args.smoke else [8, 16, 32])
    if min(args.n_comm) < 1:
        p.error("--n-comm: expected positive program counts")
    args.timing = TIMINGS["smoke" if args.smoke else "quick" if args.quick else "default"]
    if args.results_dir is None:
        args.results_dir = Path(tempfile.mkdtemp(prefix="comet-bench-ep-")) if args.smoke else RESULTS_DIR
    return args


def log(msg: str):
    if dist.get_rank() == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# The PyTorch + NCCL baseline
# ----------------------------------------------------------------------------------------------
def a2a_grouped_mm_experts(x, topk_ids, topk_weights, local_w: comet.ExpertWeights, cfg: comet.MoEConfig,
                           group=None) -> torch.Tensor:
    """Per-copy expert parallelism with all_to_all: each (token, slot) row goes to its expert's rank."""
    world = dist.get_world_size(group)
    per_rank = cfg.num_experts // world
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)  # rows by expert, hence by destination rank
    send_counts = torch.bincount(flat // per_rank, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()  # host sync
    sorted_ids = flat.index_select(0, order)
    # Local expert id and weight travel together as fp32 (ids < 2^24 are exact).
    meta = torch.stack([(sorted_ids % per_rank).float(), topk_weights.reshape(-1).float().index_select(0, order)], 1)
    recv_meta = meta.new_empty(sum(recv_splits), 2)
    dist.all_to_all_single(recv_meta, meta, recv_splits, send_splits, group=group)
    send_x = x.index_select(0, order // top_k)
    recv_x = x.new_empty(sum(recv_splits), x.shape[1])
    dist.all_to_all_single(recv_x, send_x, recv_splits, send_splits, group=group)
    local_cfg = cfg.replace(num_experts=per_rank, top_k=1, n_group=1, topk_group=1)
    y = grouped_mm_experts(recv_x, recv_meta[:, :1].long(), recv_meta[:, 1:], local_w, local_cfg)
    back = torch.empty_like(send_x)
    dist.all_to_all_single(back, y, send_splits, recv_splits, group=group)
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, order // top_k, back.float()).to(x.dtype)


def received_batch(s, cfg: comet.MoEConfig, max_tokens: int):
    """What `ep_experts` computes on this rank: for every source rank, its tokens that use this
    rank's experts, in order, padded to `max_tokens` slots (local expert ids, -1 elsewhere).
    Built with all_gathers, outside any timing; every rank has the same token count here."""
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = cfg.num_experts // world
    gathered = []
    for t in (s.x, s.topk_ids, s.topk_weights.float()):
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        gathered.append(parts)
    xs, ids, weights = [], [], []
    for x_s, ids_s, w_s in zip(*gathered):
        plan = plan_sends(ids_s, cfg.num_experts, world)
        count = int(plan.counts[rank])
        tokens = plan.send_tokens[rank, :count].long()
        local = ids_s[tokens] - rank * per_rank
        pad = max_tokens - count
        xs.append(torch.nn.functional.pad(x_s[tokens], (0, 0, 0, pad)))
        ids.append(torch.nn.functional.pad(torch.where((local >= 0) & (local < per_rank), local, -1), (0, 0, 0, pad),
                                           value=-1))
        weights.append(torch.nn.functional.pad(w_s[tokens], (0, 0, 0, pad)))
    return torch.cat(xs), torch.cat(ids).int(), torch.cat(weights)


# ----------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------
def slowest(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def measure(call, sets, ref, dtype, device, timing) -> dict:
    """Check against the reference (unless `ref` is None), then time: the slowest rank's error
    and median."""
    error = slowest(relative_error(call(sets[0])[: ref.shape[0]], ref)) if ref is not None else math.nan
    if ref is None:
        return {"status": "ok", "note": "diagnostic", "rel_err": error, "ms": _timed(call, sets, device, timing)}
    return {"status": "ok" if within_tolerance(error, dtype) else "mismatch", "note": "", "rel_err": error,
            "ms": _timed(call, sets, device, timing)}


def _timed(call, sets, device, timing) -> float:
    warmup, reps = timing
    times = time_calls(lambda i: call(sets[i]), len(sets), device, warmup=warmup, min_reps=reps, max_reps=reps,
                       budget_s=0.0)
    return slowest(statistics.median(times))


def run_shape(args, name: str, device: torch.device, env: dict) -> list[dict]:
    from comet.ep import ep_experts, release_workspace

    shape = model_shape(name)
    cfg, dtype = shape.cfg, DTYPES[args.dtype]
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = cfg.num_experts // world
    torch.manual_seed(args.seed)  # the same full weights and router skew on every rank
    skew = torch.randn(cfg.num_experts, device=device) * ROUTER_SKEW_STD
    full = make_weights(shape, dtype, device)
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    local = full._replace(**{k: getattr(full, k)[part] for k in ("gate_up", "down", "gate_up_bias", "down_bias")
                             if getattr(full, k) is not None})
    rows = []
    for tokens in args.tokens:
        torch.manual_seed(args.seed * 7919 + tokens * 31 + rank)  # each rank its own tokens
        sets = [make_inputs(cfg, tokens, dtype, device, skew) for _ in range(args.input_sets)]
        ref = reference_output(sets[0], full, cfg, min(tokens, args.check_rows))
        batches = {id(s): received_batch(s, cfg, tokens) for s in sets}

        def baseline(s):
            return a2a_grouped_mm_experts(s.x, s.topk_ids, s.topk_weights, local, cfg)

        def ours(n_comm, experts=True):
            return lambda s: ep_experts(s.x, s.topk_ids, s.topk_weights, local, cfg, max_tokens=tokens,
                                        n_comm=n_comm, experts=experts)

        def compute_only(s):
            x, ids, weights = batches[id(s)]
            return routed_experts(x, ids, weights, local.gate_up, local.down, local.gate_up_bias, local.down_bias,
                                  local.interleaved, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit,
                                  cfg.weight_on_input)

        impls = ([("a2a_grouped_mm", None, baseline), ("ours", 0, ours(0))]
                 + [("ours_fused", n, ours(n)) for n in args.n_comm]
                 + [("comm_only", 0, ours(0, experts=False)), ("compute_only", None, compute_only)])
        first = len(rows)
        for impl, n_comm, call in impls:
            missing = grouped_mm_missing() if impl == "a2a_grouped_mm" else None
            row = {**env, "world_size": world, "shape": name, "E": cfg.num_experts, "K": cfg.top_k,
                   "H": cfg.hidden_size, "F": cfg.ffn_size, "dtype": args.dtype, "tokens_per_rank": tokens,
                   "impl": impl, "n_comm": n_comm, "series": impl if not n_comm else f"{impl} n_comm={n_comm}",
                   "status": "missing" if missing else "ok", "note": missing or ""}
            if not missing:
                try:
                    row.update(measure(call, sets, None if impl in DIAGNOSTICS else ref, dtype, device, args.timing))
                    if impl not in DIAGNOSTICS:
                        row["tflops_per_rank"] = expert_flops(cfg, tokens) / (row["ms"] * 1e-3) / 1e12
                except Exception as exc:  # the same on every rank (shapes, not data), so no rank hangs
                    row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
            if "tflops_per_rank" in row:
                log(f"{name} T/rank={tokens} {row['series']}: {row['status']} {row['ms']:.3f} ms, "
                    f"{row['tflops_per_rank']:.1f} TFLOP/s per rank, rel err {row['rel_err']:.2g}")
            else:
                log(f"{name} T/rank={tokens} {row['series']}: {row['status']} "
                    + (f"{row['ms']:.3f} ms" if "ms" in row else f"({row['note']})"))
        add_comm_hidden(rows[first:])
        release_workspace()  # buffers are sized by this token count
        del sets, batches
    return rows


def add_comm_hidden(rows: list[dict]):
    """comm_hidden = 1 - (t - t_compute_only) / t_comm_only on the rows of one (shape, tokens)."""
    ms = {r["impl"]: r.get("ms") for r in rows if r["status"] == "ok"}
    if ms.get("comm_only") and ms.get("compute_only"):
        for r in rows:
            if r["impl"] in ("ours", "ours_fused") and r.get("ms"):
                r["comm_hidden"] = 1 - (r["ms"] - ms["compute_only"]) / ms["comm_only"]


def run(args) -> list[dict]:
    """One rank's part (the process group is up); rank 0 returns the rows."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    env = environment(device)
    log(" ".join(f"{k}={v}" for k, v in env.items()) + f" world_size={dist.get_world_size()}")
    rows = []
    with torch.inference_mode():
        for name in args.shapes:
            shape_rows = run_shape(args, name, device, env)
            rows += shape_rows
            if dist.get_rank() == 0:  # shape by shape: a run cut short keeps what it measured
                append_csv(args.results_dir / "ep.csv", shape_rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows if dist.get_rank() == 0 else []


def report(rows: list[dict], results_dir: Path):
    df = pd.DataFrame(rows)
    csv, png = results_dir / "ep.csv", results_dir / "ep.png"
    timed = df[(df["status"] != "missing")]
    if not timed.empty:
        print(timed.pivot_table(index=["shape", "tokens_per_rank"], columns="series", values="ms").to_string(
            float_format=lambda v: f"{v:.3f}"))
        print("(ms per call, slowest rank)")
        if "comm_hidden" in timed:
            hidden = timed.dropna(subset=["comm_hidden"])
            print(hidden.pivot_table(index=["shape", "tokens_per_rank"], columns="series", values="comm_hidden")
                  .to_string(float_format=lambda v: f"{v:.2f}"))
            print("(share of the communication hidden: 1 - (t - t_compute_only) / t_comm_only)")
        plot_panels(timed, png, panel="shape", x="tokens_per_rank", y="tflops_per_rank", series="series",
                    ylabel="TFLOP/s per rank", title=f"expert parallel, {rows[0]['world_size']} x {rows[0]['gpu']}, "
                                                     f"commit {rows[0]['commit']}")
    bad = df[df["status"].isin(["mismatch", "error"])]
    for _, r in bad.iterrows():
        why = (f"rel err {r['rel_err']:.3g} > {TOLERANCE[DTYPES[r['dtype']]]}" if r["status"] == "mismatch"
               else r["note"])
        print(f"!!! {r['status'].upper()}: {r['series']} on {r['shape']} T/rank={r['tokens_per_rank']}: {why}")
    publish([csv, png])
    print(f"appended {len(rows)} rows to {csv}")
    return 1 if len(bad) else 0


def _smoke_rank(args) -> list[dict]:
    torch.set_num_threads(1)  # tiny CPU ops on a shared machine
    return run(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        from comet.multiprocess import run_ranks

        rows = run_ranks(_smoke_rank, 2, args, env={"TRITON_INTERPRET": "1"}, timeout=600)[0]
        return report(rows, args.results_dir)
    if "LOCAL_RANK" not in os.environ:
        sys.exit("bench/ep.py: launch it with torchrun, e.g. torchrun --nproc-per-node 2 bench/ep.py "
                 "(or add --smoke for a CPU run)")
    if not torch.cuda.is_available():
        sys.exit("bench/ep.py: needs CUDA GPUs (or --smoke)")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    try:
        rows = run(args)
        return report(rows, args.results_dir) if dist.get_rank() == 0 else 0
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
