"""`compile`: the towers' plain paths through torch.compile equal eager, keep the state dict, fail clearly.

Compiling costs seconds to tens of seconds even for the tiny model on a loaded CPU, so every test that
compiles is `slow` (make test-slow); the fast suite keeps the one check that compiles nothing.
"""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

from clipadapt import checkpoints
from clipadapt.cli import main
from clipadapt.data import write_synthetic
from clipadapt.data.readers import resolve_dataset
from clipadapt.errors import ClipAdaptError
from clipadapt.methods import METHODS
from clipadapt.models import CLIPBackbone
from clipadapt.models import backbone as backbone_module

REPO = Path(__file__).resolve().parents[1]
# fp32 reassociation only (inductor fuses and reorders the same ops): measured ~2e-7 on the tiny towers.
TOLERANCE = 2e-5


def pair(attention: str = "module") -> tuple[CLIPBackbone, CLIPBackbone]:
    eager = CLIPBackbone("clipadapt-tiny", None, attention=attention)
    compiled = CLIPBackbone("clipadapt-tiny", None, attention=attention, compile="default")
    compiled.load_state_dict(eager.state_dict())
    return eager, compiled


def test_compile_is_validated_keeps_the_state_dict_and_names_a_missing_compiler(monkeypatch):
    with pytest.raises(ValueError, match="compile must be one of off, default"):
        CLIPBackbone("clipadapt-tiny", None, compile="fast")
    eager, compiled = pair()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no `_orig_mod.`: functions are compiled
    method = METHODS["ZeroShotCLIP"](["a", "b"], ["a photo of a {}."], arch="clipadapt-tiny", pretrained=None,
                                     compile="default")  # fmt: skip
    assert method.clip.compile_mode == "default" and not any("_orig_mod" in k for k in method.state_dict())
    monkeypatch.setattr(backbone_module, "_COMPILERS_OK", set())
    monkeypatch.setattr(backbone_module.shutil, "which", lambda name: None)
    with pytest.raises(ClipAdaptError, match="needs a C\\+\\+ compiler.*compile: off"):
        compiled.encode_image(torch.randn(1, 3, 32, 32))
    assert eager.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, eager.embed_dim)  # off never looks


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["module", "sdpa"])
def test_compiled_towers_equal_eager_forward_and_gradients(attention):
    eager, compiled = pair(attention)
    images = torch.randn(4, 3, 32, 32)
    sentences = [["a cat"] * 5, ["a small dark cat on a mat"] * 3, ["a dog", "a big brown dog"] * 4]
    with torch.no_grad():
        for batch in (4, 3, 2):  # the second shape recompiles with a symbolic batch, the third reuses it
            diff = compiled.encode_image(images[:batch]) - eager.encode_image(images[:batch])
            assert diff.abs().max() < TOLERANCE
        for texts in sentences:  # class counts and truncated lengths vary per evaluation set
            tokens = eager.tokenize(texts)
            assert (compiled.encode_text(tokens) - eager.encode_text(tokens)).abs().max() < TOLERANCE
        graphs = counters["stats"]["unique_graphs"]
        tokens = eager.tokenize(["one more set", "of other classes", "and lengths", "x", "y", "z", "w"])
        assert (compiled.encode_text(tokens) - eager.encode_text(tokens)).abs().max() < TOLERANCE
        assert counters["stats"]["unique_graphs"] == graphs, "a new evaluation set compiled again"
        embeddings, eot = eager.token_embeddings(tokens), eager.eot_positions(tokens)
        diff = compiled.encode_text_embeddings(embeddings, eot) - eager.encode_text_embeddings(embeddings, eot)
        assert diff.abs().max() < TOLERANCE
    # Trainable towers (CLIP-AST, FT), with open_clip's gradient checkpointing on in the image tower.
    grads = []
    for clip in (eager, compiled):
        clip.requires_grad_(True).train()
        clip.model.visual.set_grad_checkpointing(True)
        loss = clip.encode_image(images).square().sum() + clip.encode_text(eager.tokenize(sentences[1])).sum()
        grads.append(torch.autograd.grad(loss, list(clip.parameters()), allow_unused=True))
    for (name, _), a, b in zip(eager.named_parameters(), *grads, strict=True):
        assert (a is None) == (b is None), name
        if a is not None:
            assert (a - b).abs().max() < TOLERANCE * max(1.0, a.abs().max().item()), name


@pytest.mark.slow
def test_fit_with_compile_trains_checkpoints_and_exports_plain_keys(tmp_path: Path):
    write_synthetic(tmp_path / "data", resolve_dataset("oxford_pets"))
    graphs = counters["stats"]["unique_graphs"]
    main(
        ["fit", "--config", str(REPO / "configs" / "ast_fewshot.yaml"), "--config", str(REPO / "configs" / "tiny.yaml")]
        + ["--data.root", str(tmp_path / "data"), "--data.cache_dir", str(tmp_path / "cache")]
        + ["--trainer.default_root_dir", str(tmp_path), "--model.init_args.compile", "default"]
    )
    # CLIP-AST's stages (a probe, then selected units) train different subsets: a few graphs, not one per step.
    compiled = counters["stats"]["unique_graphs"] - graphs
    assert 2 <= compiled <= 16, compiled
    (run,) = sorted((tmp_path / "lightning_logs").glob("version_*"))
    metrics = yaml.safe_load((run / "test_metrics.json").read_text())
    assert any(k.endswith("/acc") for k in metrics)
    (ckpt,) = run.glob("checkpoints/*.ckpt")
    state = checkpoints.read_checkpoint(ckpt)["state_dict"]
    assert state and not any("_orig_mod" in key for key in state)
    main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported.pt")])
    exported = torch.load(tmp_path / "exported.pt", weights_only=True)
    assert list(exported) == list(CLIPBackbone("clipadapt-tiny", None).model.state_dict())


@pytest.mark.slow
def test_gpu_check_times_the_compiled_image_tower_without_the_methods(tmp_path: Path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    small = ["--arch", "clipadapt-tiny", "--device", "cpu", "--precision", "32-true", "--batch-size", "2",
             "--eval-batch-size", "4", "--iters", "1", "--warmup", "1"]  # fmt: skip
    report = gpu_check.main([*small, "--methods", "--compile", "default", "--out", str(tmp_path / "compile.json")])
    line = report["compile"]
    assert report["methods"] == {} and line["mode"] == "default" and line["first_call_s"] > 0
    assert line["eager_eval_images_per_s"] > 0 and line["compiled_eval_images_per_s"] > 0
    assert line["max_abs_diff"] < TOLERANCE
