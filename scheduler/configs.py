"""Tile configurations of the expert GEMMs, chosen per call from the shape bucket.

Source, in order: the tuned table for this GPU (`scheduler/tables/<gpu>.json`, written by
`python -m comet tune`): the shape's entry, else the entry of the same hidden and FFN sizes with
the nearest expert count (an expert-parallel rank's E/W experts are the full model's GEMMs over
fewer experts); else a heuristic on the mean rows per expert. No autotuning at call time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import NamedTuple

import torch

from comet.kernels.expert_backward import (
    PADDED_WGRAD_EPILOGUE_BYTES, SHARED_MEMORY_LIMIT, padded_wgrad_pipeline_bytes,
)
from comet.kernels.expert_gemm import GemmConfig

TABLE_DIR = Path(__file__).resolve().parent / "tables"


@functools.lru_cache(maxsize=None)
def gpu_key(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def rows_bucket(num_rows: int, num_experts: int) -> int:
    """Mean rows per expert, rounded up to a power of two: the bucket a table entry covers."""
    mean = max(1, -(-num_rows // num_experts))
    return 1 << (mean - 1).bit_length()


def shape_key(num_experts: int, hidden: int, ffn: int, dtype: torch.dtype) -> str:
    return f"E{num_experts}_H{hidden}_F{ffn}_{str(dtype).removeprefix('torch.')}"


@functools.lru_cache(maxsize=None)
def load_table(gpu: str) -> dict:
    path = TABLE_DIR / f"{gpu}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def clear_table_cache():
    """Forget the tables read and the configs chosen from them (after a table was written)."""
    load_table.cache_clear()
    _bucket_configs.cache_clear()
    _backward_bucket_configs.cache_clear()


def heuristic_configs(bucket: int, device: torch.device) -> tuple[GemmConfig, GemmConfig]:
    if device.type != "cuda":
        small = GemmConfig(16, 32, 32, group_m=2)
        return small, small
    if bucket <= 16:
        cfg = GemmConfig(16, 64, 128, group_m=4, num_warps=4, num_stages=4)
        return cfg, cfg
    if bucket <= 64:
        cfg = GemmConfig(64, 128, 64, group_m=8, num_warps=4, num_stages=4)
        return cfg, cfg
    return (GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=3),
            GemmConfig(128, 128, 64, group_m=8, num_warps=8, num_stages=4))


SHARED_MEMORY_BUDGET = 200 * 1024  # of the 227 KiB an H100/H200 block may use; leaves epilogue room


def fit_shared_memory(cfg: GemmConfig, element_size: int, b_tiles: int) -> GemmConfig:
    """Fewer pipeline stages if the operands of `num_stages` K steps would not fit (fp32 inputs,
    say); `b_tiles` is how many [BLOCK_K, BLOCK_N] weight tiles one K step loads."""
    per_stage = (cfg.block_m + b_tiles * cfg.block_n) * cfg.block_k * element_size
    stages = max(1, min(cfg.num_stages, SHARED_MEMORY_BUDGET // per_stage))
    return dataclasses.replace(cfg, num_stages=stages)


def fit_wgrad_shared_memory(cfg: GemmConfig, element_size: int) -> GemmConfig:
    """A weight-gradient config (chosen for 16-bit operands) for operands of `element_size` bytes:
    16-bit ones keep its stages, wider ones (fp32) get fewer, as `fit_shared_memory` cuts them.
    The weight-gradient kernel holds fewer operand tiles than it has stages (its row-index loads
    take some; `python -m bench.diagnostics.kernel_resources` shows its shared memory), so the
    forward's rule would cut a 16-bit config that fits."""
    return cfg if element_size <= 2 else fit_shared_memory(cfg, element_size, 1)


