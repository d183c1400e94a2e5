"""Routing analysis on the device: expert-sorted row order and the per-expert histogram.

Everything the expert GEMMs need (expert of each tile, its rows) follows from these two tensors
inside the kernels, so nothing is read back to the host and the layer stays graph-capturable.
"""
from typing import NamedTuple

import torch

from comet.kernels import routing as routing_kernels


class RoutingPlan(NamedTuple):
    sorted_rows: torch.Tensor  # int64 [T*K]: row ids (token * K + slot) ordered by expert id, stable
    hist: torch.Tensor  # int32 [histogram_bins(E)]: see comet.kernels.routing


def analyze_routing(topk_ids: torch.Tensor, num_experts: int) -> RoutingPlan:
    flat = topk_ids.reshape(-1)
    if 0 < flat.numel() <= routing_kernels.SMALL_ROUTING_ROWS:
        return RoutingPlan(*routing_kernels.small_routing_plan(flat, num_experts))
    return RoutingPlan(*routing_kernels.sorted_routing_plan(flat, num_experts))
