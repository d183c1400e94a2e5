"""The expert-parallel cost model's machine rates, measured on every rank of a group: the same
figures everywhere (so every rank picks the same split), the probe's buffers freed afterwards."""
import pytest
import torch

from comet.scheduler import ep_split
from rank_helpers import backends as _backends, launch as _launch


def _measure(_seed: int) -> dict:
    from comet.comm import CommWorkspace
    from comet.scheduler import ep_calibrate
    from comet.scheduler.ep_calibrate import group_rates, measure_rates

    ws = CommWorkspace.create()
    small = dict(gemm_size=64, copy_bytes=1 << 16, push_bytes=1 << 12, repeats=2)
    rates = measure_rates(ws, programs=(1, 2), **small)
    leftover = sorted(ws._buffers)
    with pytest.raises(ValueError, match="programs"):
        measure_rates(ws, programs=(0,), **small)
    ep_calibrate._RATES[ws] = rates  # what group_rates would have measured (at full sizes)
    cached = group_rates(ws) is rates
    ws.close()
    return {"rates": rates, "leftover": leftover, "cached": cached}


@pytest.mark.parametrize("backend", _backends(2))
def test_rates_agree_across_ranks(backend):
    results = _launch(_measure, 2, 0, backend=backend)
    assert results[0]["rates"] == results[1]["rates"]
    rates = results[0]["rates"]
    assert rates.gemm_flops > 0 and rates.hbm_bytes_per_s > 0
    assert [p for p, _ in rates.push_gbps] == [1, 2] and all(g > 0 for _, g in rates.push_gbps)
    assert not any(name.startswith("comm_probe.recv") for name in results[0]["leftover"])
    assert results[0]["cached"]
    # The model takes them as they are.
    shape = ep_split.ep_shape(8192, 2048, 768, 128, 8, 2, torch.bfloat16)
    assert ep_split.model_split(shape, rates._replace(sms=132)) in [(0, 1)] + [
        (n, c) for n in ep_split.N_COMM_CANDIDATES for c in ep_split.COLUMN_CHUNK_CANDIDATES]


def test_rates_scale_with_the_sm_count():
    half = ep_split.H200_RATES.scaled(66)
    assert half.sms == 66 and half.gemm_flops == pytest.approx(ep_split.H200_RATES.gemm_flops / 2)
    assert ep_split.push_bytes_per_s(66, half) == pytest.approx(ep_split.push_bytes_per_s(132) / 2)
