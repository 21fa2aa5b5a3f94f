"""The toy world (renderer, captions, held-out pairs, domains, CoOp-layout writer) and the shipped toy CLIP."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipadapt.cli import main
from clipadapt.data import CLIPDataModule
from clipadapt.data.readers import read_splits
from clipadapt.errors import ClipAdaptError
from clipadapt.models import CLIPBackbone
from clipadapt.toy import pretrain, world

REPO = Path(__file__).resolve().parents[1]
# Zero-shot points the shipped weights may be off their manifest here: the same arithmetic on this machine
# gives the same numbers; another CPU or torch build may round differently and flip a few of the 640 images.
SHIPPED_TOLERANCE = 1.0


def test_render_is_deterministic_8_bit_and_32_px():
    labels = torch.arange(len(world.CLASSES))
    for domain in world.DOMAINS:
        a = world.class_images(domain, labels, torch.Generator().manual_seed(3))
        b = world.class_images(domain, labels, torch.Generator().manual_seed(3))
        c = world.class_images(domain, labels, torch.Generator().manual_seed(4))
        assert a.shape == (32, 3, 32, 32) and a.dtype == torch.float32
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert a.min() >= 0 and a.max() <= 1
        assert torch.equal(torch.round(a * 255) / 255, a)  # what a PNG stores


def test_objects_have_their_colour_and_differ_by_kind():
    g = torch.Generator().manual_seed(0)
    scenes = world.sample_pretraining(64, g)
    scenes.pattern.zero_()  # solid fill: the object's pixels are its colour (times jitter)
    plain = world.Shift(noise=0.0)
    images = world.render(scenes, g, plain)
    palette = torch.tensor(list(world.COLOURS.values()))
    for i in range(8):
        distance = (images[i] - palette[scenes.colour[i], :, None, None]).abs().sum(0)  # (32, 32)
        assert (distance < 0.35).sum() >= 20, "the object should show its colour on at least 20 pixels"
    # Same scene, another kind: another mask.
    other = world.Scenes(**{**scenes.__dict__, "kind": (scenes.kind + 1) % len(world.KINDS)})
    assert not torch.equal(world.render(other, torch.Generator().manual_seed(1), plain), images)


def test_captions_name_colour_and_kind_and_vary():
    g = torch.Generator().manual_seed(0)
    scenes = world.sample_pretraining(200, g)
    texts = world.captions(scenes, g)
    assert len(texts) == 200 and len(set(texts)) > 100
    for i, text in enumerate(texts):
        assert world.COLOUR_NAMES[scenes.colour[i]] in text and world.KINDS[scenes.kind[i]] in text
    assert world.captions(scenes, torch.Generator().manual_seed(5)) == world.captions(
        scenes, torch.Generator().manual_seed(5)
    )


def test_held_out_pairs_never_in_pretraining_and_are_the_novel_half():
    scenes = world.sample_pretraining(20000, torch.Generator().manual_seed(0))
    seen = set(zip(scenes.kind.tolist(), scenes.colour.tolist(), strict=True))
    assert not seen & world.HELD_OUT
    assert len(seen) == 64 - len(world.HELD_OUT) == 48
    assert {k for k, _ in world.HELD_OUT} == set(range(8)) and {c for _, c in world.HELD_OUT} == set(range(8))
    half = len(world.CLASSES) // 2
    assert set(world.CLASSES[half:]) == set(world.HELD_OUT)  # novel = never seen as a pair
    assert set(world.CLASSES[:half]) <= seen  # base = seen in pretraining
    names = world.classnames()
    assert len(set(names)) == 32 and names[0] == "red triangle"


def test_domains_shift_the_images():
    labels = torch.arange(len(world.CLASSES)).repeat(4)
    images = {d: world.class_images(d, labels, torch.Generator().manual_seed(0)) for d in world.DOMAINS}
    assert images["toy_dusk"].mean() < 0.6 * images["toy"].mean()
    roughness = {d: (x[..., 1:] - x[..., :-1]).abs().mean() for d, x in images.items()}
    assert roughness["toy_blur"] > roughness["toy"]  # the heavy noise dominates the blur
    assert not torch.allclose(images["toy_palette"], images["toy"], atol=0.1)
    # Habitat: the background is the class's own; two images of one class share their corner colour family.
    corner = images["toy_habitat"][:, :, 0, 0]
    assert (corner[0] - corner[32]).abs().max() < (corner[0] - corner[1]).abs().max() + 0.5
    with pytest.raises(ValueError, match="class-specific"):
        world.render(world.sample_pretraining(2, torch.Generator()), torch.Generator(), world.DOMAINS["toy_habitat"])
    with pytest.raises(ValueError, match="unknown toy domain"):
        world.class_images("toy_night", labels, torch.Generator())


def test_written_domain_reads_back_through_the_coop_reader(tmp_path: Path):
    folder = world.write_toy(tmp_path, "toy_palette", train_per_class=2, val_per_class=1, test_per_class=1, seed=7)
    assert (folder / "split_zhou_ToyPalette.json").is_file()
    splits = read_splits(tmp_path, "ToyPalette")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [64, 32, 32]
    assert sorted({(d.label, d.classname) for d in splits["train"]}) == list(enumerate(world.classnames()))
    # The PNGs hold exactly the rendered pixels.
    labels = torch.arange(32).repeat_interleave(2)
    expected = world.class_images("toy_palette", labels, torch.Generator().manual_seed(7 * 1000))
    for i in (0, 17, 63):
        pixels = np.array(Image.open(splits["train"][i].path).convert("RGB"))
        assert torch.equal(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255, expected[i])
    assert world.write_toy(tmp_path, "toy_palette", 2, 1, 1, seed=7) == folder  # kept
    with pytest.raises(ClipAdaptError, match="delete the folder"):
        world.write_toy(tmp_path, "toy_palette", 3, 1, 1, seed=7)
    (tmp_path / "toy_blur").mkdir()
    with pytest.raises(ClipAdaptError, match="not written by write_toy"):
        world.write_toy(tmp_path, "toy_blur")
    with pytest.raises(ValueError, match="not a toy domain"):
        world.write_toy(tmp_path, "dtd")


def test_datamodule_writes_a_toy_domain_on_first_use(toy_root: Path, tmp_path: Path):
    dm = CLIPDataModule(
        root=str(toy_root), dataset="toy_dusk", num_shots=4, subsample="base", eval_sets=["base", "novel", "toy"],
        image_size=32, num_workers=0, cache_dir=str(tmp_path),
    )  # fmt: skip
    dm.setup("fit")
    assert dm.classnames == world.classnames()[:16]
    assert [e.name for e in dm.eval_sets] == ["base", "novel", "toy"]
    assert (toy_root / "toy" / "split_zhou_Toy.json").is_file()  # an evaluation domain is written too
    assert dm.templates == ["a photo of a {}."]


def test_short_pretraining_is_deterministic(tmp_path: Path):
    settings = dict(steps=2, batch_size=8, warmup=1, eval_every=2, threads=1, eval_per_class=1)
    first = pretrain.pretrain(tmp_path / "a", **settings)
    second = pretrain.pretrain(tmp_path / "b", **settings)
    assert first["sha256"] == second["sha256"] == pretrain.sha256(tmp_path / "a" / "clipadapt-toy.safetensors")
    assert first["zero_shot"] == second["zero_shot"] and set(first["zero_shot"]) == set(world.DOMAINS)
    third = pretrain.pretrain(tmp_path / "c", **(settings | {"seed": 1}))
    assert third["sha256"] != first["sha256"]
    assert json.loads((tmp_path / "a" / "clipadapt-toy.json").read_text())["sha256"] == first["sha256"]


def test_shipped_weights_load_by_tag_and_give_their_manifest_accuracy():
    manifest = json.loads(pretrain.SHIPPED_MANIFEST.read_text())
    assert pretrain.sha256(pretrain.SHIPPED_WEIGHTS) == manifest["sha256"]
    assert pretrain.SHIPPED_WEIGHTS.stat().st_size <= 20 * 2**20
    backbone = CLIPBackbone("clipadapt-toy", pretrained="toy")
    scores = pretrain.evaluate(backbone, manifest["eval"]["per_class"])
    for domain, expected in manifest["zero_shot"].items():
        for key, value in expected.items():
            assert abs(scores[domain][key] - value) <= SHIPPED_TOLERANCE, (domain, key, scores[domain][key], value)
    assert manifest["zero_shot"]["toy"]["all"] > 50  # it learned the world
    assert all(
        manifest["zero_shot"][d]["all"] < manifest["zero_shot"]["toy"]["all"] for d in world.DOMAINS if d != "toy"
    )


def test_unknown_tag_of_the_toy_arch_lists_the_bundled_one():
    with pytest.raises(ValueError, match="Known tags: \\['toy'\\]"):
        CLIPBackbone("clipadapt-toy", pretrained="openai")


def test_pretrain_toy_command_needs_an_output_folder(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain-toy", "--steps", "1"])
    assert "--out is required" in capsys.readouterr().err


def test_check_retrains_and_compares_with_the_manifest(tmp_path: Path, monkeypatch, capsys):
    settings = dict(steps=1, batch_size=4, warmup=1, eval_every=1, threads=1)
    manifest = pretrain.pretrain(tmp_path / "shipped", **settings, eval_per_class=1)
    monkeypatch.setattr(pretrain, "SHIPPED_MANIFEST", tmp_path / "shipped" / "clipadapt-toy.json")
    main(["pretrain-toy", "--check", "--out", str(tmp_path / "again")])
    assert f"same weights as shipped (sha256 {manifest['sha256']})" in capsys.readouterr().out
    # Other bytes: the accuracies decide, within the tolerance.
    manifest["sha256"] = "0" * 64
    manifest["zero_shot"]["toy"]["all"] += 0.05
    (tmp_path / "shipped" / "clipadapt-toy.json").write_text(json.dumps(manifest))
    main(["pretrain-toy", "--check", "--out", str(tmp_path / "again")])
    assert "same zero-shot accuracies within 0.1 points" in capsys.readouterr().out
    manifest["zero_shot"]["toy_dusk"]["base"] += 5
    (tmp_path / "shipped" / "clipadapt-toy.json").write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="toy_dusk/base"):
        main(["pretrain-toy", "--check", "--out", str(tmp_path / "again")])


def test_demo_config_adapts_the_toy_clip_above_zero_shot(toy_root: Path, tmp_path: Path, capsys):
    """configs/demo.yaml, shortened to 1 probe + 2 epochs: the base accuracy clears zero-shot by 10 points."""
    main(
        ["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.root", str(toy_root)]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path)]
        + ["--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false"]
    )
    (run,) = (tmp_path / "lightning_logs").glob("version_*")
    zero_shot = json.loads((run / "zero_shot_metrics.json").read_text())
    adapted = json.loads((run / "test_metrics.json").read_text())
    assert set(zero_shot) == {"base", "novel", "hm"}
    assert 30 < zero_shot["base"] < 70  # the shipped model on dusk: far from chance (6.25) and from solved
    assert adapted["test/base/acc"] >= zero_shot["base"] + 10
