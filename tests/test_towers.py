"""The default `attention="sdpa"` path: equal to open_clip's modules up to rounding, on the kernels' fast terms.

`attention="module"` is bit-exact with open_clip (tests/test_backbone.py); this file holds the default's
tolerance (image and text, fp32), its gradients, the causal flag that replaces the text mask, and the
oneDNN projections of an x86 CPU.
"""

import pytest
import torch
import torch.nn.functional as F

import clipadapt.models.backbone as backbone_module
from clipadapt.models import CLIPBackbone
from clipadapt.models.backbone import _is_causal, _linear, _low_rank_block


@pytest.fixture(scope="module")
def pair() -> tuple[CLIPBackbone, CLIPBackbone]:
    module = CLIPBackbone("clipadapt-tiny", None, attention="module").eval()
    fused = CLIPBackbone("clipadapt-tiny", None).eval()  # the default
    fused.load_state_dict(module.state_dict())  # the option changes no parameter: the same state dict, strict
    return module, fused


def test_the_default_is_sdpa_and_keeps_the_state_dict(pair):
    module, fused = pair
    assert (fused.attention, module.attention) == ("sdpa", "module")
    assert list(fused.state_dict()) == list(module.state_dict())


def test_sdpa_encoders_equal_open_clip_up_to_rounding(pair):
    module, fused = pair
    images = torch.randn(5, 3, 32, 32)
    tokens = module.tokenize(["a photo of a cat.", "a dog", "a photo of a large red boat on the sea."])
    with torch.no_grad():
        # float reassociation only: the same weights, the attention spelled out batch-first
        torch.testing.assert_close(fused.encode_image(images), module.model.encode_image(images, normalize=True),
                                   atol=1e-5, rtol=0)  # fmt: skip
        torch.testing.assert_close(fused.encode_text(tokens, truncate=False), module.model.encode_text(tokens, True),
                                   atol=1e-5, rtol=0)  # is_causal in place of the causal mask  # fmt: skip


def test_sdpa_gradients_match_and_checkpointing_keeps_them(pair):
    module, fused = pair
    images = torch.randn(3, 3, 32, 32)
    grads = []
    for backbone, checkpointed in ((module, False), (fused, False), (fused, True)):
        backbone.model.visual.set_grad_checkpointing(checkpointed)
        backbone.zero_grad()
        backbone.requires_grad_(True)
        backbone.encode_image(images, normalize=False).square().sum().backward()  # unnormalised: a real gradient
        grads.append(backbone.model.visual.conv1.weight.grad.clone())
        backbone.requires_grad_(False).model.visual.set_grad_checkpointing(False)
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[2], grads[1], atol=1e-6, rtol=0)


def test_the_kernels_get_no_mask_and_unit_stride_views(pair, monkeypatch):
    """What CUDA's flash / memory-efficient kernels need: no additive mask (image), is_causal (text), last stride 1."""
    _, fused = pair
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((attn_mask, is_causal, q.stride(-1), k.stride(-1), v.stride(-1), q.dim()))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(backbone_module.F, "scaled_dot_product_attention", spy)
    blocks = len(fused.blocks("image"))
    with torch.no_grad():
        fused.encode_image(torch.randn(2, 3, 32, 32))
        fused.encode_text(fused.tokenize(["a photo of a cat."]))
    assert calls[:blocks] == [(None, False, 1, 1, 1, 4)] * blocks  # (B, H, L, W/H) views
    assert calls[blocks:] == [(None, True, 1, 1, 1, 4)] * len(fused.blocks("text"))


def test_is_causal_equals_the_additive_causal_mask(pair):
    _, fused = pair
    mask = fused.model.attn_mask
    assert _is_causal(mask) and _is_causal(mask[:9, :9])
    other = mask.clone()
    other[3, 1] = float("-inf")
    assert not _is_causal(other) and not _is_causal(None) and not _is_causal(torch.zeros(4, 4))
    block = fused.blocks("text")[0]
    x = torch.randn(3, 9, fused.width_text)
    with torch.no_grad():
        torch.testing.assert_close(_low_rank_block(block, x, None, None, causal=True),
                                   _low_rank_block(block, x, None, mask[:9, :9]), atol=1e-6, rtol=0)  # fmt: skip


@pytest.mark.skipif(not backbone_module._ONEDNN, reason="oneDNN projections run on x86 CPUs only")
@pytest.mark.parametrize("gelu", [False, True], ids=["linear", "gelu"])
def test_onednn_projection_equals_f_linear_forward_and_backward(gelu: bool):
    x = torch.randn(2, 64, 128, requires_grad=True)  # 2^20 multiply-adds with the (128, 128) weight: oneDNN's side
    weight = torch.randn(128, 128, requires_grad=True)
    bias = torch.randn(128, requires_grad=True)
    ours, reference = _linear(x, weight, bias, gelu=gelu), F.linear(x, weight, bias)
    reference = F.gelu(reference) if gelu else reference
    linear = ours.grad_fn.next_functions[0][0] if gelu else ours.grad_fn  # with gradients the GELU comes after
    assert "OneDNN" in type(linear).__name__
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, (x, weight, bias), upstream)
    expected = torch.autograd.grad(reference, (x, weight, bias), upstream)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(_linear(x, weight, bias, gelu=gelu), reference, atol=1e-4, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps F.linear (it casts to bf16)
        assert _linear(x, weight, bias, gelu=gelu).dtype == torch.bfloat16


def test_an_unknown_attention_is_one_clear_error():
    with pytest.raises(ValueError, match="attention must be 'module' or 'sdpa'"):
        CLIPBackbone("clipadapt-tiny", None, attention="flash")


def test_projections_under_torch_func_transforms_fall_back_to_f_linear():
    x, weight = torch.randn(3, 64, 128), torch.randn(128, 128)  # oneDNN's side of the threshold
    per_row = torch.func.vmap(lambda row: _linear(row, weight, None))(x)
    torch.testing.assert_close(per_row, F.linear(x, weight), atol=1e-4, rtol=1e-5)
    grad = torch.func.grad(lambda w: _linear(x, w, None).square().sum())(weight)
    torch.testing.assert_close(grad, 2 * F.linear(x, weight).flatten(0, 1).T @ x.flatten(0, 1), atol=1e-2, rtol=1e-4)
