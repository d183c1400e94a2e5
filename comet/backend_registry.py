"""Where expert-compute backends are registered (`register_backend`); `comet.backends` looks them up.

A backend computes the routed experts: ``fn(x [T,H], topk_ids [T,K], topk_weights [T,K],
weights: ExpertWeights, cfg: MoEConfig, recompute: bool = False) -> [T,H]``, differentiable;
``recompute`` asks it to save less for the backward and compute it again there.
``why_unavailable(device)`` returns None when the backend can run on ``device``, else the reason;
``dtypes`` are the dtypes it computes in (None: any), so that a backend never returns a dtype it
did not compute in.
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
    dtypes: tuple[torch.dtype, ...] | None = None  # None: every floating-point dtype

    def computes(self, dtype: torch.dtype | None) -> bool:
        return dtype is None or self.dtypes is None or dtype in self.dtypes

    def check(self, device: torch.device, dtype: torch.dtype | None = None):
        """Raise if this backend cannot run on `device` (RuntimeError) or compute in `dtype`
        (TypeError; None: not checked)."""
        reason = self.why_unavailable(device)
        if reason is not None:
            raise RuntimeError(f"backend {self.name!r} cannot run on {device}: {reason}")
        if not self.computes(dtype):
            computed = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            raise TypeError(f"backend {self.name!r} computes {computed}, not {str(dtype).removeprefix('torch.')}: "
                            f"cast the inputs and weights, or use backend='reference'")


BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable, why_unavailable=lambda device: None, auto_priority: int = 0,
                     dtypes: tuple[torch.dtype, ...] | None = None):
    BACKENDS[name] = Backend(name, fn, why_unavailable, auto_priority, dtypes)
