"""Megatron-Core adapter (0.16 and 0.19): `apply(model)` turns every `MoELayer` into a
`CometMoELayer`, which keeps Megatron's own router (its probs and routing map, aux losses, expert
bias, token dropping) and shared experts, and replaces dispatch -> experts -> combine with comet's
experts on the same routing. `revert(model)` restores the original classes.

Expert parallelism (a layer whose `ep_group` has W > 1 ranks): Megatron's token dispatchers take
this rank's tokens ([S, B, H] viewed [S*B, H]) with their routing over all E experts, move them
to the ranks holding the experts (each rank's `local_expert_indices`, E/W consecutive ids), run
the local experts there on the received tokens sorted by local expert, and bring the outputs back
into this rank's token order, so what the layer returns is this rank's tokens in its input's
layout. `comet.ep.ep_experts` takes and gives exactly that ([S*B, H], global expert ids, this
rank's experts' weights), forward and backward, so the dispatcher is bypassed whatever its type.
One `comet.ep.ExpertParallelState` per expert-parallel group serves every layer (made by
`apply`, closed by `revert`: both collective over the group then).

Expert layouts read (Megatron applies the routing prob after the activation, before fc2, which is
the same as weighting the expert's output, its fc2 bias included):
- SequentialMLP: per expert `linear_fc1.weight` [2F, H] (gate rows first), `linear_fc2.weight` [H, F];
- TEGroupedMLP: `linear_fc{1,2}.weight{i}` with the same per-expert shapes;
- GroupedMLP (0.16 only): `weight1` [H, E*2F] viewed [E, H, 2F], `weight2` [E*F, H] viewed [E, F, H].
Per-expert parameters are stacked on every call (a copy of the expert weights; differentiable);
GroupedMLP's weights are read as views.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from comet.backends import check_backend_name
from comet.config import MoEConfig
from comet.functional import ExpertWeights
from comet.integrations.common import check_process_group, run_experts

try:
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from megatron.core.transformer.moe import experts as mcore_experts
    from megatron.core.transformer.moe.moe_layer import MoELayer
except ImportError as exc:
    raise ImportError("comet.integrations.megatron needs megatron-core>=0.16 (pip install megatron-core)") from exc


def _activation(config) -> dict:
    """MoEConfig activation fields of a Megatron TransformerConfig's expert MLP."""
    act = config.activation_func
    clamp = getattr(config, "activation_func_clamp_value", None)
    offset = getattr(config, "glu_linear_offset", 0.0)
    if config.gated_linear_unit:
        if act is F.silu and clamp is None and offset == 0.0:
            return dict(activation="swiglu")
        if act is F.gelu and clamp is None and offset == 0.0:
            return dict(activation="geglu")
        if act is quick_gelu and clamp is not None and offset == 1.0:
            return dict(activation="clamped_swiglu", swiglu_alpha=1.702, swiglu_limit=float(clamp))
    raise NotImplementedError(
        f"config: expert activation {getattr(act, '__name__', act)!r} with gated_linear_unit="
        f"{config.gated_linear_unit}, activation_func_clamp_value={clamp}, glu_linear_offset={offset} is not "
        f"supported; supported: gated silu, gated gelu, gated quick_gelu with a clamp and offset 1 (GPT-OSS)"
    )


def _group_size(group) -> int:
    return 1 if group is None else group.size()


def _check_supported(layer: MoELayer, name: str):
    config = layer.config
    if getattr(config, "moe_latent_size", None):
        raise NotImplementedError(f"{name}: MoE latent projections (moe_latent_size) are not supported")
    if _group_size(getattr(layer, "attn_tp_group", None)) > 1:
        raise NotImplementedError(f"{name}: tensor parallelism around the MoE layer is not supported")
    if _group_size(getattr(layer.experts, "tp_group", None)) > 1:
        raise NotImplementedError(f"{name}: expert tensor parallelism is not supported")
    if getattr(config, "moe_single_grouped_weight", False) or getattr(config, "moe_single_grouped_bias", False):
        raise NotImplementedError(
            f"{name}: moe_single_grouped_weight/bias (one tensor for all experts) is not supported"
        )
    # megatron-core 0.19 options (absent in 0.16): each changes what the expert weights hold or
    # which tokens reach them, so `expert_weights` on the same routing would compute something else.
    if getattr(config, "expert_gtp_weight_remat_size", 1) > 1:
        raise NotImplementedError(f"{name}: expert_gtp_weight_remat_size > 1 (sharded expert weights) is not supported")
    if getattr(config, "moe_expert_rank_capacity_factor", None) is not None:
        raise NotImplementedError(
            f"{name}: moe_expert_rank_capacity_factor (token dropping in the dispatcher) is not supported"
        )
    if isinstance(layer.experts, mcore_experts.TEGroupedMLP) and getattr(config, "moe_mlp_glu_interleave_size", None):
        raise NotImplementedError(
            f"{name}: moe_mlp_glu_interleave_size (block-interleaved gate/up rows) is not supported"
        )
    if not isinstance(layer.experts, _EXPERTS_TYPES):
        raise NotImplementedError(
            f"{name}.experts: {type(layer.experts).__name__} is not supported; supported: "
            f"{[t.__name__ for t in _EXPERTS_TYPES]}"
        )


