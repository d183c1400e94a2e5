"""Expert parallelism: each rank of a process group holds E/W of the experts and its own tokens.

Two pieces:

- `ExpertParallelState`: the one owner of a group's expert-parallel state (as DeepEP's `Buffer`):
  the communication workspace (`comet.comm.CommWorkspace`), the dispatch and combine buffers of
  each reserved layer shape, the chunk sizes, the measured machine rates and the split chosen per
  call shape, and the error record a timed-out wait leaves. Making it, `reserve` and `close` are
  collective; nothing else is.
- `ep_experts(x, topk_ids, topk_weights, local_weights, cfg, state)`: the routed experts of this
  rank's tokens across the group, differentiable (forward and backward are collective calls).

Forward, per call (one epoch of the workspace):

1. send plan (device, `comet.scheduler.ep_plan`): each token goes once to every rank holding any
   of its experts;
2. dispatch (`comet.kernels.ep_dispatch`): tokens, their routing (as the receiver's local expert
   ids) and weights pushed straight into the receivers' buffers, flags raised per chunk;
3. on the receiver, the received slots of all sources form one "virtual token" batch
   [W * max_tokens, H] whose unused slots carry id -1: routing analysis, GEMM1 and GEMM2 of the
   single-GPU kernels on this rank's experts, then `slot_sum_push` sums each received token's K
   slot rows and stores the sum straight into its source's combine buffer. With `n_comm` > 0 the
   routing moves first, the token rows are pushed inside GEMM1's launch (`dispatch_gate_up`, tiles
   in arrival-bin order: `comet.kernels.ep_tiles`) and the slot sums inside GEMM2's
   (`down_combine`; with `column_chunks=0` by `slot_sum_push` after GEMM2);
4. combine (`comet.kernels.ep_combine`): each source waits for the partial rows of its tokens
   and sums them in a fixed rank order.

Backward, per call (one more epoch), the same kernels and buffers in the other direction: the
output gradient of each token is dispatched with the forward's send plan (once to every rank that
computed one of its experts), the receiver runs `_local_experts_backward` on its received rows
(weight gradients stay there), and the partial input gradients and routing-weight gradients come
back through the combine (summed at the source in fixed rank order: deterministic).

No host sync on the hot path: each call's epoch is counted on the device, so eager calls can be
captured in a CUDA graph once the state exists. A peer that stops answering makes the waits give
up after the workspace's `max_spins`; the call's output is then NaN (written by the combine
kernel) and the next call on that rank raises `CommTimeoutError` (read from a host-mapped error
record, no sync). Measurements of these kernels: docs/performance-ep.md.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist
import triton

from comet.backends import resolve_backend
from comet.comm import CommTimeoutError, CommWorkspace
from comet.config import MoEConfig
from comet.device_info import num_sms
from comet.kernels.ep_combine import (
    CombineBuffers, combine_buffers, combine_push, combine_reduce, down_combine, slot_sum_push,
)
from comet.device_info import num_sms
from comet.kernels.ep_dispatch import DispatchBuffers, dispatch_buffers, dispatch_gate_up, dispatch_push, dispatch_receive
from comet.kernels.ep_tiles import ArrivalTiles, arrival_gemm
from comet.kernels.expert_gemm import GemmProblem, launch_gemm
from comet.scheduler.configs import select_configs
from comet.scheduler.ep_calibrate import group_rates
from comet.scheduler.ep_plan import SendPlan, plan_sends
from comet.scheduler.ep_split import (
    EpShape, EpSplit, best_column_chunks, choose_split, default_rates, ep_shape,
    lead_experts as model_lead_experts,
)
from comet.ops import experts_backward
from comet.scheduler.routing import analyze_routing
from comet.validation import check_expert_weights, check_hidden, check_routing, kernel_ids
from comet.weights import ExpertWeights

# Tokens per flag. The interpreter gets small chunks and few programs per push launch so that tiny
# test shapes still cross several of each; on a GPU the push launches (which never wait) use every SM.
CHUNK_TOKENS = {"cpu": 4, "cuda": 16}
# The combine's flag chunks are larger on a GPU: in the fused GEMM2 each (chunk, column chunk) unit
# of the push pays a claim and a system-scope counter (docs/performance-ep.md).
COMBINE_CHUNK_TOKENS = {"cpu": 4, "cuda": 64}
INTERPRETER_PUSH_PROGRAMS = 2
# Seconds the group setup waits for every rank to make its state (COMET_EP_SETUP_TIMEOUT overrides).
DEFAULT_SETUP_TIMEOUT_S = 300.0


class _ShapeBuffers(NamedTuple):
    """The workspace buffers of one (hidden, top_k) layer shape."""

    dispatch: DispatchBuffers
    combine: CombineBuffers  # partial output rows (forward) and partial input gradients (backward)
    weight_grads: CombineBuffers  # fp32 [.., K] partial routing-weight gradients (backward)


class ExpertParallelState:
    """Everything the expert-parallel calls of one process group share: workspace, buffers, chunk
    sizes, machine rates, splits and the error record. Shared by every layer of a model that runs
    over the same group (hand the same object to each), or one per layer.

    Collective calls (every rank of the group makes them, in the same order): the constructor,
    `reserve`, `close`. Everything else is local and host-sync free except `check_errors`.

    group: the process group (None: the world). max_tokens: the most tokens one rank sends per
    call (the buffers' capacity; the same value on every rank). device: the workspace's device
    (None: the current CUDA device for an NCCL group, else the CPU). max_spins: polls before a
    wait gives up (None: `comet.comm.DEFAULT_MAX_SPINS`). setup_timeout: seconds the constructor
    waits for every rank of the group to make its state too; past it, `CommTimeoutError` naming the
    missing ranks (None: COMET_EP_SETUP_TIMEOUT, else 300). configs: layer configs to `reserve`.

    On a GPU the constructor also measures the machine's rates for the split's cost model (a few
    hundred milliseconds, `comet.scheduler.ep_calibrate`), so that no call has to.
    """

    _setups: dict[str, int] = {}  # group name -> states made for it in this process (the same on every rank)

    def __init__(self, group=None, *, max_tokens: int, device=None, max_spins: int | None = None,
                 setup_timeout: float | None = None, configs=()):
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelState: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first")
        group = group if group is not None else dist.group.WORLD
        if setup_timeout is None:
            setup_timeout = float(os.environ.get("COMET_EP_SETUP_TIMEOUT", DEFAULT_SETUP_TIMEOUT_S))
        if not setup_timeout > 0:
            raise ValueError(f"setup_timeout: expected a positive number of seconds, got {setup_timeout!r}")
        setup = self._setups[group.group_name] = self._setups.get(group.group_name, -1) + 1
        _wait_for_group(group, setup, setup_timeout)
        self.workspace = ws = CommWorkspace.create(group, device, max_spins)
        self.max_tokens = max_tokens
        self.chunk = CHUNK_TOKENS[ws.device.type]
        self.combine_chunk = COMBINE_CHUNK_TOKENS[ws.device.type]
        programs = num_sms(ws.device) if ws.device.type == "cuda" else INTERPRETER_PUSH_PROGRAMS
        self.push_programs = min(programs, triton.cdiv(max_tokens, self.chunk))  # of the push-only launches
        # The error record of the last kernel of every call (`combine_reduce`), copied from the
        # workspace's device record: host memory (pinned, hence mapped into the GPU's address
        # space, on a GPU), read by `raise_if_failed` without a sync. Reached through an address
        # table like every workspace buffer.
        self.host_errors = torch.zeros(len(ws.errors), dtype=torch.int64, pin_memory=ws.device.type == "cuda")
        self.host_errors_table = torch.tensor([self.host_errors.data_ptr()], dtype=torch.int64, device=ws.device)
        self.rates = group_rates(ws) if ws.device.type == "cuda" else None
        self._buffers: dict[tuple[int, int], _ShapeBuffers] = {}
        self._splits: dict[EpShape, EpSplit] = {}
        for cfg in configs:
            self.reserve(cfg)

    @property
    def group(self):
        return self.workspace.group

    @property
    def rank(self) -> int:
        return self.workspace.rank

    @property
    def world_size(self) -> int:
        return self.workspace.world_size

    @property
    def device(self) -> torch.device:
        return self.workspace.device

    def reserve(self, cfg: MoEConfig):
        """Collective: make the buffers for layers of `cfg`'s hidden size and top-k (any dtype up
        to 4 bytes: the row buffers are sized for fp32). Reserving a shape again does nothing."""
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg: expected a comet.MoEConfig, got {type(cfg).__name__}")
        if cfg.num_experts % self.world_size:
            raise ValueError(f"cfg.num_experts ({cfg.num_experts}) must be a multiple of the group size "
                             f"({self.world_size})")
        key = (cfg.hidden_size, cfg.top_k)
        if key not in self._buffers:
            ws, c = self.workspace, self.max_tokens
            self._buffers[key] = _ShapeBuffers(
                dispatch_buffers(ws, c, cfg.hidden_size, cfg.top_k, self.chunk),
                combine_buffers(ws, c, cfg.hidden_size, self.combine_chunk, "out"),
                combine_buffers(ws, c, cfg.top_k, self.combine_chunk, "weight_grads"))

    def buffers(self, cfg: MoEConfig) -> _ShapeBuffers:
        """The buffers `reserve(cfg)` made (local)."""
        found = self._buffers.get((cfg.hidden_size, cfg.top_k))
        if found is None:
            raise ValueError(f"state: no buffers for hidden_size={cfg.hidden_size}, top_k={cfg.top_k}; call "
                             f"state.reserve(cfg) on every rank first (collective)")
        return found

    def split(self, shape: EpShape, n_comm: int | str, column_chunks: int | None = None) -> EpSplit:
        """The split a call of `shape` runs with (local, no sync): "auto" asks
        `comet.scheduler.ep_split` (tuned table, else the cost model fed the rates measured when
        the state was made), remembered per shape; an explicit n_comm gets the model's column
        chunks for it (H200 rates scaled to this GPU); `column_chunks` overrides."""
        if n_comm == "auto":
            split = self._splits.get(shape)
            if split is None:
                split = self._splits[shape] = choose_split(shape, self.device, lambda: self.rates)
        elif n_comm == 0:
            split = EpSplit(0, 1)
        else:
            split = EpSplit(n_comm, best_column_chunks(shape, n_comm, default_rates(self.device)))
        return split if column_chunks is None else split._replace(column_chunks=column_chunks)

    def raise_if_failed(self):
        """Raise `CommTimeoutError` if a call of this state timed out. Reads the host-mapped copy of
        the error record, no sync: on a GPU it sees a failure once the call that failed has run."""
        if int(self.host_errors[0]):
            raise self.workspace.timeout_error(self.host_errors.tolist())

    def check_errors(self):
        """Raise `CommTimeoutError` if a wait timed out (a host sync: waits for queued work)."""
        self.workspace.check_errors()

    def close(self):
        """Collective: free the workspace and its buffers once no rank can still write into them."""
        self.workspace.close()

    def __enter__(self) -> "ExpertParallelState":
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"ExpertParallelState(rank={self.rank}, world_size={self.world_size}, device={self.device}, "
                f"max_tokens={self.max_tokens}, shapes={sorted(self._buffers)})")


def _wait_for_group(group, setup: int, timeout_s: float):
    """Bounded rendezvous before the first collective of a state: every rank of `group` marks its
    arrival in the process group's store and waits at most `timeout_s` for the others'."""
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    keys = [f"comet.ep.setup/{group.group_name}/{setup}/{r}" for r in range(world)]
    store.set(keys[rank], "1")
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001  the store's timeout error differs by store and version
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise CommTimeoutError(
            f"rank {rank} timed out after {timeout_s:g} s waiting for rank(s) {missing} to make their "
            f"ExpertParallelState (the group setup is collective: every rank makes its states in the same "
            f"order)") from exc


def ep_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, local_weights: ExpertWeights,
               cfg: MoEConfig, state: ExpertParallelState, *, n_comm: int | str = "auto",
               column_chunks: int | None = None, lead_experts: int | None = None) -> torch.Tensor:
    """Routed experts of this rank's tokens, x [T, H] -> [T, H], with the experts spread over
    `state`'s group: this rank holds experts [r*E/W, (r+1)*E/W) in `local_weights`; `topk_ids`
    [T, K] are global ids (ids outside [0, E) are skipped); `topk_weights` [T, K]. Collective:
    every rank of the group calls it (T may differ, T = 0 included, T <= state.max_tokens), after
    `state.reserve(cfg)`. No host sync.

    Differentiable in x, topk_weights and the local weights (when grad mode is on and one of them
    requires grad): the backward is a collective call too, so every rank must backpropagate
    through every call, in the same order. Under autograd the unfused path runs whatever
    `n_comm` says, and the received rows are kept for the backward ([W * max_tokens, H]).

    `n_comm`: "auto" (default) lets `comet.scheduler.ep_split` choose from the shapes (tuned table,
    else cost model; the same choice on every rank). 0 runs the dispatch, the expert GEMMs and the
    slot sum that pushes the partial rows back as separate launches on every SM; n_comm > 0 moves
    the routing first, then fuses pushing the token rows into GEMM1's launch (its first `n_comm`
    programs push while the others compute) and pushing the partial rows back into GEMM2's (its
    last `n_comm` programs sum and push each column chunk as soon as GEMM2 has finished it).
    `column_chunks`: GEMM2's column chunks in the fused path (None: the split's choice; 0: only
    the dispatch fused). `lead_experts`: in the fused GEMM1, how many local experts' own rows run
    before any other rank's rows are read (None: the cost model's `ep_split.lead_experts`).

    A lost peer: the call whose waits gave up returns NaN, the next call raises `CommTimeoutError`.
    """
    return _ep_experts(x, topk_ids, topk_weights, local_weights, cfg, state, n_comm=n_comm,
                       column_chunks=column_chunks, lead_experts=lead_experts)


def _ep_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, local_weights: ExpertWeights,
                cfg: MoEConfig, state: ExpertParallelState, *, n_comm: int | str = "auto",
                column_chunks: int | None = None, lead_experts: int | None = None,
                experts: bool = True) -> torch.Tensor:
    """`ep_experts`, and for the benchmarks `experts=False` (with n_comm=0, no autograd): the
    expert computation skipped, the received rows sent back as the partials: the same traffic and
    no result, to time the communication (bench/ep.py's comm_only row)."""
    if n_comm != "auto" and (not isinstance(n_comm, int) or isinstance(n_comm, bool) or n_comm < 0):
        raise ValueError(f"n_comm: expected a non-negative int or 'auto', got {n_comm!r}")
    if column_chunks is not None and (not isinstance(column_chunks, int) or column_chunks < 0):
        raise ValueError(f"column_chunks: expected a non-negative int or None, got {column_chunks!r}")
    if not experts and n_comm not in (0, "auto"):
        raise ValueError("experts=False times the unfused communication: it needs n_comm=0")
    if lead_experts is not None and (not isinstance(lead_experts, int) or lead_experts < 0):
        raise ValueError(f"lead_experts: expected a non-negative int or None, got {lead_experts!r}")
    check_hidden(x, cfg.hidden_size, local_weights.gate_up, name="x")
    if x.dim() != 2:
        raise ValueError(f"x: expected [tokens, hidden], got shape {tuple(x.shape)}")
    num_tokens = x.shape[0]
    check_routing(topk_ids, topk_weights, num_tokens, cfg.num_experts, x.device, check_values=False)
    if topk_ids.shape[1] != cfg.top_k:
        raise ValueError(f"topk_ids: expected top_k = {cfg.top_k} columns, got {topk_ids.shape[1]}")
    if not isinstance(state, ExpertParallelState):
        raise TypeError(f"state: expected a comet.ep.ExpertParallelState, got {type(state).__name__}")
    max_tokens = state.max_tokens
    if num_tokens > max_tokens:
        raise ValueError(f"x: {num_tokens} tokens exceed max_tokens={max_tokens}, the expert-parallel buffers' "
                         f"capacity per rank; raise max_tokens or split the batch")
    resolve_backend("triton", x.device, x.dtype)  # the kernels can run here, or a clear error
    if x.device != state.device:
        raise ValueError(f"x: on {x.device} but the state's workspace is on {state.device}")
    if cfg.num_experts % state.world_size:
        raise ValueError(f"cfg.num_experts ({cfg.num_experts}) must be a multiple of the group size "
                         f"({state.world_size})")
    check_expert_weights(local_weights, cfg, x, cfg.num_experts // state.world_size, "local_weights")
    bufs = state.buffers(cfg)
    state.raise_if_failed()
    tensors = (x, topk_weights, *local_weights[:4])
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        if not experts:
            raise ValueError("experts=False sends no result back: run it under torch.no_grad()")
        return _ExpertParallelExperts.apply((topk_ids, local_weights.interleaved, cfg, state, bufs), *tensors)
    shape = ep_shape(max_tokens, cfg.hidden_size, cfg.ffn_size, cfg.num_experts, cfg.top_k, state.world_size,
                     x.dtype)
    split = state.split(shape, n_comm if experts else 0, column_chunks)
    out, _ = _forward(state, bufs, x, topk_ids, topk_weights, local_weights, cfg, split, lead_experts, experts)
    return out


def _forward(state: ExpertParallelState, bufs: _ShapeBuffers, x, topk_ids, topk_weights, w: ExpertWeights,
             cfg: MoEConfig, split: EpSplit, lead_experts: int | None, experts: bool = True, keep_rows: bool = False):
    """One forward call (an epoch): -> (out [T, H], (plan, recv_x) if keep_rows else None), where
    recv_x [W*C, H] is a copy of the received rows (unfused only)."""
    ws, world, top_k = state.workspace, state.world_size, cfg.top_k
    experts_per_rank = cfg.num_experts // world
    x = x if x.stride(-1) == 1 else x.contiguous()
    topk_ids = kernel_ids(topk_ids).contiguous()
    topk_weights = topk_weights.float().contiguous()
    fused = split.n_comm > 0
    plan = plan_sends(topk_ids, cfg.num_experts, world, every_token_to=ws.rank if fused else None)
    if not fused:
        lead_experts = 0
    elif lead_experts is None:
        shape = ep_shape(state.max_tokens, cfg.hidden_size, cfg.ffn_size, cfg.num_experts, top_k, world, x.dtype)
        lead_experts = model_lead_experts(shape, split.n_comm, default_rates(x.device))
    else:
        lead_experts = min(lead_experts, experts_per_rank)
    tiles = ArrivalTiles(experts_per_rank, world, lead_experts) if fused else None
    epoch = ws.next_epoch()
    # Fused, this launch only sends the routing (the rows go inside GEMM1's).
    dispatch_push(ws, bufs.dispatch, epoch, x, topk_ids, topk_weights, plan.send_tokens, plan.counts,
                  experts_per_rank, state.push_programs, push_rows=not fused)
    # Fused, GEMM1 runs tiles in the order their rows can arrive: see dispatch_receive.
    recv_ids, recv_weights, recv_counts = dispatch_receive(ws, bufs.dispatch, epoch, top_k, wait_rows=not fused,
                                                           tiles=tiles)
    recv_x = bufs.dispatch.received_x(ws, x.dtype)
    if keep_rows or (not fused and x.device.type == "cpu"):
        # The interpreter writes a kernel's tensor arguments back after the launch, and a
        # workspace buffer shares its storage with the peers' copies, which they may be writing.
        recv_x = recv_x.clone()
    recv_ids, recv_weights = recv_ids.view(-1, top_k), recv_weights.view(-1, top_k)
    if experts:
        _experts(state, bufs, epoch, x, plan, recv_x, recv_ids, recv_weights, recv_counts, w, cfg, split, tiles)
    else:
        combine_push(ws, bufs.combine, epoch, recv_x, recv_counts, state.push_programs)  # the received rows
    out = _combine(state, bufs.combine, epoch, plan, torch.empty_like(x))
    return out, ((plan, recv_x) if keep_rows else None)


def _combine(state: ExpertParallelState, bufs: CombineBuffers, epoch, plan: SendPlan, out: torch.Tensor):
    """`combine_reduce` into `out`, its last program copying the error record to the host."""
    return combine_reduce(state.workspace, bufs, epoch, plan.mask, plan.slot, out, state.host_errors_table)


def _experts(state: ExpertParallelState, bufs: _ShapeBuffers, epoch, x, plan, recv_x, recv_ids, recv_weights,
             recv_counts, w: ExpertWeights, cfg: MoEConfig, split: EpSplit, tiles: ArrivalTiles | None):
    """This rank's experts on the received tokens (recv_x [W*C, H], the receive buffer; recv_ids
    [W*C, K] local expert ids, or with split.n_comm > 0 the bins of `tiles`),
    their partial rows pushed to the sources' combine buffers. Unfused: routing, GEMM1, GEMM2 and
    `slot_sum_push`, each on every SM. Fused: pushing the token rows inside GEMM1's launch
    (recv_x is filled while GEMM1 runs) and, unless split.column_chunks is 0, the slot sums and
    their push inside GEMM2's."""
    ws = state.workspace
    rows, top_k = recv_ids.numel(), recv_ids.shape[1]
    experts, hidden, ffn = w.down.shape
    fused = split.n_comm > 0
    bins = tiles.bins if fused else experts
    routing = analyze_routing(recv_ids, bins)
    row_weights = recv_weights.reshape(-1)
    # Looked up for the receive buffer's W*C*K slots (`comet tune --ep-ranks` stores under that).
    cfg1, cfg2 = select_configs(rows, experts, hidden, ffn, x.dtype, x.device)
    act = torch.empty(rows, ffn, dtype=x.dtype, device=x.device)
    gemm1 = GemmProblem.gate_up(recv_x, w.gate_up, w.gate_up_bias, w.interleaved, routing.sorted_rows, row_weights,
                                routing.hist, act, top_k=top_k, activation=cfg.activation, alpha=cfg.swiglu_alpha,
                                limit=cfg.swiglu_limit, weight_on_input=cfg.weight_on_input, cfg=cfg1)
    slots = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    gemm2 = GemmProblem.down(act, w.down, w.down_bias, routing.sorted_rows, row_weights, routing.hist, slots,
                             top_k=top_k, weight_on_input=cfg.weight_on_input, cfg=cfg2)
    if fused:
        dispatch_gate_up(ws, bufs.dispatch, epoch, x, plan.send_tokens, plan.counts, gemm1, tiles, split.n_comm)
        if split.column_chunks > 0:
            down_combine(ws, bufs.combine, epoch, gemm2, tiles, recv_ids, recv_counts, split.n_comm,
                         split.column_chunks)
            return
        arrival_gemm(gemm2, tiles)
    else:
        launch_gemm(gemm1)
        launch_gemm(gemm2)
    slot_sum_push(ws, bufs.combine, epoch, slots, recv_ids, recv_counts, bins)


def _local_experts_backward(grad_rows: torch.Tensor, x_rows: torch.Tensor, local_ids: torch.Tensor,
                            weights_rows: torch.Tensor, w: ExpertWeights, cfg: MoEConfig):
    """The backward of this rank's experts on a received "virtual token" batch of S rows.

    Takes: grad_rows [S, H] (dL/d out of each received token, x's dtype), x_rows [S, H] (the
    received token rows), local_ids [S, K] int (local expert ids; ids outside [0, E_local) are
    skipped: those slots get zero gradients), weights_rows [S, K] fp32 (their routing weights), w
    (this rank's E_local experts), cfg (activation, weight_on_input).
    Gives: (dx_rows [S, H] in x's dtype, summed over each row's slots; d_weights [S, K] fp32;
    d_gate_up, d_down, d_gate_up_bias, d_down_bias like w's tensors, None where w has none).

    The single-GPU backward kernels (`comet.ops.experts_backward`) on the received batch: its
    routing plan and GEMM1's output are computed again here. No host sync.
    """
    two_f = w.gate_up.shape[1]
    ids = kernel_ids(local_ids).contiguous()
    plan = analyze_routing(ids, w.gate_up.shape[0])
    dx, d_weights, d_gate_up, d_down, d_gate_up_bias, d_down_bias = experts_backward(
        grad_rows, x_rows, ids, weights_rows, w, plan, x_rows.new_empty(0, two_f), activation=cfg.activation,
        alpha=cfg.swiglu_alpha, limit=cfg.swiglu_limit, weight_on_input=cfg.weight_on_input)
    return (dx, d_weights, d_gate_up, d_down, d_gate_up_bias if w.gate_up_bias is not None else None,
            d_down_bias if w.down_bias is not None else None)


class _ExpertParallelExperts(torch.autograd.Function):
    """`ep_experts` under autograd: the unfused forward, keeping the send plan and the received
    rows; the backward dispatches the output gradients with that plan and combines the partial
    input and routing-weight gradients back (see the module docstring)."""

    @staticmethod
    def forward(ctx, static, x, topk_weights, gate_up, down, gate_up_bias, down_bias):
        topk_ids, interleaved, cfg, state, bufs = static
        w = ExpertWeights(gate_up, down, gate_up_bias, down_bias, interleaved)
        out, (plan, recv_x) = _forward(state, bufs, x, topk_ids, topk_weights, w, cfg, EpSplit(0, 1), None,
                                       keep_rows=True)
        ctx.static, ctx.plan, ctx.recv_x = static, plan, recv_x
        ctx.weights_dtype = topk_weights.dtype
        ctx.save_for_backward(topk_weights, gate_up, down, gate_up_bias, down_bias)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        topk_ids, interleaved, cfg, state, bufs = ctx.static
        topk_weights, gate_up, down, gate_up_bias, down_bias = ctx.saved_tensors
        w = ExpertWeights(gate_up, down, gate_up_bias, down_bias, interleaved)
        ws, plan, top_k = state.workspace, ctx.plan, cfg.top_k
        grad_out = grad_out.to(ctx.recv_x.dtype).contiguous()
        epoch = ws.next_epoch()
        # The forward's dispatch with the output gradients as the rows: the same plan, kernels and
        # buffers (the routing goes again, so the receiver needs to keep none of it).
        dispatch_push(ws, bufs.dispatch, epoch, grad_out, kernel_ids(topk_ids).contiguous(), topk_weights.float().contiguous(),
                      plan.send_tokens, plan.counts, cfg.num_experts // state.world_size, state.push_programs)
        recv_ids, recv_weights, recv_counts = dispatch_receive(ws, bufs.dispatch, epoch, top_k)
        # Read by torch ops only, before this rank's pushes below: no peer writes it meanwhile.
        recv_grad = bufs.dispatch.received_x(ws, grad_out.dtype)
        dx_rows, d_weights_rows, *d_w = _local_experts_backward(
            recv_grad, ctx.recv_x, recv_ids.view(-1, top_k), recv_weights.view(-1, top_k), w, cfg)
        # Back like the forward's combine: one slot per contributing rank, summed in rank order.
        combine_push(ws, bufs.combine, epoch, dx_rows.contiguous(), recv_counts, state.push_programs)
        combine_push(ws, bufs.weight_grads, epoch, d_weights_rows.contiguous(), recv_counts, state.push_programs)
        dx = _combine(state, bufs.combine, epoch, plan, torch.empty_like(grad_out))
        d_weights = _combine(state, bufs.weight_grads, epoch, plan,
                             torch.empty(grad_out.shape[0], top_k, dtype=torch.float32, device=grad_out.device))
        return (None, dx, d_weights.to(ctx.weights_dtype), *d_w)
