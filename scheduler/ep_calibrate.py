"""The machine rates the expert-parallel cost model needs, measured once per process group.

`group_rates(ws)` measures, on first use for the workspace `ws` (a collective: every rank of the
group calls it at the same point, which `comet.ep` does on the first call that needs the model):

- the GEMM rate: a square bf16 matmul (fp32 on CPU);
- the memory bandwidth: a device-to-device copy (bytes read + written);
- the push bandwidth for several numbers of pushing programs: `comet.kernels.comm_probe`, every
  rank sending the same bytes to every rank, as the dispatch does (its buffers freed afterwards).

Every figure is the minimum over the ranks, so that every rank feeds the model the same rates and
picks the same split. It costs a few hundred milliseconds once (and a host sync): make the first
call eagerly, before capturing a CUDA graph.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from comet.comm import CommWorkspace
from comet.device_info import num_sms
from comet.measurement import time_ms
from comet.scheduler.ep_split import MachineRates

_RATES: "weakref.WeakKeyDictionary[CommWorkspace, MachineRates]" = weakref.WeakKeyDictionary()
PUSH_BLOCK = 32768  # elements per store of the probe: the dispatch's tile size on a GPU


def group_rates(ws: CommWorkspace) -> MachineRates:
    """The rates of `ws`'s group, measured on the first call (collective), then remembered."""
    rates = _RATES.get(ws)
    if rates is None:
        rates = _RATES[ws] = measure_rates(ws)
    return rates


def measure_rates(ws: CommWorkspace, *, gemm_size: int = 4096, copy_bytes: int = 256 << 20,
                  push_bytes: int = 32 << 20, programs: tuple[int, ...] | None = None, repeats: int = 5
                  ) -> MachineRates:
    """Measure the rates (collective; see the module docstring). `push_bytes` per destination;
    `programs`: pushing program counts (default 8, 16, 32 and every SM)."""
    from comet.kernels.comm_probe import comm_probe

    device = ws.device
    sms = num_sms(device)
    programs = tuple(sorted(set(programs or [p for p in (8, 16, 32) if p < sms] + [sms])))
    if not programs or min(programs) < 1 or max(programs) > sms:
        raise ValueError(f"programs: expected counts in [1, {sms}], got {programs}")

    gemm_flops = matmul_flops(device, gemm_size, repeats)
    hbm = copy_bandwidth(device, copy_bytes, repeats)
    data = torch.randn(push_bytes // 2, device=device).to(torch.bfloat16)
    peers = max(ws.world_size - 1, 1)
    push = []
    for p in programs:
        ms, _ = time_ms(lambda: comm_probe(ws, data, num_programs=p, block=PUSH_BLOCK, num_warps=8, check=False),
                        device, warmup=2, repeats=repeats)
        push.append(data.numel() * data.element_size() * peers / (ms * 1e-3) / 1e9)
    ws.check_errors()
    comm_probe(ws, data, num_programs=1, keep_buffers=False)  # frees the probe's buffers (collective)

    # The same rates on every rank: the slowest's.
    measured = torch.tensor([gemm_flops, hbm, *push], dtype=torch.float64, device=device)
    dist.all_reduce(measured, op=dist.ReduceOp.MIN, group=ws.group)
    gemm_flops, hbm, *push = measured.tolist()
    return MachineRates(sms, gemm_flops, hbm, tuple(zip(programs, push)))


def matmul_flops(device: torch.device, size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of a square matmul: bf16 on a GPU, fp32 on CPU (median of `repeats`)."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    ms, _ = time_ms(lambda: a @ a, device, warmup=2, repeats=repeats)
    return 2 * size**3 / (ms * 1e-3)


def copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory copy bandwidth in bytes/s, counting bytes read and written (median of `repeats`)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * nbytes / (ms * 1e-3)
