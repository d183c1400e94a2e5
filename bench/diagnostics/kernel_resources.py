#!/usr/bin/env python3
"""Diagnostic, no GPU needed: compiles the routed experts' kernels for an H100/H200 (sm_90a) on
this machine and prints what each config costs a thread block: registers per thread, the local
stack (spilled registers: anything above 0 slows a kernel down) and shared memory.

Kernels, with one shape's sizes and layout (its published config; 8 experts stand in for all, which
changes nothing the compiler sees but the expert count): the forward's GEMM1 (saving the
pre-activation, as in training) and GEMM2, and the backward's down_dgrad, gate_up_dgrad and the
weight gradients of both GEMMs. Configs: the candidates `bench.diagnostics.expert_gemms` and
`bench.diagnostics.backward_gemms` time, or those named. Nothing runs: Triton compiles each kernel
with a CUDA target, and `cuobjdump` (shipped with Triton) reads the cubin's resource usage.

    python -m bench.diagnostics.kernel_resources --shapes Qwen3-30B-A3B
    python -m bench.diagnostics.kernel_resources --shapes GPT-OSS-20B --kernels down_dgrad --configs 128x128x64-g8w8s3
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import tempfile

import torch

from bench.common import progress
from bench.diagnostics.backward_gemms import DGRAD_CONFIGS, WGRAD_CONFIGS
from bench.diagnostics.expert_gemms import DEFAULT_CONFIGS as FORWARD_CONFIGS, config_label, parse_config
from bench.shapes import MODELS, model_shape

KERNELS = ("gate_up_gemm", "down_gemm", "down_dgrad", "gate_up_dgrad", "down_wgrad", "gate_up_wgrad")
CANDIDATES = {"gate_up_gemm": FORWARD_CONFIGS, "down_gemm": FORWARD_CONFIGS, "down_dgrad": DGRAD_CONFIGS,
              "gate_up_dgrad": DGRAD_CONFIGS, "down_wgrad": WGRAD_CONFIGS, "gate_up_wgrad": WGRAD_CONFIGS}
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)")


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver where there is no GPU: reports a compute capability,
    device 0 and stream 0, which is all compiling needs."""

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(capability: int = 90):
    """Within: every Triton kernel launch compiles for `capability` and returns without running
    (its outputs stay as they were), and the compiled kernels are appended to the yielded list.
    The launchers' interpreter-only switch UPCAST_DOT is forced off, as on a GPU."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled, run = [], JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        if "UPCAST_DOT" in kwargs:
            kwargs["UPCAST_DOT"] = False
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(kernel)
        return kernel

    driver.set_active(_CompileOnlyDriver(capability))
    JITFunction.run = compile_instead
    try:
        yield compiled
    finally:
        JITFunction.run = run
        try:
            driver.reset_active()
        except RuntimeError:  # no GPU driver on this machine to go back to
            pass


def resources(kernel) -> dict:
    """{registers, stack_bytes, shared_kb} of a compiled kernel, from its cubin."""
    import triton

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        listing = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", path], capture_output=True,
                                 text=True, check=True).stdout
    match = _RESOURCES.search(listing)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{listing}")
    return {"registers": int(match[1]), "stack_bytes": int(match[2]),
            "shared_kb": round(kernel.metadata.shared / 1024, 1)}


def kernel_calls(shape_name: str, rows_per_expert: int = 64, experts: int = 8) -> dict:
    """{kernel: call(GemmConfig)} launching each kernel on CPU tensors with the shape's hidden and
    FFN sizes, activation, bias and layout; weights are one expert's, broadcast to `experts`."""
    from comet.kernels.expert_backward import down_dgrad, dw_partial_blocks, expert_wgrad, gate_up_dgrad
    from comet.kernels.expert_gemm import down_gemm, gate_up_gemm

    cfg = model_shape(shape_name).cfg
    h, f, k, e, dt = cfg.hidden_size, cfg.ffn_size, cfg.top_k, experts, torch.bfloat16
    rows = rows_per_expert * e
    tokens = max(1, rows // k)
    rows = tokens * k
    interleaved = cfg.family == "gpt_oss"
    if interleaved:  # Hugging Face's GPT-OSS layout, as transposed views
        gate_up, down = torch.empty(1, h, 2 * f, dtype=dt).expand(e, h, 2 * f).mT, \
            torch.empty(1, f, h, dtype=dt).expand(e, f, h).mT
    else:
        gate_up, down = torch.empty(1, 2 * f, h, dtype=dt).expand(e, 2 * f, h), \
            torch.empty(1, h, f, dtype=dt).expand(e, h, f)
    gate_up_bias = torch.empty(e, 2 * f, dtype=dt) if cfg.expert_bias else None
    down_bias = torch.empty(e, h, dtype=dt) if cfg.expert_bias else None
    x, g = torch.empty(tokens, h, dtype=dt), torch.empty(tokens, h, dtype=dt)
    sorted_rows, hist = torch.arange(rows, dtype=torch.int32), torch.zeros(e + 1, dtype=torch.int32)
    row_weights = torch.empty(rows)
    pre_act, d_pre_act = torch.empty(rows, 2 * f, dtype=dt), torch.empty(rows, 2 * f, dtype=dt)
    act, slots = torch.empty(rows, f, dtype=dt), torch.empty(rows, h, dtype=dt)
    d_gate_up, d_down = torch.empty(e, 2 * f, h, dtype=dt), torch.empty(e, h, f, dtype=dt)
    opts = dict(activation=cfg.activation, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    woi = cfg.weight_on_input
    return {
        "gate_up_gemm": lambda c: gate_up_gemm(x, gate_up, gate_up_bias, interleaved, sorted_rows, row_weights, hist,
                                               act, top_k=k, weight_on_input=woi, cfg=c, pre_act=pre_act, **opts),
        "down_gemm": lambda c: down_gemm(act, down, down_bias, sorted_rows, row_weights, hist, slots, top_k=k,
                                         weight_on_input=woi, cfg=c),
        "down_dgrad": lambda c: down_dgrad(g, down, down_bias, pre_act, sorted_rows, row_weights, hist, d_pre_act,
                                           act, torch.empty(dw_partial_blocks(f, c), rows), top_k=k,
                                           interleaved=interleaved, weight_on_input=woi, cfg=c, **opts),
        "gate_up_dgrad": lambda c: gate_up_dgrad(d_pre_act, gate_up, x, sorted_rows, row_weights, hist, slots,
                                                 torch.empty(dw_partial_blocks(h, c), rows), top_k=k,
                                                 weight_on_input=woi, cfg=c),
        "down_wgrad": lambda c: expert_wgrad(act, False, g, True, d_down.transpose(1, 2), down_bias, sorted_rows,
                                             row_weights, hist, top_k=k, weighted_bias=not woi, cfg=c),
        "gate_up_wgrad": lambda c: expert_wgrad(x, True, d_pre_act, False, d_gate_up.transpose(1, 2), gate_up_bias,
                                                sorted_rows, row_weights, hist, top_k=k, scale_a=woi, cfg=c),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=["Qwen3-30B-A3B"], choices=sorted(MODELS))
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS)
    p.add_argument("--configs", nargs="*", help="BLOCK_MxBLOCK_NxBLOCK_K-g<G>w<warps>s<stages> labels "
                   "(default: each kernel's candidates)")
    p.add_argument("--pointer-loads", action="store_true", help="weights through pointers, not descriptors")
    p.add_argument("--capability", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_resources: unset TRITON_INTERPRET; this compiles the kernels", file=sys.stderr)
        return 2
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
    print(f"{'shape':<15} {'kernel':<14} {'config':<20} {'regs':>5} {'stack B':>8} {'smem KB':>8}")
    for r in rows:
        if r["registers"] is None:
            print(f"{r['shape']:<15} {r['kernel']:<14} {r['config']:<20} {r['error']}")
        else:
            flag = "  spills" if r["stack_bytes"] else ""
            print(f"{r['shape']:<15} {r['kernel']:<14} {r['config']:<20} {r['registers']:>5} {r['stack_bytes']:>8} "
                  f"{r['shared_kb']:>8}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
