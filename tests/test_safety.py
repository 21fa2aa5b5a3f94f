"""No code runs from a file a user was given, and a bad file ends in one line (issue 10 §2, §3, §6).

Every entry point that reads a user's file (`--ckpt_path` of fit and test, `export --ckpt`, a
`pretrained` file, RAda's `init_checkpoint`) gets three crafted files whose loading would create a
marker file: a plain pickle, torch's zip format with a malicious data.pkl, and a TorchScript archive
whose `__setstate__` writes the marker with `aten::save` when `torch.jit.load` reads it.
"""

import functools
import pickle
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from doubles import QUIET, one_line_error
from lightning import Trainer

from clipadapt.cli import main
from clipadapt.data import write_synthetic
from clipadapt.data.templates import templates_for
from clipadapt.errors import ClipAdaptError
from clipadapt.methods import CLIPCITE, Adapt, LinearProbe, RAda
from clipadapt.models import CLIPBackbone
from clipadapt.models.prompts import CompactPrompts

REPO = Path(__file__).resolve().parents[1]
TINY = {"arch": "clipadapt-tiny", "pretrained": None}
KINDS = ("pickle", "zip", "torchscript")


class Payload:
    """What a crafted pickle carries: a call that creates the marker file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return exec, (f"open({self.marker!r}, 'w').close()",)


class ScriptedPayload(torch.nn.Module):
    """A TorchScript module whose `__setstate__` (run by torch.jit.load) writes a file of its choosing."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return self.weight, self.marker, self.training

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight, self.marker, self.training = state[0], state[1], state[2]
        torch.ops.aten.save(state[0], state[1])


def crafted(kind: str, folder: Path) -> tuple[Path, Path]:
    """A crafted file of `kind` and the marker that its loading would create."""
    marker, path = folder / f"marker-{kind}", folder / f"evil-{kind}.ckpt"
    checkpoint = {"state_dict": Payload(marker), "clipadapt": {"class_path": "clipadapt.methods.zeroshot.LinearProbe"}}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(checkpoint))
    elif kind == "zip":
        torch.save(checkpoint, path)
    else:
        torch.jit.save(torch.jit.script(ScriptedPayload(str(marker))), str(path))
    assert not marker.exists()
    return path, marker


