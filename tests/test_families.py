"""Any open_clip backbone: timm image towers, ResNet CLIP, SigLIP-style towers, a model config of one's own.

Tiny random-init configs of each family (clipadapt/models/configs/): parity with open_clip's own
encoders, the seams refused in one line, CLIP-AST's units from any tower's blocks, every supported
method through the CLI; hf-hub: / local-dir: / model_config names offline; real architectures (slow).
"""

import importlib.util
import json
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from doubles import one_line_error
from huggingface_hub import constants as hf_constants
from safetensors.torch import save_file

from clipadapt.cli import main
from clipadapt.data import write_synthetic
from clipadapt.errors import ClipAdaptError
from clipadapt.methods import CLIPAST, FT, Adapt, CLIPAdapter, CLIPLoRA, CoOp, ZeroShotCLIP
from clipadapt.models import CLIPBackbone, PretrainedWeightsUnavailableError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "clipadapt" / "models" / "configs"
TINY_YAML = str(REPO / "configs" / "tiny.yaml")
# family -> (arch, image size, image tower native, text tower native)
FAMILIES = {
    "timm": ("clipadapt-tiny-timm", 160, False, False),
    "resnet": ("clipadapt-tiny-rn", 32, False, True),
    "sigmoid": ("clipadapt-tiny-sigmoid", 32, True, False),
}
PROMPTS = ["a photo of a cat.", "x", "a centered satellite photo of annual crop land.", ""]
CLOSED_PORT_TEMPLATE = "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"
# The methods that need only encode_image / encode_text, as shipped configs (zero-shot has nothing to fit).
SUPPORTED = ["zeroshot", "linear_probe_fewshot", "rada_base2novel", "cite_fewshot", "ast_fewshot"]
# ... and the other methods that need no seam of these towers (on oxford_pets, whatever the config's dataset).
ALSO = ["clip_adapter_fewshot", "tip_adapter_f_fewshot", "tip_adapter_fewshot", "lpft_imagenet_ood", "rada_ttt"]
ALSO += ["rada_fft_imagenet", "wiseft_imagenet_ood"]
FAST = ["--trainer.max_epochs", "1", "--data.num_shots", "1"]
SUBSETS = ("all", "base", "novel")


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", CLOSED_PORT_TEMPLATE)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_synthetic(root, "oxford_pets")
    return root


def _run(config: str, root: Path, tmp_path: Path, *flags: str) -> dict:
    """One shipped config through the CLI on the tiny overlay; the run's test metrics."""
    spec = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())
    test_only = spec["model"]["class_path"].endswith(("ZeroShotCLIP", "TipAdapter"))
    test_only |= spec["model"]["init_args"].get("setting") == "ttt"  # test-time training: `clipadapt test`
    main(
        ["test" if test_only else "fit", "--config", str(REPO / "configs" / f"{config}.yaml"), "--config", TINY_YAML]
        + ["--data.root", str(root), "--data.cache_dir", str(tmp_path / "cache")]
        + ["--trainer.default_root_dir", str(tmp_path), *flags]
    )
    (run,) = sorted((tmp_path / "lightning_logs").glob("version_*"))
    return json.loads((run / "test_metrics.json").read_text())


# ---- the backbone on each family ----


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_encoders_are_open_clips_own(family: str, train: bool) -> None:
    arch, size, image_native, text_native = FAMILIES[family]
    clip = CLIPBackbone(arch, pretrained=None, attention="module").train(train)  # bit-exact on its native tower
    assert not clip.native
    assert (clip.image_native, clip.text_native, clip.image_size, clip.embed_dim) == (
        image_native,
        text_native,
        size,
        32,
    )
    images, tokens = torch.randn(2, 3, size, size), clip.tokenize(PROMPTS)
    torch.manual_seed(0)
    with torch.set_grad_enabled(train):
        assert torch.equal(clip.encode_image(images), clip.model.encode_image(images, normalize=True))
        assert torch.equal(clip.encode_text(tokens, truncate=False), clip.model.encode_text(tokens, normalize=True))
        # SigLIP-style: scale·cos + bias, what open_clip's own get_logits computes.
        expected = clip.model.get_logits(images, tokens)[0]
        logits = clip.logits(clip.encode_image(images), clip.encode_text(tokens, truncate=False))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-6)


def test_the_logit_bias_enters_the_base_classifier() -> None:
    clip = CLIPBackbone("clipadapt-tiny-sigmoid", pretrained=None).eval()
    assert clip.logit_bias is not None and clip.logit_bias.item() == -10.0
    images, text = torch.randn(2, 3, 32, 32), clip.text_features(["cat", "dog"], ["a photo of a {}."])
    plain = clip.logit_scale.exp() * clip.encode_image(images) @ text.T
    torch.testing.assert_close(clip.logits(clip.encode_image(images), text), plain - 10.0)
    assert CLIPBackbone("clipadapt-tiny", pretrained=None).logit_bias is None


