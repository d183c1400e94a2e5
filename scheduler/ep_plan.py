"""Expert-parallel send plan, on the device (no host sync).

Rank d of a group of W owns experts [d*E/W, (d+1)*E/W). A token goes once to every rank that
holds any of its top-k experts (not once per expert), into that rank's receive slots in token
order. Ids outside [0, E) (Hugging Face's marker for experts handled elsewhere) send nothing.
"""
from typing import NamedTuple

import torch


class SendPlan(NamedTuple):
    mask: torch.Tensor  # bool [W, T]: token t goes to rank d
    slot: torch.Tensor  # int32 [W, T]: its receive slot on rank d (meaningful where mask)
    counts: torch.Tensor  # int32 [W]: tokens sent to rank d
    send_tokens: torch.Tensor  # int32 [W, T]: token in send slot i to rank d, for i < counts[d]


def plan_sends(topk_ids: torch.Tensor, num_experts: int, world_size: int, every_token_to: int | None = None
               ) -> SendPlan:
    """The send plan of a routing `topk_ids` [T, K] with global expert ids. With `every_token_to`
    = d, rank d gets every token, in slot t = token t (the fused path's own rank: it reads its
    rows from x in place, so slots must be token indices; tokens none of its experts want simply
    carry no routed row)."""
    if num_experts % world_size:
        raise ValueError(f"num_experts ({num_experts}) must be a multiple of the group size ({world_size})")
    experts_per_rank = num_experts // world_size
    in_range = (topk_ids >= 0) & (topk_ids < num_experts)
    owner = torch.where(in_range, topk_ids // experts_per_rank, -1)  # [T, K]
    ranks = torch.arange(world_size, device=topk_ids.device)
    mask = (owner.unsqueeze(0) == ranks[:, None, None]).any(dim=-1)  # [W, T]
    if every_token_to is not None:
        if not 0 <= every_token_to < world_size:
            raise ValueError(f"every_token_to: expected a rank in [0, {world_size}), got {every_token_to}")
        mask[every_token_to] = True
    taken = mask.to(torch.int32)
    inclusive = taken.cumsum(dim=1, dtype=torch.int32)
    slot, counts = inclusive - taken, taken.sum(dim=1, dtype=torch.int32)
    # The inverse of `slot`: each rank's tokens first, in token order, then the others (what a
    # stable sort of 1 - taken gives, by one scatter instead of a sort).
    tokens = torch.arange(topk_ids.shape[0], dtype=torch.int32, device=topk_ids.device)
    position = torch.where(mask, slot, counts[:, None] + tokens - inclusive)
    send_tokens = torch.empty_like(slot).scatter_(1, position.long(), tokens.expand_as(slot))
    return SendPlan(mask, slot, counts, send_tokens)
