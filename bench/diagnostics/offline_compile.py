"""Compiling the routed experts' kernels without a GPU, and without running them: what
`bench.diagnostics.kernel_resources` reads registers and spills from, and what lets a tuning sweep
compile its candidate kernels in parallel processes before it times them.

- `compile_only()`: within it, every Triton launch compiles for a CUDA compute capability and
  returns without running.
- `kernel_calls(shape)`: a launch of each kernel (forward GEMM1 / GEMM2, the four backward
  kernels, dW1 reading x presorted in zero-padded segments and the copy that writes them) with
  the shape's sizes, layout and dtypes, on small CPU tensors.
- `resources(kernel)`: registers, spill stack and shared memory of a compiled kernel.
- `precompile(jobs, capability)`: compiles (shape, kernel, config) jobs in worker processes into
  Triton's on-disk cache.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

import torch

from bench.common import progress
from bench.shapes import model_shape

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
    The launchers' interpreter-only switch UPCAST_DOT (an argument, or a field of the `gemm`
    argument, `comet.kernels.expert_gemm.GemmArgs`) is forced off, as on a GPU."""
    import triton.language as tl
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    compiled, run = [], JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        if "UPCAST_DOT" in kwargs:
            kwargs["UPCAST_DOT"] = False
        for name, value in kwargs.items():
            if "UPCAST_DOT" in getattr(value, "_fields", ()):
                kwargs[name] = value._replace(UPCAST_DOT=tl.constexpr(False))
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
    """{registers, stack_bytes, shared_kb, shared_bytes} of a compiled kernel, from its cubin."""
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
            "shared_kb": round(kernel.metadata.shared / 1024, 1), "shared_bytes": kernel.metadata.shared}


def kernel_calls(shape_name: str, rows_per_expert: int = 64, experts: int | None = None) -> dict:
    """{kernel: call(GemmConfig)} launching each kernel on CPU tensors with the shape's sizes,
    activation, bias, layout and dtypes (so with its expert count the compiled kernel is the one a
    GPU run of the shape compiles); weights are one expert's, broadcast to `experts` (default: the
    shape's)."""
    from comet.kernels.expert_backward import down_dgrad, down_wgrad, dw_partial_blocks, gate_up_dgrad, gate_up_wgrad
    from comet.kernels.expert_gemm import down_gemm, gate_up_gemm
    from comet.kernels.routing import gather_padded_rows, histogram_bins, padded_rows

    cfg = model_shape(shape_name).cfg
    h, f, k, dt = cfg.hidden_size, cfg.ffn_size, cfg.top_k, torch.bfloat16
    e = experts or cfg.num_experts
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
    sorted_rows, hist = torch.arange(rows), torch.zeros(histogram_bins(e), dtype=torch.int32)
    row_weights = torch.empty(rows)
    pre_act, d_pre_act = torch.empty(rows, 2 * f, dtype=dt), torch.empty(rows, 2 * f, dtype=dt)
    act, slots = torch.empty(rows, f, dtype=dt), torch.empty(rows, h, dtype=dt)
    d_gate_up, d_down = torch.empty(e, 2 * f, h, dtype=dt), torch.empty(e, h, f, dtype=dt)
    opts = dict(activation=cfg.activation, alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit)
    woi = cfg.weight_on_input

    def x_padded(c):  # the buffer `BackwardConfigs.gate_up_wgrad_presorted` reads (16-byte aligned rows)
        return torch.empty(padded_rows(rows, e, c.block_k), h, dtype=dt)
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
        "down_wgrad": lambda c: down_wgrad(g, act, sorted_rows, row_weights, hist, d_down, down_bias, top_k=k,
                                           weight_on_input=woi, cfg=c),
        "gate_up_wgrad": lambda c: gate_up_wgrad(d_pre_act, x, sorted_rows, row_weights, hist, d_gate_up,
                                                 gate_up_bias, top_k=k, weight_on_input=woi, cfg=c),
        # dW1 with x presorted (`BackwardConfigs.gate_up_wgrad_presorted`): the wgrad kernel alone
        "gate_up_wgrad_presorted": lambda c: gate_up_wgrad(d_pre_act, x, sorted_rows, row_weights, hist, d_gate_up,
                                                           gate_up_bias, top_k=k, weight_on_input=woi, cfg=c,
                                                           x_padded=x_padded(c)),
        # ... and the copy before it (segments of the config's block_k rows)
        "gather_padded_rows": lambda c: gather_padded_rows(x, sorted_rows, hist, k, x_padded(c), num_experts=e,
                                                           block=c.block_k, row_weights=row_weights if woi else None),
    }


def _compile_job(job) -> str | None:
    """Worker of `precompile`: compiles one (shape, kernel, GemmConfig); the error, if any."""
    shape_name, kernel, cfg, capability = job
    try:
        with compile_only(capability):
            kernel_calls(shape_name)[kernel](cfg)
    except Exception as e:  # the sweep that follows reports it where the config runs
        return f"{type(e).__name__}: {e}"
    return None


def precompile(jobs: list[tuple[str, str, "GemmConfig"]], capability: int, workers: int | None = None):
    """Compiles each (shape name, kernel, GemmConfig) in `workers` processes (default: one per
    2 CPU cores, at most 16) into Triton's on-disk cache, where a sweep's launches of the same
    kernels then find them: a sweep's time otherwise goes mostly to compiling, one kernel at a
    time. Compiling needs no GPU; `capability` is the GPU's (90 on an H200)."""
    import concurrent.futures
    import multiprocessing

    workers = workers or max(1, min(16, (os.cpu_count() or 2) // 2))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        bar = progress(len(jobs), "precompile")
        for _ in pool.map(_compile_job, [(*job, capability) for job in jobs]):
            bar.update(1)
        bar.close()
