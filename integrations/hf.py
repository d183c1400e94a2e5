"""Hugging Face transformers (5.7+) adapter: `apply(model)` runs the routed experts of every MoE
block through comet; `revert(model)` puts the model back as it was.

Families whose experts go through transformers' experts interface (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V2/V3, GPT-OSS, Phi-3.5-MoE) get a "comet" experts implementation, registered in
`transformers.integrations.moe.ExpertsInterface` and switched on with
`model.set_experts_implementation("comet")`. It reads the experts module's own parameters as views
(no copy), so router, shared experts, router-logit capture, aux loss, checkpoint loading and saving
all stay the library's own. Llama4, whose experts module does not use the interface, has each MoE
block replaced by `CometLlama4Block`, which keeps the block's own router, experts and shared-expert
modules (same parameters, same state-dict keys) and only swaps the computation.

Expert parallelism (`apply(model, process_group=g)`): attention, router and shared experts stay
replicated and data-parallel (each rank runs its own batch); each experts module keeps only this
rank's E/W experts (the others are dropped) and runs through `comet.ep.ep_experts` on the
router's global expert ids, forward and backward, with one `comet.ep.ExpertParallelState` for
the whole model (made by `apply`, closed by `revert`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from comet.backends import check_backend_name
from comet.config import MoEConfig
from comet.hf_families import config_from_hf, experts_from_hf_layout, find_moe_blocks
from comet.integrations.common import check_process_group, run_experts

try:
    from transformers.integrations.moe import ExpertsInterface
except ImportError as exc:  # transformers < 5.7 has no experts interface
    raise ImportError("comet.integrations.hf needs transformers>=5.7 (pip install 'transformers>=5.7')") from exc

IMPLEMENTATION = "comet"


@dataclass
class _ExpertsState:
    """What the "comet" implementation needs about one experts module, kept on the module."""

    family: str
    config: MoEConfig  # the experts' shapes: num_experts is the number held by this module
    backend: str = "auto"
    ep_state: object = None  # expert parallelism (comet.ep): config holds all E experts, the module E/W


def _experts_config(family_cfg: MoEConfig, num_local_experts: int) -> MoEConfig:
    """The family's layer config, restricted to the experts this module holds (HF's own expert
    parallelism shards them); routing fields are not used by the experts."""
    if num_local_experts == family_cfg.num_experts:
        return family_cfg
    return family_cfg.with_experts(num_local_experts)


def _state(experts: nn.Module) -> _ExpertsState:
    """The module's state, built on first use when the implementation was switched on by hand
    (`model.set_experts_implementation("comet")` without `apply`)."""
    state = experts.__dict__.get("_comet")
    if state is None:
        family_cfg = config_from_hf(experts.config)
        state = _ExpertsState(family_cfg.family, _experts_config(family_cfg, experts.gate_up_proj.shape[0]))
        experts._comet = state
    return state


def comet_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts contract: hidden [T, H], top_k_index [T, K], top_k_weights [T, K] -> [T, H]."""
    state = _state(self)
    weights = experts_from_hf_layout(
        state.family, self.gate_up_proj, self.down_proj,
        getattr(self, "gate_up_proj_bias", None), getattr(self, "down_proj_bias", None),
    )
    if state.ep_state is not None:  # ids >= E (experts on no rank) are skipped there
        return run_experts(hidden_states, top_k_index, top_k_weights, weights, state.config, state.backend,
                           state.ep_state)
    # HF's expert parallelism passes experts held by other ranks as ids >= E with weight 0. Point
    # them at a held expert with weight 0 (backends need ids in range). transformers < 5.17 has no
    # flag telling whether the module is sharded, so there this is always done (two tiny ops).
    if getattr(self, "_is_expert_parallel", True):
        num_experts = weights.num_experts
        held = top_k_index < num_experts
        top_k_weights = top_k_weights.masked_fill(~held, 0.0)
        top_k_index = top_k_index.clamp(max=num_experts - 1)
    return run_experts(hidden_states, top_k_index, top_k_weights, weights, state.config, state.backend)


ExpertsInterface.register(IMPLEMENTATION, comet_experts_forward)


