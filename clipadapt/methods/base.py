"""AdaptationModule: what every method shares.

The base owns the backbone, the text classifier (built per evaluation set, cached while the text
tower is frozen), the accuracy protocol (one top-1 accuracy per evaluation set, base/novel/HM), the
stage schedule with an optimizer rebuild at each boundary, and the per-step learning-rate schedule.
A method says *which* parameters train in *which* stage (`trainable`), *which* losses
(`training_losses`), how it classifies (`classify`, `class_embeddings`; `class_logits` when its text
depends on the image) and what happens at a stage boundary (`on_stage_end`).

Exact resume: each training step first seeds the global RNG from (run seed, epoch, batch, rank), so
what a step draws (CLIP-LoRA's dropout) is the same in a run resumed from a checkpoint as in the
uninterrupted one; the data stream is seeded the same way (`clipadapt.data.datamodule`).

Chunks of steps (`feature_chunk` > 1, for small batches under a frozen image tower): a training loader
batch holds several optimizer steps' images, encoded in one no-grad forward at the first step's ask;
each step then runs on its rows, seeded as that step of the unchunked run (`_chunked_steps`).

Train features computed once: with `data.train_augment: false` the train split's transform is
deterministic, so while the plain image tower is frozen and computes in training what it computes
in eval mode, a training step's `image_features` of its own images are rows of the whole split's
features, encoded once (`image_features`).

Deviation from Dassl, on purpose: the warmup + cosine schedule is stepped per optimizer step
(Dassl steps per epoch); with few-shot data an epoch is a handful of steps, so the curves differ
only in smoothness.
"""

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple

import lightning as L
import open_clip
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torchmetrics import Metric

from clipadapt.checkpoints import keep_plain
from clipadapt.data.datamodule import CLIP_MEAN, CLIP_STD, ItemKey, seed_torch, stream_seed
from clipadapt.data.templates import templates_for
from clipadapt.errors import ClipAdaptError
from clipadapt.features import FeatureStore, files_digest, set_key, weights_digest
from clipadapt.models import CLIPBackbone


class Stage(NamedTuple):
    """One training stage: its name, length in epochs (-1: until max_epochs), optional lr and schedule length."""

    name: str
    epochs: int = -1
    lr: float | None = None  # overrides the optimizer's lr in this stage
    # The warmup + cosine spans this many epochs instead of the stage's own length: a longer schedule cut
    # where the stage ends (RAda-FT starts from epoch 5 of a 10-epoch probe run, whose lr is not yet 0).
    schedule_epochs: int | None = None


def run_seed(default: int = 0) -> int:
    """The run's global seed (`seed_everything`, which the CLI sets from `data.seed`), else `default`."""
    return int(os.environ.get("PL_GLOBAL_SEED", default))


def harmonic_mean(base: float, novel: float) -> float:
    """HM = 2BN / (B + N), the base-to-novel summary (0 when both are 0)."""
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def _warn_on_other_normalisation(clip: CLIPBackbone) -> None:
    """The data module normalises with CLIP's mean/std; say so when the weights were trained with others (SigLIP)."""
    cfg = open_clip.get_model_preprocess_cfg(clip.model)
    mean, std = tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD))
    if not (
        torch.allclose(torch.tensor(mean), torch.tensor(CLIP_MEAN))
        and torch.allclose(torch.tensor(std), torch.tensor(CLIP_STD))
    ):
        rank_zero_warn(
            f"{clip.arch} was trained with image mean {mean} / std {std}, but clipadapt's data module normalises "
            f"with CLIP's {CLIP_MEAN} / {CLIP_STD}: expect somewhat lower accuracy than with its own normalisation"
        )