@pytest.mark.parametrize("method", [ZeroShotCLIP, CLIPAdapter, FT])
def test_classifiers_equal_open_clips_own_logits_with_the_bias(method: type) -> None:
    classes, template = ["cat", "dog", "sea turtle"], "a photo of a {}."
    extra = {"residual_ratio": 0.0} if method is CLIPAdapter else {}  # the adapter's share 0: CLIP's own features
    module = method(classes, [template], arch="clipadapt-tiny-sigmoid", pretrained=None, prompts="dataset", **extra)
    module.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = module.clip.model.get_logits(images, module.clip.tokenize([template.format(c) for c in classes]))[0]
        torch.testing.assert_close(module(images), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_seams_of_other_towers_fail_in_one_line(family: str) -> None:
    arch, size, image_native, text_native = FAMILIES[family]
    clip = CLIPBackbone(arch, pretrained=None)
    if not image_native:
        with pytest.raises(ClipAdaptError, match=f"native open_clip ViT.*{arch} has a .* image tower"):
            clip.encode_image(torch.randn(1, 3, size, size), deep=[torch.zeros(2, 8)])
        with pytest.raises(ClipAdaptError, match="image layer loop"):
            clip.blocks("image")
    if not text_native:
        with pytest.raises(ClipAdaptError, match=f"own text transformer.*{arch} has a separate"):
            clip.encode_text_embeddings(torch.zeros(1, 4, 32), torch.tensor([3]))
    with pytest.raises(ClipAdaptError, match=f"^Adapt needs .*; {arch} has ") as error:
        Adapt(["cat", "dog"], ["a photo of a {}."], arch=arch, pretrained=None)
    assert "\n" not in str(error.value)


def test_coop_runs_on_a_resnet_but_not_on_a_separate_text_tower() -> None:
    classes, templates = ["cat", "dog"], ["a photo of a {}."]
    coop = CoOp(classes, templates, arch="clipadapt-tiny-rn", pretrained=None, n_ctx=2)
    assert coop(torch.randn(2, 3, 32, 32)).shape == (2, 2)  # learned context in RN CLIP's native text tower
    with pytest.raises(ClipAdaptError, match="^CoOp needs open_clip's own text transformer"):
        CoOp(classes, templates, arch="clipadapt-tiny-timm", pretrained=None)


def test_lora_needs_the_layer_loop_of_the_towers_it_tunes() -> None:
    classes, templates = ["cat", "dog"], ["a photo of a {}."]
    lora = CLIPLoRA(classes, templates, arch="clipadapt-tiny-rn", pretrained=None, encoders="text")
    assert lora(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(ClipAdaptError, match="^CLIPLoRA needs a native open_clip ViT image tower"):
        CLIPLoRA(classes, templates, arch="clipadapt-tiny-rn", pretrained=None, encoders="both")


def test_tower_blocks_of_each_family() -> None:
    timm_ = CLIPBackbone("clipadapt-tiny-timm", pretrained=None)
    depth = len(timm_.model.visual.trunk.blocks)
    assert [p for p, _ in timm_.tower_blocks("image")] == [f"visual.trunk.blocks.{i}." for i in range(depth)]
    assert [p for p, _ in timm_.tower_blocks("text")] == [
        "text.transformer.resblocks.0.",
        "text.transformer.resblocks.1.",
    ]
    rn = CLIPBackbone("clipadapt-tiny-rn", pretrained=None)
    assert [p for p, _ in rn.tower_blocks("image")] == [f"visual.layer{i}.0." for i in (1, 2, 3, 4)]
    assert [p for p, _ in rn.tower_blocks("text")] == ["transformer.resblocks.0.", "transformer.resblocks.1."]
    native = CLIPBackbone("clipadapt-tiny", pretrained=None)
    assert native.native and [m for _, m in native.tower_blocks("image")] == list(native.blocks("image"))


def test_ast_units_are_the_tensors_of_each_block_of_any_tower() -> None:
    ast = CLIPAST(["cat", "dog"], ["a photo of a {}."], arch="clipadapt-tiny-rn", pretrained=None, top_k=2)
    image = [u for u in ast.units if u.encoder == "image"]
    bottleneck = dict(ast.clip.model.visual.layer2[0].named_parameters())
    assert [u.kind for u in image if u.block == 1] == list(bottleneck)  # every tensor of the second bottleneck
    assert {u.block for u in image} == {0, 1, 2, 3}
    assert not any(u.param.startswith(("visual.conv1", "visual.attnpool")) for u in ast.units)  # stem, pool: not blocks
    text = [u.name for u in ast.units if u.encoder == "text"]
    native = CLIPAST(["cat", "dog"], ["a photo of a {}."], arch="clipadapt-tiny", pretrained=None, top_k=2)
    assert text == [u.name for u in native.units if u.encoder == "text"]  # the same text tower, the same units


# ---- every supported method through the CLI, Adapt refused ----


@pytest.mark.parametrize("config", SUPPORTED)
@pytest.mark.parametrize("family", FAMILIES)
def test_supported_methods_run_through_the_cli(family: str, config: str, synthetic: Path, tmp_path: Path) -> None:
    arch, size, _, _ = FAMILIES[family]
    flags = ["--model.init_args.arch", arch, "--data.image_size", str(size), *FAST]
    metrics = _run(config, synthetic, tmp_path, *flags)
    accs = [v for k, v in metrics.items() if k.endswith("/acc")]
    assert accs and all(0 <= v <= 100 for v in accs)
    if config == "ast_fewshot":  # the probe scored and picked tensors of this tower's own blocks
        (selection,) = tmp_path.glob("lightning_logs/version_*/selection.json")
        chosen = json.loads(selection.read_text())["selected"]
        blocks = {"timm": "visual.trunk.blocks.", "resnet": "visual.layer", "sigmoid": "text.transformer.resblocks."}
        assert any(name.startswith(blocks[family]) for name in chosen)


# Each on one family in turn: they differ from the methods above only in what they do with the features.
@pytest.mark.parametrize(("family", "config"), [(list(FAMILIES)[i % 3], c) for i, c in enumerate(ALSO)])
def test_the_other_encoder_only_methods_run_through_the_cli(
    family: str, config: str, synthetic: Path, tmp_path: Path
) -> None:
    arch, size, _, _ = FAMILIES[family]
    flags = ["--model.init_args.arch", arch, "--data.image_size", str(size), *FAST]
    flags += ["--data.dataset", "oxford_pets", "--data.eval_sets", "[all]", "--data.subsample", "all"]
    metrics = _run(config, synthetic, tmp_path, *flags)
    accs = [v for k, v in metrics.items() if k.endswith("/acc")]
    assert accs and all(0 <= v <= 100 for v in accs), metrics


@pytest.mark.parametrize("family", FAMILIES)
def test_adapt_fails_in_one_line_through_the_cli(family: str, synthetic: Path, tmp_path: Path) -> None:
    arch, size, _, _ = FAMILIES[family]
    message = one_line_error(
        ["fit", "--config", str(REPO / "configs" / "adapt_fewshot.yaml"), "--config", TINY_YAML]
        + ["--model.init_args.arch", arch, "--data.image_size", str(size), "--data.root", str(synthetic)]
        + ["--trainer.default_root_dir", str(tmp_path)]
    )
    assert "Adapt needs" in message and f"{arch} has" in message


# ---- names: a model config of one's own, local-dir:, hf-hub: ----


def _own_config(tmp_path: Path, name: str = "my-resnet-clip") -> tuple[Path, Path]:
    """A model config JSON of one's own (a small ResNet CLIP) and a random-init weights file of it."""
    config = json.loads((CONFIGS / "clipadapt-tiny-rn.json").read_text())
    config["vision_cfg"]["width"] = 16
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    torch.manual_seed(1)
    weights = tmp_path / "weights.safetensors"
    source = CLIPBackbone(pretrained=None, model_config=str(path))
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(weights))
    return path, weights


def test_a_model_config_of_ones_own_with_local_weights(tmp_path: Path, no_hub: None) -> None:
    path, weights = _own_config(tmp_path)
    clip = CLIPBackbone("ViT-B-16", pretrained=str(weights), model_config=str(path))  # arch: the file's stem
    assert clip.arch == "my-resnet-clip" and clip.model.visual.layer1[0].conv1.in_channels == 16
    stored = open_clip.create_model("my-resnet-clip", pretrained=str(weights))  # registered with open_clip
    assert all(
        torch.equal(a, b) for a, b in zip(clip.model.state_dict().values(), stored.state_dict().values(), strict=True)
    )


def test_bad_model_configs_fail_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ClipAdaptError, match="does not exist"):
        CLIPBackbone(pretrained=None, model_config=str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ClipAdaptError, match="not JSON"):
        CLIPBackbone(pretrained=None, model_config=str(tmp_path / "broken.json"))
    (tmp_path / "partial.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ClipAdaptError, match="vision_cfg, text_cfg"):
        CLIPBackbone(pretrained=None, model_config=str(tmp_path / "partial.json"))
    own, _ = _own_config(tmp_path)
    with pytest.raises(ValueError, match="Known tags: none; or pass a local checkpoint file path, or null"):
        CLIPBackbone(pretrained="openai", model_config=str(own))  # the default tag: one's own config has none
    clash = tmp_path / "RN50.json"
    shutil.copy(CONFIGS / "clipadapt-tiny-rn.json", clash)
    with pytest.raises(ClipAdaptError, match="rename the file"):
        CLIPBackbone(pretrained=None, model_config=str(clash))


@pytest.mark.parametrize(
    "config",
    ["zeroshot", "linear_probe_fewshot", "rada_base2novel", "cite_fewshot", "ast_fewshot"]
    + ["clip_adapter_fewshot", "tip_adapter_fewshot", "wiseft_imagenet_ood", "coop_fewshot", "cocoop_base2novel"],
)
def test_own_config_and_weights_run_every_supported_method_offline(
    config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub: None
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, weights = _own_config(tmp_path, "my-offline-clip")
    spec = yaml.safe_load((REPO / "configs" / f"{config}.yaml").read_text())
    for name in {spec["data"]["dataset"], *(s for s in spec["data"].get("eval_sets") or [] if s not in SUBSETS)}:
        write_synthetic(tmp_path / "data", name)
    flags = ["--model.init_args.model_config", str(path), "--model.init_args.pretrained", str(weights), *FAST]
    metrics = _run(config, tmp_path / "data", tmp_path, *flags)
    assert any(k.endswith("/acc") for k in metrics)
    for ckpt in tmp_path.glob("lightning_logs/version_*/checkpoints/*.ckpt"):  # the tuned model, as open_clip's
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported.pt")])
        assert open_clip.create_model("my-offline-clip", pretrained=str(tmp_path / "exported.pt"))


def test_local_dir_and_cached_hf_hub_load_offline(tmp_path: Path, no_hub: None) -> None:
    source = CLIPBackbone("clipadapt-tiny-sigmoid", pretrained=None)
    config = {"model_cfg": json.loads((CONFIGS / "clipadapt-tiny-sigmoid.json").read_text()), "preprocess_cfg": {}}
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    local = CLIPBackbone(f"local-dir:{folder}", pretrained="openai")  # pretrained is ignored, as in open_clip
    assert torch.equal(local.model.logit_bias, source.model.logit_bias) and local.logit_bias is not None
    assert torch.equal(local.model.text.token_embedding.weight, source.model.text.token_embedding.weight)

    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("0" * 40)
    hub = CLIPBackbone("hf-hub:org/tiny", pretrained=None, cache_dir=str(tmp_path / "hub"))
    assert hub.arch == "hf-hub:org/tiny"
    assert torch.equal(hub.model.visual.proj, source.model.visual.proj)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_a_siglip_tokenizer_without_transformers_says_what_to_install() -> None:
    with pytest.raises(ClipAdaptError, match=r"ViT-B-16-SigLIP .*pip install transformers"):
        CLIPBackbone("ViT-B-16-SigLIP", pretrained=None)


def test_weights_trained_with_another_normalisation_are_flagged(tmp_path: Path) -> None:
    config = json.loads((CONFIGS / "clipadapt-tiny-sigmoid.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}})
    )
    with pytest.warns(UserWarning, match=r"mean \(0.5, 0.5, 0.5\).*CLIP's"):
        ZeroShotCLIP(["cat"], ["a {}."], arch=f"local-dir:{tmp_path}", pretrained=None)


def test_uncached_hf_hub_and_bad_local_dir_fail_fast(tmp_path: Path, no_hub: None) -> None:
    with pytest.raises(PretrainedWeightsUnavailableError, match="hf-hub:org/absent.*unreachable"):
        CLIPBackbone("hf-hub:org/absent", pretrained=None, cache_dir=str(tmp_path))
    with pytest.raises(ClipAdaptError, match="no open_clip_config.json"):
        CLIPBackbone(f"local-dir:{tmp_path}", pretrained=None)
    message = one_line_error(
        ["test", "--config", str(REPO / "configs" / "zeroshot.yaml"), "--config", TINY_YAML]
        + ["--model.init_args.arch", "RN5O", "--data.root", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
    )
    assert "Close matches: RN50" in message


# ---- real architectures, random init (heavy on CPU) ----


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["EVA02-B-16", "RN50"])
@pytest.mark.parametrize("config", ["zeroshot", "rada_base2novel"])
def test_real_architectures_run_through_the_cli(arch: str, config: str, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_synthetic(root, "oxford_pets", num_classes=4, train_per_class=2, val_per_class=1, test_per_class=2)
    flags = ["--model.init_args.arch", arch, "--data.image_size", "224", "--data.subsample", "base"]
    flags += ["--data.eval_sets", "[base]", "--data.eval_batch_size", "8", *FAST]
    metrics = _run(config, root, tmp_path, *flags)
    assert 0 <= metrics["test/base/acc"] <= 100
