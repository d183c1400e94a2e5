"""The expert-parallel send plan (`comet.scheduler.ep_plan`): which tokens go to which rank, in which slot."""
import pytest
import torch

from comet.scheduler.ep_plan import plan_sends
from rank_helpers import E


def test_send_plan():
    world, num_tokens = 4, 23
    ids = torch.rand(num_tokens, E).argsort(dim=1)[:, :3]
    ids[::5, 0] = E  # skipped
    plan = plan_sends(ids, E, world)
    for d in range(world):
        tokens = [t for t in range(num_tokens) if any(0 <= e < E and e // (E // world) == d for e in ids[t].tolist())]
        assert plan.mask[d].nonzero().flatten().tolist() == tokens
        assert plan.counts[d].item() == len(tokens)
        assert plan.send_tokens[d, :len(tokens)].tolist() == tokens
        assert sorted(plan.send_tokens[d].tolist()) == list(range(num_tokens))  # every entry written
        assert plan.slot[d, tokens].tolist() == list(range(len(tokens)))
    # The fused path's own rank gets every token, slot t = token t; the others' plans are unchanged.
    everything = plan_sends(ids, E, world, every_token_to=1)
    assert everything.mask[1].all() and everything.counts[1].item() == num_tokens
    assert everything.slot[1].tolist() == everything.send_tokens[1].tolist() == list(range(num_tokens))
    for d in (0, 2, 3):
        assert torch.equal(everything.mask[d], plan.mask[d]) and torch.equal(everything.counts[d], plan.counts[d])
    with pytest.raises(ValueError, match="every_token_to"):
        plan_sends(ids, E, world, every_token_to=world)
    empty = plan_sends(ids[:0], E, world)
    assert empty.counts.tolist() == [0] * world and empty.mask.shape == (world, 0)
    with pytest.raises(ValueError, match="multiple of the group size"):
        plan_sends(ids, E, 3)
