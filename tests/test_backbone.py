"""CLIPBackbone: bit-exact parity with open_clip, EOT truncation, the ensemble, and weight loading offline."""

import json
import os
import time
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from clipadapt.errors import ClipAdaptError
from clipadapt.models import CLIPBackbone, PretrainedWeightsUnavailableError

TINY = "clipadapt-tiny"
PROMPTS = [
    "a photo of a cat.",
    "x",
    "a photo of a yellow-bellied sapsucker, a type of bird, sitting on a branch in the rain.",
    "a centered satellite photo of annual crop land.",
    "",
]
# Guarantees the download path can never reach the internet, even on a machine that has it.
CLOSED_PORT_TEMPLATE = "http://127.0.0.1:9/{repo_id}/resolve/{revision}/{filename}"


@pytest.fixture(scope="module")
def tiny() -> CLIPBackbone:
    torch.manual_seed(0)
    # open_clip's own blocks: the bit-exact option (the default `sdpa` path is held to a tolerance in test_towers.py)
    return CLIPBackbone(TINY, pretrained=None, attention="module").eval()


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", CLOSED_PORT_TEMPLATE)


def test_tiny_config_is_registered_and_builds_offline(tiny: CLIPBackbone) -> None:
    assert TINY in open_clip.list_models()
    assert (tiny.embed_dim, tiny.image_size, tiny.width_image, tiny.width_text) == (32, 32, 64, 32)
    assert isinstance(tiny.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert all(p.dtype == torch.float32 for p in tiny.parameters())
    assert tiny.logit_scale is tiny.model.logit_scale
    assert tiny.tokenize(PROMPTS).shape == (len(PROMPTS), 77)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-grad"])
def test_image_encoder_is_bit_identical_to_open_clip(tiny: CLIPBackbone, train: bool) -> None:
    images = torch.randn(3, 3, 32, 32)
    tiny.train(train)
    with torch.set_grad_enabled(train):
        assert torch.equal(tiny.encode_image(images, normalize=False), tiny.model.encode_image(images))
        assert torch.equal(tiny.encode_image(images), tiny.model.encode_image(images, normalize=True))
    tiny.eval()


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-grad"])
def test_text_encoder_is_bit_identical_to_open_clip(tiny: CLIPBackbone, train: bool) -> None:
    tokens = tiny.tokenize(PROMPTS)
    tiny.train(train)
    with torch.set_grad_enabled(train):
        ours = tiny.encode_text(tokens, normalize=False, truncate=False)
        assert torch.equal(ours, tiny.model.encode_text(tokens))
        assert torch.equal(tiny.encode_text(tokens, truncate=False), tiny.model.encode_text(tokens, normalize=True))
    tiny.eval()


@pytest.mark.parametrize("prompts", [PROMPTS, PROMPTS[:2], ["x"], ["word " * 100]], ids=["mixed", "short", "one", "77"])
def test_eot_truncation_matches_full_context(tiny: CLIPBackbone, prompts: list[str]) -> None:
    tokens = tiny.tokenize(prompts)
    full = tiny.encode_text(tokens, normalize=False, truncate=False)
    truncated = tiny.encode_text(tokens, normalize=False, truncate=True)
    torch.testing.assert_close(truncated, full, atol=1e-5, rtol=0)
    assert tiny._pooled_length(tokens) == int(tokens.argmax(dim=-1).max()) + 1


def test_truncation_is_skipped_for_a_bidirectional_text_tower(monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = CLIPBackbone(TINY, pretrained=None, attention="module").eval()
    monkeypatch.setattr(backbone.model, "attn_mask", None)  # like SigLIP's text tower: no causal mask
    tokens = backbone.tokenize(PROMPTS[:2])
    assert backbone._pooled_length(tokens) is None
    assert torch.equal(backbone.encode_text(tokens, normalize=False), backbone.model.encode_text(tokens))


def test_text_features_is_the_clip_ensemble(tiny: CLIPBackbone) -> None:
    classnames, templates = ["cat", "dog", "sea turtle"], ["a photo of a {}.", "{} texture.", "art of the {}."]
    per_template = torch.stack(
        [tiny.model.encode_text(tiny.tokenize([t.format(c) for c in classnames]), normalize=True) for t in templates]
    )  # (T, C, D)
    expected = F.normalize(per_template.mean(dim=0), dim=-1)  # (C, D)
    torch.testing.assert_close(tiny.text_features(classnames, templates, chunk_size=2), expected, atol=1e-6, rtol=0)
    single = tiny.text_features(classnames, templates[:1])
    torch.testing.assert_close(single, per_template[0], atol=1e-6, rtol=0)


def test_text_features_carry_gradients_when_enabled(tiny: CLIPBackbone) -> None:
    tiny.zero_grad()
    tiny.text_features(["cat", "dog"], ["a photo of a {}."]).sum().backward()
    assert all(p.grad is not None for _, p in tiny.text_parameters())
    tiny.zero_grad()
    with torch.no_grad():
        assert not tiny.text_features(["cat"], ["a {}."]).requires_grad


def test_parameter_views_split_the_model_by_tower(tiny: CLIPBackbone) -> None:
    image = dict(tiny.image_parameters())
    text = dict(tiny.text_parameters())
    assert all(name.startswith("visual.") for name in image)
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection"} <= text.keys()
    assert set(dict(tiny.model.named_parameters())) - image.keys() - text.keys() == {"logit_scale"}
    assert tiny.blocks("image") is tiny.model.visual.transformer.resblocks
    assert tiny.blocks("text") is tiny.model.transformer.resblocks
    with pytest.raises(ValueError, match="image' or 'text"):
        tiny.blocks("audio")


def _assert_same_outputs(a: CLIPBackbone, b: CLIPBackbone) -> None:
    images, tokens = torch.randn(2, 3, 32, 32), a.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(a.encode_image(images), b.encode_image(images))
        assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))


