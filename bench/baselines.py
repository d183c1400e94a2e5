"""The baselines our expert kernels are measured against, on the same weights and routing.

- `grouped_mm_experts`: routed experts the way people write them with PyTorch today: sort the
  (token, slot) rows by expert, gather, `torch._grouped_mm` for gate_up, activation,
  `torch._grouped_mm` for down, weighted un-permute. Offsets come from a device-side histogram and
  cumsum, so there is no host sync.
- `hf_experts_module`: transformers' own experts module, set to its `grouped_mm` implementation,
  holding the same tensors (no copy).
"""
from __future__ import annotations

import torch
from torch import nn

from comet.config import MoEConfig
from comet.reference import activation_reference
from comet.weights import ExpertWeights, split_gate_up


def grouped_mm_missing() -> str | None:
    """Why the `torch._grouped_mm` baseline cannot run here, or None."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    return None


def grouped_mm_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                       w: ExpertWeights, cfg: MoEConfig, group_align: int = 1) -> torch.Tensor:
    """x [T, H] -> [T, H]. `torch._grouped_mm` wants int32 end offsets per expert and operands whose
    non-unit stride is 16-byte aligned: the [E, 2F, H] weights are passed transposed ([E, H, 2F]
    views), the gathered activations are contiguous. Its backward (the weight gradient, which
    reduces over each group's rows) also wants every group's rows 16 bytes apart: `group_align` > 1
    pads each expert's rows with zero rows to a multiple of it (8 for 16-bit floats)."""
    if cfg.weight_on_input:
        raise ValueError("grouped_mm_experts: cfg.weight_on_input is not supported by this baseline")
    num_tokens, top_k = topk_ids.shape
    num_experts = cfg.num_experts
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)  # expert-sorted position -> row token*K + slot
    sorted_ids = flat_ids.index_select(0, order)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    padded = (counts + group_align - 1) // group_align * group_align
    offsets = padded.cumsum(0, dtype=torch.int32)
    rows = x.index_select(0, order // top_k)
    if group_align > 1:  # sorted position -> its row in the padded layout (sized for the worst case)
        shift = (offsets - padded) - (counts.cumsum(0, dtype=torch.int32) - counts)
        position = torch.arange(order.numel(), device=x.device) + shift.index_select(0, sorted_ids)
        capacity = -(-(order.numel() + num_experts * (group_align - 1)) // group_align) * group_align
        rows = rows.new_zeros(capacity, rows.shape[1]).index_copy(0, position, rows)
        # The last group takes the spare rows (zeros, never read back): no row is outside a group.
        offsets[-1] = capacity
        row_experts = torch.searchsorted(offsets, torch.arange(capacity, device=x.device, dtype=torch.int32),
                                         right=True).clamp_(max=num_experts - 1)
    else:
        row_experts = sorted_ids
    h = torch._grouped_mm(rows, w.gate_up.transpose(1, 2), offs=offsets)  # [S, 2F]
    if w.gate_up_bias is not None:
        h = h + w.gate_up_bias.index_select(0, row_experts)
    gate, up = split_gate_up(h.mT, w.interleaved)
    a = activation_reference(gate.mT, up.mT, cfg.activation, cfg.swiglu_alpha, cfg.swiglu_limit)
    y = torch._grouped_mm(a, w.down.transpose(1, 2), offs=offsets)  # [S, H]
    if w.down_bias is not None:
        y = y + w.down_bias.index_select(0, row_experts)
    if group_align > 1:
        y = y.index_select(0, position)

    # Back to (token, slot) order, then the K-way weighted sum as one batched [1,K]x[K,H] product.
    per_slot = torch.empty_like(y).index_copy(0, order, y).view(num_tokens, top_k, -1)
    return torch.bmm(topk_weights.to(x.dtype).unsqueeze(1), per_slot).squeeze(1)


def hf_experts_module(w: ExpertWeights, cfg: MoEConfig, hf_layout: str) -> nn.Module:
    """transformers' experts module for `hf_layout` ("standard": MixtralExperts, the same code path
    as Qwen3-MoE's, OLMoE's and DeepSeek-V3's experts; "gpt_oss": GptOssExperts), with the experts
    implementation set to "grouped_mm" and `w`'s tensors as its parameters.

    Raises ImportError when transformers is absent."""
    if hf_layout == "gpt_oss":
        if not (w.interleaved and w.gate_up_bias is not None and cfg.activation == "clamped_swiglu"):
            raise ValueError("hf_experts_module: the gpt_oss layout needs interleaved gate/up, biases "
                             "and activation='clamped_swiglu'")
        from transformers import GptOssConfig as Config
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts

        # transformers >= 5.24 reads alpha and limit from the config; earlier versions fix 1.702 / 7.0.
        extra = {"swiglu_alpha": cfg.swiglu_alpha, "swiglu_limit": cfg.swiglu_limit}
        params = {"gate_up_proj": w.gate_up.mT, "gate_up_proj_bias": w.gate_up_bias,
                  "down_proj": w.down.mT, "down_proj_bias": w.down_bias}
    elif hf_layout == "standard":
        if w.interleaved or w.gate_up_bias is not None or cfg.activation != "swiglu":
            raise ValueError("hf_experts_module: the standard layout needs gate-first rows, no biases "
                             "and activation='swiglu'")
        from transformers import MixtralConfig as Config
        from transformers.models.mixtral.modeling_mixtral import MixtralExperts as Experts

        extra = {"hidden_act": "silu"}
        params = {"gate_up_proj": w.gate_up, "down_proj": w.down}
    else:
        raise ValueError(f"hf_layout: expected 'standard' or 'gpt_oss', got {hf_layout!r}")

    config = Config(hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_size,
                    num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, **extra)
    config._experts_implementation = "grouped_mm"  # what set_experts_implementation("grouped_mm") sets
    with torch.device("meta"):  # parameters are replaced below: allocate nothing
        module = Experts(config)
    for name, tensor in params.items():
        setattr(module, name, nn.Parameter(tensor, requires_grad=False))
    return module
