"""The text-context and deep-prompt seams: hand-built layouts, and parity with open_clip's own forward.

The reference side never calls our layer loop: it runs open_clip's `encode_text` / `encode_image`
with forward hooks that do what the Dassl forks do by hand (placeholder "X" tokens whose embeddings
are overwritten by the context, prompt slots replaced at the input of each block).
"""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor

from clipadapt.errors import ClipAdaptError
from clipadapt.models import CLIPBackbone
from clipadapt.models.context import TextContext, VLPrompts, class_tokens, init_context, place_context

NAMES = ["cat", "sea turtle", "yellow bellied sapsucker with a very long and detailed name", "dog"]
# Our prompts stop at the last EOT; the reference runs all 77 columns. The causal tower makes both
# equal in exact arithmetic; attention over a shorter sequence rounds differently.
TRUNCATION_ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny() -> CLIPBackbone:
    torch.manual_seed(0)
    # open_clip's own blocks, so the seams can be bit-identical to open_clip's forward with hooks
    return CLIPBackbone("clipadapt-tiny", pretrained=None, attention="module").eval()


@contextmanager
def hooks(*handles: torch.utils.hooks.RemovableHandle) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def placeholder_prompts(names: list[str], slots: int, position: str) -> list[str]:
    """CoOp's trick: "X" placeholders where the context goes, so the tokenizer puts the EOT right."""
    xs = " ".join(["X"] * slots)
    half = " ".join(["X"] * (slots // 2))
    rest = " ".join(["X"] * (slots - slots // 2))
    layout = {"end": "{x} {n}.", "front": "{n} {x}.", "middle": "{h} {n} {r}."}[position]
    return [layout.format(x=xs, n=n, h=half, r=rest).strip() for n in names]


def reference_text(
    clip: CLIPBackbone, names: list[str], context: Tensor, position: str, deep: list | None = None
) -> Tensor:
    """open_clip's encode_text on placeholder prompts, placeholders overwritten by the context (per class row)."""
    model = clip.model
    ids = clip.tokenize(placeholder_prompts(names, context.shape[-2], position))  # (C, 77)
    x_id = clip.tokenize(["X"])[0, 1]
    slots = ids == x_id  # (C, 77) where the context goes, in order

    def put_context(module: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
        out = out.clone()
        rows = context.expand(len(names), -1, -1) if context.dim() == 2 else context
        out[slots] = rows.reshape(-1, rows.shape[-1]).to(out.dtype)
        return out

    handles = [model.token_embedding.register_forward_hook(put_context)]
    for j, tokens in enumerate(deep or []):
        if j and tokens is not None:

            def replace(module: torch.nn.Module, args: tuple, tokens: Tensor = tokens) -> tuple:
                x = args[0].clone()
                x[:, 1 : 1 + len(tokens)] = tokens
                return (x,)

            handles.append(model.transformer.resblocks[j].register_forward_pre_hook(replace))
    with hooks(*handles):
        return model.encode_text(ids, normalize=True)


def reference_image(clip: CLIPBackbone, images: Tensor, deep: list[Tensor]) -> Tensor:
    """open_clip's encode_image with P tokens appended before ln_pre and replaced at each later prompted block."""
    visual = clip.model.visual
    count = len(deep[0])

    def append(module: torch.nn.Module, args: tuple) -> tuple:
        return (torch.cat([args[0], deep[0].expand(len(args[0]), -1, -1)], dim=1),)

    handles = [visual.ln_pre.register_forward_pre_hook(append)]
    for j, tokens in enumerate(deep[1:], start=1):

        def replace(module: torch.nn.Module, args: tuple, tokens: Tensor = tokens) -> tuple:
            x = args[0].clone()
            x[:, -count:] = tokens
            return (x,)

        handles.append(visual.transformer.resblocks[j].register_forward_pre_hook(replace))
    with hooks(*handles):
        return clip.model.encode_image(images, normalize=True)  # 'tok' pooling reads the class token only


# ---- place_context: hand-built layouts ----


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        # rows: SOT=0, name tokens, "."=8, EOT=9, pad=7 (token value = 10 * class + column); context -1, -2, -3
        ("end", [[0, -1, -2, -3, 1, 2, 3, 4], [10, -1, -2, -3, 11, 12, 13, 14]]),
        ("front", [[0, 1, -1, -2, -3, 2, 3, 4], [10, 11, 12, -1, -2, -3, 13, 14]]),
        ("middle", [[0, -1, 1, -2, -3, 2, 3, 4], [10, -1, 11, 12, -2, -3, 13, 14]]),
    ],
)
def test_place_context_builds_the_papers_layouts(position: str, expected: list[list[int]]) -> None:
    # class 0: SOT n1 . EOT (name 1 token), class 1: SOT n1 n2 . EOT (name 2 tokens); W = 1
    tokens = (torch.arange(6).float() + 10 * torch.arange(2).float()[:, None]).unsqueeze(-1)  # (2, 6, 1)
    eot, lengths = torch.tensor([3, 4]), torch.tensor([1, 2])
    context = torch.tensor([[-1.0], [-2.0], [-3.0]])  # (M=3, W=1)
    prompts, new_eot = place_context(tokens, eot, lengths, context, position)
    assert prompts.squeeze(-1).tolist() == expected  # L = max(eot) + M + 1 = 8
    assert new_eot.tolist() == [6, 7]


def test_place_context_class_specific_and_batched_contexts() -> None:
    tokens = torch.arange(12.0).view(2, 6, 1)
    eot, lengths = torch.tensor([3, 4]), torch.tensor([1, 2])
    per_class = torch.tensor([[[-1.0]], [[-2.0]]])  # (C=2, M=1, W=1)
    prompts, _ = place_context(tokens, eot, lengths, per_class, "end")
    assert prompts[:, 1, 0].tolist() == [-1.0, -2.0]
    batched = torch.tensor([[[[-5.0]]], [[[-6.0]]], [[[-7.0]]]])  # (B=3, 1, M=1, W=1)
    prompts, _ = place_context(tokens, eot, lengths, batched, "end")
    assert prompts.shape == (3, 2, 6, 1)
    assert prompts[:, :, 1, 0].tolist() == [[-5.0, -5.0], [-6.0, -6.0], [-7.0, -7.0]]
    assert torch.equal(prompts[2, 1, 2:], tokens[1, 1:5])  # the words follow the context


def test_place_context_rejects_a_prompt_longer_than_the_tower(tiny: CLIPBackbone) -> None:
    cls = class_tokens(tiny, ["word " * 70])
    words = tiny.token_embeddings(cls.ids)
    with pytest.raises(ClipAdaptError, match="too long for 16 context tokens"):
        place_context(words, cls.eot, cls.name_lengths, torch.zeros(16, tiny.width_text))
    with pytest.raises(ValueError, match="end, middle, front"):
        place_context(words, cls.eot, cls.name_lengths, torch.zeros(2, tiny.width_text), "start")


def test_class_tokens_and_context_init(tiny: CLIPBackbone) -> None:
    cls = class_tokens(tiny, ["cat", "sea turtle"])
    assert cls.eot.tolist() == [3, 4] and cls.name_lengths.tolist() == [1, 2]
    init = init_context(tiny, 4, "a photo of a")
    expected = tiny.model.token_embedding.weight[tiny.tokenize(["a photo of a"])[0, 1:5]]
    assert torch.equal(init, expected)
    assert torch.equal(init_context(tiny, 2, "a photo of a"), expected[:2])  # MaPLe's "a photo"
    assert init_context(tiny, 3, None, classes=5).shape == (5, 3, tiny.width_text)
    with pytest.raises(ValueError, match="fewer than n_ctx=5"):
        init_context(tiny, 5, "a photo of a")


# ---- the text-context seam vs open_clip ----


def test_plain_embeddings_path_is_bit_identical_to_open_clip(tiny: CLIPBackbone) -> None:
    tokens = tiny.tokenize(["a photo of a cat.", "x", "a centered satellite photo of annual crop land."])
    ours = tiny.encode_text_embeddings(tiny.token_embeddings(tokens), tiny.eot_positions(tokens), truncate=False)
    assert torch.equal(ours, tiny.model.encode_text(tokens, normalize=True))


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True], ids=["shared", "csc"])
def test_context_prompts_match_coop_placeholders_in_open_clip(
    tiny: CLIPBackbone, position: str, class_specific: bool
) -> None:
    context = TextContext(init_context(tiny, 4, None, classes=len(NAMES) if class_specific else None), position)
    with torch.no_grad():
        ours = context.features(tiny, NAMES, chunk_size=3)  # (C, D), two chunks
        expected = reference_text(tiny, NAMES, context.vectors, position)
    torch.testing.assert_close(ours, expected, atol=TRUNCATION_ATOL, rtol=0)


def test_batched_per_image_context_matches_one_image_at_a_time(tiny: CLIPBackbone) -> None:
    context = TextContext(init_context(tiny, 4, "a photo of a"))
    per_image = context.vectors + torch.randn(5, 1, 1, tiny.width_text)  # (B, 1, M, W), CoCoOp's ctx + π(x)
    with torch.no_grad():
        batched = context.features(tiny, NAMES, context=per_image, chunk_size=8)  # 2 images per chunk
        single = torch.stack([reference_text(tiny, NAMES, ctx[0], "end") for ctx in per_image])
    assert batched.shape == (5, len(NAMES), tiny.embed_dim)
    torch.testing.assert_close(batched, single, atol=TRUNCATION_ATOL, rtol=0)


def test_context_gets_gradients(tiny: CLIPBackbone) -> None:
    context = TextContext(init_context(tiny, 4, "a photo of a"), "middle")
    context.features(tiny, NAMES).sum().backward()
    assert context.vectors.grad is not None and context.vectors.grad.abs().sum() > 0


# ---- the deep-prompt seam vs open_clip ----


def test_deep_text_prompts_match_replacement_hooks_in_open_clip(tiny: CLIPBackbone) -> None:
    context = TextContext(init_context(tiny, 2, "a photo of a"))
    deep = [None, torch.randn(2, tiny.width_text)]  # block 1's replacement tokens
    with torch.no_grad():
        ours = context.features(tiny, NAMES, deep=deep)
        expected = reference_text(tiny, NAMES, context.vectors, "end", deep=deep)
        plain = context.features(tiny, NAMES)
    torch.testing.assert_close(ours, expected, atol=TRUNCATION_ATOL, rtol=0)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the replacement did something


@pytest.mark.parametrize("depth", [1, 2], ids=["input-only", "replaced"])
def test_deep_image_prompts_match_hooks_in_open_clip(tiny: CLIPBackbone, depth: int) -> None:
    images = torch.randn(3, 3, 32, 32)
    deep = [torch.randn(3, tiny.width_image) for _ in range(depth)]
    with torch.no_grad():
        ours = tiny.encode_image(images, deep=deep)
        expected = reference_image(tiny, images, deep)
    # Same modules on the same token sequence, in the same order: bit-identical.
    assert torch.equal(ours, expected)
    fused = CLIPBackbone("clipadapt-tiny", pretrained=None).eval()  # the default sdpa path: up to float rounding
    fused.load_state_dict(tiny.state_dict())
    torch.testing.assert_close(fused.encode_image(images, deep=deep), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, tiny.encode_image(images), atol=1e-3)


def test_deep_prompts_are_checked(tiny: CLIPBackbone) -> None:
    cls = class_tokens(tiny, ["cat"])
    words = tiny.token_embeddings(cls.ids[:, :4])
    with pytest.raises(ValueError, match="start at block 1"):
        tiny.encode_text_embeddings(words, cls.eot, deep=[torch.zeros(1, tiny.width_text)])
    with pytest.raises(ValueError, match="block 0's tokens"):
        tiny.encode_image(torch.randn(1, 3, 32, 32), deep=[None, torch.zeros(1, tiny.width_image)])
    with pytest.raises(ValueError, match="outside the 4 embedding columns"):
        tiny.encode_text_embeddings(words, torch.tensor([4]))


def test_vl_prompts_coupled_and_independent(tiny: CLIPBackbone) -> None:
    context = TextContext(init_context(tiny, 2, "a photo of a"))
    maple = VLPrompts(context, 2, 2, tiny.width_image, coupled=True)
    tokens = maple.image_tokens()
    assert [t.shape for t in tokens] == [(2, tiny.width_image)] * 2
    torch.testing.assert_close(tokens[0], maple.couplers[0](context.vectors))  # F_0(context)
    torch.testing.assert_close(tokens[1], maple.couplers[1](maple.text[0]))  # F_1(text prompt of block 1)
    assert maple.text_tokens()[0] is None and maple.text_tokens()[1] is maple.text[0]
    ivlp = VLPrompts(context, 2, 1, tiny.width_image, image_length=4)
    assert [t.shape for t in ivlp.image_tokens()] == [(4, tiny.width_image)]
    with pytest.raises(ValueError, match="equal depths"):
        VLPrompts(context, 2, 1, tiny.width_image, coupled=True)