def test_local_checkpoint_file_round_trips(tiny: CLIPBackbone, tmp_path: Path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    _assert_same_outputs(tiny, CLIPBackbone(TINY, pretrained=str(path), attention="module").eval())


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # torch.jit deprecation notices
def test_openai_torchscript_archive_loads(tmp_path: Path) -> None:
    source = open_clip.create_model(TINY)
    source.attn_mask = None  # OpenAI's JIT archives keep the causal mask out of the state_dict
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(torch.jit.script(source), path)
    loaded = CLIPBackbone(TINY, pretrained=str(path))
    assert torch.equal(loaded.model.visual.proj, source.visual.proj)
    assert torch.equal(loaded.model.token_embedding.weight, source.token_embedding.weight)


def _register_gelu_tiny(tmp_path: Path) -> str:
    """A GELU twin of the tiny config, to see a QuickGELU tag force QuickGELU."""
    config = json.loads((Path(__file__).parents[1] / "clipadapt/models/configs/clipadapt-tiny.json").read_text())
    config["quick_gelu"] = False
    path = tmp_path / "clipadapt-tiny-gelu-test.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return path.stem


def _write_hf_cache(cache: Path, repo_id: str, filename: str, state_dict: dict[str, torch.Tensor]) -> None:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(repo / "snapshots" / commit / filename))


def test_cached_tag_loads_offline_with_the_tags_quickgelu_and_preprocessing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hub: None
) -> None:
    arch = _register_gelu_tiny(tmp_path)
    mean = (0.1, 0.2, 0.3)
    tag = {"hf_hub": "clipadapt/tiny-test/", "quick_gelu": True, "mean": mean, "std": (1.0, 1.0, 1.0)}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, arch, {"cached": tag})
    source = open_clip.create_model(arch, force_quick_gelu=True)
    _write_hf_cache(tmp_path / "hub", "clipadapt/tiny-test", "open_clip_model.safetensors", source.state_dict())

    loaded = CLIPBackbone(arch, pretrained="cached", cache_dir=str(tmp_path / "hub"))
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert torch.equal(loaded.model.visual.proj, source.visual.proj)
    assert tuple(open_clip.get_model_preprocess_cfg(loaded.model)["mean"]) == mean


def test_uncached_tag_fails_fast_with_instructions(tmp_path: Path, no_hub: None) -> None:
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailableError) as error:
        CLIPBackbone("ViT-B-16-quickgelu", pretrained="openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 30
    message = str(error.value)
    for needed in ("'ViT-B-16-quickgelu'", "'openai'", str(tmp_path), "machine with internet", "local checkpoint"):
        assert needed in message
    assert "unreachable" in message


def test_offline_mode_fails_without_touching_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PretrainedWeightsUnavailableError, match="HF_HUB_OFFLINE"):
        CLIPBackbone("ViT-B-16", pretrained="laion2b_s34b_b88k", cache_dir=str(tmp_path))


def test_unknown_names_and_missing_files_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ViT-B-16-quickgelu.*list_models"):
        CLIPBackbone("ViT-B16-quickgelu", pretrained=None)
    with pytest.raises(ValueError, match=r"laion2b_s34b_b88k"):
        CLIPBackbone("ViT-B-16", pretrained="laion2b")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        CLIPBackbone(TINY, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(ClipAdaptError, match="CoCa"):
        CLIPBackbone("coca_ViT-B-32", pretrained=None)


@pytest.mark.pretrained
@pytest.mark.skipif(not os.environ.get("CLIPADAPT_PRETRAINED_FILE"), reason="set CLIPADAPT_PRETRAINED_FILE")
def test_real_weights_parity() -> None:
    arch = os.environ.get("CLIPADAPT_PRETRAINED_ARCH", "ViT-B-16-quickgelu")
    backbone = CLIPBackbone(arch, pretrained=os.environ["CLIPADAPT_PRETRAINED_FILE"], attention="module").eval()
    images = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    tokens = backbone.tokenize(PROMPTS)
    with torch.no_grad():
        assert torch.equal(backbone.encode_image(images, normalize=False), backbone.model.encode_image(images))
        full = backbone.encode_text(tokens, normalize=False, truncate=False)
        assert torch.equal(full, backbone.model.encode_text(tokens))
        torch.testing.assert_close(backbone.encode_text(tokens, normalize=False), full, atol=1e-4, rtol=1e-5)
    # Trained CLIPs end at the clamp, logit_scale.exp() = 100; the random init is 1 / 0.07 = 14.3.
    assert backbone.logit_scale.exp().item() > 50
