#!/usr/bin/env python3
"""Diagnostic, no GPU needed: compiles the routed experts' kernels for an H100/H200 (sm_90a) on
this machine and prints what each config costs a thread block: registers per thread, the local
stack (spilled registers: anything above 0 slows a kernel down) and shared memory.

Kernels, with one shape's sizes, layout and expert count (its published config): the forward's
GEMM1 (saving the pre-activation, as in training) and GEMM2, and the backward's down_dgrad,
gate_up_dgrad and the weight gradients of both GEMMs, dW1 reading x presorted in zero-padded
segments (`gate_up_wgrad_presorted`, as `BackwardConfigs.gate_up_wgrad_presorted` runs it) and the copy that
writes them (`gather_padded_rows`: only its block_k matters) (`bench.diagnostics.offline_compile`).
Configs: the candidates `bench.diagnostics.expert_gemms` and
`bench.diagnostics.backward_gemms` time, or those named. Nothing runs: Triton compiles each kernel
with a CUDA target, and `cuobjdump` (shipped with Triton) reads the cubin's resource usage.

    python -m bench.diagnostics.kernel_resources --shapes Qwen3-30B-A3B
    python -m bench.diagnostics.kernel_resources --shapes GPT-OSS-20B --kernels down_dgrad --configs 128x128x64-g8w8s3
    python -m bench.diagnostics.kernel_resources --kernels gate_up_wgrad gate_up_wgrad_presorted \
        --configs 256x128x64-g1w8s5 256x128x64-g1w8s4
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from bench.common import progress
from bench.diagnostics.backward_gemms import DGRAD_CONFIGS, DW1_PRESORT_CONFIGS, WGRAD_CONFIGS
from bench.diagnostics.expert_gemms import DEFAULT_CONFIGS as FORWARD_CONFIGS, config_label, parse_config
from bench.diagnostics.offline_compile import compile_only, kernel_calls, resources
from bench.shapes import MODELS

KERNELS = ("gate_up_gemm", "down_gemm", "down_dgrad", "gate_up_dgrad", "down_wgrad", "gate_up_wgrad",
           "gate_up_wgrad_presorted", "gather_padded_rows")
DEFAULT_KERNELS = KERNELS[:6]
CANDIDATES = {"gate_up_gemm": FORWARD_CONFIGS, "down_gemm": FORWARD_CONFIGS, "down_dgrad": DGRAD_CONFIGS,
              "gate_up_dgrad": DGRAD_CONFIGS, "down_wgrad": WGRAD_CONFIGS, "gate_up_wgrad": WGRAD_CONFIGS,
              "gate_up_wgrad_presorted": DW1_PRESORT_CONFIGS, "gather_padded_rows": DW1_PRESORT_CONFIGS[:1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["Qwen3-30B-A3B"], choices=sorted(MODELS))
    p.add_argument("--kernels", nargs="+", default=list(DEFAULT_KERNELS), choices=KERNELS)
    p.add_argument("--configs", nargs="*", help="BLOCK_MxBLOCK_NxBLOCK_K-g<G>w<warps>s<stages> labels "
                   "(default: each kernel's candidates)")
    p.add_argument("--pointer-loads", action="store_true", help="weights through pointers, not descriptors")
    p.add_argument("--capability", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_resources: unset TRITON_INTERPRET; this compiles the kernels", file=sys.stderr)
        return 2
    from comet.kernels.expert_backward import SHARED_MEMORY_LIMIT

    jobs = [(s, kern, lbl) for s in args.shapes for kern in args.kernels for lbl in (args.configs or CANDIDATES[kern])]
    rows, bar = [], progress(len(jobs), "kernel_resources")
    calls = {}
    with compile_only(args.capability) as compiled:
        for shape_name, kernel, label in jobs:
            if shape_name not in calls:
                calls[shape_name] = kernel_calls(shape_name)
            cfg = dataclasses.replace(parse_config(label), weight_descriptors=not args.pointer_loads)
            compiled.clear()
            row = {"shape": shape_name, "kernel": kernel, "config": config_label(cfg)}
            try:
                calls[shape_name][kernel](cfg)
                row.update(resources(compiled[-1]))
            except Exception as e:  # a config the compiler refuses (shared memory, say) is a result too
                row.update(registers=None, stack_bytes=None, shared_kb=None, error=f"{type(e).__name__}: {e}"[:80])
            rows.append(row)
            bar.update(1)
    bar.close()
    width = max(14, *(len(r["kernel"]) for r in rows)) if rows else 14
    print(f"{'shape':<15} {'kernel':<{width}} {'config':<20} {'regs':>5} {'stack B':>8} {'smem KB':>8}")
    for r in rows:
        if r["registers"] is None:
            print(f"{r['shape']:<15} {r['kernel']:<{width}} {r['config']:<20} {r['error']}")
        else:
            flag = "  spills" if r["stack_bytes"] else ""
            if args.capability == 90 and r["shared_bytes"] > SHARED_MEMORY_LIMIT:
                flag += f"  over the {SHARED_MEMORY_LIMIT:,}-byte limit ({r['shared_bytes']:,})"
            print(f"{r['shape']:<15} {r['kernel']:<{width}} {r['config']:<20} {r['registers']:>5} "
                  f"{r['stack_bytes']:>8} {r['shared_kb']:>8}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
