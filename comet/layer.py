"""`MoELayer`: router, routed experts and shared experts as separate small modules."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from comet.backends import check_backend_name, resolve_backend
from comet.config import MoEConfig
from comet.weights import ExpertWeights
from comet.reference import activation_reference, route
from comet.validation import check_hidden, check_type


class Router(nn.Module):
    """Linear router (+ optional bias) and the config's top-k rule."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_bias else None
        if cfg.score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))
        else:
            self.e_score_correction_bias = None
        nn.init.normal_(self.weight, std=cfg.hidden_size**-0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, H] -> (logits [T, E], topk_weights fp32 [T, K], topk_ids int64 [T, K])."""
        logits = F.linear(x, self.weight, self.bias)
        topk_weights, topk_ids = route(logits, self.cfg, self.e_score_correction_bias)
        return logits, topk_weights, topk_ids


class Experts(nn.Module):
    """Routed expert weights, gate rows first: gate_up [E, 2F, H], down [E, H, F] (E = `num_experts`,
    default all of the config's; an expert-parallel rank holds only its own)."""

    def __init__(self, cfg: MoEConfig, num_experts: int | None = None):
        super().__init__()
        e, f, h = num_experts or cfg.num_experts, cfg.ffn_size, cfg.hidden_size
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * f, h) / math.sqrt(h))
        self.down_proj = nn.Parameter(torch.randn(e, h, f) / math.sqrt(f))
        self.gate_up_bias = nn.Parameter(torch.zeros(e, 2 * f)) if cfg.expert_bias else None
        self.down_bias = nn.Parameter(torch.zeros(e, h)) if cfg.expert_bias else None

    def weights(self) -> ExpertWeights:
        return ExpertWeights(self.gate_up_proj, self.down_proj, self.gate_up_bias, self.down_bias)


