"""Expert parallelism: each rank of a process group holds E/W of the experts and its own tokens.

`ep_experts` runs the routed experts of this rank's tokens across the group:

1. send plan (device, `comet.scheduler.ep_plan`): each token goes once to every rank holding any
   of its experts;
2. dispatch (`comet.kernels.ep_dispatch`): tokens, their routing (as the receiver's local expert
   ids) and weights pushed straight into the receivers' buffers, flags raised per chunk;
3. on the receiver, the received slots of all sources form one "virtual token" batch
   [W * max_tokens, H] whose unused slots carry id -1: routing analysis, GEMM1 and GEMM2 of the
   single-GPU kernels on this rank's experts; then `slot_sum_push` sums each received token's K
   slot rows and stores the sum straight into its source's combine buffer (the push overlaps
   the sum's reads; no separate copy). With `n_comm` > 0 the routing moves first, the token rows
   are pushed inside GEMM1's launch (`dispatch_gate_up`, tiles in arrival-bin order: see
   `comet.kernels.routing.arrival_bin`) and the slot sums inside GEMM2's (`down_combine`; with
   `column_chunks=0` by `slot_sum_push` after GEMM2);
4. combine (`comet.kernels.ep_combine`): each source waits for the partial rows of its tokens
   and sums them in a fixed rank order.

The workspace (`comet.comm.CommWorkspace`) is made once per group and shared by every layer
(`group_workspace`); buffers are sized by `max_tokens` (tokens per rank per call, the same on
every rank). Each call is one epoch, counted on the device; nothing waits on the host, so calls
can be captured in a CUDA graph once an eager call has made the buffers (and, where no tuned
table entry exists, measured the machine's rates). A peer that stops answering makes
the waits give up after the workspace's `max_spins`; `check_errors(group)` (a host sync) then raises
`CommTimeoutError`. Forward only: the kernels build no autograd graph.

What the fused path costs, measured (bench/ep_kernels.py, GPU time per kernel, Qwen3-30B-A3B, 8192
tokens per rank, n_comm 8, bench/results/ep_kernels.csv). On 2 x H200 at commit 3cca3d7: the
fused GEMM1 886-893 us against 737 us for GEMM1 alone + 112 us to push the rows + 5 us to
receive them. Its 8 pushing programs, beside the computing ones, push at ~0.4 of their idle
rate, so the other ranks' rows arrive ~100 us after the own rows are done; leading with fewer
experts' own rows (`lead_experts`) stalls sooner (956 us at half of them). At commit 1b57878 the
fused GEMM2 + combine took 910 us against 604 us of GEMM2 (+ 114 us of slot sum and 110 us of
push, unfused then): its few pushing programs must also sum each token's K slot rows (for K = 8,
eight rows read per row pushed), more than they can while GEMM2 runs, and its input is read once
per column chunk. On one rank (nothing to send) the fused kernels cost 3-6% over the unfused
GEMMs: the SMs given to pushing. Fixes along the way: GEMM2 in a few column chunks, tile waits
polling 64 chunk flags per atomic and remembering what has arrived, this rank's own tokens read
from x in place, combine flag chunks of 64 tokens on a GPU (`COMBINE_CHUNK_TOKENS`), the routing
sent and received in blocks over many programs, the slot sum pushing its own sums.
`n_comm="auto"` takes the tuned table's measured best (bench/ep.py --write-table), and without an
entry stays unfused unless the cost model predicts a clear gain.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton

from comet.backends import resolve_backend
from comet.comm import CommWorkspace
from comet.config import MoEConfig
from comet.functional import ExpertWeights
from comet.kernels.ep_combine import combine_buffers, combine_push, combine_reduce, down_combine, slot_sum_push
from comet.kernels.ep_dispatch import (
    dispatch_buffers, dispatch_gate_up, dispatch_push, dispatch_receive, over_arrival_bins,
)
from comet.kernels.expert_gemm import down_gemm_args, gate_up_gemm_args, launch_gemm
from comet.scheduler.configs import select_configs
from comet.scheduler.ep_plan import plan_sends
from comet.scheduler.ep_calibrate import group_rates
from comet.scheduler.ep_split import (
    EpShape, EpSplit, best_column_chunks, choose_split, default_rates, ep_shape,
    lead_experts as model_lead_experts,
)
from comet.scheduler.routing import analyze_routing
from comet.validation import check_hidden, check_routing, kernel_ids

# Tokens per flag. The interpreter gets small chunks and few programs per push launch so that tiny
# test shapes still cross several of each; on a GPU the push launches (which never wait) use every SM.
CHUNK_TOKENS = {"cpu": 4, "cuda": 16}
# The combine's flag chunks are larger on a GPU: in the fused GEMM2 each (chunk, column chunk) unit
# of the push pays a claim and a system-scope counter (microseconds each), and with 16-token units
# those made the pushing programs fall behind GEMM2 (bench/results/ep_kernels.csv: the fused
# GEMM2 + combine of Qwen3-30B-A3B took 895 us on 2 GPUs, 632 us on one with nothing to push).
COMBINE_CHUNK_TOKENS = {"cpu": 4, "cuda": 64}
INTERPRETER_PUSH_PROGRAMS = 2

_WORKSPACES: dict = {}


def _group_key(group):
    return group if group is not None else dist.group.WORLD


def group_workspace(group=None) -> CommWorkspace:
    """The expert-parallel workspace of `group` (default: the world), made on first use: a
    collective call, so every rank of the group must reach it."""
    key = _group_key(group)
    ws = _WORKSPACES.get(key)
    if ws is None:
        ws = _WORKSPACES[key] = CommWorkspace.create(key)
    return ws


def release_workspace(group=None):
    """Collective: free the group's workspace (the next call makes a new one)."""
    ws = _WORKSPACES.pop(_group_key(group), None)
    if ws is not None:
        ws.close()