class CometLlama4Block(nn.Module):
    """A Llama4 text MoE block run through comet. Holds the original block's own router, experts
    and shared expert (so output capture of the router and state-dict keys are unchanged);
    returns what the block returns: (output [T, H], router_logits [T, E])."""

    def __init__(self, block: nn.Module, config: MoEConfig, backend: str):
        super().__init__()
        self.router = block.router
        self.experts = block.experts
        self.shared_expert = block.shared_expert
        self.moe_config = config
        self.backend = backend

    def forward(self, hidden_states: torch.Tensor):
        cfg = self.moe_config
        x = hidden_states.reshape(-1, cfg.hidden_size)
        # The router returns sigmoid scores scattered into [T, E] (0 off the top-k) and the logits;
        # the top-k of the scores is exactly its choice, weights included.
        router_scores, router_logits = self.router(x)
        topk_weights, topk_ids = router_scores.topk(cfg.top_k, dim=-1)
        weights = experts_from_hf_layout(cfg.family, self.experts.gate_up_proj, self.experts.down_proj)
        routed = run_experts(x, topk_ids, topk_weights, weights, cfg, self.backend)
        return self.shared_expert(x) + routed, router_logits


@dataclass
class _Patch:
    """What `apply` changed, for `revert`."""

    previous_implementation: object = None  # str or dict; None when no experts implementation was switched
    experts: list = field(default_factory=list)
    replaced: list = field(default_factory=list)  # (parent, attribute, original block)
    process_group: object = None  # expert parallel: the other ranks' experts were dropped
    ep_state: object = None  # and this state runs them (closed by revert)


def _uses_experts_interface(experts: nn.Module) -> bool:
    # `use_experts_implementation` sets these on every instance of a decorated class.
    return hasattr(experts, "is_transposed") and hasattr(experts, "has_gate")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _check_expert_parallel(process_group, backend: str, max_tokens_per_rank: int):
    check_process_group(process_group, backend)
    if not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1:
        raise ValueError(f"max_tokens_per_rank: expected a positive int, got {max_tokens_per_rank!r}")


_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")


def _keep_rank_experts(experts: nn.Module, process_group):
    """Replace the experts module's parameters by this rank's E/W experts (copies: the full ones go)."""
    world, rank = torch.distributed.get_world_size(process_group), torch.distributed.get_rank(process_group)
    per_rank = experts.gate_up_proj.shape[0] // world
    part = slice(rank * per_rank, (rank + 1) * per_rank)
    for attr in _EXPERT_PARAMETERS:
        p = getattr(experts, attr, None)
        if p is not None:
            setattr(experts, attr, nn.Parameter(p.detach()[part].clone(), requires_grad=p.requires_grad))
    if hasattr(experts, "num_experts"):
        experts.num_experts = per_rank


def _gather_experts(experts: nn.Module, process_group):
    """Undo `_keep_rank_experts` (collective): every rank's experts, gathered in rank order."""
    world = torch.distributed.get_world_size(process_group)
    for attr in _EXPERT_PARAMETERS:
        p = getattr(experts, attr, None)
        if p is not None:
            parts = [torch.empty_like(p) for _ in range(world)]
            torch.distributed.all_gather(parts, p.detach().contiguous(), group=process_group)
            setattr(experts, attr, nn.Parameter(torch.cat(parts), requires_grad=p.requires_grad))
    if hasattr(experts, "num_experts"):
        experts.num_experts *= world