class SharedExpert(nn.Module):
    """Always-on gated MLP, optionally scaled by sigmoid(gate(x)) (Qwen2-MoE)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        h, s = cfg.hidden_size, cfg.shared_ffn_size
        self.cfg = cfg
        self.gate_proj = nn.Linear(h, s, bias=False)
        self.up_proj = nn.Linear(h, s, bias=False)
        self.down_proj = nn.Linear(s, h, bias=False)
        self.gate = nn.Linear(h, 1, bias=False) if cfg.shared_expert_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg  # the routed experts' activation, as in every Hugging Face family
        a = activation_reference(self.gate_proj(x), self.up_proj(x), c.activation, c.swiglu_alpha, c.swiglu_limit)
        y = self.down_proj(a)
        return y * torch.sigmoid(self.gate(x)) if self.gate is not None else y


class MoELayer(nn.Module):
    """Drop-in MoE layer: [..., H] -> [..., H].

    backend: "reference" (plain PyTorch, fp32 accumulation), a kernel backend registered in
    `comet.backends`, or "auto" (the fastest one usable on the weights' device, chosen at call time).
    Training runs the backend's backward kernels; set the attribute `recompute_experts = True` to
    save only the routing plan for them (GEMM1 runs again in the backward) instead of also GEMM1's
    [T*K, 2F] output.

    process_group: expert parallelism (`comet.ep`) over this group of W ranks. Each rank keeps
    only its experts, `expert_range` = [r*E/W, (r+1)*E/W) (router and shared experts are
    replicated), runs its own tokens (at most `max_tokens_per_rank` per call) and gets their
    outputs, forward and backward; every rank of the group must call forward (and backward)
    together. The layer's `ep_state` (a `comet.ep.ExpertParallelState`) owns the buffers: pass
    one to share it between layers of the group (its max_tokens then applies), else the layer
    makes its own. Constructing an expert-parallel layer is collective. The attribute
    `ep_n_comm` sets the pushing programs of the fused kernels (`comet.ep`): "auto" (default,
    chosen per call from the shapes by `comet.scheduler.ep_split`), 0 (unfused) or a count.
    """

    def __init__(self, config: MoEConfig, process_group=None, backend: str = "auto",
                 max_tokens_per_rank: int = 4096, ep_state=None):
        super().__init__()
        check_type(config, MoEConfig, "config", "a comet.MoEConfig (comet.MoEConfig(**fields))")
        self.config = config
        self.process_group = process_group
        self.backend = backend
        check_backend_name(backend)
        # Training: the routed experts' backward computes GEMM1 again instead of saving its output.
        self.recompute_experts = False
        self.router = Router(config)
        self.expert_range = range(config.num_experts)
        if process_group is not None:
            self._init_expert_parallel(process_group, backend, max_tokens_per_rank, ep_state)
        elif ep_state is not None:
            raise ValueError("ep_state: expert parallelism needs process_group too")
        self.experts = Experts(config, num_experts=len(self.expert_range))
        self.shared_expert = SharedExpert(config) if config.shared_ffn_size else None

    def _init_expert_parallel(self, group, backend: str, max_tokens_per_rank: int, state):
        from comet.ep import ExpertParallelState  # lazily, like the kernel backends (see comet.backends)

        check_type(group, dist.ProcessGroup, "process_group", "a torch.distributed.ProcessGroup")
        if backend not in ("auto", "triton"):
            raise ValueError(f"backend: expert parallelism runs the Triton kernels ('auto' or 'triton'), "
                             f"got {backend!r}")
        if not isinstance(max_tokens_per_rank, int) or max_tokens_per_rank < 1:
            raise ValueError(f"max_tokens_per_rank: expected a positive int, got {max_tokens_per_rank!r}")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if self.config.num_experts % world:
            raise ValueError(f"process_group: {world} ranks do not evenly split {self.config.num_experts} experts")
        per_rank = self.config.num_experts // world
        self.expert_range = range(rank * per_rank, (rank + 1) * per_rank)
        if state is None:
            state = ExpertParallelState(group, max_tokens=max_tokens_per_rank)
        elif not isinstance(state, ExpertParallelState):
            raise TypeError(f"ep_state: expected a comet.ep.ExpertParallelState, got {type(state).__name__}")
        elif state.group != group:
            raise ValueError("ep_state: made for another process group than process_group")
        state.reserve(self.config)
        self.ep_state = state
        self.max_tokens_per_rank = state.max_tokens
        self.ep_n_comm = "auto"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        check_hidden(hidden_states, cfg.hidden_size, self.experts.gate_up_proj)
        x = hidden_states.reshape(-1, cfg.hidden_size)
        if x.shape[0] == 0 and self.process_group is None:  # a rank of a group still takes part
            return torch.empty_like(hidden_states)
        _, topk_weights, topk_ids = self.router(x)
        if self.process_group is not None:
            from comet.ep import ep_experts  # lazily, like the kernel backends (see comet.backends)

            out = ep_experts(x, topk_ids, topk_weights, self.experts.weights(), cfg, self.ep_state,
                             n_comm=self.ep_n_comm)
        else:
            out = resolve_backend(self.backend, x.device, x.dtype).fn(x, topk_ids, topk_weights, self.experts.weights(),
                                                                      cfg, recompute=self.recompute_experts)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.view(hidden_states.shape)

    @classmethod
    def expert_parallel_from(cls, layer: "MoELayer", process_group, max_tokens_per_rank: int = 4096,
                             ep_state=None) -> "MoELayer":
        """This rank's expert-parallel copy of a full `layer` (collective): its router and shared
        experts, and the experts of `expert_range`, on the same device and dtype."""
        if layer.process_group is not None:
            raise ValueError("layer: expected a full layer (built without process_group)")
        ref = layer.experts.gate_up_proj
        ep = cls(layer.config, process_group=process_group, max_tokens_per_rank=max_tokens_per_rank,
                 ep_state=ep_state).to(
            ref.device, ref.dtype)
        part = slice(ep.expert_range.start, ep.expert_range.stop)
        ep.load_state_dict({k: v[part] if k.startswith("experts.") else v for k, v in layer.state_dict().items()})
        return ep

    def load_hf_block(self, block) -> "MoELayer":
        """Copy the weights of a Hugging Face MoE block of this layer's family into this layer."""
        from comet.hf_families import load_hf_block

        load_hf_block(self, block)
        return self

    @classmethod
    def from_hf_block(cls, block, hf_config, backend: str = "auto") -> "MoELayer":
        """A layer with the config and weights of a Hugging Face MoE block."""
        ref = next(block.parameters())
        layer = cls(MoEConfig.from_hf(hf_config), backend=backend).to(ref.device, ref.dtype)
        return layer.load_hf_block(block)

    def extra_repr(self) -> str:
        c = self.config
        return (f"family={c.family}, hidden={c.hidden_size}, ffn={c.ffn_size}, experts={c.num_experts}, "
                f"top_k={c.top_k}, backend={self.backend!r}")
