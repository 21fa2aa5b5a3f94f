"""CLIP-LoRA, FT, LP-FT and WiSE-FT on the tiny model: zero-shot start, what trains, the ensemble, plain exports."""

from collections.abc import Callable
from pathlib import Path

import lightning as L
import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from doubles import epoch_loss
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from clipadapt.cli import main
from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.methods import FT, LPFT, CLIPLoRA, WiSEFT, ZeroShotCLIP


def build(cls: type, data: CLIPDataModule, lr: float = 1e-2, **kwargs) -> torch.nn.Module:
    optimizer = lambda params: torch.optim.AdamW(params, lr=lr)  # noqa: E731 - tiny model: a large lr moves it fast
    return cls(classnames=data.classnames, templates=data.templates, optimizer=optimizer, **TINY, **kwargs).eval()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def zero_shot_twin(model: torch.nn.Module, data: CLIPDataModule) -> ZeroShotCLIP:
    """Zero-shot CLIP holding `model`'s CLIP weights."""
    zero = ZeroShotCLIP(classnames=data.classnames, templates=data.templates, **TINY).eval()
    zero.clip.load_state_dict(model.clip.state_dict())
    return zero


def exported_logits(path: Path, data: CLIPDataModule, images: torch.Tensor) -> torch.Tensor:
    """Logits of a plain open_clip model loaded from an export."""
    plain = open_clip.create_model("clipadapt-tiny", pretrained=None).eval()
    plain.load_state_dict(torch.load(path, weights_only=True))
    tokens = open_clip.get_tokenizer("clipadapt-tiny")([data.templates[0].format(c) for c in data.classnames])
    with torch.no_grad():
        text = F.normalize(plain.encode_text(tokens), dim=-1)
        return plain.logit_scale.exp() * F.normalize(plain.encode_image(images), dim=-1) @ text.T