def demo_args(root: Path, *extra: str) -> list[str]:
    """The tiny linear-probe config with its output and data under `root`."""
    return [
        *("--config", str(REPO / "configs" / "linear_probe_fewshot.yaml"), "--config", str(REPO / "configs/tiny.yaml")),
        *("--data.root", str(root / "data"), "--data.cache_dir", str(root / "cache")),
        *("--trainer.default_root_dir", str(root / "out"), "--trainer.max_epochs", "1"),
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine checkpoint of `clipadapt fit` (tiny linear probe, one epoch), under a root that holds its data."""
    root = tmp_path_factory.mktemp("fitted")
    write_synthetic(root / "data", "oxford_pets")
    main(["fit", *demo_args(root)])
    (ckpt,) = root.glob("out/lightning_logs/version_0/checkpoints/*.ckpt")
    return ckpt


# ---- §3: crafted files at every entry point ----


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", ["fit", "test"])
def test_crafted_ckpt_path_runs_nothing(command: str, kind: str, tmp_path: Path):
    path, marker = crafted(kind, tmp_path)
    message = one_line_error([command, *demo_args(tmp_path, "--ckpt_path", str(path))])
    assert str(path) in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_export_runs_nothing(kind: str, tmp_path: Path):
    path, marker = crafted(kind, tmp_path)
    message = one_line_error(["export", "--ckpt", str(path), "--out", str(tmp_path / "out.pt")])
    assert str(path) in message
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_pretrained_file_runs_nothing(kind: str, data_root: Path, tmp_path: Path):
    path, marker = crafted(kind, tmp_path)
    args = demo_args(tmp_path, "--data.root", str(data_root), "--model.init_args.pretrained", str(path))
    assert str(path) in one_line_error(["fit", *args])
    assert not marker.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_crafted_init_checkpoint_runs_nothing(kind: str, data_root: Path, tmp_path: Path):
    path, marker = crafted(kind, tmp_path)
    args = [
        *("--config", str(REPO / "configs" / "rada_base2novel.yaml"), "--config", str(REPO / "configs/tiny.yaml")),
        *("--data.root", str(data_root), "--data.dataset", "oxford_pets", "--data.cache_dir", str(tmp_path / "c")),
        *("--trainer.default_root_dir", str(tmp_path / "out"), "--model.init_args.init_checkpoint", str(path)),
    ]
    assert str(path) in one_line_error(["fit", *args])
    assert not marker.exists()


def test_crafted_archive_is_read_as_data_by_the_backbone(tmp_path: Path):
    path, marker = crafted("torchscript", tmp_path)
    with pytest.raises(ClipAdaptError, match="TorchScript archive"):
        CLIPBackbone("clipadapt-tiny", pretrained=str(path))
    assert not marker.exists()


# ---- §3: genuine files still load, with weights_only=True ----


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")  # torch.jit deprecation notices
def test_traced_half_precision_archive_loads_as_data(tmp_path: Path):
    # OpenAI's archives are traced fp16 models; torch.jit.load is never called on them.
    source = open_clip.create_model("clipadapt-tiny").eval()
    images, tokens = torch.randn(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long)
    source.half().float()  # weights that fp16 holds exactly
    traced = torch.jit.trace_module(source, {"forward": (images, tokens)}, strict=False, check_trace=False)
    traced = traced.half()
    torch.jit.save(traced, str(tmp_path / "ViT-tiny.pt"))
    loaded = CLIPBackbone("clipadapt-tiny", pretrained=str(tmp_path / "ViT-tiny.pt"))
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor.half().float()), name


def test_checkpoint_of_a_python_built_method_loads_with_weights_only(tiny_data, tmp_path: Path):
    sgd = functools.partial(torch.optim.SGD, lr=0.1)  # pickled by reference: refused by weights_only=True
    model = LinearProbe(tiny_data.classnames, tiny_data.templates, **TINY, optimizer=sgd)
    fit_one_step(model, tiny_data, tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert "optimizer" not in checkpoint["hyper_parameters"]  # left out, as Lightning leaves out lambdas
    assert checkpoint["hyper_parameters"]["classnames"] == tiny_data.classnames


def test_pretrained_file_that_is_not_weights_is_one_line(data_root: Path, tmp_path: Path):
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 8)
    torch.save({"epoch": 3}, tmp_path / "no-tensors.pt")
    tiny = CLIPBackbone("clipadapt-tiny", pretrained=None).model.state_dict()
    torch.save({k: v for k, v in tiny.items() if k != "logit_scale"}, tmp_path / "incomplete.pt")
    for name, reason in [("random.pt", "not a PyTorch checkpoint"), ("no-tensors.pt", "not a state dict of tensors")]:
        args = demo_args(tmp_path, "--data.root", str(data_root), "--model.init_args.pretrained", str(tmp_path / name))
        assert reason in one_line_error(["fit", *args])
    args = demo_args(
        tmp_path, "--data.root", str(data_root), "--model.init_args.pretrained", str(tmp_path / "incomplete.pt")
    )
    assert "does not fit arch 'clipadapt-tiny'" in one_line_error(["fit", *args])


# ---- §2: --ckpt_path of another method, and model flags that the checkpoint would replace ----


def test_ckpt_path_of_another_method_is_refused(fitted: Path, tmp_path: Path):
    args = demo_args(fitted.parents[4], "--ckpt_path", str(fitted))
    args[1] = str(REPO / "configs" / "ast_fewshot.yaml")
    message = one_line_error(["fit", *args])
    assert "clipadapt.methods.zeroshot.LinearProbe" in message and "clipadapt.methods.clip_ast.CLIPAST" in message


def test_model_flag_that_would_not_take_effect_is_refused(fitted: Path):
    root = fitted.parents[4]
    warmup = ["--model.init_args.warmup_epochs", "3"]
    assert "model.init_args.warmup_epochs=3.0 (checkpoint: 1.0)" in one_line_error(
        ["test", *demo_args(root, "--ckpt_path", str(fitted), *warmup)]
    )
    # resuming a fit keeps every argument of the run: even a test-time one is refused there
    prompts = one_line_error(
        ["fit", *demo_args(root, "--ckpt_path", str(fitted), "--model.init_args.prompts", "simple")]
    )
    assert "model.init_args.prompts='simple'" in prompts


def test_a_test_time_flag_takes_effect_and_the_rest_comes_from_the_checkpoint(fitted: Path, monkeypatch):
    seen = []
    monkeypatch.setattr("clipadapt.cli.ClipAdaptCLI.after_test", lambda cli: seen.append(cli.model), raising=False)
    root = fitted.parents[4]
    main(["test", *demo_args(root, "--ckpt_path", str(fitted), "--model.init_args.prompts", "simple")])
    (model,) = seen
    assert model.hparams.prompts == "simple"
    assert model.hparams.warmup_epochs == 1.0  # not given: the checkpoint's, without an error
    # the test run's config.yaml records what was evaluated
    config = yaml.safe_load(sorted((root / "out" / "lightning_logs").glob("version_*/config.yaml"))[-1].read_text())
    assert config["model"]["init_args"]["prompts"] == "simple"


def test_ckpt_path_with_arguments_this_version_lacks_is_one_line(fitted: Path, tmp_path: Path):
    checkpoint = torch.load(fitted, weights_only=True)
    checkpoint["hyper_parameters"]["renamed_arg"] = 3  # as a checkpoint of another clipadapt version
    torch.save(checkpoint, tmp_path / "old.ckpt")
    message = one_line_error(["test", *demo_args(fitted.parents[4], "--ckpt_path", str(tmp_path / "old.ckpt"))])
    assert "LinearProbe does not take (renamed_arg)" in message


def test_init_checkpoint_without_an_adapter_is_one_line(fitted: Path, tmp_path: Path):
    args = [
        *("--config", str(REPO / "configs" / "rada_base2novel.yaml"), "--config", str(REPO / "configs/tiny.yaml")),
        *("--data.root", str(fitted.parents[4] / "data"), "--data.dataset", "oxford_pets"),
        *("--trainer.default_root_dir", str(tmp_path), "--model.init_args.init_checkpoint", str(fitted)),
    ]
    assert "holds no RAda adapter of this shape" in one_line_error(["fit", *args])


@pytest.fixture(scope="module")
def cite_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLIP-CITE checkpoint saved during fit (fine-tuned weights, not yet ensembled), trained with α = 0.5."""
    root = tmp_path_factory.mktemp("cite")
    write_synthetic(root / "data", "oxford_pets")
    main(["fit", *cite_args(root, "--test_after_fit", "false")])
    (ckpt,) = root.glob("out/lightning_logs/version_0/checkpoints/*.ckpt")
    return ckpt


def cite_args(root: Path, *extra: str) -> list[str]:
    args = demo_args(root, "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "0", *extra)
    args[1] = str(REPO / "configs" / "cite_fewshot.yaml")
    return args


def test_cite_ensemble_alpha_at_test_time_takes_effect(cite_checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    seen = []
    monkeypatch.setattr("clipadapt.cli.ClipAdaptCLI.after_test", lambda cli: seen.append(cli.model), raising=False)
    main(["test", *cite_args(cite_checkpoint.parents[4], "--ckpt_path", str(cite_checkpoint))])
    main(["test", *cite_args(cite_checkpoint.parents[4], "--ckpt_path", str(cite_checkpoint), *ALPHA_1)])
    half, one = seen
    finetuned = torch.load(cite_checkpoint, weights_only=True)["state_dict"]
    assert (half.hparams.ensemble_alpha, one.hparams.ensemble_alpha) == (0.5, 1.0)
    # α = 1 keeps the fine-tuned weights exactly (1·θ + 0·θ_zs); the checkpoint's α = 0.5 would not
    weight = "clip.model.visual.proj"
    assert torch.equal(one.state_dict()[weight], finetuned[weight])
    assert not torch.equal(half.state_dict()[weight], finetuned[weight])


ALPHA_1 = ("--model.init_args.ensemble_alpha", "1.0")


def test_cite_ensemble_alpha_of_an_ensembled_checkpoint_is_refused(cite_checkpoint: Path, tmp_path: Path):
    checkpoint = torch.load(cite_checkpoint, weights_only=True)
    checkpoint["state_dict"]["_extra_state"]["weights"] = "ensembled"  # as saved after fit
    torch.save(checkpoint, tmp_path / "final.ckpt")
    args = cite_args(cite_checkpoint.parents[4], "--ckpt_path", str(tmp_path / "final.ckpt"), *ALPHA_1)
    assert "already ensembled with ensemble_alpha=0.5" in one_line_error(["test", *args])


# ---- §6: export writes what open_clip cannot hold beside the weights, and prints lines that work ----


def fit_one_step(model: Any, data: Any, path: Path) -> None:
    # the run folder (masks.json, ...) next to the checkpoint, not in the working directory
    trainer = Trainer(
        **(QUIET | dict(max_epochs=1, limit_train_batches=1, limit_val_batches=0, default_root_dir=path.parent))
    )
    trainer.fit(model, data)
    trainer.save_checkpoint(path)


def exported(ckpt: Path, out: Path, capsys: pytest.CaptureFixture) -> tuple[torch.nn.Module, dict | None, str]:
    """Run `clipadapt export` and evaluate the load lines it prints: (open_clip model, extras or None, output)."""
    main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    printed = capsys.readouterr().out
    loads = [line.removeprefix("load it with: ") for line in printed.splitlines() if line.startswith("load it with: ")]
    model = eval(loads[0], {"open_clip": open_clip})  # noqa: S307 - the line the user is told to run
    extras = None
    if len(loads) > 1:
        namespace = {"torch": torch}
        exec(loads[1], namespace)  # noqa: S102 - `extras = torch.load(...)`, as printed
        extras = namespace["extras"]
    return model.eval(), extras, printed


def test_adapt_export_loads_in_open_clip_and_the_prompts_reproduce_the_model(tiny_data, tmp_path: Path, capsys):
    pruning = dict(max_length=4, target_length=6, prune_per_step=2, accumulate_steps=1, prune_after_epochs=0)
    model = Adapt(tiny_data.classnames, tiny_data.templates, **TINY, **pruning)
    fit_one_step(model, tiny_data, tmp_path / "adapt.ckpt")
    plain, extras, printed = exported(tmp_path / "adapt.ckpt", tmp_path / "adapt.pt", capsys)
    assert "CompactPrompts.from_state(extras)" in printed
    assert extras is not None and all(k.startswith("prompts.") or k == "classnames" for k in extras)

    backbone = CLIPBackbone("clipadapt-tiny", pretrained=str(tmp_path / "adapt.pt")).eval()
    prompts = CompactPrompts.from_state(extras)
    assert sum(sum(n) for n in prompts.lengths.values()) == model.kv_prompts.live() < 16
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        text = backbone.text_features(
            extras["classnames"], templates_for("simple", tiny_data.templates), prompts=prompts
        )
        logits = backbone.logit_scale.exp() * backbone.encode_image(images, prompts=prompts) @ text.T
        expected = model(images)
    # masked prompts (the module) and compact prompts (the export) sum in another order: last-bit differences
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(plain.visual.proj, model.clip.model.visual.proj)


@pytest.mark.parametrize(
    "method, kwargs, keys",
    [
        (LinearProbe, {}, {"head"}),
        (CLIPCITE, {"eval_head": "head"}, {"head"}),
        (RAda, {"setting": "fft", "probe_epochs": 1}, {"head", "adapter."}),
        (RAda, {"setting": "eft"}, {"adapter."}),
    ],
    ids=["linear_probe", "cite_head", "rada_fft", "rada_eft"],
)
def test_export_writes_the_learned_parts_beside_the_weights(method, kwargs, keys, tiny_data, tmp_path: Path, capsys):
    model = method(tiny_data.classnames, tiny_data.templates, **TINY, **kwargs)
    fit_one_step(model, tiny_data, tmp_path / "m.ckpt")
    plain, extras, printed = exported(tmp_path / "m.ckpt", tmp_path / "m.pt", capsys)
    assert extras is not None and extras["classnames"] == tiny_data.classnames
    assert {k if k == "head" else k.split(".")[0] + "." for k in extras if k != "classnames"} == keys
    model.eval()
    if "head" in keys:
        assert "normalize(extras['head'])" in printed
        images = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            logits = plain.logit_scale.exp() * F.normalize(plain.encode_image(images), dim=-1)
            logits = logits @ F.normalize(extras["head"], dim=-1).T
            text = model.class_embeddings(tiny_data.classnames, tiny_data.templates)
            if method is not RAda:  # RAda's adapter masks R: the head alone is not its classifier
                torch.testing.assert_close(logits, model.classify(images, text), rtol=1e-5, atol=1e-5)
            assert torch.equal(F.normalize(extras["head"], dim=-1), text)
    if "adapter." in keys:
        assert all(torch.equal(extras[f"adapter.{k}"], v) for k, v in model.adapter.state_dict().items())


def test_export_of_a_method_that_adds_nothing_writes_only_the_weights(fitted: Path, tmp_path: Path, capsys):
    checkpoint = torch.load(fitted, weights_only=True)
    checkpoint["clipadapt"]["class_path"] = "clipadapt.methods.zeroshot.ZeroShotCLIP"
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k != "head"}
    torch.save(checkpoint, tmp_path / "zs.ckpt")
    _, extras, printed = exported(tmp_path / "zs.ckpt", tmp_path / "zs.pt", capsys)
    assert extras is None and not (tmp_path / "zs.extras.pt").exists() and "extras" not in printed
