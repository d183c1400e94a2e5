"""The tile map of the fused expert-parallel GEMMs: arrival bins.

On a receiving rank the rows of one local expert come from W sources (this rank's own tokens, read
in place, and each other rank's, pushed into the receive buffer while GEMM1 runs). The fused
kernels sort them not by expert but by (expert, source's arrival position) bin, in an order that
lets GEMM1 start before anything has arrived and still read each expert's weights about once
(`arrival_bin`). `dispatch_receive(tiles=...)` (`comet.kernels.ep_dispatch`) writes each received
slot's bin in place of its local expert id; the routing plan over those ids is the tile map;
every kernel that runs tiles over it maps a bin back to its expert's weights (`bin_expert`) and
runs the single-GPU kernels' per-tile body (`comet.kernels.expert_gemm.expert_gemm_tile`) on a
`GemmProblem`.

Here: the bin maps (`arrival_bin`, `bin_expert`), `ArrivalTiles` (the map's description, whose
`kernel_args()` every such kernel takes beside `GemmProblem.kernel_args()`), `arrival_gemm` (a
plain grouped GEMM over the map: GEMM2 when only the dispatch is fused) and `fused_programs` (the
grid of a launch whose programs wait on each other). Nothing here is collective or syncs the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from comet.device_info import num_sms
from comet.kernels.expert_gemm import GemmProblem, expert_gemm_tile, locate_item, persistent_programs
from comet.kernels.routing import expert_segments, histogram_bins


# Rows of local expert e from the source at arrival position p (0: this rank's own tokens, read in
# place; p: the p-th rank pushing to this one) get their own bin: the own rows of the first `lead`
# experts (computed while the dispatch runs), then for every later expert its W bins together
# (own, then each source: the weights stay in L2 across them), then the other sources' rows of
# the first `lead` experts. With lead = E every source's rows follow all own rows.
@triton.jit
def arrival_bin(expert, position, lead, EXPERTS: tl.constexpr, SOURCES: tl.constexpr):
    """The bin of local expert `expert`'s rows from the source at arrival position `position`."""
    interleaved_end = lead + (EXPERTS - lead) * SOURCES
    late = interleaved_end + expert * (SOURCES - 1) + position - 1
    return tl.where(expert >= lead, lead + (expert - lead) * SOURCES + position, tl.where(position == 0, expert, late))


@triton.jit
def bin_expert(bin, lead, EXPERTS: tl.constexpr, BINS: tl.constexpr):
    """(local expert, source's arrival position) of a tile-map bin: `arrival_bin` inverted where
    the map has BINS = EXPERTS * W bins; (bin, 0) where it has one per expert (W = 1)."""
    if BINS == EXPERTS:
        return bin, bin * 0
    else:
        SOURCES: tl.constexpr = BINS // EXPERTS
        interleaved_end = lead + (EXPERTS - lead) * SOURCES
        late = bin - interleaved_end
        expert = tl.where(bin < lead, bin, tl.where(late < 0, lead + (bin - lead) // SOURCES, late // (SOURCES - 1)))
        position = tl.where(bin < lead, 0, tl.where(late < 0, (bin - lead) % SOURCES, late % (SOURCES - 1) + 1))
        return expert, position


@dataclass(frozen=True)
class ArrivalTiles:
    """The arrival-bin tile map of one rank: `experts` local experts (the weights' E), `sources`
    ranks pushing to it (W, this rank included), the own rows of the first `lead_experts` experts
    first (`comet.scheduler.ep_split.lead_experts` picks it; 0 <= lead_experts <= experts)."""

    experts: int
    sources: int
    lead_experts: int = 0

    def __post_init__(self):
        if not 0 <= self.lead_experts <= self.experts:
            raise ValueError(f"lead_experts: expected 0 to {self.experts}, got {self.lead_experts}")

    @property
    def bins(self) -> int:
        """Bins of the map: the ids its routing plan is made over (`analyze_routing(ids, bins)`)."""
        return self.experts * self.sources

    def kernel_args(self) -> dict:
        """The tile-map arguments of the kernels that run a `GemmProblem` over this map."""
        return dict(lead_experts=self.lead_experts, EXPERTS=self.experts, BINS=self.bins,
                    NUM_BINS=histogram_bins(self.bins))


def fused_programs(device: torch.device, n_comm: int, max_items: int) -> int:
    """Computing programs of a fused launch beside its `n_comm` communicating ones (at most
    `max_items`). One side waits on the other, so on a GPU every program must be resident at
    once: n_comm + computing <= SMs. The interpreter runs programs one after another and takes
    `comet.device_info.num_sms`'s few."""
    if n_comm < 1:
        raise ValueError(f"n_comm: expected >= 1 pushing programs, got {n_comm}")
    sms = num_sms(device)
    if device.type != "cuda":
        return max(1, min(sms, max_items))
    if n_comm >= sms:
        raise ValueError(f"n_comm: expected fewer than the {sms} SMs, got {n_comm}")
    return max(1, min(sms - n_comm, max_items))


@triton.jit(do_not_specialize=["lead_experts"])
def _arrival_gemm_kernel(
    gemm,  # GemmProblem.kernel_args()
    lead_experts, EXPERTS: tl.constexpr, BINS: tl.constexpr, NUM_BINS: tl.constexpr,  # ArrivalTiles.kernel_args()
    NUM_PROGRAMS: tl.constexpr,
):
    row_start, counts, tile_start, tile_end, num_tiles = expert_segments(gemm.hist_ptr, BINS, NUM_BINS, gemm.BLOCK_M)
    num_n = tl.cdiv(gemm.N, gemm.BLOCK_N)
    for item in range(tl.program_id(0), num_tiles * num_n, NUM_PROGRAMS):
        bin, first_row, end_row, n_block = locate_item(
            item, row_start, counts, tile_start, tile_end, num_tiles, num_n, NUM_BINS, gemm.BLOCK_M, gemm.GROUP_M)
        expert, _ = bin_expert(bin, lead_experts, EXPERTS, BINS)
        expert_gemm_tile(expert, first_row, end_row, n_block, gemm)


def arrival_gemm(problem: GemmProblem, tiles: ArrivalTiles):
    """Run `problem` (its sorted rows and histogram over `tiles.bins` arrival bins) as a plain
    persistent grouped GEMM, one program per SM: the unfused GEMM2 of the fused dispatch.
    Asynchronous; local; no host sync."""
    programs = persistent_programs(problem.a.device, problem.max_items(tiles.bins))
    _arrival_gemm_kernel[(programs,)](**problem.kernel_args(), **tiles.kernel_args(), NUM_PROGRAMS=programs)
