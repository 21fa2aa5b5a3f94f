"""The prompt learners on the tiny model: hand-checked math, what each trains, and that training moves them.

Behaviour on pretrained weights (KgCoOp keeps more pretraining-domain accuracy than CoOp, ...) is
tested on the pretrained toy world; here the model is random, so "it learns" means plumbing only.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from clipadapt.cli import main
from clipadapt.data import write_synthetic
from clipadapt.data.templates import PROMPTSRC_TEMPLATES
from clipadapt.losses import knowledge_guided_loss
from clipadapt.methods import CoCoOp, CoOp, KgCoOp, MaPLe, PromptSRC, ZeroShotCLIP
from clipadapt.methods.prompting.promptsrc import gaussian_epoch_weights

HERE = Path(__file__).resolve().parent
TINY = {"arch": "clipadapt-tiny", "pretrained": None}
METHODS = [CoOp, CoCoOp, KgCoOp, MaPLe, PromptSRC]
# Our class prompts stop at the last EOT, the zero-shot classifier runs 77 columns: equal in exact
# arithmetic (causal tower), attention over fewer columns rounds differently.
TRUNCATION_ATOL = 1e-5


def build(cls: type, data: L.LightningDataModule, **kwargs: object) -> L.LightningModule:
    return cls(data.classnames, data.templates, **TINY, **kwargs)


def learned(model: L.LightningModule) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("clip.")}


# ---- pure functions, by hand ----


def test_gaussian_epoch_weights_by_hand() -> None:
    a = math.exp(-0.5)  # N(e; 2, 1) at e = 1 and 3, relative to e = 2
    assert gaussian_epoch_weights(3, 2.0, 1.0) == pytest.approx([a / (1 + 2 * a), 1 / (1 + 2 * a), a / (1 + 2 * a)])
    # μ far past the run (a 45-epoch setting on a 2-epoch run): no underflow to 0/0, the last epoch wins
    ratio = math.exp(-0.5 * (44**2 - 43**2))  # w_1 / w_2
    assert gaussian_epoch_weights(2, 45.0, 1.0) == pytest.approx([ratio / (1 + ratio), 1 / (1 + ratio)])
    assert sum(gaussian_epoch_weights(20, 15.0, 1.0)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="std > 0"):
        gaussian_epoch_weights(3, 1.0, 0.0)


def test_knowledge_guided_loss_by_hand() -> None:
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    anchor = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.8, 0.6]])
    # ‖(1, −1)‖² = 2, 0, ‖(−0.2, 0.2)‖² = 0.08 -> mean 0.69333
    assert knowledge_guided_loss(text, anchor).item() == pytest.approx(2.08 / 3)
    # unit vectors: ‖w − w'‖² = 2 (1 − cos), the public code's W · (1 − cos) is λ = W / 2
    assert knowledge_guided_loss(text, anchor).item() == pytest.approx(
        2 * (1 - F.cosine_similarity(text, anchor)).mean()
    )
    with pytest.raises(ValueError, match="shapes differ"):
        knowledge_guided_loss(text, anchor[:2])


# ---- what each method starts from and trains ----


def test_coop_from_the_template_words_starts_at_zero_shot_clip(tiny_data) -> None:
    def seeded(cls: type, **kwargs: object) -> L.LightningModule:
        torch.manual_seed(0)  # the same random CLIP for each
        return build(cls, tiny_data, **kwargs).eval()

    coop = seeded(CoOp, n_ctx=4, context_init="a photo of a")
    zero_shot = seeded(ZeroShotCLIP, prompts="simple")  # "a photo of a {}."
    kgcoop = seeded(KgCoOp, prompts="simple")
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(coop(images), zero_shot(images), atol=100 * TRUNCATION_ATOL, rtol=0)  # s = 100
        losses = kgcoop.training_losses(images, torch.zeros(4, dtype=torch.long))
    assert losses["kg"].item() < 1e-9  # the learned prompt is the hand-crafted one at init
    assert all(torch.equal(a, b) for a, b in zip(coop.clip.parameters(), kgcoop.clip.parameters(), strict=True))


def test_kgcoop_term_is_lambda_times_the_distance_to_zero_shot(tiny_data) -> None:
    model = build(KgCoOp, tiny_data, kg_weight=8.0)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    losses = model.training_losses(images, labels)
    text = model.class_embeddings(tiny_data.classnames, tiny_data.templates)
    anchor = model.clip.text_features(tiny_data.classnames, tiny_data.templates)  # CoOp's dataset template
    expected = 8.0 * (text - anchor).square().sum(-1).mean()
    torch.testing.assert_close(losses["kg"], expected)
    assert losses["kg"].item() > 0 and losses["kg"].requires_grad


def test_class_specific_context_serves_subsets_and_falls_back_to_zero_shot(tiny_data) -> None:
    model = build(CoOp, tiny_data, n_ctx=2, class_specific=True, class_position="front").eval()
    names = tiny_data.classnames
    assert model.context.vectors.shape == (len(names), 2, model.clip.width_text)
    with torch.no_grad():
        everything = model.encode_classes(names, tiny_data.templates)
        subset = model.encode_classes([names[3], names[0]], tiny_data.templates)
        other = model.encode_classes(["unicorn", names[0]], tiny_data.templates)
    torch.testing.assert_close(subset, everything[[3, 0]], atol=TRUNCATION_ATOL, rtol=0)
    torch.testing.assert_close(other, model.clip.text_features(["unicorn", names[0]], tiny_data.templates))


def test_cocoop_conditions_every_class_prompt_on_its_image(tiny_data) -> None:
    model = build(CoCoOp, tiny_data, chunk_size=8).eval()
    dim, width = model.clip.embed_dim, model.clip.width_text
    shapes = [tuple(p.shape) for p in model.meta_net.parameters()]
    assert shapes == [(dim // 16, dim), (dim // 16,), (width, dim // 16), (width,)]  # D -> D/16 -> W
    images = torch.randn(3, 3, 32, 32)
    names = tiny_data.classnames
    with torch.no_grad():
        logits = model(images)  # (B, C), prompts built for 3 x 6 rows, 8 per call
        expected = []
        for image in images:
            f = model.clip.encode_image(image[None])  # (1, D)
            context = model.context.vectors + model.meta_net(f)  # (M, W): v_m + π(f̂(x))
            text = model.context.features(model.clip, names, context=context)  # (C, D)
            expected.append(model.clip.logit_scale.exp() * (f @ text.T)[0])
    torch.testing.assert_close(logits, torch.stack(expected), atol=100 * TRUNCATION_ATOL, rtol=0)
    assert not torch.allclose(logits[0], logits[1])


def test_promptsrc_losses_and_its_60_template_teacher(tiny_data) -> None:
    model = build(PromptSRC, tiny_data)
    names = tiny_data.classnames
    with torch.no_grad():
        unnormalized = [
            model.clip.encode_text(model.clip.tokenize([t.format(n) for n in names]), normalize=False)
            for t in PROMPTSRC_TEMPLATES
        ]
    torch.testing.assert_close(model.teacher_text(), F.normalize(torch.stack(unnormalized).mean(0), dim=-1))
    assert len(PROMPTSRC_TEMPLATES) == 60
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    losses = model.training_losses(images, labels)
    assert set(losses) == {"ce", "l1_text", "l1_image", "kl"}
    with torch.no_grad():
        teacher = model.clip.encode_image(images)  # the frozen tower without prompts
        student = model.clip.encode_image(images, deep=model.vl_prompts.image_tokens())
    torch.testing.assert_close(losses["l1_image"], 10.0 * (student - teacher).abs().mean())
    off = build(PromptSRC, tiny_data, image_consistency_weight=0.0, text_consistency_weight=0.0)
    assert set(off.training_losses(images, labels)) == {"ce", "kl"}


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_training_lowers_the_loss_and_raises_train_accuracy(cls: type, tiny_data) -> None:
    """Plumbing: gradients reach the prompts and optimizing them fits the synthetic training set."""
    extra = {"kg_weight": 1.0} if cls is KgCoOp else {}  # λ = 8 outweighs CE on a random model
    model = build(cls, tiny_data, **extra)
    params = model._apply_stage("train")
    optimizer = torch.optim.Adam(params, lr=1e-2)
    tiny_data.setup("fit")
    images, labels = (torch.cat(x) for x in zip(*tiny_data.train_dataloader(), strict=True))  # 6 classes x 2 shots

    def accuracy() -> float:
        with torch.no_grad():
            return (model(images).argmax(-1) == labels).float().mean().item()

    before, first = accuracy(), None
    for _ in range(40):
        loss = sum(model.training_losses(images, labels).values())
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.7 * first
    assert accuracy() > before


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_fit_trains_only_the_prompts(cls: type, tiny_data, cpu_trainer) -> None:
    model = build(cls, tiny_data)
    clip = {k: v.clone() for k, v in model.clip.state_dict().items()}
    start = learned(model)
    cpu_trainer(max_epochs=1, limit_val_batches=0).fit(model, tiny_data)
    assert all(torch.equal(v, clip[k]) for k, v in model.clip.state_dict().items()), "the backbone moved"
    after = learned(model)
    assert after.keys() == start.keys() and all(not torch.equal(after[k], start[k]) for k in start)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{n}" for n in start}


# ---- GPA, export ----


class Snapshots(L.Callback):
    """The prompts at each epoch end, before the module's own hook (callbacks run first) aggregates them."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, Tensor]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epochs.append({n: p.detach().clone() for n, p in module.vl_prompts.named_parameters()})