def presorted_wgrad_config(cfg: GemmConfig, element_size: int) -> GemmConfig:
    """dW1's config for x read presorted in zero-padded segments
    (`BackwardConfigs.gate_up_wgrad_presorted`) at operands of `element_size` bytes: that kernel has no
    row-index loads, so each stage holds a tile of both operands; stages are cut to fit them and
    the output's epilogue in shared memory (`comet.kernels.expert_backward.SHARED_MEMORY_LIMIT`)."""
    per_stage = padded_wgrad_pipeline_bytes(dataclasses.replace(cfg, num_stages=1), element_size)
    stages = max(1, min(cfg.num_stages, (SHARED_MEMORY_LIMIT - PADDED_WGRAD_EPILOGUE_BYTES) // per_stage))
    return dataclasses.replace(cfg, num_stages=stages)


def select_configs(num_rows: int, num_experts: int, hidden: int, ffn: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[GemmConfig, GemmConfig]:
    """(GEMM1 config, GEMM2 config) for `num_rows` = tokens * top_k routed rows."""
    return _bucket_configs(rows_bucket(num_rows, num_experts), num_experts, hidden, ffn, dtype, device)


def shape_entries(table: dict, num_experts: int, hidden: int, ffn: int, dtype: torch.dtype) -> dict | None:
    """The table's buckets for this shape, else for the same hidden, FFN and dtype with the expert
    count nearest in log scale (ties: the larger count), else None."""
    exact = table.get(shape_key(num_experts, hidden, ffn, dtype))
    if exact:
        return exact
    suffix = shape_key(0, hidden, ffn, dtype).removeprefix("E0")
    counts = [int(key[1:-len(suffix)]) for key in table if key.endswith(suffix) and key[1:-len(suffix)].isdigit()]
    if not counts:
        return None
    nearest = min(counts, key=lambda e: (abs(math.log2(e / num_experts)), -e))
    return table[shape_key(nearest, hidden, ffn, dtype)]


@functools.lru_cache(maxsize=None)  # a call's host time matters at decode sizes
def _bucket_configs(bucket: int, num_experts: int, hidden: int, ffn: int, dtype: torch.dtype,
                    device: torch.device) -> tuple[GemmConfig, GemmConfig]:
    entries = shape_entries(load_table(gpu_key(device)), num_experts, hidden, ffn, dtype)
    if entries:
        # The tuned bucket nearest (in log scale) to this call's.
        best = min(entries, key=lambda b: abs(int(b).bit_length() - bucket.bit_length()))
        gemm1, gemm2 = GemmConfig(**entries[best][0]), GemmConfig(**entries[best][1])
    else:
        gemm1, gemm2 = heuristic_configs(bucket, device)
    size = dtype.itemsize
    return fit_shared_memory(gemm1, size, 2), fit_shared_memory(gemm2, size, 1)



class BackwardConfigs(NamedTuple):
    """Tile configs of the backward kernels (`comet.kernels.expert_backward`), one per launch."""

    down_dgrad: GemmConfig  # rows x F tiles over H: GEMM1's shape, with the activation's backward
    gate_up_dgrad: GemmConfig  # rows x H tiles over 2F: GEMM2's shape
    down_wgrad: GemmConfig  # H x F tiles of dW2 over each expert's rows (block_k rows per step)
    gate_up_wgrad: GemmConfig  # 2F x H tiles of dW1, x's rows gathered by token
    # dW1 with x copied first into sorted order, in zero-padded expert segments of its block_k rows
    # (`comet.kernels.routing.gather_padded_rows`, a buffer of its own), both operands through
    # descriptors; None: dW1 gathers x's rows by token at `gate_up_wgrad`. The table says which
    # (`bench/diagnostics/backward_gemms.py --dw1-presort --write-table`).
    gate_up_wgrad_presorted: GemmConfig | None = None

    def map_gemms(self, fn) -> BackwardConfigs:
        """A copy with `fn(GemmConfig) -> GemmConfig` applied to each kernel's config."""
        return self._replace(**{name: fn(c) for name, c in self._asdict().items() if isinstance(c, GemmConfig)})


def backward_table_name(gpu: str) -> str:
    """The tuned table of the backward kernels (`python -m bench.diagnostics.backward_gemms --write-table` writes it):
    {shape_key: {bucket: {BackwardConfigs field: GemmConfig fields}}}, beside the forward's."""
    return f"backward_{gpu}"


def heuristic_wgrad_configs(device: torch.device) -> tuple[GemmConfig, GemmConfig, GemmConfig | None]:
    """(down_wgrad, gate_up_wgrad, gate_up_wgrad_presorted): 128 rows of the gathered operand's
    columns by 256 of the sorted one's per tile (down_wgrad gathers its A, gate_up_wgrad its B),
    5 stages (3 data tiles in flight); dW1 over presorted x at 128 x 256 x 64, 3 stages (as many in
    flight: no row-index loads). Measured: docs/performance.md. On CPU dW1 gathers."""
    if device.type != "cuda":
        return GemmConfig(16, 32, 16, group_m=1), GemmConfig(32, 16, 16, group_m=1), None
    return (GemmConfig(128, 256, 64, group_m=1, num_warps=8, num_stages=5),
            GemmConfig(256, 128, 64, group_m=1, num_warps=8, num_stages=5),
            GemmConfig(128, 256, 64, group_m=1, num_warps=8, num_stages=3))


def backward_configs(num_rows: int, num_experts: int, hidden: int, ffn: int, dtype: torch.dtype,
                     device: torch.device) -> BackwardConfigs:
    """The backward kernels' configs for `num_rows` = tokens * top_k routed rows: the tuned backward
    table's entry (nearest bucket, nearest expert count as for the forward), else the forward's
    GEMM1 / GEMM2 configs for the dgrads and a heuristic for the weight gradients."""
    return _backward_bucket_configs(rows_bucket(num_rows, num_experts), num_experts, hidden, ffn, dtype, device)


@functools.lru_cache(maxsize=None)
def _backward_bucket_configs(bucket: int, num_experts: int, hidden: int, ffn: int, dtype: torch.dtype,
                             device: torch.device) -> BackwardConfigs:
    gemm1, gemm2 = _bucket_configs(bucket, num_experts, hidden, ffn, dtype, device)
    configs = BackwardConfigs(gemm1, gemm2, *heuristic_wgrad_configs(device))
    entries = shape_entries(load_table(backward_table_name(gpu_key(device))), num_experts, hidden, ffn, dtype)
    if entries:
        best = min(entries, key=lambda b: abs(int(b).bit_length() - bucket.bit_length()))
        configs = configs._replace(**{name: c and GemmConfig(**c) for name, c in entries[best].items()})
    size = dtype.itemsize
    presorted = configs.gate_up_wgrad_presorted
    return configs._replace(down_dgrad=fit_shared_memory(configs.down_dgrad, size, 1),
                            gate_up_dgrad=fit_shared_memory(configs.gate_up_dgrad, size, 1),
                            down_wgrad=fit_wgrad_shared_memory(configs.down_wgrad, size),
                            gate_up_wgrad=fit_wgrad_shared_memory(configs.gate_up_wgrad, size),
                            gate_up_wgrad_presorted=presorted and presorted_wgrad_config(presorted, size))