def check_errors(group=None):
    """Raise `CommTimeoutError` if a wait of the group's expert-parallel kernels timed out.
    Reads the error record back: call it where a host sync is acceptable."""
    ws = _WORKSPACES.get(_group_key(group))
    if ws is not None:
        ws.check_errors()


def _check_local_weights(w: ExpertWeights, experts_per_rank: int, cfg: MoEConfig, x: torch.Tensor):
    f, h = cfg.ffn_size, cfg.hidden_size
    expected = {"gate_up": (experts_per_rank, 2 * f, h), "down": (experts_per_rank, h, f),
                "gate_up_bias": (experts_per_rank, 2 * f), "down_bias": (experts_per_rank, h)}
    for name, shape in expected.items():
        t = getattr(w, name)
        if t is None:
            continue
        if tuple(t.shape) != shape:
            raise ValueError(f"local_weights.{name}: expected this rank's {experts_per_rank} experts, shape {shape}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"local_weights.{name}: {t.dtype} on {t.device}, expected x's {x.dtype} on {x.device}")


def ep_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, local_weights: ExpertWeights,
               cfg: MoEConfig, group=None, *, max_tokens: int, n_comm: int | str = "auto",
               column_chunks: int | None = None, lead_experts: int | None = None,
               experts: bool = True) -> torch.Tensor:
    """Routed experts of this rank's tokens, x [T, H] -> [T, H], with the experts spread over
    `group`: this rank holds experts [r*E/W, (r+1)*E/W) in `local_weights`; `topk_ids` [T, K]
    are global ids (ids outside [0, E) are skipped). Collective: every rank of the group calls it
    (T may differ, T = 0 included), with the same `max_tokens` >= every rank's T.

    `n_comm`: "auto" (default) lets `comet.scheduler.ep_split` choose from the shapes (tuned table,
    else cost model; the same choice on every rank, no host sync). 0 runs the dispatch, the
    expert GEMMs and the slot sum that pushes the partial rows back as separate launches on every
    SM; n_comm > 0 moves the routing first, then fuses pushing the token rows into GEMM1's launch
    (its first `n_comm` programs push while the others compute, each tile waiting only for the
    chunks up to its last row's) and pushing the partial rows back into GEMM2's (its last
    `n_comm` programs sum and push each column chunk as soon as GEMM2 has finished it).
    `column_chunks`: GEMM2's column chunks in the fused path (None: the split's choice; 0: only
    the dispatch fused, GEMM2 and the slot sum with its push as separate launches on every SM).
    `lead_experts`: in the fused GEMM1, how many local experts' own rows run before any other
    rank's rows are read (`comet.kernels.routing.arrival_bin`; None: the cost model's
    `ep_split.lead_experts`; E/W or more: every source's rows after all own rows).

    `experts=False` (with n_comm=0) skips the expert computation and sends the received rows back
    as the partials: the same traffic and no result, to time the communication alone.
    """
    if n_comm != "auto" and (not isinstance(n_comm, int) or isinstance(n_comm, bool) or n_comm < 0):
        raise ValueError(f"n_comm: expected a non-negative int or 'auto', got {n_comm!r}")
    if column_chunks is not None and (not isinstance(column_chunks, int) or column_chunks < 0):
        raise ValueError(f"column_chunks: expected a non-negative int or None, got {column_chunks!r}")
    if not experts and n_comm not in (0, "auto"):
        raise ValueError("experts=False times the unfused communication: it needs n_comm=0")
    if lead_experts is not None and (not isinstance(lead_experts, int) or lead_experts < 0):
        raise ValueError(f"lead_experts: expected a non-negative int or None, got {lead_experts!r}")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
    check_hidden(x, cfg.hidden_size, local_weights.gate_up, name="x")
    if x.dim() != 2:
        raise ValueError(f"x: expected [tokens, hidden], got shape {tuple(x.shape)}")
    num_tokens, top_k = x.shape[0], cfg.top_k
    if num_tokens > max_tokens:
        raise ValueError(f"x: {num_tokens} tokens exceed max_tokens={max_tokens}, the expert-parallel buffers' "
                         f"capacity per rank; raise max_tokens or split the batch")
    check_routing(topk_ids, topk_weights, num_tokens, cfg.num_experts, x.device, check_values=False)
    if topk_ids.shape[1] != top_k:
        raise ValueError(f"topk_ids: expected top_k = {top_k} columns, got {topk_ids.shape[1]}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, topk_weights, *local_weights[:4])):
        raise NotImplementedError("expert parallelism is forward-only: run it under torch.no_grad() "
                                  "or torch.inference_mode()")
    resolve_backend("triton", x.device, x.dtype)  # the kernels can run here, or a clear error
    ws = group_workspace(group)
    if x.device != ws.device:
        raise ValueError(f"x: on {x.device} but the group's workspace is on {ws.device}")
    world = ws.world_size
    if cfg.num_experts % world:
        raise ValueError(f"cfg.num_experts ({cfg.num_experts}) must be a multiple of the group size ({world})")
    experts_per_rank = cfg.num_experts // world
    _check_local_weights(local_weights, experts_per_rank, cfg, x)
    shape = ep_shape(max_tokens, cfg.hidden_size, cfg.ffn_size, cfg.num_experts, top_k, world, x.dtype)
    split = call_split(ws, shape, n_comm if experts else 0, column_chunks)

    hidden, device = cfg.hidden_size, x.device
    chunk = CHUNK_TOKENS[device.type]
    programs = (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda"
                else INTERPRETER_PUSH_PROGRAMS)
    programs = min(programs, triton.cdiv(max_tokens, chunk))
    dispatch = dispatch_buffers(ws, max_tokens, hidden, top_k, x.dtype, chunk)
    combine = combine_buffers(ws, max_tokens, hidden, x.dtype, COMBINE_CHUNK_TOKENS[device.type])

    x = x if x.stride(-1) == 1 else x.contiguous()
    topk_ids = kernel_ids(topk_ids).contiguous()
    topk_weights = topk_weights.float().contiguous()
    fused = split.n_comm > 0
    plan = plan_sends(topk_ids, cfg.num_experts, world, every_token_to=ws.rank if fused else None)
    if not fused:
        lead_experts = 0
    elif lead_experts is None:
        lead_experts = model_lead_experts(shape, split.n_comm, default_rates(device))
    else:
        lead_experts = min(lead_experts, experts_per_rank)
    epoch = ws.next_epoch()
    # Fused, this launch only sends the routing (the rows go inside GEMM1's).
    dispatch_push(ws, dispatch, epoch, x, topk_ids, topk_weights, plan.send_tokens, plan.counts,
                  experts_per_rank, programs, push_rows=not fused)
    # Fused, GEMM1 runs tiles in the order their rows can arrive: see dispatch_receive.
    recv_ids, recv_weights, recv_counts = dispatch_receive(ws, dispatch, epoch, top_k, wait_rows=not fused,
                                                           arrival_experts=experts_per_rank if fused else 0,
                                                           lead_experts=lead_experts)
    recv_x = ws.buffer(dispatch.x, (world, max_tokens, hidden), x.dtype).view(-1, hidden)
    recv_ids, recv_weights = recv_ids.view(-1, top_k), recv_weights.view(-1, top_k)
    if not fused and device.type == "cpu":
        # The interpreter writes a kernel's tensor arguments back after the launch, and a
        # workspace buffer shares its storage with the peers' copies, which they may be writing.
        recv_x = recv_x.clone()
    if experts:
        _experts(ws, dispatch, combine, epoch, x, plan, recv_x, recv_ids, recv_weights, recv_counts, local_weights,
                 cfg, split, lead_experts)
    else:
        combine_push(ws, combine, epoch, recv_x, recv_counts, programs)  # the received rows, as the partials
    return combine_reduce(ws, combine, epoch, plan.mask, plan.slot, torch.empty_like(x))


def call_split(ws: CommWorkspace, shape: EpShape, n_comm: int | str, column_chunks: int | None = None) -> EpSplit:
    """The split a call of `shape` runs with: "auto" asks `comet.scheduler.ep_split` (tuned table,
    else the cost model fed the group's measured rates: measured on the first such call, a
    collective); an explicit n_comm gets the model's column chunks for it (H200 rates scaled to
    this GPU: no measurement); `column_chunks` overrides."""
    if n_comm == "auto":
        split = choose_split(shape, ws.device, lambda: group_rates(ws))
    elif n_comm == 0:
        split = EpSplit(0, 1)
    else:
        split = EpSplit(n_comm, best_column_chunks(shape, n_comm, default_rates(ws.device)))
    return split if column_chunks is None else split._replace(column_chunks=column_chunks)


def _experts(ws, dispatch, combine, epoch, x, plan, recv_x, recv_ids, recv_weights, recv_counts,
             w: ExpertWeights, cfg: MoEConfig, split: EpSplit, lead: int):
    """This rank's experts on the received tokens (recv_x [W*C, H], the receive buffer; recv_ids
    [W*C, K] local expert ids, or with split.n_comm > 0 arrival bins with `lead` lead experts),
    their partial rows pushed to the sources' combine buffers. Unfused: routing, GEMM1, GEMM2 and
    `slot_sum_push`, each on every SM. Fused: pushing the token rows inside GEMM1's launch
    (recv_x is filled while GEMM1 runs) and, unless split.column_chunks is 0, the slot sums and
    their push inside GEMM2's."""
    rows, top_k = recv_ids.numel(), recv_ids.shape[1]
    experts, hidden, ffn = w.down.shape
    fused = split.n_comm > 0
    bins = ws.world_size * experts if fused else experts
    routing = analyze_routing(recv_ids, bins)
    row_weights = recv_weights.reshape(-1)
    # Looked up for the receive buffer's W*C*K slots (`comet tune --ep-ranks` stores under that).
    cfg1, cfg2 = select_configs(rows, experts, hidden, ffn, x.dtype, x.device)
    act = torch.empty(rows, ffn, dtype=x.dtype, device=x.device)
    gemm1 = gate_up_gemm_args(recv_x, w.gate_up, w.gate_up_bias, w.interleaved, routing.sorted_rows, row_weights,
                              routing.hist, act, top_k=top_k, activation=cfg.activation, alpha=cfg.swiglu_alpha,
                              limit=cfg.swiglu_limit, weight_on_input=cfg.weight_on_input, cfg=cfg1)
    slots = torch.empty(rows, hidden, dtype=x.dtype, device=x.device)
    gemm2 = down_gemm_args(act, w.down, w.down_bias, routing.sorted_rows, row_weights, routing.hist, slots,
                           top_k=top_k, weight_on_input=cfg.weight_on_input, cfg=cfg2)
    if fused:
        dispatch_gate_up(ws, dispatch, epoch, x, plan.send_tokens, plan.counts, over_arrival_bins(gemm1, bins, lead),
                         split.n_comm)
        gemm2 = over_arrival_bins(gemm2, bins, lead)
        if split.column_chunks > 0:
            down_combine(ws, combine, epoch, gemm2, recv_ids, recv_counts, split.n_comm, split.column_chunks)
            return
    else:
        launch_gemm(*gemm1)
    launch_gemm(*gemm2)
    slot_sum_push(ws, combine, epoch, slots, recv_ids, recv_counts, bins)