def test_promptsrc_ends_with_the_gaussian_aggregate_of_its_epochs(tiny_data, cpu_trainer) -> None:
    model = build(PromptSRC, tiny_data, gpa_mean=2.0, gpa_std=1.0)
    snapshots = Snapshots()
    cpu_trainer(max_epochs=3, limit_val_batches=0, callbacks=[snapshots]).fit(model, tiny_data)
    assert len(snapshots.epochs) == 3
    weights = gaussian_epoch_weights(3, 2.0, 1.0)
    for name, p in model.vl_prompts.named_parameters():
        expected = sum(w * epoch[name] for w, epoch in zip(weights, snapshots.epochs, strict=True))
        torch.testing.assert_close(p.detach(), expected)
        assert not torch.allclose(p.detach(), snapshots.epochs[-1][name])  # not simply the last epoch
    assert set(model.method_state()["gpa"]) == {n for n, _ in model.vl_prompts.named_parameters()}


def test_export_holds_the_weights_and_the_prompts(tiny_data, cpu_trainer, tmp_path: Path, capsys) -> None:
    model = build(MaPLe, tiny_data)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    cpu_trainer(max_epochs=1, limit_val_batches=0, enable_checkpointing=True, callbacks=[ckpt]).fit(model, tiny_data)
    out = tmp_path / "maple.pt"
    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(out)])
    printed = capsys.readouterr().out
    # The weights file is plain open_clip; the prompts go beside it, with the method's own usage text.
    assert "The frozen open_clip weights plus the prompts" in printed and "maple.extras.pt" in printed
    assert torch.load(out, weights_only=True).keys() == model.clip.model.state_dict().keys()
    extras = torch.load(tmp_path / "maple.extras.pt", weights_only=True)
    prompts = {k.removeprefix("prompts."): v for k, v in extras.items() if k.startswith("prompts.")}
    assert prompts.keys() == model.vl_prompts.state_dict().keys()
    assert all(torch.equal(prompts[k], v) for k, v in model.vl_prompts.state_dict().items())


@pytest.mark.slow  # two processes: make test-slow
def test_two_process_ddp_keeps_the_prompts_and_their_aggregate_in_sync(tmp_path: Path) -> None:
    write_synthetic(tmp_path / "data", "oxford_pets")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    script = [sys.executable, str(HERE / "ddp_prompting.py"), str(tmp_path / "data"), str(tmp_path)]
    subprocess.run(script, cwd=tmp_path, env=env, check=True, capture_output=True)
    init, rank0, rank1 = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("init", "rank0", "rank1"))
    assert all(not torch.equal(init[k], rank0[k]) for k in init), "a prompt did not train"
    assert all(torch.equal(rank0[k], rank1[k]) for k in init), "ranks diverged"
