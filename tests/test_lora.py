"""The low-rank q/k/v seam: untrained LoRA is frozen CLIP bit for bit, branch = merged weights, the merge by hand."""

import math

import pytest
import torch

from clipadapt.models import CLIPBackbone
from clipadapt.models.lora import LowRankQKV
from clipadapt.models.weights import call_with_weights

CLASSES, TEMPLATES = ["red circle", "blue square", "green star"], ["a photo of a {}.", "{} texture."]


@pytest.fixture(scope="module")
def clip() -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone("clipadapt-tiny", pretrained=None).eval().requires_grad_(False)  # frozen, as methods use it


def trained(clip: CLIPBackbone) -> LowRankQKV:
    """LoRA on both towers with random B (a trained-looking delta), in eval mode (no dropout)."""
    lora = LowRankQKV.for_backbone(clip, ("image", "text"))
    with torch.no_grad():
        for b in lora.b.values():
            b.normal_(0, 0.5)
    return lora.eval()


def merged(clip: CLIPBackbone, lora: LowRankQKV, fn, *args):
    return call_with_weights(clip.model, lora.merged_weights(clip), fn, *args)


def test_untrained_lora_is_bit_identical_to_frozen_clip(clip):
    lora = LowRankQKV.for_backbone(clip, ("image", "text"))  # B = 0
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(merged(clip, lora, clip.encode_image, images), clip.encode_image(images))
        plain = clip.text_features(CLASSES, TEMPLATES)
        assert torch.equal(merged(clip, lora, clip.text_features, CLASSES, TEMPLATES), plain)


def test_merged_weights_leave_the_module_untouched(clip):
    before = {n: p.clone() for n, p in clip.named_parameters()}
    with torch.no_grad():
        merged(clip, trained(clip), clip.encode_image, torch.randn(2, 3, 32, 32))
    assert all(torch.equal(p, before[n]) for n, p in clip.named_parameters())


def test_branch_path_equals_merged_weights(clip):
    lora = trained(clip)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        via_merge = merged(clip, lora, clip.encode_image, images)
        via_branch = clip.encode_image(images, lora=lora)
        assert not torch.allclose(via_merge, clip.encode_image(images), atol=1e-3)  # the delta matters
        # Two code paths (nn.MultiheadAttention vs the written-out attention): equal up to fp32 rounding.
        torch.testing.assert_close(via_branch, via_merge, rtol=1e-5, atol=1e-5)
        text_branch = clip.text_features(CLASSES, TEMPLATES, lora=lora)  # causal mask through the branch
        torch.testing.assert_close(text_branch, merged(clip, lora, clip.text_features, CLASSES, TEMPLATES))


def test_merged_weights_are_w_plus_scaled_ba_by_hand(clip):
    lora = LowRankQKV({"image": (1, 2)}, rank=2, alpha=1.0)  # s = 1/√2
    with torch.no_grad():
        lora.a["image"].zero_()
        lora.b["image"].zero_()
        lora.a["image"][0, 0] = torch.tensor([[1.0, 2.0], [0.0, 1.0]])  # A_q
        lora.b["image"][0, 0] = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # B_q
        lora.a["image"][0, 2] = torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # A_v
        lora.b["image"][0, 2] = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # B_v
    s = 1 / math.sqrt(2)
    # B_q A_q = [[1, 2], [1, 3]]; B_k A_k = 0; B_v A_v = [[0, 2], [0, 0]]
    expected = s * torch.tensor([[1.0, 2.0], [1.0, 3.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    torch.testing.assert_close(lora.weight_delta("image")[0], expected)
    # and as a branch on an input h = [[3, -1]]: h · deltaᵀ
    h = torch.tensor([[[3.0, -1.0]]])  # (B, L, W)
    branch = lora.eval().qkv_delta("image", 0)(h)
    torch.testing.assert_close(branch, s * torch.tensor([[[1.0, 0.0, 0.0, 0.0, -2.0, 0.0]]]))
    assert lora.qkv_delta("text", 0) is None  # no LoRA on that tower


def test_merged_weights_name_open_clips_fused_projection(clip):
    lora = trained(clip)
    names = set(lora.merged_weights(clip))
    state = clip.model.state_dict()
    assert len(names) == len(clip.blocks("image")) + len(clip.blocks("text"))
    for name, weight in lora.merged_weights(clip).items():
        assert name.endswith("attn.in_proj_weight") and weight.shape == state[name].shape


def test_dropout_acts_on_the_branch_input_in_training_only(clip):
    lora = LowRankQKV({"image": (1, 4)}, rank=2, alpha=1.0, dropout=0.5)
    with torch.no_grad():
        lora.b["image"].normal_()
        lora.a["image"][0, 1:] = lora.a["image"][0, 0]  # q, k, v share A and B: only dropout tells them apart
        lora.b["image"][0, 1:] = lora.b["image"][0, 0]
    h = torch.randn(2, 5, 4)
    delta = lora.train().qkv_delta("image", 0)
    first, second = delta(h), delta(h)
    assert not torch.equal(first, second)
    q, k, _ = first.chunk(3, dim=-1)
    assert not torch.equal(q, k)  # one dropout mask per projection, as CLIP-LoRA's three LoRA layers
    evaluated = lora.eval().qkv_delta("image", 0)
    assert torch.equal(evaluated(h), evaluated(h))
    torch.testing.assert_close(evaluated(h), h @ lora.weight_delta("image")[0].T)


def test_gradients_reach_only_the_factors_through_both_paths(clip):
    lora = trained(clip).train()
    images = torch.randn(2, 3, 32, 32)
    for features in (clip.encode_image(images, lora=lora), merged(clip, lora, clip.encode_image, images)):
        lora.zero_grad()
        features.sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (lora.a["image"], lora.b["image"]))
        assert lora.b["text"].grad is None or not lora.b["text"].grad.any()


def test_prompts_and_lora_in_one_call_are_refused(clip):
    class NoPrompts:
        def kv_tokens(self, tower: str, layer: int) -> None:
            return None

    with pytest.raises(ValueError, match="not both"):
        clip.encode_image(torch.randn(1, 3, 32, 32), prompts=NoPrompts(), lora=trained(clip))


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="rank"):
        LowRankQKV({"image": (1, 4)}, rank=0)
    with pytest.raises(ValueError, match="towers"):
        LowRankQKV({"audio": (1, 4)})
