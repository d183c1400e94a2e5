#!/usr/bin/env python3
"""Training benchmark of the routed experts: forward and forward + backward on the same weights,
routing and output gradient, gradients of x, the routing weights and every expert weight.

  ours            `comet.moe_experts(..., backend="triton")`: saves the pre-activation and the
                  routing plan for the backward kernels
  ours_recompute  the same with `recompute=True`: saves only the routing plan, GEMM1 runs again
  liger           Liger-Kernel's `LigerFusedMoEFunction` (SwiGLU, gate-first layout, no biases)
  grouped_mm      the `torch._grouped_mm` pipeline (bench/baselines.py) under autograd, each expert's
                  rows padded to 16 bytes (its weight gradient needs that)
  hf              transformers' experts module, "grouped_mm" implementation, under autograd

Every implementation's output and gradients are checked first against autograd through the fp32
reference (relative Frobenius error per tensor, on the first token count of each shape). Columns:
ms_fwd, ms_fwd_bwd (median CUDA-event time of eager calls), tflops (3x the forward's GEMM FLOPs over
ms_fwd_bwd), saved_gb (memory the forward leaves allocated for the backward, output excluded),
speedup_vs_liger and speedup_vs_grouped_mm (on ours rows). Writes bench/results/training.csv
(appended after each shape) and training.png; with $OUT set, copies and the log there. `--profile` adds a table of
our kernels' GPU times (torch.profiler) per shape at the middle token count.

    python -m bench.training                                   # all shapes, 4096 8192 16384 tokens
    python -m bench.training --shapes Qwen3-30B-A3B --tokens 8192 --quick
    python -m bench.training --smoke                           # tiny shapes on CPU (interpreter)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

import comet
from bench.baselines import grouped_mm_experts, grouped_mm_missing, hf_experts_module
from bench.common import (
    DTYPES, ROUTER_SKEW_STD, TOLERANCE, RunLog, append_csv, environment, expert_flops, finish_shape_args,
    make_inputs, make_weights, plot_panels, progress, publish, record_error, relative_error, run_on_device,
    time_calls, within_tolerance,
)
from bench.shapes import MODELS, model_shape
from comet.reference import experts_reference

IMPLS = ("ours", "ours_recompute", "liger", "grouped_mm", "hf")
TOKEN_COUNTS = (4096, 8192, 16384)
GRAD_NAMES = ("x", "topk_weights", "gate_up", "down", "gate_up_bias", "down_bias")


def liger_missing(cfg: comet.MoEConfig, w: comet.ExpertWeights) -> str | None:
    if w.gate_up.device.type != "cuda":
        return "Liger-Kernel's kernels need a CUDA GPU"
    try:
        import liger_kernel.ops.fused_moe  # noqa: F401
    except ImportError as exc:
        return f"liger-kernel not importable: {exc}"
    if cfg.activation != "swiglu" or w.interleaved or w.gate_up_bias is not None or cfg.weight_on_input:
        return "LigerFusedMoEFunction supports SwiGLU, gate-first weights, no biases only"
    return None


def build_impls(shape, w: comet.ExpertWeights):
    """(name -> forward(x, ids, weights, leaves) -> out, name -> why it cannot run). `leaves` are
    the differentiable tensors in GRAD_NAMES order (x and the routing weights first)."""
    cfg = shape.cfg
    calls, skipped = {}, {}

    def ours(recompute):
        def forward(x, ids, weights, params):
            experts = comet.ExpertWeights(*params, interleaved=w.interleaved)
            return comet.moe_experts(x, ids, weights, experts, cfg, backend="triton", check_values=False,
                                     recompute=recompute)
        return forward

    calls["ours"], calls["ours_recompute"] = ours(False), ours(True)
    why = liger_missing(cfg, w)
    if why:
        skipped["liger"] = why
    else:
        from liger_kernel.ops.fused_moe import LigerFusedMoEFunction

        calls["liger"] = lambda x, ids, weights, p: LigerFusedMoEFunction.apply(x, p[0], p[1], ids.int(), weights)
    why = grouped_mm_missing()
    if why:
        skipped["grouped_mm"] = why
    else:
        align = 16 // w.gate_up.element_size()  # the weight gradients' groups 16 bytes apart
        calls["grouped_mm"] = lambda x, ids, weights, p: grouped_mm_experts(
            x, ids, weights, comet.ExpertWeights(*p, interleaved=w.interleaved), cfg, group_align=align)
    try:
        module = hf_experts_module(w, cfg, shape.hf_layout)
        names = (["gate_up_proj", "down_proj"] + (["gate_up_proj_bias", "down_proj_bias"]
                                                  if w.gate_up_bias is not None else []))

        def hf(x, ids, weights, params):
            for name, p in zip(names, params):  # the module's parameters are the leaves (views are fine)
                module._parameters[name] = p.mT if shape.hf_layout == "gpt_oss" and p.dim() == 3 else p
            return module(x, ids, weights)

        calls["hf"] = hf
    except Exception as exc:  # transformers missing, or a version whose config rejects these sizes
        skipped["hf"] = f"transformers' experts module: {type(exc).__name__}: {exc}"
    return calls, skipped


def leaves_of(s, w: comet.ExpertWeights) -> list[torch.Tensor]:
    params = [t for t in (w.gate_up, w.down, w.gate_up_bias, w.down_bias) if t is not None]
    return [s.x, s.topk_weights] + params


# fp32 copies of this many bytes of expert weights (and their gradients) at a time in the reference
REFERENCE_CHUNK_BYTES = 4 << 30


def reference_grads(s, w, cfg, grad_out, chunk_bytes: int = REFERENCE_CHUNK_BYTES):
    """[output, then the gradients of leaves_of(s, w)] by autograd through the fp32 reference,
    experts a chunk at a time (a chunk's fp32 weights and gradients at once: DeepSeek-V3's all
    together would not fit beside the run); the weight and bias gradients are kept on the host."""
    x = s.x.detach().float().requires_grad_()
    weights = s.topk_weights.detach().float().requires_grad_()
    params = leaves_of(s, w)[2:]
    num_experts = w.gate_up.shape[0]
    per_expert = 8 * (w.gate_up[0].numel() + w.down[0].numel())  # fp32 copy + its gradient
    chunk = max(1, min(num_experts, chunk_bytes // per_expert))
    out, dx, d_weights, param_grads = 0, 0, 0, [[] for _ in params]
    for e0 in range(0, num_experts, chunk):
        e1 = min(num_experts, e0 + chunk)
        ids = torch.where((s.topk_ids >= e0) & (s.topk_ids < e1), s.topk_ids - e0, -1)  # -1: skipped
        part = [p[e0:e1].detach().float().requires_grad_() for p in params]
        o = experts_reference(x, ids, weights, *(part + [None] * (4 - len(part))), activation=cfg.activation,
                              swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
                              interleaved=w.interleaved, weight_on_input=cfg.weight_on_input)
        leaves = [x, weights] + part
        grads = (torch.autograd.grad(o, leaves, grad_out.float(), allow_unused=True, materialize_grads=True)
                 if o.requires_grad else [torch.zeros_like(t) for t in leaves])  # no token on these experts
        out, dx, d_weights = out + o.detach(), dx + grads[0], d_weights + grads[1]
        for acc, g in zip(param_grads, grads[2:]):
            acc.append(g.cpu())
    return [out, dx, d_weights] + [torch.cat(g) for g in param_grads]


def run_step(call, s, w, grad_out, backward: bool):
    leaves = [t.detach().requires_grad_() for t in leaves_of(s, w)]
    out = call(leaves[0], s.topk_ids, leaves[1], leaves[2:])
    if not backward:
        return [out]
    return [out] + list(torch.autograd.grad(out, leaves, grad_out))


def saved_bytes(call, s, w, device) -> int:
    """Memory the forward leaves allocated for the backward (its output excluded)."""
    if device.type != "cuda":
        return 0
    leaves = [t.detach().requires_grad_() for t in leaves_of(s, w)]
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    out = call(leaves[0], s.topk_ids, leaves[1], leaves[2:])
    torch.cuda.synchronize(device)
    used = torch.cuda.memory_allocated(device) - before - out.numel() * out.element_size()
    del out
    return used


def profile_ours(call, sets, w, grad_outs, device, log):
    """Our kernels' GPU time per call of forward + backward, by kernel name (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for i in range(2):
        run_step(call, sets[i % len(sets)], w, grad_outs[i % len(sets)], True)
    torch.cuda.synchronize(device)
    calls = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            run_step(call, sets[i % len(sets)], w, grad_outs[i % len(sets)], True)
        torch.cuda.synchronize(device)
    totals = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            totals[e.name] = totals.get(e.name, 0.0) + e.device_time / calls
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    log("  kernel GPU time per forward+backward call (us):")
    for name, us in rows[:14]:
        log(f"    {us:9.1f}  {name[:100]}")
    log(f"    {sum(totals.values()):9.1f}  (all kernels)")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", metavar="NAME", help=f"model shapes (default: all): {', '.join(MODELS)}")
    p.add_argument("--tokens", nargs="+", type=int, help=f"token counts (default: {list(TOKEN_COUNTS)})")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--input-sets", type=int, default=2, help="input sets rotated between calls (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--profile", action="store_true", help="also our kernels' GPU times (middle token count)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter), results in a temp dir")
    p.add_argument("--results-dir", type=Path, help="where the CSV and PNG go (default bench/results)")
    args = p.parse_args(argv)
    finish_shape_args(p, args, TOKEN_COUNTS)
    return args


def check(impl, got, ref, dtype, log) -> tuple[bool, float]:
    """Worst relative error over the output and the gradients that exist."""
    worst = 0.0
    for name, g, r in zip(("out",) + GRAD_NAMES, got, ref):
        error = relative_error(g.detach(), r)
        worst = max(worst, error) if error == error else float("nan")
        if not within_tolerance(error, dtype):
            log(f"!!! MISMATCH: {impl} {name}: relative error {error:.3g} > {TOLERANCE[dtype]:.1g}")
    return within_tolerance(worst, dtype), worst


def run_shape(args, device, env, name, log, bar) -> list[dict]:
    shape = model_shape(name)
    cfg, dtype = shape.cfg, DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    skew = torch.randn(cfg.num_experts, device=device) * ROUTER_SKEW_STD
    w = make_weights(shape, dtype, device)
    calls, skipped = build_impls(shape, w)
    rows, checked = [], {}
    for tokens in args.tokens:
        sets = [make_inputs(cfg, tokens, dtype, device, skew) for _ in range(args.input_sets)]
        grad_outs = [torch.randn_like(s.x) for s in sets]
        ref = reference_grads(sets[0], w, cfg, grad_outs[0]) if not checked else None
        flops = 3 * expert_flops(cfg, tokens)
        for impl in args.impls:
            bar.set_postfix_str(f"{impl} {name} T={tokens}")
            row = {**env, "shape": name, "E": cfg.num_experts, "K": cfg.top_k, "H": cfg.hidden_size,
                   "F": cfg.ffn_size, "dtype": args.dtype, "tokens": tokens, "impl": impl, "status": "ok", "note": ""}
            if impl in skipped:
                row.update(status="missing", note=skipped[impl])
            else:
                try:
                    call = calls[impl]
                    if ref is not None:
                        ok, worst = check(impl, run_step(call, sets[0], w, grad_outs[0], True), ref, dtype, log)
                        checked[impl] = ("ok" if ok else "mismatch", worst)
                    row["status"], row["max_rel_err"] = checked.get(impl, ("unchecked", float("nan")))
                    t = args.timing
                    for what, backward in (("ms_fwd", False), ("ms_fwd_bwd", True)):
                        times = time_calls(lambda i: run_step(call, sets[i], w, grad_outs[i], backward),
                                           len(sets), device, warmup=t.warmup, min_reps=t.min_reps,
                                           max_reps=t.max_reps, budget_s=t.budget_s)
                        row[what] = statistics.median(times)
                    row["tflops"] = flops / (row["ms_fwd_bwd"] * 1e-3) / 1e12
                    row["saved_gb"] = saved_bytes(call, sets[0], w, device) / 1e9
                except Exception as exc:  # report and go on: one broken path must not lose the others
                    record_error(row, log, f"{impl} on {name} T={tokens}", exc, device)
            rows.append(row)
            bar.update()
        ms = {r["impl"]: r.get("ms_fwd_bwd") for r in rows[-len(args.impls):] if r["status"] in ("ok", "mismatch")}
        for r in rows[-len(args.impls):]:
            if r["impl"].startswith("ours") and r["impl"] in ms:
                for base in ("liger", "grouped_mm"):
                    if base in ms:
                        r[f"speedup_vs_{base}"] = ms[base] / ms[r["impl"]]
        if args.profile and device.type == "cuda" and tokens == args.tokens[len(args.tokens) // 2]:
            log(f"{name} T={tokens}:")
            profile_ours(calls["ours"], sets, w, grad_outs, device, log)
        del sets, grad_outs, ref
    del w
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def format_table(rows) -> str:
    head = f"{'shape':<15}{'tokens':>7}  {'impl':<15}{'fwd ms':>8}{'fwd+bwd':>9}{'TFLOP/s':>9}{'saved GB':>9}" \
           f"{'vs liger':>9}{'vs gmm':>8}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(key, fmt):
            v = r.get(key)
            return format(v, fmt) if isinstance(v, float) and v == v else "-"
        lines.append(f"{r['shape']:<15}{r['tokens']:>7}  {r['impl']:<15}{f('ms_fwd', '8.2f'):>8}"
                     f"{f('ms_fwd_bwd', '9.2f'):>9}{f('tflops', '9.0f'):>9}{f('saved_gb', '9.2f'):>9}"
                     f"{f('speedup_vs_liger', '8.2f'):>9}{f('speedup_vs_grouped_mm', '7.2f'):>8}  {r['status']}")
    return "\n".join(lines)


def run(args, device: torch.device) -> int:
    import pandas as pd

    log = RunLog("training")
    env = environment(device)
    log(f"environment: {env}")
    bar = progress(len(args.shape_names) * len(args.tokens) * len(args.impls), "training")
    rows = []
    csv_path = args.results_dir / "training.csv"
    for name in args.shape_names:
        shape_rows = run_shape(args, device, env, name, log, bar)
        append_csv(csv_path, shape_rows)  # shape by shape: a run stopped midway keeps what it measured
        log(format_table(shape_rows))
        rows += shape_rows
    bar.close()
    df = pd.DataFrame([r for r in rows if r["status"] in ("ok", "mismatch")])
    if not df.empty:
        png = args.results_dir / "training.png"
        plot_panels(df, png, panel="shape", x="tokens", y="ms_fwd_bwd", series="impl",
                    title=f"routed experts, forward + backward ({args.dtype}, {env.get('gpu', device)})",
                    ylabel="ms (lower is better)")
        publish([png])
    log(format_table(rows))
    bad = [r for r in rows if r["status"] in ("mismatch", "error")]
    return 1 if bad else 0


def main(argv=None) -> int:
    return run_on_device("training.py", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
