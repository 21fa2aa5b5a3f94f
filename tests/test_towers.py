"""`attention="sdpa"`: plain blocks over fused scaled-dot-product kernels equal open_clip's modules up to rounding."""

import pytest
import torch

from clipadapt.models import CLIPBackbone


@pytest.fixture
def pair() -> tuple[CLIPBackbone, CLIPBackbone]:
    module = CLIPBackbone("clipadapt-tiny", None).eval()
    fused = CLIPBackbone("clipadapt-tiny", None, attention="sdpa").eval()
    fused.load_state_dict(module.state_dict())
    return module, fused


def test_sdpa_encoders_equal_open_clip_up_to_rounding(pair):
    module, fused = pair
    images = torch.randn(5, 3, 32, 32)
    tokens = module.tokenize(["a photo of a cat.", "a dog", "a photo of a large red boat on the sea."])
    with torch.no_grad():
        # float reassociation only: the same weights, the attention spelled out batch-first
        torch.testing.assert_close(fused.encode_image(images), module.model.encode_image(images, normalize=True),
                                   atol=1e-5, rtol=0)  # fmt: skip
        torch.testing.assert_close(fused.encode_text(tokens, truncate=False), module.model.encode_text(tokens, True),
                                   atol=1e-5, rtol=0)  # causal mask kept  # fmt: skip


def test_sdpa_gradients_match_and_checkpointing_keeps_them(pair):
    module, fused = pair
    images = torch.randn(3, 3, 32, 32)
    grads = []
    for backbone, checkpointed in ((module, False), (fused, False), (fused, True)):
        backbone.model.visual.set_grad_checkpointing(checkpointed)
        backbone.zero_grad()
        backbone.encode_image(images).square().sum().backward()
        grads.append(backbone.model.visual.conv1.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[2], grads[1], atol=1e-6, rtol=0)


def test_an_unknown_attention_is_one_clear_error():
    with pytest.raises(ValueError, match="attention must be 'module' or 'sdpa'"):
        CLIPBackbone("clipadapt-tiny", None, attention="flash")
