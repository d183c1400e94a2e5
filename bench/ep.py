"""Expert-parallel benchmark: routed experts spread over W GPUs, each rank with its own tokens.

  a2a_grouped_mm  PyTorch + NCCL: per-(token, slot) all_to_all of rows to the experts' ranks (split
                  sizes read back to the host, as Megatron's all-to-all dispatcher does), the
                  `torch._grouped_mm` pipeline of bench/baselines.py on the local experts,
                  all_to_all back, weighted sum per token
  megatron_alltoall  Megatron-Core's MoELayer (expert_model_parallel_size=W, alltoall token
                  dispatcher, SequentialMLP experts: the fastest experts module megatron-core 0.19
                  has without Transformer Engine, TEGroupedMLP needing TE and GroupedMLP being gone),
                  this rank's experts loaded from the same weights; its router replaced by the
                  benchmark's routing (probs and routing map made outside the timing), so it computes
                  the same thing
  ours            `comet.ep.ep_experts` with n_comm=0: dispatch kernel (each token once per
                  destination rank), the persistent expert GEMMs, the slot sum pushing to the
                  sources, combine kernel; no host sync
  ours_auto       the same with n_comm="auto" (the layer's default): `comet.scheduler.ep_split`'s
                  choice, noted in the row
  ours_fused      the same with n_comm > 0 (--n-comm, one row each): routing first, then the token
                  rows pushed by the first n_comm programs of GEMM1's launch while the others compute,
                  and the partial rows pushed by the last n_comm programs of GEMM2's launch
  ours_fused_dispatch  the same with only the dispatch fused (column_chunks=0): GEMM2, then the slot
                  sum pushing its sums to the sources, as separate launches on every SM

and two diagnostic rows (not checked, not plotted) from which each row's `comm_hidden`, the share
of the communication hidden behind computation, 1 - (t - t_compute_only) / t_comm_only, follows
(with `--graphs`, every row of ours and both diagnostics are CUDA-graph replays: GPU time alone;
eager, comm_only is bound by the host's launches, which overstates the communication):

  comm_only       ours without the expert computation (comet.ep._ep_experts(experts=False)): the same traffic
  compute_only    the expert computation alone on the batch this rank receives (comet.ops.routed_experts
                  on every source's tokens that use this rank's experts, padded as ours pads them)

Every rank makes the same full expert weights (one seed) and keeps its slice; its tokens differ.
Each output is checked against the fp32 reference of the full layer on the rank's first
`--check-rows` tokens before timing. Times are CUDA events per call with a fixed repeat count (every
rank makes the same collective calls), spread over a few round-robin rounds of all rows (a drift of
the machine then spreads over every row); a row reports the slowest rank's median. The log prints
each of ours' speedups over each baseline and the share of communication hidden. Appends
bench/results/ep<W>.csv and writes ep<W>.png for W ranks (copied to $OUT when set). `--write-table` records the
fastest of ours, ours_fused and ours_fused_dispatch per shape and token count in scheduler/tables/ep_<gpu>.json, the
table `n_comm="auto"` reads first (also copied to $OUT), through `comet.ep_tune`, the same code as
`torchrun --nproc-per-node W -m comet tune --ep-split` (which times only our splits, no baselines).

    torchrun --nproc-per-node 2 -m bench.ep                      # 4 shapes x 4096, 16384 tokens per rank, bf16
    torchrun --nproc-per-node 2 -m bench.ep --write-table        # and tune the split
    torchrun --nproc-per-node 2 -m bench.ep --quick --shapes Mixtral-8x7B --tokens 4096
    python -m bench.ep --smoke                                   # 2 CPU ranks, interpreter, tiny shapes
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import torch.distributed as dist

import comet
from bench.baselines import grouped_mm_experts, grouped_mm_missing
from bench.common import (
    DTYPES, RESULTS_DIR, ROUTER_SKEW_STD, TOLERANCE, append_csv, environment, expert_flops, graph_replays,
    init_torchrun_rank, make_inputs, make_weights, plot_panels, publish, reference_output, relative_error,
    time_calls, within_tolerance,
)
from bench.shapes import SMOKE_MODELS, model_shape
from comet.ops import routed_experts
from comet.scheduler.configs import gpu_key
from comet.scheduler.ep_plan import plan_sends
from comet.scheduler.ep_split import ep_shape

SHAPES = ("Mixtral-8x7B", "Qwen3-30B-A3B", "OLMoE-1B-7B", "DeepSeek-V3")
# The token counts; at 8192 alone, 4 shapes with 2 n_comm values took ~45 s on 2 H200s.
TOKENS = (1024, 4096, 8192, 16384)
SMOKE_TOKENS = (8, 12)
DIAGNOSTICS = ("comm_only", "compute_only")  # timed only, for comm_hidden
BASELINES = ("a2a_grouped_mm", "megatron_alltoall")
OURS = ("ours", "ours_auto", "ours_fused", "ours_fused_dispatch")
SWEPT = ("ours_fused", "ours_fused_dispatch")  # one row per --n-comm
# (warm-up calls, timed calls): fixed, so that every rank makes the same collective calls.
TIMINGS = {"default": (3, 20), "quick": (2, 8), "smoke": (1, 2)}
ROUNDS = 4  # the timed calls of every row are spread over this many round-robin rounds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", help=f"model shapes (default: {', '.join(SHAPES)})")
    p.add_argument("--tokens", nargs="+", type=int, help=f"tokens per rank (default {list(TOKENS)})")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--n-comm", type=int, nargs="+", help="pushing programs of ours_fused and ours_fused_dispatch "
                   "(default 8 16 32; --smoke: 1 2)")
    p.add_argument("--input-sets", type=int, default=3, help="input sets rotated between calls (default 3)")
    p.add_argument("--check-rows", type=int, default=128, help="tokens per rank checked against the reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--smoke", action="store_true", help="2 CPU ranks, kernels interpreted, tiny shapes, temp dir")
    p.add_argument("--write-table", action="store_true", help="record the fastest split per shape and token "
                   "count in scheduler/tables/ep_<gpu>.json (GPU runs)")
    p.add_argument("--graphs", action="store_true",
                   help="time every row of ours and the diagnostics as CUDA-graph replays (GPU only): their "
                        "GPU time without the host's launch overhead, which bounds small batches and the "
                        "comm-only row otherwise; the baselines stay eager (they sync with the host)")
    p.add_argument("--impls", nargs="+", choices=BASELINES + OURS + DIAGNOSTICS,
                   help="rows to run (default: all; comm_hidden needs both diagnostics)")
    p.add_argument("--results-dir", type=Path, help="where ep<W>.csv and ep<W>.png go (default bench/results)")
    args = p.parse_args(argv)
    names = list(SMOKE_MODELS) if args.smoke else list(SHAPES)
    args.shapes = args.shapes or names
    unknown = [s for s in args.shapes if s not in names]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; choose from {names}")
    args.tokens = args.tokens or list(SMOKE_TOKENS if args.smoke else TOKENS)
    args.n_comm = args.n_comm or ([1, 2] if args.smoke else [8, 16, 32])
    args.impls = set(args.impls or BASELINES + OURS + DIAGNOSTICS)
    if min(args.n_comm) < 1:
        p.error("--n-comm: expected positive program counts")
    if args.graphs and args.smoke:
        p.error("--graphs: CUDA graphs need GPUs, --smoke runs on CPU")
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
    local_cfg = cfg.with_experts(per_rank).replace(top_k=1)  # each received row is one (token, slot)
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
# Megatron-Core's MoELayer
# ----------------------------------------------------------------------------------------------
def megatron_missing(device: torch.device) -> str | None:
    """Why the Megatron-Core baseline cannot run here, or None."""
    if device.type != "cuda":
        return "Megatron-Core's alltoall dispatcher runs on CUDA GPUs only"
    try:
        import megatron.core  # noqa: F401
    except ImportError as exc:
        return f"megatron-core is not importable: {exc}"
    return None


def init_megatron(world: int):
    """Megatron's process groups over the running world: every rank one expert-parallel shard."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                                 expert_model_parallel_size=world)