def moe_config(layer: MoELayer) -> MoEConfig:
    """The `MoEConfig` of a Megatron MoELayer: all E of its experts (this rank holds
    `layer.num_local_experts` of them, all when there is no expert parallelism)."""
    config = layer.config
    num_experts = config.num_moe_experts
    return MoEConfig(
        hidden_size=config.hidden_size, ffn_size=config.moe_ffn_hidden_size, num_experts=num_experts,
        top_k=min(config.moe_router_topk, num_experts), expert_bias=bool(config.add_bias_linear),
        weight_on_input=bool(config.moe_apply_probs_on_input), family="megatron", **_activation(config),
    )


def _per_expert(linears: list, add_bias: bool) -> tuple:
    weight = torch.stack([lin.weight for lin in linears])
    bias = torch.stack([lin.bias for lin in linears]) if add_bias else None
    return weight, bias


def _grouped_linear(linear: nn.Module, num_experts: int, attr: str) -> list:
    """The per-expert tensors `attr`0..E-1 of a Transformer Engine grouped linear."""
    return [getattr(linear, f"{attr}{i}") for i in range(num_experts)]


def expert_weights(experts: nn.Module, num_local_experts: int, cfg: MoEConfig) -> ExpertWeights:
    """The weights of a Megatron experts module holding `num_local_experts` experts, in comet's
    layout: gate_up [E_local, 2F, H], down [E_local, H, F]."""
    e, h = num_local_experts, cfg.hidden_size
    bias = cfg.expert_bias
    if isinstance(experts, mcore_experts.SequentialMLP):
        gate_up, gate_up_bias = _per_expert([m.linear_fc1 for m in experts.local_experts], bias)
        down, down_bias = _per_expert([m.linear_fc2 for m in experts.local_experts], bias)
        return ExpertWeights(gate_up, down, gate_up_bias, down_bias)
    if isinstance(experts, mcore_experts.TEGroupedMLP):
        fc1, fc2 = experts.linear_fc1, experts.linear_fc2
        return ExpertWeights(
            torch.stack(_grouped_linear(fc1, e, "weight")), torch.stack(_grouped_linear(fc2, e, "weight")),
            torch.stack(_grouped_linear(fc1, e, "bias")) if bias else None,
            torch.stack(_grouped_linear(fc2, e, "bias")) if bias else None,
        )
    # Legacy GroupedMLP: the same [E, H, 2F] / [E, F, H] views its grouped GEMM uses.
    return ExpertWeights(experts.weight1.view(e, h, -1).transpose(1, 2), experts.weight2.view(e, -1, h).transpose(1, 2))


def routing_from_map(probs: torch.Tensor, routing_map: torch.Tensor, top_k: int) -> tuple:
    """Megatron's dense routing (probs [T, E], routing_map bool [T, E] with at most K experts per
    token) -> (topk_ids [T, K], topk_weights [T, K]). Rows with fewer than K experts (dropped or
    padding tokens) get extra slots of weight 0."""
    topk_ids = routing_map.to(torch.uint8).topk(top_k, dim=-1).indices
    chosen = routing_map.gather(1, topk_ids)
    topk_weights = probs.gather(1, topk_ids).masked_fill(~chosen, 0.0)
    return topk_ids, topk_weights


class CometMoELayer(MoELayer):
    """Megatron's MoELayer with comet's experts in place of dispatch -> experts -> combine."""

    def forward(self, hidden_states: torch.Tensor, intermediate_tensors=None, padding_mask=None):
        if intermediate_tensors is not None:
            raise NotImplementedError(
                "intermediate_tensors: partial CUDA-graph capture of the MoE layer is not supported"
            )
        if padding_mask is not None:  # [B, S] -> [S, B], as Megatron's own forward does
            padding_mask = padding_mask.transpose(0, 1).bool()
        if self.use_shared_expert and self.shared_expert_overlap:
            shared_output = self.shared_experts(hidden_states)  # no dispatcher to overlap it with
        else:
            shared_output = self.shared_experts_compute(hidden_states)
        probs, routing_map = self.route(hidden_states, padding_mask)

        cfg = self._comet_config
        x = hidden_states.reshape(-1, cfg.hidden_size)
        topk_ids, topk_weights = routing_from_map(probs, routing_map, cfg.top_k)
        weights = expert_weights(self.experts, self.num_local_experts, cfg)
        output = run_experts(x, topk_ids, topk_weights, weights, cfg, self._comet_backend, self._comet_ep_state)
        output = output.view(hidden_states.shape)
        if shared_output is not None:
            output = output + shared_output
        return output, None


