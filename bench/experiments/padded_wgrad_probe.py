"""Where does dW1 over presorted x (`expert_wgrad` with `padded_b`) go wrong on a GPU? Each variant
runs `gate_up_wgrad` on x copied into zero-padded expert segments and is compared with an fp32
oracle (one matmul per expert over its rows, the same bf16 inputs), tile by tile: the table lists
the relative error of the whole gradient and of the bias gradient, how many output tiles are
wrong (relative error > 1e-2 within the tile), and which M / N blocks and experts they are in; a
variant is wrong if a tile is, or the bias gradient (1e-2), or the padded copy of x, and the exit
status is then 1. Variants: sizes ([2F, H] dividing the tiles or not), tile configs, the output
through its descriptor or pointer stores, B (the padded x) through its descriptor or pointer
loads, with a bias gradient or without, and the gathered path (no padding) beside them.

    python -m bench.experiments.padded_wgrad_probe [--tokens 2048] [--experts 32] [--top-k 4]
    python -m bench.experiments.padded_wgrad_probe --smoke   # small sizes (CPU: the interpreter)

Appends the rows (GPU, torch, Triton, commit in each) to --results-dir/padded_wgrad_probe.csv
(bench/results; copied to $OUT when set) and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, append_csv, environment

# (2F, H): GPT-OSS-20B's, one that divides every tile here, and each partial on one side only
SIZES = ((5760, 2880), (6144, 3072), (5760, 3072), (6144, 2880))
SMOKE_SIZES = ((40, 24), (32, 32))
CONFIGS = ("128x256x64-g1w8s3", "256x128x64-g1w8s3", "128x128x64-g1w8s3")
SMOKE_CONFIGS = ("16x16x16-g1w4s2",)
BAD_TILE = 1e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--sizes", nargs="+", default=[f"{m}x{n}" for m, n in SIZES], help="2FxH of the output")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--smoke", action="store_true", help="small sizes and one config (runs on CPU too)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return p.parse_args(argv)


def _oracle(d_pre, x, sorted_rows, hist, top_k, num_experts):
    """fp32 [E, 2F, H] weight gradient and [E, 2F] bias gradient, expert by expert."""
    counts = hist[1:num_experts + 1].tolist()
    position = int(hist[0])
    out = torch.zeros(num_experts, d_pre.shape[1], x.shape[1], device=x.device)
    bias = torch.zeros(num_experts, d_pre.shape[1], device=x.device)
    for e, count in enumerate(counts):
        rows = slice(position, position + count)
        a = d_pre[rows].float()
        out[e] = a.T @ x[sorted_rows[rows] // top_k].float()
        bias[e] = a.sum(0)
        position += count
    return out, bias


def _tile_errors(got, want, block_m, block_n):
    """Relative error of every [block_m, block_n] tile of every expert: [E, m_blocks, n_blocks]."""
    e, m, n = want.shape
    pm, pn = -m % block_m, -n % block_n
    diff = torch.nn.functional.pad((got.float() - want).abs(), (0, pn, 0, pm))
    ref = torch.nn.functional.pad(want.abs(), (0, pn, 0, pm))
    shape = (e, (m + pm) // block_m, block_m, (n + pn) // block_n, block_n)
    return diff.reshape(shape).amax((2, 4)) / ref.reshape(shape).amax((2, 4)).clamp_min(1e-30)


def run(args) -> list[dict]:
    import comet.kernels.expert_backward as eb
    from comet.kernels.expert_backward import gate_up_wgrad
    from comet.kernels.routing import gather_padded_rows, padded_rows, sorted_routing_plan
    from bench.diagnostics.expert_gemms import parse_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    sizes, configs = ((SMOKE_SIZES, SMOKE_CONFIGS) if args.smoke else
                      ([tuple(map(int, s.split("x"))) for s in args.sizes], args.configs))
    tokens, E, K = (24, 4, 2) if args.smoke else (args.tokens, args.experts, args.top_k)
    gen = torch.Generator(device).manual_seed(0)
    ids = torch.stack([torch.randperm(E, device=device, generator=gen)[:K] for _ in range(tokens)])
    ids[:, 0][: tokens // 8] = 0  # one expert with more rows than the others
    sorted_rows, hist = sorted_routing_plan(ids.flatten(), E)
    weights = torch.rand(tokens * K, device=device, generator=gen) + 0.1
    env = environment(torch.device(device))
    rows = []
    for (two_f, hidden), name in itertools.product(sizes, configs):
        cfg = parse_config(name)
        x = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
        d_pre = torch.randn(tokens * K, two_f, device=device, generator=gen).to(dtype)
        want, want_bias = _oracle(d_pre, x, sorted_rows, hist, K, E)
        x_padded = torch.full((padded_rows(tokens * K, E, cfg.block_k), hidden), float("nan"), dtype=dtype,
                              device=device)
        gather_padded_rows(x, sorted_rows, hist, K, x_padded, num_experts=E, block=cfg.block_k)
        gather_ok = _gather_matches(x, x_padded, sorted_rows, hist, K, E, cfg.block_k)
        for path, out_desc, b_desc, bias in itertools.product(("padded", "gathered"), (True, False), (True, False),
                                                                (True, False)):
            if path == "gathered" and not (b_desc and out_desc):
                continue  # the reference path: its B gathered (pointer loads), its output as the table says
            out = torch.full((E, two_f, hidden), float("nan"), dtype=dtype, device=device)
            bias_out = torch.full((E, two_f), float("nan"), dtype=dtype, device=device) if bias else None
            with _load_paths(eb, out_desc, b_desc, x_padded):
                gate_up_wgrad(d_pre, x, sorted_rows, weights, hist, out, bias_out, top_k=K, weight_on_input=False,
                              cfg=cfg, x_padded=x_padded if path == "padded" else None)
            tiles = _tile_errors(out, want, cfg.block_m, cfg.block_n)
            bad = (tiles > BAD_TILE) | tiles.isnan()
            where = bad.nonzero().tolist()
            bias_err = _rel(bias_out, want_bias) if bias else 0.0
            rows.append(dict(
                **env, tokens=tokens, num_experts=E, top_k=K, two_f=two_f, hidden=hidden, config=name, path=path,
                out_desc="on" if out_desc else "off", b_desc="on" if b_desc else "off", bias="yes" if bias else "no",
                gather_ok=gather_ok, rel_err=f"{_rel(out, want):.2e}",
                bias_err=f"{bias_err:.2e}" if bias else "-",
                bad_tiles=f"{int(bad.sum())}/{bad.numel()}",
                m_blocks=_span(sorted({w[1] for w in where}), tiles.shape[1]),
                n_blocks=_span(sorted({w[2] for w in where}), tiles.shape[2]),
                bad_experts=_span(sorted({w[0] for w in where}), E),
                wrong=bool(where) or not gather_ok or not bias_err <= BAD_TILE))
    return rows


@contextlib.contextmanager
def _load_paths(eb, out_desc: bool, b_desc: bool, x_padded):
    """`comet.kernels.expert_backward` with a padded B's output and (x_padded's) B loads through
    descriptors where the layout allows (True) or as pointers (False), for the calls inside."""
    output_descriptor, sorted_descriptor = eb._padded_output_descriptor, eb._sorted_descriptor
    if not out_desc:
        eb._padded_output_descriptor = lambda *args: False
    if not b_desc:
        eb._sorted_descriptor = lambda t, *args: t is not x_padded and sorted_descriptor(t, *args)
    try:
        yield
    finally:
        eb._padded_output_descriptor, eb._sorted_descriptor = output_descriptor, sorted_descriptor


def _gather_matches(x, x_padded, sorted_rows, hist, top_k, num_experts, block) -> bool:
    position, padded = int(hist[0]), 0
    for count in hist[1:num_experts + 1].tolist():
        segment = -(-count // block) * block
        if not (torch.equal(x_padded[padded:padded + count], x[sorted_rows[position:position + count] // top_k])
                and (x_padded[padded + count:padded + segment] == 0).all()):
            return False
        position, padded = position + count, padded + segment
    return True


def _rel(got, want) -> float:
    return float((got.float() - want).abs().max() / want.abs().max())


def _span(values, total) -> str:
    """'-' for none, 'all' for every one, else the list (shortened past 6)."""
    if not values:
        return "-"
    if len(values) == total:
        return "all"
    return ",".join(map(str, values[:6])) + (f",..({len(values)})" if len(values) > 6 else "")


TABLE_COLUMNS = ("two_f", "hidden", "config", "path", "out_desc", "b_desc", "bias", "gather_ok", "rel_err",
                 "bias_err", "bad_tiles", "m_blocks", "n_blocks", "bad_experts")


def _format(rows) -> str:
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in TABLE_COLUMNS]
    lines = ["  ".join(k.ljust(w) for k, w in zip(TABLE_COLUMNS, widths))]
    lines += ["  ".join(str(r[k]).ljust(w) for k, w in zip(TABLE_COLUMNS, widths)) for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows = run(args)
    append_csv(args.results_dir / "padded_wgrad_probe.csv", rows)
    print(_format(rows))
    wrong = [r for r in rows if r["wrong"]]
    print(f"{len(wrong)} of {len(rows)} variants wrong")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