def megatron_layer(cfg: comet.MoEConfig, local: comet.ExpertWeights, dtype: torch.dtype, device: torch.device,
                   dispatcher: str = "alltoall"):
    """Megatron's MoELayer holding this rank's experts `local` (gate rows first), with the token
    `dispatcher` ("alltoall" needs CUDA; "allgather" also runs on CPU)."""
    import torch.nn.functional as F
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if cfg.activation != "swiglu" or local.interleaved or local.gate_up_bias is not None or cfg.weight_on_input:
        raise NotImplementedError("the Megatron baseline is built for SwiGLU experts without biases, gate rows first")
    config = TransformerConfig(
        num_layers=1, hidden_size=cfg.hidden_size, num_attention_heads=8, num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.top_k, moe_ffn_hidden_size=cfg.ffn_size, ffn_hidden_size=cfg.ffn_size,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, bias_activation_fusion=False,
        moe_token_dispatcher_type=dispatcher, moe_router_load_balancing_type="none",
        expert_model_parallel_size=dist.get_world_size(), params_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, perform_initialization=False,  # the weights are loaded below
    )
    # A ModuleSpec in megatron-core 0.16, a functools.partial over MoELayer in 0.19: both build when called.
    layer = get_moe_module_spec(use_te=False, num_experts=cfg.num_experts, moe_grouped_gemm=False)(config=config)
    layer = layer.to(device).eval()
    with torch.no_grad():
        for i, expert in enumerate(layer.experts.local_experts):
            expert.linear_fc1.weight.copy_(local.gate_up[i])
            expert.linear_fc2.weight.copy_(local.down[i])
    return layer