_EXPERTS_TYPES = tuple(
    t for t in (mcore_experts.SequentialMLP, mcore_experts.TEGroupedMLP, getattr(mcore_experts, "GroupedMLP", None))
    if t is not None
)
_COMET_CLASSES: dict[type, type] = {MoELayer: CometMoELayer}


def _comet_class(cls: type) -> type:
    """CometMoELayer's forward over `cls` (MoELayer or a subclass of it)."""
    if cls not in _COMET_CLASSES:
        _COMET_CLASSES[cls] = type(f"Comet{cls.__name__}", (cls,), {"forward": CometMoELayer.forward})
    return _COMET_CLASSES[cls]


def moe_layers(model: nn.Module) -> list[tuple[str, MoELayer]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoELayer)]


def apply(model: nn.Module, backend: str = "auto", max_tokens_per_rank: int = 4096) -> nn.Module:
    """Run the experts of every Megatron-Core MoELayer in `model` through comet's `backend`
    (in place; `model` may itself be a MoELayer). Layers whose expert-parallel group has more than
    one rank run through `comet.ep` (the Triton kernels: backend "auto" or "triton"), at most
    `max_tokens_per_rank` tokens per rank and forward; then `apply` is collective over that group
    (it makes the group's `comet.ep.ExpertParallelState`), and every rank of it must run forward
    and backward together, as Megatron's own dispatchers need. Applying again re-applies."""
    check_backend_name(backend)
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"model: no megatron.core MoELayer found in this {type(model).__name__}")
    groups = []
    for name, layer in layers:  # check everything before changing anything
        _check_supported(layer, name or "model")
        ep_group = getattr(layer, "ep_group", None)
        process_group = ep_group if _group_size(ep_group) > 1 else None
        check_process_group(process_group, backend)
        if process_group is not None:  # comet.ep's layout: rank r of the group holds experts [r*E/W, (r+1)*E/W)
            first = process_group.rank() * layer.num_local_experts
            if list(layer.local_expert_indices) != list(range(first, first + layer.num_local_experts)):
                raise NotImplementedError(f"{name or 'model'}: local_expert_indices {layer.local_expert_indices} are "
                                          f"not this rank's consecutive share of the experts")
        groups.append(process_group)
    if any(g is not None for g in groups) and (not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1):
        raise ValueError(f"max_tokens_per_rank: expected a positive int, got {max_tokens_per_rank!r}")
    _close_states([layer for _, layer in layers])  # of an earlier apply
    from comet.ep import ExpertParallelState  # lazily: the kernels load on first use

    states: list[tuple[object, object]] = []  # (group, its state), in the order the layers come
    for (name, layer), group in zip(layers, groups):
        cfg = moe_config(layer)
        state = None
        if group is not None:
            state = next((s for g, s in states if g is group), None)
            if state is None:
                state = ExpertParallelState(group, max_tokens=max_tokens_per_rank)
                states.append((group, state))
            state.reserve(cfg)
        original = layer.__dict__.get("_comet_original_class", type(layer))
        layer._comet_config = cfg
        layer._comet_backend = backend
        layer._comet_ep_state = state
        layer._comet_original_class = original
        layer.__class__ = _comet_class(original)
    return model


def _close_states(layers: list):
    """Close the expert-parallel states of patched `layers`, each once (collective)."""
    closed = []
    for layer in layers:
        state = layer.__dict__.get("_comet_ep_state")
        if state is not None and not any(state is c for c in closed):
            state.close()
            closed.append(state)


def revert(model: nn.Module) -> nn.Module:
    """Undo `apply`: every patched MoELayer gets its original class back (collective over the
    expert-parallel groups of layers that ran through `comet.ep`: their states are closed)."""
    patched = [m for _, m in moe_layers(model) if "_comet_original_class" in m.__dict__]
    if not patched:
        raise ValueError("model: not patched by comet.integrations.megatron.apply")
    _close_states(patched)
    for layer in patched:
        layer.__class__ = layer._comet_original_class
        for attr in ("_comet_config", "_comet_backend", "_comet_ep_state", "_comet_original_class"):
            delattr(layer, attr)
    return model


__all__ = ["apply", "revert", "CometMoELayer", "moe_config", "expert_weights", "routing_from_map", "moe_layers"]
