"""`ExpertWeights`: the routed experts' parameters, and how the gate and up rows sit in `gate_up`."""
from __future__ import annotations

from typing import NamedTuple

import torch


class ExpertWeights(NamedTuple):
    """The routed experts' parameters. Any strides (views of other layouts are fine).

    gate_up [E, 2F, H]: gate rows first, or gate at even rows if `interleaved`;
    down [E, H, F]; gate_up_bias [E, 2F] (same row order); down_bias [E, H].
    """

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    interleaved: bool = False

    @property
    def num_experts(self) -> int:
        return self.gate_up.shape[0]


def split_gate_up(gate_up: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., 2F, ...] rows -> (gate, up) views along dim -2 (gate first, or gate at even rows)."""
    if interleaved:
        return gate_up[..., 0::2, :], gate_up[..., 1::2, :]
    f = gate_up.shape[-2] // 2
    return gate_up[..., :f, :], gate_up[..., f:, :]
