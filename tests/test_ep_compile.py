"""Every expert-parallel kernel compiles for Hopper (no GPU needed)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _cases() -> tuple[dict, dict, dict]:
    """(kernel argument types, GEMM constexprs, communication constexprs) of the EP kernels; the
    GEMM's by `GemmArgs` field (the kernels' `gemm` argument) and tile-map argument."""
    tables = {name: "*i64" for name in ("recv_x_table", "recv_ids_table", "recv_weights_table", "recv_count_table",
                                        "meta_table", "chunk_table", "partials_table", "flags_table", "error_ptr",
                                        "column_done_ptr", "claims_ptr", "chunk_done_ptr", "epoch_ptr",
                                        "host_error_table")}
    pointers = dict(tables, x_ptr="*bf16", topk_ids_ptr="*i64", topk_weights_ptr="*fp32", send_tokens_ptr="*i32",
                    send_counts_ptr="*i32", ids_out_ptr="*i32", weights_out_ptr="*fp32", counts_out_ptr="*i32",
                    recv_counts_ptr="*i32", recv_ids_ptr="*i32", partial_ptr="*bf16", counts_ptr="*i32",
                    mask_ptr="*i1", slot_ptr="*i32", slots_ptr="*bf16", a_ptr="*bf16", b_ptr="*bf16", b2_ptr="*bf16", bias_ptr="*bf16",
                    bias2_ptr="*bf16", out_ptr="*bf16", sorted_rows_ptr="*i64", row_weights_ptr="*fp32",
                    hist_ptr="*i32", alpha="fp32", limit="fp32", pre_act_ptr="*bf16")
    # The tile map (ep_tiles.ArrivalTiles.kernel_args()): 8 local experts, 2 sources.
    gemm = dict(EXPERTS=8, BINS=16, NUM_BINS=32, TOP_K=8, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8,
                NUM_PROGRAMS=100, GATHER_A=True, GATED=True, INTERLEAVED=False, ACTIVATION=0, HAS_BIAS=False,
                ROW_WEIGHT=0, SCATTER_OUT=False, EVEN_K=True, DOT_PRECISION="tf32", UPCAST_DOT=False, B_DESC=1,
                A_DESC=False, SAVE_PRE_ACT=False)
    comm = dict(WORLD=2, TOP_K=8, CHUNK=16, BLOCK_H=512, BLOCK_K=8, META_BLOCK=128, NUM_PROGRAMS=132,
                META_KIND=2, CHUNK_KIND=3, WAIT_KIND=3, COMM_PROGRAMS=16, BLOCK_T=16, WAIT_BLOCK=64, SOURCES_P2=2,
                ERROR_FIELDS=5, ERROR_BLOCK=8)
    return pointers, gemm, comm


def _compile(cases: list, pointers: dict) -> list:
    """[(kernel name, whether a cubin came out)] of (kernel, values) cases compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from comet.kernels.expert_gemm import GEMM_CONSTEXPRS, GemmArgs

    compiled = []
    for fn, values in cases:
        declared = {fn.arg_names[i] for i in fn.constexprs}
        consts = {name: values[name] for name in fn.arg_names if name in declared}
        signature = {name: "constexpr" if name in consts else pointers.get(name, "i32") for name in fn.arg_names}
        if "gemm" in fn.arg_names:  # the GemmArgs tuple: its constexpr fields (and any given, e.g. None) from values
            index = fn.arg_names.index("gemm")
            fields = {name: i for i, name in enumerate(GemmArgs._fields)}
            given = {name for name in fields if name in GEMM_CONSTEXPRS or name in values}
            consts.update({(index, fields[name]): values[name] for name in given})
            signature["gemm"] = GemmArgs(*("constexpr" if name in given else pointers.get(name, "i32")
                                          for name in GemmArgs._fields))
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8, num_stages=3))
        compiled.append((fn.__name__, "cubin" in kernel.asm))
    return compiled


def _compile_ep_kernels() -> list:
    """Compile every EP kernel for sm_90 (no GPU needed): catches what the interpreter accepts and
    the compiler does not. Run in a process without TRITON_INTERPRET."""
    from comet.kernels import ep_combine, ep_dispatch

    pointers, gemm, comm = _cases()
    cases = [
        (ep_dispatch._dispatch_push_kernel, dict(comm, PUSH_ROWS=True)),
        (ep_dispatch._dispatch_push_kernel, dict(comm, PUSH_ROWS=False)),
        (ep_dispatch._dispatch_receive_kernel, dict(comm, WAIT_ROWS=True, ARRIVAL_EXPERTS=0)),
        (ep_dispatch._dispatch_receive_kernel, dict(comm, WAIT_ROWS=False, ARRIVAL_EXPERTS=8)),
        (ep_dispatch._dispatch_gate_up_kernel, dict(comm, **gemm, a_ptr=None)),  # A through recv_x_table
        (ep_combine._down_combine_kernel, {**comm, **gemm, "GATHER_A": False, "GATED": False, "ROW_WEIGHT": 2,
                                           "SCATTER_OUT": True, "A_DESC": True}),
        (ep_combine._combine_push_kernel, comm),
        (ep_combine._slot_sum_push_kernel, dict(comm, NUM_EXPERTS=16, BLOCK_N=256)),
        (ep_combine._combine_reduce_kernel, dict(comm, BLOCK_H=256)),
    ]
    return _compile(cases, pointers)


def _compile_arrival_gemm() -> list:
    """Compile the plain GEMM over arrival bins (GEMM2 with only the dispatch fused) for sm_90."""
    from comet.kernels import ep_tiles

    pointers, gemm, _ = _cases()
    down = {**gemm, "GATHER_A": False, "GATED": False, "ROW_WEIGHT": 2, "SCATTER_OUT": True, "A_DESC": True}
    return _compile([(ep_tiles._arrival_gemm_kernel, down)], pointers)


def _compiled_in_subprocess(tmp_path, function: str) -> str:
    """stdout of test_ep_compile.<function>() run in a process that compiles (no interpreter)."""
    ptxas = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.is_file():
        pytest.skip("this Triton has no NVIDIA backend to compile with")
    # "0", not unset: importing the tests' conftest would set it to "1" again.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_ep_compile; "
            f"print(test_ep_compile.{function}())")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_kernels_compile_for_hopper(tmp_path):
    stdout = _compiled_in_subprocess(tmp_path, "_compile_ep_kernels")
    assert stdout.count("True") == 9, stdout


def test_arrival_gemm_compiles_for_hopper(tmp_path):
    stdout = _compiled_in_subprocess(tmp_path, "_compile_arrival_gemm")
    assert stdout.count("True") == 1, stdout
