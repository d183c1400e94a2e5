"""Input checks with errors that name the argument and what was expected."""
from __future__ import annotations

import torch


def _capturing() -> bool:
    """Value checks read device memory back to the host; skip them where that is not allowed."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_hidden(x: torch.Tensor, hidden_size: int, like: torch.Tensor, name: str = "hidden_states"):
    """Shape, dtype and device of an activation tensor against the layer's weights `like`."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
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
    lo, hi = int(topk_ids.min()), int(topk_ids.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"topk_ids: expert ids must lie in [0, {num_experts}), got values in [{lo}, {hi}]")
    if not bool(torch.isfinite(topk_weights).all()):
        raise ValueError("topk_weights: contains NaN or Inf")
