"""The fused GEMM1's arrival bins: `ep_tiles.bin_expert` inverts `ep_tiles.arrival_bin`."""
import torch
import triton
import triton.language as tl

from comet.kernels.ep_tiles import arrival_bin, bin_expert
from conftest import DEVICE
from rank_helpers import spelled_arrival_bin as _arrival_bin


@triton.jit
def _bins_round_trip(out_ptr, lead, EXPERTS: tl.constexpr, SOURCES: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    expert, position = offs // SOURCES, offs % SOURCES
    valid = offs < EXPERTS * SOURCES
    bins = arrival_bin(expert, position, lead, EXPERTS, SOURCES)
    back_expert, back_position = bin_expert(bins, lead, EXPERTS, EXPERTS * SOURCES)
    tl.store(out_ptr + offs * 3, bins, mask=valid)
    tl.store(out_ptr + offs * 3 + 1, back_expert, mask=valid)
    tl.store(out_ptr + offs * 3 + 2, back_position, mask=valid)


def test_arrival_bins_invert():
    """ep_tiles.bin_expert inverts ep_tiles.arrival_bin: every bin once, for each lead."""
    for experts, world in [(4, 2), (3, 4), (5, 1)]:
        for lead in range(experts + 1):
            out = torch.full((experts * world, 3), -7, dtype=torch.int32, device=DEVICE)
            block = triton.next_power_of_2(experts * world)
            _bins_round_trip[(1,)](out, lead, EXPERTS=experts, SOURCES=world, BLOCK=block)
            expert, position = torch.arange(experts * world) // world, torch.arange(experts * world) % world
            spelled = torch.stack([_arrival_bin(e, int(p), lead, experts, world) for e, p in zip(expert, position)])
            out = out.cpu()
            assert torch.equal(out[:, 0], spelled.int()), (experts, world, lead)
            assert sorted(out[:, 0].tolist()) == list(range(experts * world)), (experts, world, lead)
            assert torch.equal(out[:, 1], expert.int()), (experts, world, lead)
            assert torch.equal(out[:, 2], position.int()), (experts, world, lead)
