"""Looking up the expert-compute backends by name: "reference" (the fp32 PyTorch loop), "triton"
(`comet.ops`, loaded on first use) and any registered with `comet.backend_registry.register_backend`."""
from __future__ import annotations

import functools

import torch

from comet.backend_registry import BACKENDS, Backend, register_backend
from comet.config import MoEConfig
from comet.reference import experts_reference
from comet.weights import ExpertWeights


def _experts_reference_backend(x, topk_ids, topk_weights, w: ExpertWeights, cfg: MoEConfig,
                               recompute: bool = False):
    # `recompute` does not apply: autograd through the reference saves what its ops save.
    return experts_reference(
        x, topk_ids, topk_weights, w.gate_up, w.down, w.gate_up_bias, w.down_bias,
        activation=cfg.activation, swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit,
        interleaved=w.interleaved, weight_on_input=cfg.weight_on_input,
    )


register_backend("reference", _experts_reference_backend)


def backend_names() -> list[str]:
    _load_kernel_backends()
    return sorted(BACKENDS)


def backend_status(device: torch.device) -> dict[str, str | None]:
    """name -> None if usable on `device`, else why not."""
    _load_kernel_backends()
    return {name: b.why_unavailable(torch.device(device)) for name, b in sorted(BACKENDS.items())}


def check_backend_name(name: str):
    _load_kernel_backends()
    if not isinstance(name, str) or (name != "auto" and name not in BACKENDS):
        raise ValueError(f"backend: expected 'auto' or one of {sorted(BACKENDS)}, got {name!r}")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The backend `name` ("auto": the usable one of highest priority) for inputs on `device` of
    `dtype` (None: not checked); raises if it cannot run them."""
    _load_kernel_backends()
    device = torch.device(device)
    if name == "auto":
        if device.type != "cuda":  # kernels on the CPU only run under the interpreter: not for speed
            return BACKENDS["reference"]
        usable = [b for b in BACKENDS.values() if b.why_unavailable(device) is None and b.computes(dtype)]
        return max(usable, key=lambda b: b.auto_priority)
    check_backend_name(name)
    backend = BACKENDS[name]
    backend.check(device, dtype)
    return backend


@functools.lru_cache(maxsize=None)
def _load_kernel_backends():
    """Import `comet.ops`, which registers "triton" (lazily: importing the kernels fixes whether
    Triton interprets them, so it must wait until the environment is set)."""
    from comet import ops  # noqa: F401
