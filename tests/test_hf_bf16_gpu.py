"""On a GPU, every family's tiny model in bf16 gives the same logits through comet's Triton kernels
as through its own experts, within bf16 tolerance.

The models keep exactly one MoE layer: after it, bf16 rounding differences could flip a later
router's top-k choice for a token, which is a legitimate difference, not an error."""
import pytest
import torch

pytest.importorskip("transformers")

from comet.hf_families import FAMILIES  # noqa: E402
from comet.integrations import hf as comet_hf  # noqa: E402
from comet.tiny_models import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernels need a GPU")
BF16_TOLERANCE = 3e-2  # relative, Frobenius: a bf16 model's logits through two bf16 expert paths


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_logits_through_triton_kernels(family):
    layers = 2 if family.startswith("deepseek") else 1  # DeepSeek's first layer is dense
    model = build_tiny_model(family, seed=torch.randint(1 << 30, ()).item(), num_hidden_layers=layers)
    model = model.to("cuda", torch.bfloat16)
    ids = torch.randint(3, model.config.vocab_size, (4, 33), device="cuda")
    with torch.no_grad():
        expected = model(ids).logits.float()
        comet_hf.apply(model, backend="triton")
        actual = model(ids).logits.float()
        comet_hf.revert(model)
    assert torch.isfinite(actual).all()
    err = ((actual - expected).norm() / expected.norm()).item()
    assert err <= BF16_TOLERANCE, f"{family}: relative error {err:.3g}"
