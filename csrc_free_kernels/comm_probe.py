"""Communication probe: every rank pushes its data into every rank's receive buffer.

A small persistent kernel exercising the workspace the way the expert-parallel kernels will: peer
addresses from pointer tables, plain stores into peer memory, one flag per (source rank, chunk)
raised with release semantics, bounded acquire waits, buffers and flags reused across calls through
epochs. Used by the multi-rank tests (CPU, interpreter) and `bench/experiments/comm_probe.py` (GPU bandwidth).
"""
from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from comet.comm import CommWorkspace, WaitKind
from comet.device_info import num_sms
from comet.kernels.signals import peer_ptr, signal_set, wait_flag_ge

_PROBE_CALLS: "weakref.WeakKeyDictionary[CommWorkspace, int]" = weakref.WeakKeyDictionary()


@triton.jit(do_not_specialize=["rank", "parity", "max_spins"])
def _comm_probe_kernel(
    send_ptr,  # [n] this rank's data
    recv_table,  # int64 [W]: every rank's receive buffer [2, W, n] (parity, source rank, element)
    flag_table,  # int64 [W]: every rank's flags [2, W, n_chunks]
    error_ptr,  # this workspace's error record
    rank,
    world_size,
    epoch_ptr,  # int64 [1]: this call's epoch (CommWorkspace.next_epoch)
    parity,  # which half of the double buffers: alternates between the probe's calls
    n,
    chunk,  # elements per chunk, a multiple of BLOCK
    n_chunks,
    max_spins,
    WAIT_KIND: tl.constexpr,
    BLOCK: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,  # a constexpr, not tl.num_programs: Triton 3.6's interpreter can't loop on that
    STREAMING: tl.constexpr,  # loads evict first, stores stream (.cs): keep the pushed bytes out of the way in L2
):
    epoch = tl.load(epoch_ptr)
    pid = tl.program_id(0)
    # Chunks are dealt round-robin to the programs; each program pushes its chunks to every rank,
    # starting with the next rank so that no two sources hit one destination at once (self last).
    for c in range(pid, n_chunks, NUM_PROGRAMS):
        start = c * chunk
        end = tl.minimum(start + chunk, n)
        for i in range(world_size):
            dst = (rank + 1 + i) % world_size
            recv = peer_ptr(recv_table, dst, send_ptr) + tl.cast(parity * world_size + rank, tl.int64) * n
            for off in range(start, end, BLOCK):
                offs = tl.multiple_of(off, BLOCK) + tl.arange(0, BLOCK)
                mask = offs < end
                if STREAMING:
                    tl.store(recv + offs, tl.load(send_ptr + offs, mask=mask, eviction_policy="evict_first"),
                             mask=mask, cache_modifier=".cs")
                else:
                    tl.store(recv + offs, tl.load(send_ptr + offs, mask=mask), mask=mask)
            flags = peer_ptr(flag_table, dst, flag_table)  # flags are int64, like the table
            signal_set(flags + (parity * world_size + rank) * n_chunks + c, epoch)
    # Then the same chunks from every source, in the order the sources push to this rank.
    own_flags = peer_ptr(flag_table, rank, flag_table)
    for c in range(pid, n_chunks, NUM_PROGRAMS):
        for i in range(world_size):
            src = (rank - 1 - i + world_size) % world_size
            wait_flag_ge(own_flags + (parity * world_size + src) * n_chunks + c, epoch, max_spins,
                         error_ptr, WAIT_KIND, src, c)


def comm_probe(
    ws: CommWorkspace,
    data: torch.Tensor,
    num_programs: int = 4,
    chunk_elems: int | None = None,
    block: int = 1024,
    num_warps: int = 4,
    check: bool = True,
    keep_buffers: bool = True,
    streaming: bool = False,
) -> torch.Tensor:
    """Send `data` [n] to every rank of `ws` (itself included); return what arrived, [W, n]
    (row s = rank s's data). `num_programs` programs push `chunk_elems`-element chunks (default:
    one chunk per program), `block` elements per store.

    Collective: every rank calls it with data of the same size and dtype. The result is a view of
    the workspace's receive buffer, valid until the call after next (without `keep_buffers`: a
    copy, and the probe's buffers of this size are freed, collectively). `check` reads the
    workspace's error record back (a host sync) and raises `CommTimeoutError` if a wait timed out;
    without it, call `ws.check_errors()` later. `streaming` marks the loads evict-first and the stores
    cache-streaming (what the pushes beside a GEMM would use, if it keeps its data in L2).
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or not data.is_contiguous():
        raise ValueError(f"data: expected a contiguous 1-D tensor, got {getattr(data, 'shape', type(data))}")
    if data.device != ws.device:
        raise ValueError(f"data: on {data.device} but the workspace is on {ws.device}")
    if num_programs < 1:
        raise ValueError(f"num_programs: expected >= 1, got {num_programs}")
    if data.is_cuda:
        # Programs wait on other ranks' programs: all of them must be resident at once.
        sms = num_sms(data.device)
        if num_programs > sms:
            raise ValueError(f"num_programs: expected at most the number of SMs ({sms}), got {num_programs}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block: expected a power of two >= 16, got {block}")
    n = data.numel()
    if n == 0:
        raise ValueError("data: expected at least one element")
    blocks = triton.cdiv(n, block)
    chunk = chunk_elems if chunk_elems is not None else triton.cdiv(blocks, num_programs) * block
    if chunk < 1:
        raise ValueError(f"chunk_elems: expected >= 1, got {chunk_elems}")
    chunk = triton.cdiv(chunk, block) * block
    n_chunks = triton.cdiv(n, chunk)
    w = ws.world_size
    dtype_tag = str(data.dtype).removeprefix("torch.")
    recv_name, flags_name = f"comm_probe.recv.{dtype_tag}.{n}", f"comm_probe.flags.{n_chunks}"
    recv = ws.buffer(recv_name, (2, w, n), data.dtype)
    ws.flags(flags_name, (2, w, n_chunks))
    epoch = ws.next_epoch()
    # The probe's buffers are its own: alternating their halves between its calls is what makes
    # reusing them safe, whatever other kernels ran in between. A host count suffices: it is
    # never captured in a CUDA graph.
    parity = _PROBE_CALLS[ws] = (_PROBE_CALLS.get(ws, 1) + 1) % 2
    grid = min(num_programs, n_chunks)
    _comm_probe_kernel[(grid,)](
        data, ws.ptr_table(recv_name), ws.ptr_table(flags_name), ws.errors,
        ws.rank, w, epoch, parity, n, chunk, n_chunks, ws.max_spins,
        WAIT_KIND=int(WaitKind.PROBE_CHUNK), BLOCK=block, NUM_PROGRAMS=grid, STREAMING=streaming,
        num_warps=num_warps,
    )
    if check:
        ws.check_errors()
    if keep_buffers:
        return recv[parity]
    received = recv[parity].clone()
    for name in (recv_name, flags_name):
        ws.free(name)
    return received
