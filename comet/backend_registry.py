"""Where expert-compute backends are registered (`register_backend`); `comet.backends` looks them up.

A backend computes the routed experts: ``fn(x [T,H], topk_ids [T,K], topk_weights [T,K],
weights: ExpertWeights, cfg: MoEConfig, recompute: bool = False) -> [T,H]``, differentiable;
``recompute`` asks it to save less for the backward and compute it again there.
``why_unavailable(device)`` returns None when the backend can run on ``device``, else the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    why_unavailable: Callable[[torch.device], str | None]
    auto_priority: int  # "auto" takes the available backend with the highest priority


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable, why_unavailable=lambda device: None, auto_priority: int = 0):
    BACKENDS[name] = Backend(name, fn, why_unavailable, auto_priority)
