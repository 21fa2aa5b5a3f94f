"""TPT: confidence selection and the loss by hand, one AdamW step by hand, per-image reset, AugMix against PIL."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from doubles import one_line_error
from PIL import Image, ImageOps

from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.errors import ClipAdaptError
from clipadapt.losses import marginal_entropy
from clipadapt.methods import TPT, CoOp
from clipadapt.testtime import AFFINE_OPS, affine_ops, augmented_views, augmix_step, confident_views, point_op

REPO = Path(__file__).resolve().parents[1]


def build(data: CLIPDataModule, **kwargs) -> TPT:
    torch.manual_seed(0)
    return TPT(classnames=data.classnames, templates=data.templates, **TINY, **kwargs).eval()


def view_features(model: TPT, images: torch.Tensor) -> torch.Tensor:
    views = augmented_views(images, model.hparams.views, model.view_seed, model.hparams.augment)
    with torch.no_grad():
        return torch.stack([model.clip.encode_image(v) for v in views]).float()  # (N, V, D)


def selected_entropy(model: TPT, features: torch.Tensor, keep: torch.Tensor, context: torch.Tensor, names) -> float:
    with torch.no_grad():
        text = model.context.features(model.clip, names, context=context).float()
        return marginal_entropy(model.clip.logit_scale.exp() * features[keep] @ text.T).item()


# ---- the pure parts, by hand ----


def test_confident_views_and_the_entropy_of_the_mean_by_hand():
    # softmax rows (1/2, 1/2), (3/4, 1/4), (9/10, 1/10), (1/5, 4/5): entropies 0.6931, 0.5623, 0.3251, 0.5004
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [math.log(9), 0.0], [0.0, math.log(4)]])
    assert confident_views(logits, 0.5).tolist() == [2, 3]
    assert confident_views(logits, 0.01).tolist() == [2]  # at least one view
    assert confident_views(torch.randn(64, 5), 0.1).shape == (6,)  # ⌊0.1 · 64⌋
    # views 2 and 3 average to (0.55, 0.45): H = 0.688139, not the mean of their entropies (0.412743)
    assert marginal_entropy(logits[[2, 3]]).item() == pytest.approx(0.6881388137, abs=1e-6)


@pytest.mark.parametrize("name", ["autocontrast", "equalize", "posterize", "solarize"])
def test_augmix_point_ops_match_pil(name):
    pixels = (np.random.default_rng(0).random((24, 24, 3)) ** 2 * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    reference = {
        "autocontrast": ImageOps.autocontrast(image),
        "equalize": ImageOps.equalize(image),
        "posterize": ImageOps.posterize(image, 4),  # 4 − int(level·4/10) bits
        "solarize": ImageOps.solarize(image, 256 - int(0.5 * 25.6)),  # level 0.5
    }[name]
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
    expected = torch.from_numpy(np.array(reference)).permute(2, 0, 1)[None].float() / 255
    # PIL rounds its output to uint8: one level apart at most
    torch.testing.assert_close(point_op(name, x, torch.tensor([0.5])), expected, rtol=0, atol=1.01 / 255)


@pytest.mark.parametrize(
    ("name", "sign", "data"),
    [
        ("rotate", 1.0, None),
        ("shear_x", 1.0, (1, 0.03, 0, 0, 1, 0)),
        ("shear_y", -1.0, (1, 0, 0, -0.03, 1, 0)),
        ("translate_x", 1.0, (1, 0, 7 * 24 / 224, 0, 1, 0)),  # int(1 · 224/3/10) = 7 px of a 224 px image
        ("translate_y", -1.0, (1, 0, 0, 0, 1, -7 * 24 / 224)),
    ],
)
def test_augmix_affine_ops_match_pil(name, sign, data):
    pixels = (np.random.default_rng(1).random((24, 24, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if data is None:
        reference = image.rotate(sign * 2, resample=Image.BILINEAR)  # int(0.9 · 3) = 2 degrees
    else:
        reference = image.transform((24, 24), Image.AFFINE, data, resample=Image.BILINEAR)
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
    op = torch.tensor([AFFINE_OPS.index(name)])
    got = affine_ops(x, op, torch.tensor([0.9 if data is None else 1.0]), torch.tensor([sign]))
    expected = torch.from_numpy(np.array(reference)).permute(2, 0, 1)[None].float() / 255
    torch.testing.assert_close(got, expected, rtol=0, atol=1.01 / 255)


def test_augmix_step_applies_each_row_its_own_op():
    x = torch.rand(10, 3, 16, 16)
    ops = torch.tensor([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8])  # none, then every op of AUGMIX_OPS once
    levels, signs = torch.rand(10) * 0.9 + 0.1, torch.tensor([1.0, -1.0] * 5)
    got = augmix_step(x, ops, levels, signs)
    assert torch.equal(got[0], x[0])
    for r in range(1, 10):
        one = augmix_step(x[r : r + 1], ops[r : r + 1], levels[r : r + 1], signs[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], one, rtol=0, atol=1e-6)
    assert not torch.allclose(got[1:], x[1:])


def test_augmix_views_keep_the_image_and_follow_its_pixels():
    images = torch.randn(3, 3, 32, 32).clamp(-1.5, 1.5)
    views = augmented_views(images, 8, seed=1, augment="augmix")
    crops = augmented_views(images, 8, seed=1, augment="crop")
    assert views.shape == (3, 8, 3, 32, 32) and torch.equal(views[:, 0], images)
    assert not torch.allclose(views[:, 1:], crops[:, 1:], atol=1e-3)  # the mix changed the crops
    torch.testing.assert_close(augmented_views(images[[2, 0]], 8, 1, "augmix")[0], views[2], rtol=0, atol=1e-6)
    assert not torch.equal(augmented_views(images, 8, seed=2, augment="augmix"), views)


# ---- the method on the tiny model ----


def test_one_step_is_adamw_by_hand_and_lowers_the_selected_entropy(tiny_data):
    model = build(tiny_data, views=16, select=0.25)
    names, hp = tiny_data.classnames, model.hparams
    features = view_features(model, torch.randn(2, 3, 32, 32))  # (2, 16, D)
    start = model.context.vectors.detach()
    tuned = model.tune(features, names)  # (2, M, W)
    scale = model.clip.logit_scale.exp()
    for image, context in zip(features, tuned, strict=True):
        leaf = start.clone().requires_grad_()
        text = model.context.features(model.clip, names, context=leaf).float()
        keep = confident_views((scale * image @ text.T).detach(), 0.25)  # 4 of 16
        (grad,) = torch.autograd.grad(marginal_entropy(scale * image[keep] @ text.T), leaf)
        # AdamW's first step: m̂ = g, v̂ = g², so θ1 = θ0 (1 − lr·wd) − lr · g / (|g| + eps)
        expected = start * (1 - hp.lr * hp.weight_decay) - hp.lr * grad / (grad.abs() + 1e-8)
        torch.testing.assert_close(context, expected, rtol=1e-5, atol=1e-7)
        before = selected_entropy(model, image, keep, start, names)
        assert selected_entropy(model, image, keep, context, names) < before  # the step lowers H(p̄)


def test_tuning_changes_the_logits_and_steps_zero_is_zero_shot_with_the_context(tiny_data):
    model = build(tiny_data, views=16)
    x = torch.randn(3, 3, 32, 32)
    tuned = model.class_logits(x, tiny_data.classnames, tiny_data.templates)
    model.hparams.steps = 0
    untuned = model.class_logits(x, tiny_data.classnames, tiny_data.templates)
    with torch.no_grad():
        text = model.context.features(model.clip, tiny_data.classnames).float()
        zero_shot = model.clip.logit_scale.exp() * model.clip.encode_image(x) @ text.T
    torch.testing.assert_close(untuned, zero_shot, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tuned, untuned, atol=1e-4)


@pytest.mark.parametrize("steps", [1, 2])
def test_context_is_reset_per_image_so_order_and_batching_do_not_matter(tiny_data, steps):
    model = build(tiny_data, views=8, steps=steps, lr=5e-2)
    before = model.context.vectors.detach().clone()
    x = torch.randn(5, 3, 32, 32)
    names, templates = tiny_data.classnames, tiny_data.templates
    together = model.class_logits(x, names, templates)
    alone = torch.cat([model.class_logits(x[i : i + 1], names, templates) for i in range(5)])
    order = torch.tensor([3, 0, 4, 2, 1])
    shuffled = model.class_logits(x[order], names, templates)
    torch.testing.assert_close(alone, together, rtol=0, atol=0)  # each image is tuned alone
    torch.testing.assert_close(shuffled, together[order], rtol=0, atol=0)
    assert torch.equal(model.context.vectors, before)  # the module's context is never tuned itself


def test_starts_from_a_coop_context_and_refuses_another_file(tiny_data, tmp_path):
    coop = CoOp(classnames=tiny_data.classnames, templates=tiny_data.templates, n_ctx=6, **TINY)
    with torch.no_grad():
        coop.context.vectors.normal_()
    torch.save({"state_dict": coop.state_dict()}, tmp_path / "coop.ckpt")
    tpt = build(tiny_data, init_checkpoint=str(tmp_path / "coop.ckpt"))
    assert torch.equal(tpt.context.vectors, coop.context.vectors)  # (6, W): the checkpoint's M
    torch.save({"state_dict": {"head": torch.zeros(3, 4)}}, tmp_path / "other.ckpt")
    with pytest.raises(ClipAdaptError, match="no shared CoOp context"):
        build(tiny_data, init_checkpoint=str(tmp_path / "other.ckpt"))


def test_under_inference_mode_fails_with_the_fix(tiny_data):
    model = build(tiny_data, views=4)
    with torch.inference_mode(), pytest.raises(ClipAdaptError, match="inference_mode: false"):
        model.class_logits(torch.randn(1, 3, 32, 32), tiny_data.classnames, tiny_data.templates)


@pytest.mark.parametrize("config", ["tpt_finegrained", "zeroshot", "tip_adapter_fewshot"])
def test_fit_of_a_method_with_nothing_to_train_is_one_line(config, tmp_path):
    write_synthetic(tmp_path / "data", "oxford_pets")
    message = one_line_error(
        ["fit", "--config", str(REPO / "configs" / f"{config}.yaml"), "--config", str(REPO / "configs" / "tiny.yaml")]
        + ["--data.root", str(tmp_path / "data"), "--data.dataset", "oxford_pets"]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path)]
    )
    assert "has nothing to train" in message and "clipadapt test" in message


def test_cli_test_under_inference_mode_is_one_line(tmp_path):
    write_synthetic(tmp_path / "data", "oxford_pets", num_classes=2, test_per_class=1)
    message = one_line_error(
        [
            "test",
            "--config",
            str(REPO / "configs" / "tpt_finegrained.yaml"),
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
        ]
        + ["--data.root", str(tmp_path / "data"), "--data.dataset", "oxford_pets", "--trainer.inference_mode", "true"]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path)]
    )
    assert "inference_mode: false" in message