def megatron_routing(s, num_experts: int):
    """The benchmark's routing as Megatron's router returns it: dense probs [T, E] (fp32) and routing map."""
    probs = torch.zeros(s.x.shape[0], num_experts, dtype=torch.float32, device=s.x.device)
    probs.scatter_(1, s.topk_ids, s.topk_weights.float())
    return probs, torch.zeros_like(probs, dtype=torch.bool).scatter_(1, s.topk_ids, True)


# ----------------------------------------------------------------------------------------------
# Run
# ----------------------------------------------------------------------------------------------
def slowest(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def check(call, sets, ref, dtype) -> dict:
    """The slowest rank's error against the reference (None: a diagnostic row, not checked)."""
    if ref is None:
        call(sets[0])
        return {"status": "ok", "note": "diagnostic", "rel_err": math.nan}
    error = slowest(relative_error(call(sets[0])[: ref.shape[0]], ref))
    return {"status": "ok" if within_tolerance(error, dtype) else "mismatch", "note": "", "rel_err": error}


def time_round_robin(calls: dict, sets, device, timing) -> dict:
    """Median ms per call of each of `calls` (name -> call), the slowest rank's: timed in ROUNDS
    rounds, each timing every call in turn, so that a drift of the machine (clocks, a neighbour)
    spreads over all of them instead of landing on one. A call that raises is left out (its
    name maps to the exception)."""
    warmup, reps = timing
    times = {name: [] for name in calls}
    for r in range(ROUNDS):
        for name, call in calls.items():
            if isinstance(times[name], Exception):
                continue
            try:
                times[name] += time_calls(lambda i: call(sets[i]), len(sets), device, warmup=warmup if r == 0 else 1,
                                          min_reps=max(1, reps // ROUNDS), max_reps=max(1, reps // ROUNDS),
                                          budget_s=0.0)
            except Exception as exc:  # the same on every rank (shapes, not data), so no rank hangs
                times[name] = exc
    return {name: t if isinstance(t, Exception) else slowest(statistics.median(t)) for name, t in times.items()}


def run_shape(args, name: str, device: torch.device, env: dict) -> list[dict]:
    from comet.ep import ExpertParallelState, _ep_experts

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
    missing_baselines = {"a2a_grouped_mm": grouped_mm_missing(), "megatron_alltoall": megatron_missing(device)}
    mcore = None
    if not missing_baselines["megatron_alltoall"]:
        try:  # the same on every rank (shapes, not data)
            mcore = megatron_layer(cfg, local, dtype, device)
        except Exception as exc:
            missing_baselines["megatron_alltoall"] = f"cannot build: {type(exc).__name__}: {exc}"[:300]
    rows = []
    for tokens in args.tokens:
        torch.manual_seed(args.seed * 7919 + tokens * 31 + rank)  # each rank its own tokens
        sets = [make_inputs(cfg, tokens, dtype, device, skew) for _ in range(args.input_sets)]
        ref = reference_output(sets[0], full, cfg, min(tokens, args.check_rows))
        batches = {id(s): received_batch(s, cfg, tokens) for s in sets}
        routings = {id(s): megatron_routing(s, cfg.num_experts) for s in sets}
        state = ExpertParallelState(max_tokens=tokens, configs=[cfg])  # buffers sized by this token count

        def baseline(s):
            return a2a_grouped_mm_experts(s.x, s.topk_ids, s.topk_weights, local, cfg)

        def megatron(s):
            probs, routing_map = routings[id(s)]
            mcore.route = lambda hidden_states, padding_mask=None: (probs, routing_map)
            return mcore(s.x.unsqueeze(1))[0].squeeze(1)  # Megatron's [sequence, batch, H]

        def ours(n_comm, experts=True, column_chunks=None):
            return lambda s: _ep_experts(s.x, s.topk_ids, s.topk_weights, local, cfg, state,
                                        n_comm=n_comm, column_chunks=column_chunks, experts=experts)

        def compute_only(s):
            x, ids, weights = batches[id(s)]
            return routed_experts(x, ids, weights, local.gate_up, local.down, local.gate_up_bias, local.down_bias,
                                  local.interleaved, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit,
                                  cfg.weight_on_input)

        def replayed(call):
            replays = []  # captured at the first call (the check)

            def run(s):
                if not replays:
                    replays.append(graph_replays(call, sets, device))
                return replays[0](s)
            return run

        # (impl, n_comm, column_chunks, call)
        impls = ([("a2a_grouped_mm", None, None, baseline), ("megatron_alltoall", None, None, megatron),
                  ("ours", 0, None, ours(0)), ("ours_auto", "auto", None, ours("auto"))]
                 + [("ours_fused", n, None, ours(n)) for n in args.n_comm]
                 + [("ours_fused_dispatch", n, 0, ours(n, column_chunks=0)) for n in args.n_comm]
                 + [("comm_only", 0, None, ours(0, experts=False)), ("compute_only", None, None, compute_only)])
        impls = [(impl, n_comm, chunks, replayed(call) if args.graphs and impl not in BASELINES else call)
                 for impl, n_comm, chunks, call in impls if impl in args.impls]
        first, timed = len(rows), {}
        split_shape = ep_shape(tokens, cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.top_k, world, dtype)
        for impl, n_comm, chunks, call in impls:  # check each, then time them all together
            missing = missing_baselines.get(impl)
            split = state.split(split_shape, n_comm, chunks) if n_comm is not None else None
            row = {**env, "world_size": world, "shape": name, "E": cfg.num_experts, "K": cfg.top_k,
                   "H": cfg.hidden_size, "F": cfg.ffn_size, "dtype": args.dtype, "tokens_per_rank": tokens,
                   "impl": impl, "n_comm": split.n_comm if split else None,
                   "column_chunks": split.column_chunks if split else None,
                   "series": f"{impl} n_comm={n_comm}" if impl in SWEPT else impl,
                   "cuda_graph": args.graphs and impl not in BASELINES,
                   "status": "missing" if missing else "ok", "note": missing or ""}
            if not missing:
                try:
                    row.update(check(call, sets, None if impl in DIAGNOSTICS else ref, dtype))
                    if impl == "ours_auto":
                        row["note"] = f"auto: n_comm={split.n_comm}, column_chunks={split.column_chunks}"
                    timed[len(rows)] = call
                except Exception as exc:  # the same on every rank (shapes, not data), so no rank hangs
                    row.update(status="error", note=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
        for i, ms in time_round_robin(timed, sets, device, args.timing).items():
            row = rows[i]
            if isinstance(ms, Exception):
                row.update(status="error", note=f"{type(ms).__name__}: {ms}"[:300])
                continue
            row["ms"] = ms
            if row["impl"] not in DIAGNOSTICS:
                row["tflops_per_rank"] = expert_flops(cfg, tokens) / (ms * 1e-3) / 1e12
        for row in rows[first:]:
            if "tflops_per_rank" in row:
                log(f"{name} T/rank={tokens} {row['series']}: {row['status']} {row['ms']:.3f} ms, "
                    f"{row['tflops_per_rank']:.1f} TFLOP/s per rank, rel err {row['rel_err']:.2g}")
            else:
                log(f"{name} T/rank={tokens} {row['series']}: {row['status']} "
                    + (f"{row['ms']:.3f} ms" if "ms" in row else f"({row['note']})"))
        add_comm_hidden(rows[first:])
        state.close()
    return rows


def add_comm_hidden(rows: list[dict]):
    """On the rows of one (shape, tokens): comm_hidden = 1 - (t - t_compute_only) / t_comm_only
    and, for each baseline that ran, speedup_vs_<baseline> = t_baseline / t, on ours' rows."""
    ms = {r["impl"]: r.get("ms") for r in rows if r["status"] == "ok"}
    for r in rows:
        if r["impl"] not in OURS or not r.get("ms"):
            continue
        if ms.get("comm_only") and ms.get("compute_only"):
            r["comm_hidden"] = 1 - (r["ms"] - ms["compute_only"]) / ms["comm_only"]
        for baseline in BASELINES:
            if ms.get(baseline):
                r[f"speedup_vs_{baseline}"] = ms[baseline] / r["ms"]


def results_name(world_size: int, suffix: str) -> str:
    return f"ep{world_size}{suffix}"  # one table per group size: their rows do not compare


def run(args) -> list[dict]:
    """One rank's part (the process group is up); rank 0 returns the rows."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    env = environment(device)
    log(" ".join(f"{k}={v}" for k, v in env.items()) + f" world_size={dist.get_world_size()}")
    if not megatron_missing(device):
        init_megatron(dist.get_world_size())
    rows = []
    with torch.inference_mode():
        for name in args.shapes:
            shape_rows = run_shape(args, name, device, env)
            rows += shape_rows
            if dist.get_rank() == 0:  # shape by shape: a run cut short keeps what it measured
                append_csv(args.results_dir / results_name(dist.get_world_size(), ".csv"), shape_rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows if dist.get_rank() == 0 else []


def write_table(rows: list[dict], device: torch.device, dtype: torch.dtype) -> Path | None:
    """Record each measured (shape, tokens)'s fastest checked split of ours (n_comm=0) and the
    swept ones in the GPU's ep_split table (`comet.ep_tune`, what `comet tune --ep-split` writes)."""
    from comet.ep_tune import best_splits, write_splits

    candidates = [r for r in rows if r["impl"] in ("ours",) + SWEPT]
    configs = {name: model_shape(name).cfg for name in {r["shape"] for r in candidates}}
    return write_splits(best_splits(candidates), configs, rows[0]["world_size"], dtype, gpu_key(device))


def report(rows: list[dict], results_dir: Path, table: Path | None = None):
    df = pd.DataFrame(rows)
    csv, png = (results_dir / results_name(rows[0]["world_size"], suffix) for suffix in (".csv", ".png"))
    timed = df[(df["status"] != "missing")]
    if not timed.empty:
        print(timed.pivot_table(index=["shape", "tokens_per_rank"], columns="series", values="ms").to_string(
            float_format=lambda v: f"{v:.3f}"))
        print("(ms per call, slowest rank)")
        if "comm_hidden" in timed:
            hidden = timed.dropna(subset=["comm_hidden"])
            print(hidden.pivot_table(index=["shape", "tokens_per_rank"], columns="series", values="comm_hidden")
                  .to_string(float_format=lambda v: f"{v:.2f}"))
            eager = "" if timed["cuda_graph"].any() else (
                "; eager calls: comm_only is bound by the host's launches, --graphs gives the GPU's share")
            print(f"(share of the communication hidden: 1 - (t - t_compute_only) / t_comm_only{eager})")
        for baseline in BASELINES:
            column = f"speedup_vs_{baseline}"
            if column in timed and timed[column].notna().any():
                print(timed.dropna(subset=[column]).pivot_table(index=["shape", "tokens_per_rank"], columns="series",
                                                                values=column)
                      .to_string(float_format=lambda v: f"{v:.2f}x"))
                print(f"(speedup over {baseline}: its time / ours)")
        plot_panels(timed, png, panel="shape", x="tokens_per_rank", y="tflops_per_rank", series="series",
                    ylabel="TFLOP/s per rank", title=f"expert parallel, {rows[0]['world_size']} x {rows[0]['gpu']}, "
                                                     f"commit {rows[0]['commit']}")
    bad = df[df["status"].isin(["mismatch", "error"])]
    for _, r in bad.iterrows():
        why = (f"rel err {r['rel_err']:.3g} > {TOLERANCE[DTYPES[r['dtype']]]}" if r["status"] == "mismatch"
               else r["note"])
        print(f"!!! {r['status'].upper()}: {r['series']} on {r['shape']} T/rank={r['tokens_per_rank']}: {why}")
    for _, r in df[df["status"] == "missing"].drop_duplicates("impl").iterrows():
        print(f"not run: {r['impl']}: {r['note']}")
    publish([csv, png] + ([table] if table else []))
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
    init_torchrun_rank("bench.ep", "--smoke")
    try:
        rows = run(args)
        if dist.get_rank() != 0:
            return 0
        table = write_table(rows, torch.device("cuda", torch.cuda.current_device()), DTYPES[args.dtype]) \
            if args.write_table else None
        return report(rows, args.results_dir, table)
    finally:
        if not megatron_missing(torch.device("cuda")):
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
