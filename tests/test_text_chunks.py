"""`text_chunk`: the text side encoded chunk by chunk under activation checkpointing equals one pass."""

import pytest
import torch

from clipadapt.errors import ClipAdaptError
from clipadapt.methods import CLIPAST, FT, Adapt, CLIPLoRA, CoCoOp, CoOp, MaPLe
from clipadapt.models import backbone
from clipadapt.models.weights import call_with_weights

CLASSES = [f"class {name}" for name in "abcdefghijk"]  # 11 classes: chunks of 4, 4 and 3


def embeddings_and_grads(cls: type, text_chunk: int, **kwargs: object) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = cls(CLASSES, ["a photo of a {}."], arch="clipadapt-tiny", pretrained=None, prompts="simple",
                text_chunk=text_chunk, **kwargs)  # fmt: skip
    params = model._apply_stage(model.stages[0].name)
    model.train()
    torch.manual_seed(1)  # the same dropout draws in both runs
    if cls is CoCoOp:  # text conditioned on the image: (B, C, D) per image
        images = torch.randn(2, 3, model.clip.image_size, model.clip.image_size)
        text = model.class_logits(images, CLASSES, ["a photo of a {}."])
    else:
        text = model.class_embeddings(CLASSES, ["a photo of a {}."])  # (C, D)
    weights = torch.linspace(-1, 1, text.numel()).reshape(text.shape)
    (text * weights).sum().backward()
    names = {id(p): n for n, p in model.named_parameters()}
    return text.detach(), {names[id(p)]: p.grad.clone() for p in params if p.grad is not None}


@pytest.mark.parametrize(
    "cls, kwargs",
    [(CoOp, {}), (CoCoOp, {}), (MaPLe, {}), (CLIPAST, {}), (Adapt, {})],
    ids=["coop-embeddings", "cocoop-per-image", "maple-deep", "ast-text-blocks", "adapt-kv-prompts"],
)
def test_chunked_text_equals_one_pass_forward_and_gradients(cls, kwargs):
    one, one_grads = embeddings_and_grads(cls, 0, **kwargs)
    chunked, chunked_grads = embeddings_and_grads(cls, 4, **kwargs)
    assert one_grads and chunked_grads.keys() == one_grads.keys()
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-6)
    for name, grad in one_grads.items():  # summed in another order: 1e-5 of the gradient's scale
        scale = grad.abs().max().item()
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_a_recomputed_chunk_replays_its_dropout_masks(monkeypatch):
    """CLIP-LoRA's dropout: a chunk draws its own masks (other draws than one pass, the same distribution),
    and its recomputation in backward replays them: equal to the same chunks kept without recomputation."""
    _, recomputed = embeddings_and_grads(CLIPLoRA, 4)
    monkeypatch.setattr(backbone, "checkpoint", lambda encode, *args, use_reentrant: encode(*args))
    _, kept = embeddings_and_grads(CLIPLoRA, 4)
    assert any(name.startswith("lora.") and "text" in name for name in kept)
    for name, grad in kept.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_lora_without_dropout_trains_the_chunked_text_through_its_branch():
    """Merged weights (functional_call) are gone by the time a chunk is recomputed: the branch, equal to one pass."""
    one, one_grads = embeddings_and_grads(CLIPLoRA, 0, lora_dropout=0.0)
    chunked, chunked_grads = embeddings_and_grads(CLIPLoRA, 4, lora_dropout=0.0)
    assert any(name.startswith("lora.") and "text" in name for name in one_grads)
    torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-6)
    for name, grad in one_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


def test_a_chunk_recomputed_under_other_weights_is_refused():
    model = FT(CLASSES, ["{}"], arch="clipadapt-tiny", pretrained=None, prompts="simple", text_chunk=4)
    swapped = {name: p.detach().clone().requires_grad_(True) for name, p in model.clip.model.named_parameters()}
    tokens = model.clip.tokenize(CLASSES)
    features = call_with_weights(model.clip.model, swapped, model.clip.encode_text, tokens)
    with pytest.raises(ClipAdaptError, match="text_chunk"):
        features.sum().backward()


def test_chunks_are_recomputed_in_backward_only_under_grad():
    model = FT(CLASSES, ["{}"], arch="clipadapt-tiny", pretrained=None, prompts="simple", text_chunk=4)
    calls = []
    encode = model.clip._encode_text
    model.clip._encode_text = lambda *a: calls.append(a[0].shape[0]) or encode(*a)
    tokens = model.clip.tokenize(CLASSES)
    with torch.no_grad():
        model.clip.encode_text(tokens)
    assert calls == [11]  # evaluation: one pass, nothing to recompute
    calls.clear()
    model.clip.requires_grad_(True)
    model.clip.encode_text(tokens).sum().backward()
    assert calls == [4, 4, 3, 3, 4, 4]  # three chunks forward, each recomputed once in backward (last first)
    with pytest.raises(ValueError, match="text_chunk"):
        FT(CLASSES, ["{}"], arch="clipadapt-tiny", pretrained=None, text_chunk=-1)


@pytest.mark.slow
def test_the_memory_benchmark_runs_at_tiny_sizes():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "text_memory.py"
    out = subprocess.run([sys.executable, str(script), "--classes", "24", "--batch", "4", "--chunk", "8"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "coop" in out and "ast" in out and "max |grad difference|" in out
