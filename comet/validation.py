"""Input checks with errors that name the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch


def _capturing() -> bool:
    """Value checks read device memory back to the host; skip them where that is not allowed."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_hidden(x: torch.Tensor, hidden_size: int, like: torch.Tensor, name: str = "hidden_states"):
    """Shape, dtype and device of an activation tensor against the layer's weights `like`."""
    check_type(x, torch.Tensor, name, "a torch.Tensor")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != hidden_size:
        raise ValueError(
            f"{name}: expected last dimension {hidden_size} (hidden_size), got shape {tuple(x.shape)}"
        )
    if x.dtype != like.dtype:
        raise TypeError(
            f"{name}: dtype {x.dtype} does not match the layer's weights ({like.dtype}); "
            f"cast the input or the layer (layer.to({x.dtype}))"
        )
    if x.device != like.device:
        raise ValueError(
            f"{name}: on device {x.device} but the layer's weights are on {like.device}"
        )


def check_expert_weights(w, cfg, like: torch.Tensor, num_experts: int | None = None, name: str = "weights"):
    """The `comet.ExpertWeights` `w` hold `num_experts` experts (None: all of `cfg.num_experts`;
    an expert-parallel rank passes its E/W) of `cfg`'s shapes, in `like`'s dtype and on its device;
    the biases may be None. Errors name `name`.<field>."""
    check_bool(w.interleaved, f"{name}.interleaved")
    e = cfg.num_experts if num_experts is None else num_experts
    f, h = cfg.ffn_size, cfg.hidden_size
    expected = {"gate_up": (e, 2 * f, h), "down": (e, h, f), "gate_up_bias": (e, 2 * f), "down_bias": (e, h)}
    for field, shape in expected.items():
        t = getattr(w, field)
        if not check_tensor(t, shape, f"{name}.{field}", optional=field.endswith("bias")):
            continue
        if t.dtype != like.dtype:
            raise TypeError(f"{name}.{field}: dtype {t.dtype} does not match hidden_states ({like.dtype})")
        if t.device != like.device:
            raise ValueError(f"{name}.{field}: on device {t.device} but hidden_states is on {like.device}")


def check_type(value, expected: type, name: str, what: str):
    """TypeError naming `name` unless `value` is an `expected` instance (`what`: how to say it)."""
    if not isinstance(value, expected):
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")


def check_tensor(t, shape: tuple, name: str, optional: bool = False) -> bool:
    """Whether `t` is given: a tensor of `shape`, or None where `optional`; else an error naming `name`."""
    if t is None and optional:
        return False
    check_type(t, torch.Tensor, name, "a torch.Tensor")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(t.shape)}")
    return True


def as_int(value, name: str, minimum: int) -> int:
    """`value` (an int or a numpy integer, not a bool) as an int >= `minimum`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be {'a positive int' if minimum == 1 else f'an int >= {minimum}'}, "
                         f"got {value!r}")
    return int(value)


def as_real(value, name: str, minimum: float, minimum_allowed: bool) -> float:
    """`value` (a real number, not a bool) as a finite float above `minimum` (or equal to it,
    if `minimum_allowed`)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    number = float(value)
    if not math.isfinite(number) or number < minimum or (number == minimum and not minimum_allowed):
        raise ValueError(f"{name} must be a finite number {'>=' if minimum_allowed else '>'} {minimum:g}, "
                         f"got {value!r}")
    return number


def check_bool(value, name: str):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {value!r} ({type(value).__name__})")


def check_choice(value, name: str, choices: tuple):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def kernel_ids(topk_ids: torch.Tensor) -> torch.Tensor:
    """Expert ids as the kernels read them: int32 and int64 as they are, other integer dtypes
    widened to int32 (uint32 to int64). Bool and uint64 ids are refused (TypeError)."""
    if topk_ids.dtype == torch.bool:
        raise TypeError("topk_ids: expected integer expert ids, got a torch.bool mask")
    if topk_ids.dtype == torch.uint64:
        raise TypeError("topk_ids: torch.uint64 ids are not supported (past 2**63 they have no int64 equivalent); "
                        "pass int64 or int32")
    if topk_ids.dtype in (torch.int32, torch.int64):
        return topk_ids
    return topk_ids.to(torch.int64 if topk_ids.dtype == torch.uint32 else torch.int32)


def check_routing(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    num_tokens: int,
    num_experts: int,
    device: torch.device,
    check_values: bool = True,
):
    """Shapes and dtypes of a routing; with `check_values`, also ids in range and finite weights
    (this reads the tensors back, so it is skipped under CUDA-graph capture and compilation)."""
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.is_floating_point() or topk_ids.is_complex():
        raise TypeError(f"topk_ids: expected an integer tensor, got {getattr(topk_ids, 'dtype', type(topk_ids))}")
    ids = kernel_ids(topk_ids)
    if not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point():
        raise TypeError(
            f"topk_weights: expected a floating-point tensor, got {getattr(topk_weights, 'dtype', type(topk_weights))}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens:
        raise ValueError(f"topk_ids: expected shape [{num_tokens}, top_k], got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights: expected the shape of topk_ids {tuple(topk_ids.shape)}, got {tuple(topk_weights.shape)}"
        )
    if topk_ids.shape[1] > num_experts:
        raise ValueError(f"topk_ids: top_k {topk_ids.shape[1]} is larger than the number of experts {num_experts}")
    for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if t.device != device:
            raise ValueError(f"{name}: on device {t.device} but hidden_states is on {device}")
    if not check_values or _capturing() or topk_ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"topk_ids: expert ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")
    if not bool(torch.isfinite(topk_weights).all()):
        raise ValueError("topk_weights: contains NaN or Inf")
