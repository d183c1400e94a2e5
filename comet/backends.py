"""Registry of expert-compute backends: where kernel backends plug into `MoELayer`.

A backend computes the routed experts: ``fn(x [T,H], topk_ids [T,K], topk_weights [T,K],
weights: ExpertWeights, cfg: MoEConfig) -> [T,H]``. ``why_unavailable(device)`` returns None when
the backend can run on ``device``, else the reason; ``dtypes`` are the dtypes it computes in (None:
any), so that a backend never returns a dtype it did not compute in.
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
    dtypes: tuple[torch.dtype, ...] | None  # None: every floating-point dtype


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, fn: Callable, why_unavailable=lambda device: None, auto_priority: int = 0,
                     dtypes: tuple[torch.dtype, ...] | None = None):
    _BACKENDS[name] = Backend(name, fn, why_unavailable, auto_priority, dtypes)


def backend_names() -> list[str]:
    _load_builtin()
    return sorted(_BACKENDS)


def backend_status(device: torch.device) -> dict[str, str | None]:
    """name -> None if usable on `device`, else why not."""
    _load_builtin()
    return {name: b.why_unavailable(torch.device(device)) for name, b in sorted(_BACKENDS.items())}


def check_backend_name(name: str):
    _load_builtin()
    if not isinstance(name, str) or (name != "auto" and name not in _BACKENDS):
        raise ValueError(f"backend: expected 'auto' or one of {sorted(_BACKENDS)}, got {name!r}")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The backend `name` ("auto": the usable one of highest priority) for inputs on `device` of
    `dtype` (None: not checked)."""
    _load_builtin()
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":  # kernels on the CPU only run under the interpreter: not for speed
            return _BACKENDS["reference"]
        usable = [b for b in _BACKENDS.values() if b.why_unavailable(device) is None and _computes(b, dtype)]
        return max(usable, key=lambda b: b.auto_priority)
    check_backend_name(name)
    backend = _BACKENDS[name]
    reason = backend.why_unavailable(device)
    if reason is not None:
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {reason}")
    if not _computes(backend, dtype):
        computed = ", ".join(str(d).removeprefix("torch.") for d in backend.dtypes)
        raise TypeError(f"backend {name!r} computes {computed}, not {str(dtype).removeprefix('torch.')}: cast the "
                        f"inputs and weights, or use backend='reference'")
    return backend


def _computes(backend: Backend, dtype: torch.dtype | None) -> bool:
    return dtype is None or backend.dtypes is None or dtype in backend.dtypes


@functools.lru_cache(maxsize=None)
def _load_builtin():
    """Import the modules that register the built-in backends (lazily: importing the kernels
    fixes whether Triton interprets them, so it must wait until the environment is set)."""
    from comet import functional  # noqa: F401  registers "reference"
    from comet import ops  # noqa: F401  registers "triton"
