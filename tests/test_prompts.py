"""Masked K/V prompts through the backbone seam: pruned = absent, no prompts = frozen CLIP, causality, export."""

import pytest
import torch
import torch.nn.functional as F

from clipadapt.models import CLIPBackbone
from clipadapt.models.backbone import _prompted_block
from clipadapt.models.prompts import CompactPrompts, MaskedPrompts

TEXTS = ["a photo of a cat.", "x", "a centered satellite photo of annual crop land."]


@pytest.fixture(scope="module")
def clip() -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone("clipadapt-tiny", pretrained=None).eval()


def make_prompts(clip: CLIPBackbone, max_length: int = 4, std: float = 0.5) -> MaskedPrompts:
    # A larger std than the default 0.02 so prompts visibly move the outputs in these tests.
    layers = {t: len(clip.blocks(t)) for t in ("image", "text")}
    return MaskedPrompts(layers, {"image": clip.width_image, "text": clip.width_text}, max_length, std)


def outputs(clip: CLIPBackbone, prompts, images: torch.Tensor, tokens: torch.Tensor) -> tuple:
    return (
        clip.encode_image(images, normalize=False, prompts=prompts),
        clip.encode_text(tokens, normalize=False, prompts=prompts),
    )


def test_all_masks_off_equals_the_frozen_backbone_bit_for_bit(clip: CLIPBackbone):
    prompts = make_prompts(clip)
    prompts.set_masks({t: torch.zeros_like(m) for t, m in prompts.masks().items()})
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(TEXTS)
    for got, want in zip(outputs(clip, prompts, images, tokens), outputs(clip, None, images, tokens), strict=True):
        assert torch.equal(got, want)
    # ... and the frozen backbone is open_clip's (its default sdpa path: up to float rounding)
    torch.testing.assert_close(clip.encode_image(images, normalize=False), clip.model.encode_image(images),
                               atol=1e-5, rtol=0)  # fmt: skip


def test_live_prompts_change_the_outputs(clip: CLIPBackbone):
    prompts = make_prompts(clip)
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(TEXTS)
    with torch.no_grad():
        for got, plain in zip(outputs(clip, prompts, images, tokens), outputs(clip, None, images, tokens), strict=True):
            assert not torch.allclose(got, plain, atol=1e-4)


def test_a_pruned_token_has_no_effect_and_no_gradient(clip: CLIPBackbone):
    prompts = make_prompts(clip)
    keep = {t: torch.rand_like(m, dtype=torch.float) < 0.5 for t, m in prompts.masks().items()}
    keep["image"][0] = False  # a whole block pruned: the plain path for that block
    keep["text"][1, :] = True
    keep["text"][1, 2] = False
    prompts.set_masks(keep)
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(TEXTS)
    image, text = outputs(clip, prompts, images, tokens)
    (image.sum() + text.sum()).backward()
    for tower in ("image", "text"):
        grad = prompts.tokens(tower).grad
        assert torch.all(grad[~keep[tower]] == 0) and grad[keep[tower]].abs().sum() > 0
    with torch.no_grad():
        image, text = outputs(clip, prompts, images, tokens)  # no-grad kernels may differ in the last bit
        for tower in ("image", "text"):
            prompts.tokens(tower)[~keep[tower]] = 100 * torch.randn_like(prompts.tokens(tower)[~keep[tower]])
        image2, text2 = outputs(clip, prompts, images, tokens)
        assert torch.equal(image2, image) and torch.equal(text2, text)
        prompts.tokens("text")[1, 0] += 1.0  # a live token: the check above can fail
        assert not torch.equal(outputs(clip, prompts, images, tokens)[1], text)


def test_text_causality_and_eot_truncation_hold_with_prompts(clip: CLIPBackbone):
    prompts = make_prompts(clip)
    block = clip.blocks("text")[0]
    mask = clip.model.attn_mask[:10, :10]  # (L, L) causal
    x = torch.randn(2, 10, clip.width_text)
    later = x.clone()
    later[:, 6:] = torch.randn(2, 4, clip.width_text)
    with torch.no_grad():
        out, out_later = (_prompted_block(block, v, prompts.kv_tokens("text", 0), mask) for v in (x, later))
    assert torch.allclose(out[:, :6], out_later[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, 6:], out_later[:, 6:], atol=1e-3)
    tokens = clip.tokenize(TEXTS)
    with torch.no_grad():
        full = clip.encode_text(tokens, truncate=False, prompts=prompts)
        cut = clip.encode_text(tokens, truncate=True, prompts=prompts)
        garbage = tokens.clone()
        garbage[garbage == 0] = 1234  # tokens after every EOT: pooled at the EOT, they must not matter
        after = clip.encode_text(garbage, truncate=False, prompts=prompts)
    assert torch.allclose(full, cut, atol=1e-6, rtol=0) and torch.allclose(full, after, atol=1e-6, rtol=0)


def test_prompted_block_matches_the_reference_layout(clip: CLIPBackbone):
    """Queries from x, K/V from LN1([SOS, P, x_1..]) with [zeros(L, P) | causal] shifted: the DPL layout."""
    prompts = make_prompts(clip)
    block = clip.blocks("text")[1]
    length, p = 7, prompts.kv_tokens("text", 1)
    x = torch.randn(2, length, clip.width_text)
    causal = clip.model.attn_mask[:length, :length]
    kv = torch.cat([x[:, :1], p.expand(2, -1, -1), x[:, 1:]], dim=1)  # (B, 1 + P + L - 1, W)
    ref_mask = torch.cat([torch.zeros(length, len(p)), causal], dim=1)  # (L, P + L)
    with torch.no_grad():
        attn = block.attn(block.ln_1(x), block.ln_1(kv), block.ln_1(kv), need_weights=False, attn_mask=ref_mask)[0]
        y = x + attn
        want = y + block.mlp(block.ln_2(y))
        got = _prompted_block(block, x, p, causal)
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_compact_prompts_reproduce_the_masked_model(clip: CLIPBackbone):
    prompts = make_prompts(clip)
    keep = {t: torch.rand_like(m, dtype=torch.float) < 0.5 for t, m in prompts.masks().items()}
    keep["text"][0] = False
    prompts.set_masks(keep)
    compact = CompactPrompts.from_state(prompts.compact().state())
    assert compact.lengths == {t: k.sum(-1).tolist() for t, k in keep.items()}
    images, tokens = torch.randn(2, 3, 32, 32), clip.tokenize(TEXTS)
    with torch.no_grad():
        for got, want in zip(
            outputs(clip, compact, images, tokens), outputs(clip, prompts, images, tokens), strict=True
        ):
            # two code paths (compact vs masked K/V): equal up to fp32 round-off, which differs between CPUs
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        text = clip.text_features(["cat", "dog"], ["a photo of a {}."], prompts=compact)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2)) and text.shape == (2, clip.embed_dim)
    assert F.cosine_similarity(text, clip.text_features(["cat", "dog"], ["a photo of a {}."]), dim=-1).max() < 1