def _mode_dependent(module: nn.Module) -> bool:
    """Whether `module` computes otherwise in train than in eval mode: batch statistics, a dropout that drops."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return True
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, nn.MultiheadAttention):
        return module.dropout > 0
    return isinstance(module, open_clip.transformer.PatchDropout) and module.prob > 0


@contextmanager
def as_at_inference(module: nn.Module) -> Iterator[None]:
    """Run `module` in eval mode (no BatchNorm statistics used or updated, no dropout), then restore every flag."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class Top1(Metric):
    """Correct and total counts, summed over ranks: exact top-1 accuracy and the number of images."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        self.correct += (logits.argmax(-1) == labels).sum()
        self.total += labels.numel()

    def compute(self) -> Tensor:
        """(2,) tensor: correct, total."""
        return torch.stack([self.correct, self.total])


class AdaptationModule(L.LightningModule):
    """Shared plumbing for every method; subclasses override the hooks above the marked line."""

    # Arguments that may differ from a checkpoint's when it is evaluated (`clipadapt test --ckpt_path`):
    # they only shape the evaluation. Any other model argument is the checkpoint's (the CLI refuses a change).
    test_time_args: ClassVar[frozenset[str]] = frozenset(
        {"prompts", "pretrained", "attention", "compile", "text_chunk", "feature_chunk"}
    )
    # Towers whose layer seams (K/V or deep prompts, learned text context, low-rank deltas) the method uses:
    # other towers (timm, ResNet, Hugging Face, CustomTextCLIP) are refused at construction, in one line.
    native_towers: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        classnames: list[str],
        templates: list[str],
        arch: str = "ViT-B-16-quickgelu",
        pretrained: str | None = "openai",
        prompts: str = "dataset",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        warmup_epochs: float = 0.0,
        warmup: str = "constant",
        warmup_lr: float = 1e-5,
        schedule: str = "cosine",
        model_config: str | None = None,
        attention: str = "sdpa",
        compile: str = "off",
        text_chunk: int = 0,
        feature_chunk: int = 1,
    ) -> None:
        """
        Args:
            classnames: training classes, prompt-ready (linked from `data.classnames` by the CLI).
            templates: the dataset's own prompt template(s) (linked from `data.templates`).
            arch: open_clip model name (any ViT, ResNet, timm-tower or SigLIP config), `hf-hub:org/repo` or
                `local-dir:PATH`; `clipadapt-tiny` is the bundled test model.
            pretrained: open_clip tag (`openai`, ...), a local checkpoint file, or None (random init); ignored
                for hf-hub: and local-dir:, which bring their own weights.
            prompts: template set for the text classifier: dataset | simple | select7 | imagenet80 | promptsrc60.
            optimizer: built over each stage's trainable parameters.
            warmup_epochs: length of the warmup at the start of every stage (may be fractional).
            warmup: `constant` (Dassl: `warmup_lr` throughout) or `linear` (0 -> lr).
            warmup_lr: the constant warmup learning rate.
            schedule: `cosine` (to 0 at the end of the stage) or `constant`.
            model_config: an open_clip model config JSON of one's own; the model is registered and built under
                the file's stem, which replaces `arch`.
            attention: `sdpa` (the blocks spelled out batch-first over fused scaled-dot-product kernels, oneDNN
                projections on an x86 CPU: equal to open_clip up to float rounding, faster) or `module` (open_clip's
                nn.MultiheadAttention blocks, bit-exact with open_clip). No parameter depends on it.
            compile: `off`, or a torch.compile mode (`default`, `max-autotune-no-cudagraphs`) for the towers' plain
                paths (prompted / low-rank paths stay eager); equal up to rounding, and it pays only on some
                devices and sizes (README "Speed", benchmarks/compile.py). It compiles functions, not modules,
                so checkpoints are unchanged.
            text_chunk: 0 (off), or while the text side trains, encode the classes this many sequences at a
                time, each chunk recomputed in backward (activation checkpointing): text memory follows the
                chunk, not the class count (ImageNet's 1000 classes); equal up to rounding, slower per step.
            feature_chunk: 1 (off), or for a method whose image tower stays frozen in every stage and whose steps
                take its features through `image_features` (RAda EFT, CoCoOp and the other prompt learners of
                the text side, linear probe, CLIP-Adapter): each training loader batch holds this many optimizer
                steps' images, encoded in one no-grad forward; then the steps run on their rows in order
                (`_chunked_steps`). The same samples, order, augmentations, per-step seeds and lr schedule as
                one step per loader batch; features equal up to the float reassociation of the batched forward.
                For small batches (RAda's and CoCoOp's 1), where one-image forwards waste the tower.
        """
        super().__init__()
        self.save_hyperparameters()
        if feature_chunk < 1:
            raise ValueError(f"feature_chunk must be 1 (no chunking) or more, got {feature_chunk}")
        self.automatic_optimization = feature_chunk == 1  # chunks take their optimizer steps themselves
        if warmup not in ("constant", "linear") or schedule not in ("cosine", "constant"):
            raise ValueError(
                f"warmup must be constant|linear and schedule cosine|constant, got {warmup!r}, {schedule!r}"
            )
        templates_for(prompts, templates)  # fail now, not at the first step, on an unknown template set
        self.clip = CLIPBackbone(
            arch, pretrained, model_config=model_config, attention=attention, compile=compile, text_chunk=text_chunk
        ).requires_grad_(False)
        self.clip.require_native(type(self).__name__, self.native_towers)
        _warn_on_other_normalisation(self.clip)
        self.make_optimizer = optimizer
        self.val_acc = Top1()
        self.test_accs = nn.ModuleList()
        self.stage: str | None = None  # set at fit start, or restored from a checkpoint
        self._text_cache: dict[tuple, Tensor] = {}
        self._last_val_acc: float | None = None  # of the last validation outside sanity checks (run_summary)
        self._eval_images: Tensor | None = None  # the images of the evaluation step running now
        self._eval_where: tuple[str, int, int] = ("", 0, 0)  # its split, loader and batch index
        self._feature_store: FeatureStore | None = None
        self._set_keys: dict[tuple, tuple[str, int]] = {}  # (split, loader, normalize) -> (store key, rows)
        self._weights_digest: str | None = None  # of the image tower, once per evaluation epoch
        # Set False to encode every training step even where the train features could be looked up (tests, benchmarks).
        self.lookup_train_features = True
        self._train_images: Tensor | None = None  # the images of the training step running now, if looked up
        self._train_rows: Tensor | None = None  # their rows in the train split
        self._train_seen = 0  # loader batches this epoch so far (a mid-epoch restart disagrees with batch_idx)
        self._train_batches: tuple[int, list[list[int]]] | None = None  # (epoch, its loader batches' rows)
        self._train_sets: dict[bool, Tensor] = {}  # normalize -> (N, D) features of the train split, this stage
        self._step_size: int | None = None  # images per optimizer step when loader batches are chunks of steps
        self._chunk: Tensor | None = None  # the loader batch (a chunk of steps) running now
        self._chunk_features: Tensor | None = None  # its (chunk, D) unnormalized features, once asked for
        self._step_view: tuple[Tensor, slice] | None = None  # the running step's images (a view) and rows

    # ---- what a method says ----

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The training stages in order; the last one runs until `max_epochs`."""
        return (Stage("train"),)

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        """Parameters that train in `stage`; everything else is frozen."""
        # `clipadapt fit` of such a method (zero-shot, training-free, test-time) ends in this one line.
        raise ClipAdaptError(
            f"{type(self).__name__} has nothing to train (it adapts at test time or not at all): "
            "run `clipadapt test` with the same config instead of `clipadapt fit`"
        )

    def training_losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Named, already weighted loss terms; the base sums and logs them."""
        return {"ce": F.cross_entropy(self(images), labels)}

    def classify(self, images: Tensor, text: Tensor) -> Tensor:
        """(B, 3, H, W), (C, D) unit class embeddings -> (B, C) logits (with SigLIP's logit bias when it has one)."""
        return self.clip.logits(self.image_features(images), text)

    def image_features(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, D) features of the plain image tower; a frozen tower's features of a step's own images are encoded once.

        Evaluation steps: once per run (validation every epoch) and, with `data.feature_cache`, once per
        sweep (`clipadapt.features`). Training steps under `data.train_augment: false` (`_train_lookup`).
        Only the step's own images are looked up (not views or crops made from them).
        """
        if self._step_view is not None and images is self._step_view[0]:
            features = self._chunk_rows(self._step_view[1])
            if features is not None:
                return F.normalize(features, dim=-1) if normalize else features
        if images is self._train_images and self._train_rows is not None:
            held = self._train_lookup(normalize)
            if held is not None:
                return held[self._train_rows.to(held.device)].to(images.device)
        if images is not self._eval_images or any(p.requires_grad for _, p in self.clip.image_parameters()):
            return self.clip.encode_image(images, normalize=normalize)
        key, total = self._eval_set_key(normalize)
        if not key:
            return self.clip.encode_image(images, normalize=normalize)
        split, index, batch_idx = self._eval_where
        start = batch_idx * self._eval_loader(split, index).batch_size
        rows = torch.arange(start, start + len(images))
        held = self._feature_store.get(key)
        if held is not None and len(held) == total:
            return held[rows].to(images.device)
        features = self.clip.encode_image(images, normalize=normalize)
        self._feature_store.add_rows(key, total, rows, features)
        return features

    def class_logits(self, images: Tensor, classnames: list[str], templates: list[str]) -> Tensor:
        """(B, C) logits over `classnames`; a method whose text depends on the image (CoCoOp) overrides this."""
        return self.classify(images, self.class_embeddings(classnames, templates))

    def class_embeddings(self, classnames: list[str], templates: list[str]) -> Tensor:
        """(C, D) unit class embeddings; cached while nothing that shapes them trains, else once per evaluation."""
        chosen = templates_for(self.hparams.prompts, templates)
        if self.text_trainable() and not self._evaluating():
            return self.encode_classes(classnames, chosen)  # with grad in training steps
        key = (tuple(classnames), tuple(chosen))
        if key not in self._text_cache:
            with torch.no_grad():
                self._text_cache[key] = self.encode_classes(classnames, chosen).float()
        return self._text_cache[key]

    def head_rows(self, head: Tensor, classnames: list[str]) -> Tensor | None:
        """(C, D) unit rows of a learned (C_train, D) class head for `classnames`; None if one is not a training class.

        The training list itself is scored row by row, by position (ImageNet's list, as open_clip ships it,
        repeats "missile" and "sunglasses"). A subset of the training classes (ImageNet-R's 200 of 1000, base
        of all) is matched by name. A name the training list repeats is matched by order, as subsets keep the
        training order (ImageNet-A/R list sorted wnids, as ImageNet does): between the rows of the nearest
        classes around it, its rows are taken in order when there are as many as the subset has copies of it
        there (ImageNet-R's "missile" is row 657, not 744); otherwise ClipAdaptError rather than a guess.
        Any other class set (novel, cross-dataset) has no trained rows and falls back to the text features.
        """
        train = list(self.hparams.classnames)
        if list(classnames) == train:
            return F.normalize(head, dim=-1)
        where: dict[str, list[int]] = {}
        for i, name in enumerate(train):
            where.setdefault(name, []).append(i)
        if not all(name in where for name in classnames):
            return None
        rows = [where[name][0] if len(where[name]) == 1 else None for name in classnames]
        for j, name in enumerate(classnames):
            if rows[j] is None:
                low = next((r for r in reversed(rows[:j]) if r is not None), -1)
                k = next((i for i in range(j + 1, len(rows)) if rows[i] is not None), len(rows))
                high = rows[k] if k < len(rows) else len(train)
                fits = [i for i in where[name] if low < i < high]
                if len(fits) != classnames[j:k].count(name):  # as many rows as copies up to the next unique name
                    raise ClipAdaptError(
                        f"class {name!r} is {len(where[name])} training classes (rows {where[name]}) and the order "
                        "of this evaluation set does not tell which one it is; make the class names unique in "
                        "the dataset's class list (e.g. classnames.txt)"
                    )
                rows[j] = fits[0]
        return F.normalize(head[rows], dim=-1)

    def encode_classes(self, classnames: list[str], templates: list[str]) -> Tensor:
        """(C, D) unit text features of the classes; a method that feeds the text tower more overrides this."""
        return self.clip.text_features(classnames, templates)

    def text_trainable(self) -> bool:
        """Whether a trainable parameter shapes the text features (then they are not cached across steps)."""
        return any(p.requires_grad for _, p in self.clip.text_parameters())

    def on_stage_end(self, stage: str) -> None:
        """Called at a stage boundary while the old optimizer still exists."""

    def export_state_dict(self) -> dict[str, Tensor]:
        """The adapted model as a plain open_clip state dict (`clipadapt export`)."""
        return self.clip.model.state_dict()

    def method_state(self) -> dict[str, Any]:
        """Method state that is not a tensor of the model (e.g. a selection); saved in checkpoints."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore `method_state()`; runs before the stage's parameters are chosen on resume."""

    def run_summary(self) -> dict[str, Any]:
        """Final facts of the run written into test_metrics.json beside the test metrics; methods add theirs."""
        # The val accuracy lets `clipadapt report --select-by val` choose a grid value without looking at test.
        return {} if self._last_val_acc is None else {"val/acc": self._last_val_acc}

    # ---- shared plumbing: methods do not override below this line ----

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C) logits over the training classes."""
        return self.class_logits(images, self.hparams.classnames, self.hparams.templates)

    def _eval_loader(self, split: str, index: int) -> Any:
        loaders = {"val": self.trainer.val_dataloaders, "test": self.trainer.test_dataloaders,
                   "predict": self.trainer.predict_dataloaders}[split]  # fmt: skip
        return loaders[index] if isinstance(loaders, (list, tuple)) else loaders

    def _eval_set_key(self, normalize: bool) -> tuple[str, int]:
        """Store key and row count of this rank's share of the running evaluation set ("" where it cannot be keyed)."""
        split, index, _ = self._eval_where
        if (split, index, normalize) in self._set_keys:
            return self._set_keys[split, index, normalize]
        loader = self._eval_loader(split, index)
        dataset = getattr(loader, "dataset", None)
        if getattr(loader, "batch_size", None) is None or not hasattr(dataset, "items") or loader.sampler is None:
            self._set_keys[split, index, normalize] = ("", 0)
            return "", 0
        paths = [dataset.items[i].path for i in loader.sampler]  # this rank's rows, in loader order
        key = self._features_key(paths, dataset.transform, normalize)
        self._set_keys[split, index, normalize] = (key, len(paths))
        return key, len(paths)

    def _features_key(self, paths: list[str], transform: Any, normalize: bool) -> str:
        """Store key of the plain tower's features of `paths` under `transform` (`clipadapt.features`)."""
        if self._feature_store is None:
            datamodule = getattr(self.trainer, "datamodule", None)
            self._feature_store = FeatureStore(getattr(datamodule, "feature_cache", None))
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.clip.model.visual)
        precision = str(self.trainer.precision)
        # The tower's code path too: sdpa / module / compiled features agree only up to float rounding.
        path = f"{transform!r}|normalize={normalize}|attention={self.clip.attention}|compile={self.clip.compile_mode}"
        return set_key(self._weights_digest, path, precision, files_digest(paths))

    def split_features(self, dataset: Any, batch_size: int, normalize: bool = True, num_workers: int = 0) -> Tensor:
        """(N, D) features of an evaluation-transform dataset (`ImageList`) in order, via the feature store.

        For a method that encodes a whole deterministic split itself (Tip-Adapter's validation search, its
        cache without augmentation; the train split under `data.train_augment: false`): the same entry as
        the validation loop's, so a run (and, with `data.feature_cache`, a sweep) encodes the split once.
        The image tower must be frozen (it is not looked up otherwise). It runs in eval mode, as in the
        evaluation loops, whatever mode the module is in (a ResNet's BatchNorm uses, and keeps, its
        running statistics).
        """
        key = ""
        if hasattr(dataset, "items") and not any(p.requires_grad for _, p in self.clip.image_parameters()):
            self._weights_digest = None  # taken again: the weights may have changed since the last use
            key = self._features_key([d.path for d in dataset.items], dataset.transform, normalize)
            held = self._feature_store.get(key)
            if held is not None and len(held) == len(dataset):
                return held.to(self.device)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
        with torch.no_grad(), self.trainer.precision_plugin.forward_context(), as_at_inference(self.clip.model.visual):
            features = torch.cat([self.clip.encode_image(x.to(self.device), normalize=normalize) for x, _ in loader])
        if key:
            self._feature_store.put(key, features)
        return features

    def _train_lookup(self, normalize: bool) -> Tensor | None:
        """(N, D) features of the whole train split for this step's lookup, or None where the step must encode.

        Used only while the step's result is the same: no image parameter trains, and the tower computes
        in this step what it computes in eval mode (the split is encoded in eval mode): it is in eval mode
        (RAda), or it is a native ViT with no dropout (BatchNorm in a ResNet tower, a timm tower's dropout or
        drop path: the step encodes). The split is encoded once per stage (a stage may change the weights)
        with the evaluation batch size, so the features equal the step's own up to float reassociation.
        Under DDP every rank encodes the whole split (once) and takes its own shard's rows.
        """
        if not self._tower_as_at_inference():
            return None
        if normalize not in self._train_sets:
            loader, datamodule = self.trainer.train_dataloader, self.trainer.datamodule
            self._train_sets[normalize] = self.split_features(
                loader.dataset, datamodule.eval_batch_size, normalize, num_workers=loader.num_workers
            )
        return self._train_sets[normalize]

    def _tower_as_at_inference(self) -> bool:
        """Whether the image tower is frozen and computes now what it computes in eval mode (its features reusable)."""
        if any(p.requires_grad for _, p in self.clip.image_parameters()):
            return False
        training = [m for m in self.clip.model.visual.modules() if m.training]
        if not training:
            return True
        # Our own layer loop over open_clip's VisionTransformer: its only mode-dependent parts are known.
        return self.clip.image_native and not any(_mode_dependent(m) for m in training)

    def _train_step_rows(self, batch: Any, batch_idx: int) -> Tensor | None:
        """(B,) train-split rows of this loader batch's images where they can be looked up, else None.

        Only under `data.train_augment: false` (a deterministic transform, so an item's pixels are the same
        in every epoch and in the one pass). The rows are the epoch's batches of the loader's own batch
        sampler (set to the epoch before it starts; under DDP each rank's `EpochSampler` shard; with
        `StepChunks` a loader batch is a chunk of steps), listed once per epoch. After a mid-epoch restart
        Lightning's batch_idx counts from the checkpoint while a plain loader starts over: batch_idx
        then disagrees with the batches seen this epoch, and the rest of that epoch encodes.
        """
        datamodule = getattr(self.trainer, "datamodule", None)
        if not self.lookup_train_features or getattr(datamodule, "train_augment", True) is not False:
            return None
        loader = self.trainer.train_dataloader
        if batch_idx != self._train_seen - 1 or not hasattr(getattr(loader, "dataset", None), "items"):
            return None
        if self._train_batches is None or self._train_batches[0] != self.current_epoch:
            batches = list(getattr(loader, "batch_sampler", None) or [])
            keys = all(isinstance(key, ItemKey) for batch in batches for key in batch)
            self._train_batches = (self.current_epoch, [[key.index for key in b] for b in batches] if keys else [])
        batches = self._train_batches[1]
        images = batch[0] if isinstance(batch, (list, tuple)) and batch else None
        if batch_idx >= len(batches) or not isinstance(images, Tensor) or len(images) != len(batches[batch_idx]):
            return None
        return torch.tensor(batches[batch_idx])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # A method that overrides this hook without calling it encodes every training step.
        self._train_seen += 1
        self._train_rows = self._train_step_rows(batch, batch_idx)
        self._train_images = batch[0] if self._train_rows is not None else None

    def _enter_eval_step(self, images: Tensor, split: str, dataloader_idx: int, batch_idx: int) -> None:
        self._eval_images, self._eval_where = images, (split, dataloader_idx, batch_idx)

    def _start_eval_epoch(self) -> None:
        # The weights may have changed since the last evaluation: their digest is taken again, lazily.
        self._weights_digest = None
        self._set_keys.clear()

    def _evaluating(self) -> bool:
        # Inside an evaluation loop nothing trains: its epoch start clears the cache, one encoding serves it.
        trainer = self._trainer
        return trainer is not None and (
            trainer.validating or trainer.testing or trainer.predicting or trainer.sanity_checking
        )

    def _stage_at(self, epoch: int) -> Stage:
        start = 0
        for stage in self.stages:
            if stage.epochs < 0 or epoch < start + stage.epochs:
                return stage
            start += stage.epochs
        return self.stages[-1]

    def _stage_bounds(self, name: str) -> tuple[int, int]:
        """First epoch and number of epochs of stage `name` under the trainer's max_epochs."""
        start = 0
        for stage in self.stages:
            epochs = stage.epochs if stage.epochs >= 0 else self.trainer.max_epochs - start
            if stage.name == name:
                return start, max(epochs, 1)
            start += stage.epochs
        raise KeyError(name)

    def _apply_stage(self, name: str) -> list[nn.Parameter]:
        params = list(dict.fromkeys(self.trainable(name)))  # de-duplicate, keep order
        if not params:
            raise RuntimeError(f"{type(self).__name__}: stage {name!r} has no trainable parameters")
        self.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        self._text_cache.clear()
        self._train_sets.clear()  # the last stage may have trained the image tower: the store keys it again
        return params

    def setup(self, stage: str) -> None:
        # DDP registers only parameters that require grad when it wraps the model, which happens
        # before configure_optimizers: the first stage's flags must already be set here.
        if stage == "fit" and self.trainer.max_epochs is not None and self.trainer.max_epochs < 0:
            raise ValueError("set trainer.max_epochs: the stage and learning-rate schedules are per epoch")
        if stage == "fit" and self.stage is None:
            self.stage = self._stage_at(0).name
            self._apply_stage(self.stage)
        if stage == "fit" and not self.automatic_optimization:
            self._check_chunkable()
            datamodule = getattr(self.trainer, "datamodule", None)
            # Under DDP one loader batch must be one backward: each rank then steps once per batch, unchunked.
            if hasattr(datamodule, "steps_per_batch") and self.trainer.world_size == 1:
                datamodule.steps_per_batch = self.hparams.feature_chunk
                self._step_size = datamodule.batch_size

    def _check_chunkable(self) -> None:
        """ClipAdaptError unless every stage keeps the image tower frozen and the steps are the base's own."""
        image = {id(p) for _, p in self.clip.image_parameters()}
        trains = [s.name for s in self.stages if any(id(p) in image for p in self.trainable(s.name))]
        own_steps = type(self).training_step is not AdaptationModule.training_step
        if trains or own_steps:
            why = f"trains the image tower (stage {trains[0]!r})" if trains else "takes its training steps itself"
            raise ClipAdaptError(
                f"feature_chunk={self.hparams.feature_chunk}: {type(self).__name__} {why}, so its training images "
                "cannot be encoded ahead of its steps; set model.init_args.feature_chunk 1"
            )

    def on_train_epoch_start(self) -> None:
        self._train_seen = 0
        stage = self._stage_at(self.current_epoch).name
        if stage == self.stage:
            return
        rank_zero_info(f"clipadapt: stage {self.stage!r} -> {stage!r} at epoch {self.current_epoch}")
        self.on_stage_end(self.stage)
        self.stage = stage
        strategy = self.trainer.strategy
        self._apply_stage(stage)
        if isinstance(strategy.model, DistributedDataParallel):
            # The reducer only knows the parameters that required grad when it was built.
            strategy.model = strategy._setup_model(self)
            strategy._register_ddp_hooks()
        strategy.setup_optimizers(self.trainer)

    def configure_optimizers(self) -> dict[str, Any]:
        self.stage = self.stage or self._stage_at(self.current_epoch).name
        params = self._apply_stage(self.stage)
        optimizer = self.make_optimizer(params)
        stage = next(s for s in self.stages if s.name == self.stage)
        if stage.lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = stage.lr
        steps_per_epoch = self._steps_per_epoch()
        _, epochs = self._stage_bounds(self.stage)
        epochs = stage.schedule_epochs or epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor(optimizer, steps_per_epoch, epochs))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, the unit of the lr schedule (one per loader batch, unless batches are chunks)."""
        steps = max(1, self.trainer.estimated_stepping_batches // max(1, self.trainer.max_epochs))  # builds the loader
        sampler = getattr(self.trainer.train_dataloader, "batch_sampler", None)
        return steps if self.automatic_optimization else getattr(sampler, "num_steps", steps)

    def _lr_factor(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
        base_lr = optimizer.param_groups[0]["lr"]
        warm = int(round(self.hparams.warmup_epochs * steps_per_epoch))
        total = max(epochs * steps_per_epoch, warm + 1)
        constant_warmup = self.hparams.warmup == "constant"
        cosine = self.hparams.schedule == "cosine"

        def factor(step: int) -> float:
            if step < warm:
                return self.hparams.warmup_lr / base_lr if constant_warmup else (step + 1) / warm
            if not cosine:
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / (total - warm)))

        return factor

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if not self.automatic_optimization:
            return self._chunked_steps(batch, batch_idx)
        seed_torch(stream_seed(run_seed(), self.current_epoch, batch_idx, self.global_rank))
        images, labels = batch
        losses = self.training_losses(images, labels)
        loss = sum(losses.values())
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(labels))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def _chunked_steps(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """A loader batch of several steps (`feature_chunk`): each step as `training_step`, on its rows, in order.

        Each step is seeded as the step of that index in the unchunked run, and its images are a view of the
        batch: `image_features` of that view are its rows of the whole chunk's features, encoded at the first
        ask (`_chunk_rows`). Logged: the chunk's mean losses.
        """
        images, labels = batch
        size = self._step_size or len(labels)  # images per optimizer step (data.batch_size)
        per_chunk = self.hparams.feature_chunk if self._step_size else 1  # steps in each earlier loader batch
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        self._chunk, self._chunk_features = images, None
        totals: dict[str, Tensor] = {}
        try:
            for index, start in enumerate(range(0, len(labels), size)):
                rows = slice(start, start + size)
                seed_torch(stream_seed(run_seed(), self.current_epoch, batch_idx * per_chunk + index, self.global_rank))
                self._step_view = (images[rows], rows)
                losses = self.training_losses(self._step_view[0], labels[rows])
                optimizer.zero_grad()
                self.manual_backward(sum(losses.values()))
                optimizer.step()
                scheduler.step()
                for name, value in losses.items():
                    totals[name] = totals.get(name, 0) + value.detach() * len(labels[rows])
        finally:
            self._chunk = self._chunk_features = self._step_view = None
        means = {name: total / len(labels) for name, total in totals.items()}
        self.log_dict({f"train/{k}": v for k, v in means.items()}, batch_size=len(labels))
        loss = sum(means.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss

    def _chunk_rows(self, rows: slice) -> Tensor | None:
        """Unnormalized features of these rows of the running chunk, or None where the step must encode itself.

        The chunk is encoded (once, no grad) only where that equals the steps' own forwards up to rounding: no
        image parameter trains, and the tower computes as in eval mode (a ResNet's BatchNorm in train mode would
        take the chunk's statistics instead of the step's).
        """
        if self._chunk_features is None:
            if not self._tower_as_at_inference():
                return None
            with torch.no_grad():
                self._chunk_features = self.image_features(self._chunk, normalize=False)  # the train lookup applies
        return self._chunk_features[rows]

    def on_train_start(self) -> None:
        if self.logger is not None:
            trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
            self.logger.log_metrics({"train/trainable_params": trainable}, step=self.global_step)

    def _check_image_size(self, images: Tensor) -> None:
        if images.shape[-1] != self.clip.image_size:
            raise ValueError(
                f"images are {images.shape[-1]} px but {self.clip.arch} expects {self.clip.image_size} px: "
                f"set data.image_size={self.clip.image_size}"
            )

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        self._check_image_size(images)
        self._enter_eval_step(images, "val", 0, batch_idx)
        self.val_acc.update(self(images), labels)
        self._eval_images = None

    def on_validation_epoch_start(self) -> None:
        self._start_eval_epoch()
        if self.text_trainable():
            self._text_cache.clear()

    def on_predict_epoch_start(self) -> None:
        self._start_eval_epoch()
        self._text_cache.clear()

    def on_validation_epoch_end(self) -> None:
        correct, total = self.val_acc.compute().tolist()
        if total:  # sanity checks may see no batch at all
            self.log("val/acc", 100 * correct / total, prog_bar=True)
            if not self.trainer.sanity_checking:
                self._last_val_acc = 100 * correct / total
        self.val_acc.reset()

    def _eval_sets(self) -> list:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "eval_sets"):
            raise RuntimeError("evaluation needs a CLIPDataModule: it names the test sets and their classes")
        return datamodule.eval_sets

    def on_test_epoch_start(self) -> None:
        self._text_cache.clear()  # weights may have changed since the last evaluation
        self._start_eval_epoch()
        self.test_accs = nn.ModuleList(Top1() for _ in self._eval_sets()).to(self.device)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels = batch
        self._check_image_size(images)
        eval_set = self._eval_sets()[dataloader_idx]
        self._enter_eval_step(images, "test", dataloader_idx, batch_idx)
        logits = self.class_logits(images, eval_set.classnames, eval_set.templates)
        self._eval_images = None
        self.test_accs[dataloader_idx].update(logits, labels)

    def on_test_epoch_end(self) -> None:
        # compute() all-reduces the counts, and the evaluation sampler never pads: exact under DDP.
        accs, metrics = {}, {}
        for eval_set, metric in zip(self._eval_sets(), self.test_accs, strict=True):
            correct, total = metric.compute().tolist()
            accs[eval_set.name] = 100 * correct / max(total, 1)
            metrics[f"test/{eval_set.name}/acc"] = accs[eval_set.name]
            metrics[f"test/{eval_set.name}/count"] = total
        if "base" in accs and "novel" in accs:
            metrics["test/hm"] = harmonic_mean(accs["base"], accs["novel"])
        for key, value in metrics.items():
            self.log(key, value, add_dataloader_idx=False)
        # TensorBoard's HPARAMS tab compares runs by `hp_metric` (TensorBoardLogger writes -1 at the start):
        # the protocol's headline number, HM for base-to-novel, else the first evaluation set's accuracy.
        headline = metrics.get("test/hm", next(iter(accs.values()), None))
        if headline is not None:
            self.log("hp_metric", headline, add_dataloader_idx=False)
        self.write_json("test_metrics.json", metrics | self.run_summary())

    def write_json(self, name: str, payload: Any) -> None:
        """`payload` as `<run dir>/<name>`, written by rank 0; every rank must call it."""
        log_dir = self.trainer.log_dir  # a collective call under DDP: every rank asks, rank 0 writes
        if log_dir is not None and self.trainer.is_global_zero:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, name), "w") as f:
                json.dump(payload, f, indent=1)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Predicted class index over the first evaluation set."""
        eval_set = self._eval_sets()[0]
        self._enter_eval_step(batch[0], "predict", dataloader_idx, batch_idx)
        predicted = self.class_logits(batch[0], eval_set.classnames, eval_set.templates).argmax(-1)
        self._eval_images = None
        return predicted

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        method = f"{type(self).__module__}.{type(self).__qualname__}"  # lets `clipadapt export` rebuild it
        checkpoint["clipadapt"] = {"stage": self.stage, "method": self.method_state(), "class_path": method}
        keep_plain(checkpoint)  # so that it loads with weights_only=True (clipadapt.checkpoints)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before DDP wraps the model and before the optimizers are built on resume, so both
        # see the restored stage's trainable set and its optimizer state loads without mismatch.
        state = checkpoint.get("clipadapt", {})
        self.load_method_state(state.get("method", {}))
        self.stage = state.get("stage")
        if self.stage is not None and self._trainer is not None and self._trainer.training:
            self._apply_stage(self.stage)
        self._text_cache.clear()
