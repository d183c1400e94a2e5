"""Registry of expert-compute backends: where kernel backends plug into `MoELayer`.

A backend computes the routed experts: ``fn(x [T,H], topk_ids [T,K], topk_weights [T,K],
weights: ExpertWeights, cfg: MoEConfig, recompute: bool = False) -> [T,H]``, differentiable;
``recompute`` asks it to save less for the backward and compute it again there. ``why_unavailable(device)`` returns None when
the backend can run on ``device``, else the reason.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable
    why_unavailable: Callable[[torch.device], str | None]
    auto_priority: int  # "auto" takes the available backend with the highest priority


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable, why_unavailable=lambda device: None, auto_priority: int = 0):
    _BACKENDS[name] = Backend(name, fn, why_unavailable, auto_priority)


def backend_names() -> list[str]:
    _load_builtin()
    return sorted(_BACKENDS)


def backend_status(device: torch.device) -> dict[str, str | None]:
    """name -> None if usable on `device`, else why not."""
    _load_builtin()
    return {name: b.why_unavailable(torch.device(device)) for name, b in sorted(_BACKENDS.items())}


def check_backend_name(name: str):
    _load_builtin()
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {sorted(_BACKENDS)}, got {name!r}")


def resolve_backend(name: str, device: torch.device) -> Backend:
    _load_builtin()
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":  # kernels on the CPU only run under the interpreter: not for speed
            return _BACKENDS["reference"]
        usable = [b for b in _BACKENDS.values() if b.why_unavailable(device) is None]
        return max(usable, key=lambda b: b.auto_priority)
    check_backend_name(name)
    backend = _BACKENDS[name]
    reason = backend.why_unavailable(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    return backend


@functools.lru_cache(maxsize=None)
def _load_builtin():
    """Import the modules that register the built-in backends (lazily: importing the kernels
    fixes whether Triton interprets them, so it must wait until the environment is set)."""
    from comet import functional  # noqa: F401  registers "reference"
    from comet import ops  # noqa: F401  registers "triton"
