"""The tuner behind `python -m comet tune`: sweep tile configs of the expert GEMMs on the local GPU, write the table.

For each model shape and token count, GEMM1 and GEMM2 are timed separately (CUDA events, median)
over every candidate that fits the bucket, on the same routing; the fastest pair is stored under
the shape key and rows-per-expert bucket in `scheduler/tables/<gpu>.json` (merged with what is
there), where `select_configs` finds it on the next call. `--ep-ranks 1 2` tunes each shape whole
and as one of 2 expert-parallel ranks (E/2 experts, the GEMMs such a rank runs).
"""
from __future__ import annotations

import dataclasses
import json

import torch

from comet.kernels.expert_gemm import DESCRIPTOR_MIN_BLOCK_M, GemmConfig, down_gemm, gate_up_gemm
from comet.scheduler.configs import (
    TABLE_DIR, clear_table_cache, fit_shared_memory, gpu_key, load_table, rows_bucket, shape_key,
)
from comet.scheduler.routing import analyze_routing

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); weight descriptors are tried on and off, and
# 128-row tiles also with GROUP_M 16 (docs/performance.md says where that was faster), GROUP_M 8
# otherwise.
# Decode-sized buckets stream the weights: deeper pipelines (stages cut to fit) keep more loads in
# flight (candidates added without a measurement yet).
GATE_UP_CANDIDATES = [
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (32, 64, 128, 4, 4), (32, 64, 128, 4, 6), (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 3), (64, 128, 64, 8, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
]
DOWN_CANDIDATES = [
    (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 128, 128, 4, 4), (32, 128, 128, 4, 6), (64, 128, 64, 4, 4),
    (64, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3),
]


def _candidates(table, bucket: int, element_size: int, b_tiles: int) -> list[GemmConfig]:
    # A tile taller than four times the mean rows per expert is mostly padding: skip it.
    fitting = [c for c in table if c[0] <= max(16, 4 * bucket)]
    # Weight descriptors both ways where tiles are tall enough for them to be used at all.
    configs = {fit_shared_memory(GemmConfig(m, n, k, g, w, s, weight_descriptors=d), element_size, b_tiles)
               for m, n, k, w, s in fitting for d in ((True, False) if m >= DESCRIPTOR_MIN_BLOCK_M else (True,))
               for g in ((8, 16) if m >= 128 else (8,))}
    return sorted(configs, key=lambda c: dataclasses.astuple(c))


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def tune_shape(experts: int, hidden: int, ffn: int, top_k: int, tokens: int, dtype: torch.dtype,
               device: torch.device) -> tuple[dict, dict, float, float]:
    """Best (GEMM1, GEMM2) configs for one shape and token count, with their times in ms."""
    gen = torch.Generator(device=device).manual_seed(tokens)
    logits = torch.randn(tokens, experts, device=device, generator=gen)
    logits += 0.2 * torch.randn(experts, device=device, generator=gen)  # uneven load, as trained routers
    topk_ids = logits.topk(top_k, dim=-1).indices
    row_weights = torch.rand(tokens * top_k, device=device, generator=gen)
    x = torch.randn(tokens, hidden, device=device, generator=gen).to(dtype)
    gate_up = (torch.randn(experts, 2 * ffn, hidden, device=device, generator=gen) * hidden**-0.5).to(dtype)
    down = (torch.randn(experts, hidden, ffn, device=device, generator=gen) * ffn**-0.5).to(dtype)
    plan = analyze_routing(topk_ids, experts)
    # Random data everywhere: tensor cores draw less power (and run faster) on zeros.
    act = torch.randn(tokens * top_k, ffn, device=device, generator=gen).to(dtype)
    slots = torch.empty(tokens * top_k, hidden, device=device, dtype=dtype)
    bucket = rows_bucket(tokens * top_k, experts)
    size = x.element_size()

    def gemm1(cfg):
        return lambda: gate_up_gemm(x, gate_up, None, False, plan.sorted_rows, row_weights, plan.hist, act,
                                    top_k=top_k, activation="swiglu", alpha=0.0, limit=0.0,
                                    weight_on_input=False, cfg=cfg)

    def gemm2(cfg):
        return lambda: down_gemm(act, down, None, plan.sorted_rows, row_weights, plan.hist, slots,
                                 top_k=top_k, weight_on_input=False, cfg=cfg)

    best = []
    for table, make, b_tiles in ((GATE_UP_CANDIDATES, gemm1, 2), (DOWN_CANDIDATES, gemm2, 1)):
        timed = []
        for cfg in _candidates(table, bucket, size, b_tiles):
            try:
                timed.append((_time_ms(make(cfg)), cfg))
            except Exception as err:  # a config the compiler rejects (resources) is skipped
                print(f"  skipped {cfg}: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
        ms, cfg = min(timed, key=lambda t: t[0])
        best.append((dataclasses.asdict(cfg), ms))
    return best[0][0], best[1][0], best[0][1], best[1][1]


def run(shapes: dict, token_counts, dtype: torch.dtype, device: torch.device, write: bool = True) -> dict:
    from tqdm import tqdm

    gpu = gpu_key(device)
    table = {key: dict(value) for key, value in load_table(gpu).items()}
    jobs = [(name, shape, t) for name, shape in shapes.items() for t in token_counts]
    for name, (e, h, f, k, w), tokens in tqdm(jobs, desc=f"tuning on {gpu}", unit="shape"):
        cfg1, cfg2, ms1, ms2 = tune_shape(e, h, f, k, tokens, dtype, device)
        # Timed on the ~T*K rows a rank receives, stored under the bucket an expert-parallel call
        # looks up: that of its receive buffer's W*T*K slots (comet/ep.py).
        bucket = rows_bucket(w * tokens * k, e)
        table.setdefault(shape_key(e, h, f, dtype), {})[str(bucket)] = [cfg1, cfg2]
        tqdm.write(f"{name:15s} tokens={tokens:6d} bucket={bucket:5d}  gemm1 {ms1:8.3f} ms {cfg1}  "
                   f"gemm2 {ms2:8.3f} ms {cfg2}")
        if write:  # after every shape, so an interrupted sweep keeps what it measured
            TABLE_DIR.mkdir(parents=True, exist_ok=True)
            (TABLE_DIR / f"{gpu}.json").write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
            clear_table_cache()
    if write:
        print(f"wrote {TABLE_DIR / f'{gpu}.json'}")
    return table