def apply(model: nn.Module, process_group=None, backend: str = "auto", max_tokens_per_rank: int = 4096) -> nn.Module:
    """Run the routed experts of every MoE block of `model` (a transformers model of a supported
    family) through comet's `backend`. Returns `model`, patched in place; `revert(model)` undoes
    it. Applying again re-applies with the new arguments.

    process_group: expert parallelism over its W ranks (`comet.ep`): every rank builds the same
    model and calls apply; each experts module then keeps only this rank's experts
    [r*E/W, (r+1)*E/W) (`revert` gathers them back: collective too). Each rank runs its own batches
    (at most `max_tokens_per_rank` tokens per forward), every rank of the group calling forward
    and backward together; the experts' gradients stay on their rank, those of the replicated
    parameters are each rank's own (sum them as data parallelism does). Collective with a
    process group. Not for Llama4.
    """
    check_backend_name(backend)
    if process_group is not None:
        _check_expert_parallel(process_group, backend, max_tokens_per_rank)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    blocks = find_moe_blocks(model)  # ValueError naming the supported families otherwise
    if not blocks:
        raise ValueError(f"model: no MoE block found in this {type(model).__name__}")
    if "_comet_patch" in model.__dict__:
        revert(model)

    family_cfg = config_from_hf(model.config)
    world = 1 if process_group is None else torch.distributed.get_world_size(process_group)
    interface_blocks, replaced_blocks = [], []
    for name, block in blocks:  # check everything before changing anything
        experts = block.experts
        if experts.gate_up_proj.shape[0] % world:
            raise ValueError(f"{name}.experts: {experts.gate_up_proj.shape[0]} experts do not split evenly over the "
                             f"{world} ranks of process_group")
        if _uses_experts_interface(experts):
            if not experts.has_gate or getattr(experts, "has_post_expert_norm", False):
                raise NotImplementedError(
                    f"{name}.experts: experts without a gate projection or with a post-expert norm are not supported"
                )
            interface_blocks.append((name, block))
        elif family_cfg.family == "llama4" and process_group is None:
            replaced_blocks.append((name, block))
        elif family_cfg.family == "llama4":
            raise NotImplementedError(f"{name}: expert parallelism is not supported for Llama4 blocks")
        else:
            raise NotImplementedError(
                f"{name}: the {family_cfg.family} experts module {type(experts).__name__} does not use "
                f"transformers' experts interface; this transformers version is not supported (needs >= 5.7)"
            )

    patch = _Patch()
    model._comet_patch = patch
    patch.process_group = process_group
    if process_group is not None:
        from comet.ep import ExpertParallelState  # lazily: the kernels load on first use

        patch.ep_state = ExpertParallelState(process_group, max_tokens=max_tokens_per_rank, configs=[family_cfg])
    for _, block in interface_blocks:
        experts = block.experts
        if process_group is None:
            local_cfg = _experts_config(family_cfg, experts.gate_up_proj.shape[0])
            experts._comet = _ExpertsState(family_cfg.family, local_cfg, backend)
        else:
            _keep_rank_experts(experts, process_group)
            experts._comet = _ExpertsState(family_cfg.family, family_cfg, backend, patch.ep_state)
        patch.experts.append(experts)
    for name, block in replaced_blocks:
        parent, attr = _parent(model, name)
        setattr(parent, attr, CometLlama4Block(block, family_cfg, backend))
        patch.replaced.append((parent, attr, block))
    if patch.experts:
        patch.previous_implementation = _get_implementation(model)
        model.set_experts_implementation(IMPLEMENTATION)
        stray = [type(e).__name__ for e in patch.experts if e.config._experts_implementation != IMPLEMENTATION]
        if stray:
            revert(model)
            raise RuntimeError(f"model: set_experts_implementation did not reach the experts modules {stray}")
    return model


def _get_implementation(model: nn.Module):
    """The model's experts implementation, in the form `set_experts_implementation` takes back."""
    get = getattr(model, "get_experts_implementation", None)  # transformers >= 5.17
    return get() if callable(get) else model.config._experts_implementation


def revert(model: nn.Module) -> nn.Module:
    """Undo `apply`: the original experts implementation and MoE blocks (after an expert-parallel
    apply, the experts gathered back from every rank: collective). Returns `model`."""
    patch = model.__dict__.get("_comet_patch")
    if patch is None:
        raise ValueError("model: not patched by comet.integrations.hf.apply")
    if patch.experts:
        model.set_experts_implementation(patch.previous_implementation)
    for experts in patch.experts:
        del experts._comet
        if patch.process_group is not None:
            _gather_experts(experts, patch.process_group)
    for parent, attr, block in patch.replaced:
        setattr(parent, attr, block)
    if patch.ep_state is not None:
        patch.ep_state.close()
    del model._comet_patch
    return model


def is_applied(model: nn.Module) -> bool:
    return "_comet_patch" in model.__dict__


__all__ = ["apply", "revert", "is_applied", "comet_experts_forward", "CometLlama4Block", "IMPLEMENTATION"]