def fit_and_export(
    model: torch.nn.Module, data: CLIPDataModule, cpu_trainer: Callable[..., L.Trainer], tmp_path: Path, epochs: int = 2
) -> Path:
    """Fit with a last checkpoint, then `clipadapt export` it (rebuilds the method with pretrained=None)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    cpu_trainer(max_epochs=epochs, enable_checkpointing=True, callbacks=[ckpt], limit_val_batches=0).fit(model, data)
    out = tmp_path / "exported.pt"
    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(out)])
    return out


# ---- CLIP-LoRA ----


def test_lora_starts_as_zero_shot_clip_bit_for_bit(tiny_data):
    lora = build(CLIPLoRA, tiny_data)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(lora(images), zero_shot_twin(lora, tiny_data)(images))


def test_lora_trains_only_its_factors_in_both_towers_and_lowers_the_loss(tiny_data, cpu_trainer):
    model = build(CLIPLoRA, tiny_data)
    assert model.text_trainable()  # the text features are re-encoded at every training step
    before, loss = snapshot(model), epoch_loss(model, tiny_data)
    cpu_trainer(max_epochs=4, limit_val_batches=0).fit(model, tiny_data)
    assert moved(model, before) == {"lora.a.image", "lora.b.image", "lora.a.text", "lora.b.text"}
    assert epoch_loss(model, tiny_data) < loss


def test_lora_on_the_image_tower_only_keeps_the_text_cached(tiny_data):
    model = build(CLIPLoRA, tiny_data, encoders="image")
    model.requires_grad_(False)
    model.lora.requires_grad_(True)
    assert model.lora.towers == ("image",) and not model.text_trainable()
    with pytest.raises(ValueError, match="encoders"):
        build(CLIPLoRA, tiny_data, encoders="audio")


def test_lora_export_is_plain_open_clip_with_the_same_logits(tiny_data, cpu_trainer, tmp_path):
    model = build(CLIPLoRA, tiny_data)
    out = fit_and_export(model, tiny_data, cpu_trainer, tmp_path)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        got = model.eval()(images)
    assert not torch.allclose(got, zero_shot_twin(model, tiny_data)(images), atol=1e-3)  # LoRA changed the model
    # open_clip encodes the full 77-token context, we cut after the last EOT: equal up to float rounding.
    torch.testing.assert_close(exported_logits(out, tiny_data, images), got, rtol=1e-5, atol=1e-5)


# ---- FT / WiSE-FT ----


def test_ft_trains_only_the_image_tower_and_lowers_the_loss(tiny_data, cpu_trainer):
    model = build(FT, tiny_data, lr=1e-3)
    before, loss = snapshot(model), epoch_loss(model, tiny_data)
    cpu_trainer(max_epochs=3, limit_val_batches=0).fit(model, tiny_data)
    changed = moved(model, before)
    assert changed and all(n.startswith("clip.model.visual.") for n in changed)
    assert epoch_loss(model, tiny_data) < loss


def test_wise_interpolation_by_hand(tiny_data):
    model = build(WiSEFT, tiny_data, wise_alpha=0.25)
    with torch.no_grad():
        model.zeroshot_visual.proj.fill_(2.0)  # θ_zs
        model.clip.model.visual.proj.fill_(4.0)  # θ_ft
    ensembled = model.ensembled_visual()["visual.proj"]
    assert torch.equal(ensembled, torch.full_like(ensembled, 2.5))  # 0.25·4 + 0.75·2


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_wise_evaluates_the_ensemble_and_trains_the_finetuned_weights(tiny_data, cpu_trainer, alpha):
    model = build(FT, tiny_data, lr=1e-3, wise_alpha=alpha)
    zero_shot = zero_shot_twin(model, tiny_data)
    cpu_trainer(max_epochs=1, limit_val_batches=0).fit(model, tiny_data)
    tuned = {n: p.detach().clone() for n, p in model.clip.model.visual.named_parameters()}
    finetuned = build(FT, tiny_data)  # α = 1: θ_ft itself
    finetuned.load_state_dict(model.state_dict())
    by_hand = zero_shot_twin(model, tiny_data)  # its image tower becomes α·θ_ft + (1 − α)·θ_zs
    with torch.no_grad():
        for (name, p), zs in zip(
            by_hand.clip.model.visual.named_parameters(), zero_shot.clip.model.visual.parameters(), strict=True
        ):
            p.copy_(alpha * tuned[name] + (1 - alpha) * zs)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        evaluated = model.eval()(images)
        torch.testing.assert_close(evaluated, by_hand(images), rtol=1e-6, atol=1e-6)
        if alpha == 0.0:  # exactly zero-shot CLIP
            assert torch.equal(evaluated, zero_shot(images))
        if alpha == 1.0:  # exactly the fine-tuned model
            assert torch.equal(evaluated, finetuned(images))
        assert torch.equal(model.train()(images), finetuned.train()(images))  # training sees θ_ft
    assert all(torch.equal(p, tuned[n]) for n, p in model.clip.model.visual.named_parameters())  # never in place


def head_args(data: CLIPDataModule) -> tuple[list[str], list[str]]:
    return data.classnames, data.templates


def test_wise_export_from_a_checkpoint_is_plain_open_clip_with_the_ensembled_logits(tiny_data, cpu_trainer, tmp_path):
    model = build(WiSEFT, tiny_data, lr=1e-3)
    out = fit_and_export(model, tiny_data, cpu_trainer, tmp_path, epochs=1)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        got = model.eval()(images)
    assert not torch.allclose(got, zero_shot_twin(model, tiny_data)(images), atol=1e-4)  # not the zero-shot model
    torch.testing.assert_close(exported_logits(out, tiny_data, images), got, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_tests_at_another_alpha(tiny_data, cpu_trainer, tmp_path):
    model = build(FT, tiny_data, lr=1e-3)  # plain FT, α = 1
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    cpu_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt], limit_val_batches=0).fit(model, tiny_data)
    torch.manual_seed(7)  # another random init: θ_zs has to come from the checkpoint
    later = FT.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", wise_alpha=0.5).eval()
    halfway = build(FT, tiny_data, wise_alpha=0.5)
    halfway.load_state_dict(model.state_dict())
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(later(images), halfway(images))
        assert not torch.allclose(later(images), model.eval()(images), atol=1e-5)


# ---- LP-FT ----


class ImageTowerAfterFirstEpoch(Callback):
    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch == 0:
            self.weights = {n: p.detach().clone() for n, p in module.clip.image_parameters()}


def test_lpft_probes_the_head_then_finetunes_tower_and_head(tiny_data, cpu_trainer):
    model = build(LPFT, tiny_data, lr=1e-3, probe_epochs=1, probe_lr=1e-2)
    before, first = snapshot(model), ImageTowerAfterFirstEpoch()
    head0, loss = model.head.detach().clone(), epoch_loss(model, tiny_data)
    cpu_trainer(max_epochs=2, limit_val_batches=0, callbacks=[first]).fit(model, tiny_data)
    assert all(torch.equal(before[f"clip.model.{n}"], p) for n, p in first.weights.items())  # probe: tower frozen
    changed = moved(model, before)
    assert "head" in changed and any(n.startswith("clip.model.visual.") for n in changed)
    assert not any(n.startswith(("clip.model.transformer", "zeroshot")) for n in changed)
    assert not torch.equal(model.head, head0) and epoch_loss(model, tiny_data) < loss


def test_lpft_wise_ensembles_the_head_with_its_zero_shot_init_and_exports_it(tiny_data, cpu_trainer, tmp_path):
    model = build(LPFT, tiny_data, lr=1e-3, probe_epochs=1, wise_alpha=0.5)
    out = fit_and_export(model, tiny_data, cpu_trainer, tmp_path)
    expected_head = F.normalize(0.5 * model.head.detach() + 0.5 * model.zeroshot_head, dim=-1)
    state = torch.load(out, weights_only=True)
    torch.testing.assert_close(
        torch.load(out.with_name("exported.extras.pt"), weights_only=True)["head"], expected_head
    )
    model.eval()
    torch.testing.assert_close(model.class_embeddings(*head_args(tiny_data)), expected_head)
    # novel classes have no trained rows: the (ensembled) text tower scores them
    novel = ["zebra", "kettle"]
    torch.testing.assert_close(
        model.class_embeddings(novel, tiny_data.templates), model.clip.text_features(novel, tiny_data.templates)
    )
    plain = open_clip.create_model("clipadapt-tiny", pretrained=None).eval()
    plain.load_state_dict(state)  # the weights file is a plain open_clip model


def test_bad_alpha_fails_at_construction(tiny_data):
    with pytest.raises(ValueError, match="wise_alpha"):
        build(WiSEFT, tiny_data, wise_alpha=1.5)


def test_clipadapt_test_of_a_checkpoint_takes_another_wise_alpha(tmp_path: Path, monkeypatch):
    write_synthetic(tmp_path / "data", "imagenet")
    seen = []
    monkeypatch.setattr("clipadapt.cli.ClipAdaptCLI.after_test", lambda cli: seen.append(cli.model), raising=False)
    common = ["--config", "configs/wiseft_imagenet_ood.yaml", "--config", "configs/tiny.yaml"]
    common += ["--data.root", str(tmp_path / "data"), "--data.cache_dir", str(tmp_path / "cache")]
    common += ["--data.eval_sets", "[all]", "--trainer.default_root_dir", str(tmp_path)]
    main(["fit", *common, "--trainer.max_epochs", "1", "--test_after_fit", "false"])
    (ckpt,) = tmp_path.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    main(["test", *common, "--ckpt_path", str(ckpt), "--model.init_args.wise_alpha", "0.0"])
    (model,) = seen
    assert model.hparams.wise_alpha == 0.0  # the flag took effect: the test ran zero-shot CLIP's weights
    zero, tested = dict(model.zeroshot_visual.named_parameters()), model.ensembled_visual()
    assert all(torch.equal(tested[f"visual.{n}"], t) for n, t in zero.items())
