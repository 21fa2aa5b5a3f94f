"""RAda: rational adaptation of CLIP in three settings — EFT, FFT (LP then FT) and TTT.

Paper: Chen, Ahmad, Yao, Liu, Shen, "One Last Attention for Your Vision-Language Model", ICCV 2025,
arXiv 2507.15480. The adapter (models/rational.py) masks the rational matrix R = f̂ ⊙ ŵ:
logits = s · Σ_d M ⊙ R with M = ReLU(1 + f_φ(R, f̂, ŵ)) ≡ 1 at init, i.e. zero-shot CLIP.

- `eft` (§4.2): encoders frozen, cached text features ("a photo of a {}."), only f_φ trains on
  CE + λ·L_reg(M). Works for any class set, so base and novel are evaluated with one adapter.
- `fft` (§4.1, App. C): a linear head W (C, D) from the 80-template zero-shot weights replaces the
  text tower, R = f̂ ⊙ normalize(W), no head bias. Stage `probe`: f_φ + W (CE + λ·L_reg); stage
  `finetune`: image tower + W + f_φ, CE only (L_reg applies only while the encoders are frozen).
  The probe's warmup + cosine is computed over `probe_schedule_epochs` (10) and cut where the probe
  ends (`probe_epochs`, 5): RAda-FT starts from epoch 5 of RAda's 10-epoch run, whose lr is then
  about half its peak, not 0 (App. C). The finetune stage has its own warmup + cosine over its epochs.
  An evaluation set whose classes are all training classes (ImageNet-V2/Sketch, the 200-class
  ImageNet-A/R) uses the matching rows of W; any other set (novel) falls back to text features.
- `ttt` (§4.3, TPT's recipe): per test image, the original view + V−1 augmented views; f_φ reset to
  its initial state (zero-init, or `init_checkpoint` = an EFT run, RAda†) and AdamW for every
  sample; the ⌊ρV⌋ lowest-entropy views are chosen at step 0 and kept; loss = entropy of their
  averaged softmax; prediction on the original view. Samples are adapted in parallel with stacked
  per-sample weights (`torch.func.vmap` of `grad`, torch's functional AdamW on the stacked tensors);
  `ttt_mode: loop` is the literal one-sample-at-a-time version with torch.optim.AdamW (the reference).

Speed, with the same updates: the base's `feature_chunk` > 1 (EFT; `configs/rada_base2novel.yaml` 64)
encodes that many training steps' images in one no-grad forward of the frozen image tower, then takes
the optimizer steps on their rows in loader order, one per `data.batch_size` images
(`AdaptationModule._chunked_steps`). The same samples, order, augmentations and lr schedule as the
per-step path; the features differ only by the float reassociation of the batched forward
(tests/test_rada.py). Under DDP it falls back to one step per loader batch; FFT (whose finetune
stage trains the image tower) refuses it.

Deliberate deviations:
- TTT views (`clipadapt.testtime`, shared with TPT) are drawn on device from the test-transformed image (resize + 224 center crop), not
  from the raw file: RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3)) + flip, bilinear, via
  roi_align (box edges sample the neighbouring pixels instead of clamping to the crop).
- Each image's views are seeded from a hash of its pixels (+ `ttt_seed`), not a global RNG, so a
  prediction does not depend on the order or batching of the test set (identical images share views).
  `ttt_seed` defaults to the run's seed (`data.seed` under the CLI), so runs over seeds 1-3 differ in
  their views too and the seed-to-seed spread is not understated; an explicit value wins.
- TTT loss is the entropy alone (spec); the mask regularizer is not added at test time.
"""

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.optim.adamw import adamw

from clipadapt import checkpoints
from clipadapt.errors import ClipAdaptError
from clipadapt.losses import MASK_REGULARIZERS, marginal_entropy, mask_regularizer
from clipadapt.methods.base import AdaptationModule, Stage, run_seed
from clipadapt.models.rational import QUERIES, RationalAdapter
from clipadapt.testtime import confident_views, crop_views


class RAda(AdaptationModule):
    """Rational adapter over CLIP; `setting` picks EFT, FFT (probe then finetune) or TTT (`clipadapt test`)."""

    # TTT adapts at test time, and the attention-map chunk size only bounds memory.
    test_time_args = AdaptationModule.test_time_args | {
        "ttt_views", "ttt_select", "ttt_steps", "ttt_lr", "ttt_weight_decay", "ttt_mode", "ttt_seed", "max_map_elements"
    }  # fmt: skip

    def __init__(
        self,
        *args: Any,
        setting: str = "eft",  # eft | fft | ttt
        num_heads: int = 8,  # H
        temperature: float = 1.0,  # t
        queries: tuple[str, ...] = QUERIES,  # Q_i (Table 4)
        mask_net: str = "attention",  # attention | mlp (Table 4)
        mask_reg: str = "mse",  # L_reg format: mse | linf | l1 (App. E)
        mask_reg_weight: float = 1.5,  # λ, App. E
        max_map_elements: int = 2**26,  # attention-map chunk size (memory)
        probe_epochs: int = 5,  # FFT stage `probe` (RAda); `finetune` (RAda-FT) runs to max_epochs
        probe_schedule_epochs: int = 10,  # App. C: the probe's lr follows RAda's 10-epoch schedule, cut at probe_epochs
        probe_lr: float = 4e-3,  # App. C
        finetune_lr: float = 4e-6,  # App. C
        ttt_views: int = 64,  # V, original + 63 augmented
        ttt_select: float = 0.1,  # ρ, share of lowest-entropy views
        ttt_steps: int = 3,  # §4.3
        ttt_lr: float = 8e-4,  # §4.3
        ttt_weight_decay: float = 0.01,  # torch AdamW default, as TPT
        ttt_mode: str = "batched",  # batched | loop
        ttt_seed: int | None = None,  # None: the run's seed (data.seed under the CLI)
        init_checkpoint: str | None = None,  # RAda†: adapter weights from an EFT checkpoint
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        if setting not in ("eft", "fft", "ttt") or ttt_mode not in ("batched", "loop"):
            raise ValueError(f"setting must be eft|fft|ttt and ttt_mode batched|loop, got {setting!r}, {ttt_mode!r}")
        if mask_reg not in MASK_REGULARIZERS:
            raise ValueError(f"mask_reg must be one of {MASK_REGULARIZERS}, got {mask_reg!r}")
        if setting == "fft" and probe_schedule_epochs < probe_epochs:
            raise ValueError(
                f"probe_schedule_epochs={probe_schedule_epochs} is shorter than probe_epochs={probe_epochs}: the "
                f"probe's lr would sit at 0 for its last epochs; set probe_schedule_epochs >= probe_epochs"
            )
        # Seeds the TTT views: following the run's seed, seed-to-seed variance includes the views' randomness.
        self.ttt_seed = run_seed() if ttt_seed is None else ttt_seed
        self.adapter = RationalAdapter(self.clip.embed_dim, num_heads, temperature, queries, mask_net, max_map_elements)
        if init_checkpoint:  # an EFT run's checkpoint (or a state dict), read as data only
            state = checkpoints.load(init_checkpoint, "init_checkpoint")
            state = state.get("state_dict", state) if isinstance(state, dict) else {}
            adapter = {k.removeprefix("adapter."): v for k, v in state.items() if k.startswith("adapter.")}
            try:
                self.adapter.load_state_dict(adapter)
            except RuntimeError as err:
                raise ClipAdaptError(
                    f"init_checkpoint {init_checkpoint} holds no RAda adapter of this shape "
                    f"({str(err).splitlines()[-1].strip()[:200]}): pass a checkpoint of a RAda run with the same "
                    "arch, num_heads, queries and mask_net"
                ) from None
        if setting == "fft":
            text = super().class_embeddings(self.hparams.classnames, self.hparams.templates)
            self.head = nn.Parameter(text.detach().clone())  # (C, D) W, from the zero-shot ensemble
        self._shown: tuple[Tensor, Tensor] | None = None  # last training batch's masks and R, for TensorBoard

    @property
    def stages(self) -> tuple[Stage, ...]:
        if self.hparams.setting == "fft":
            hp = self.hparams
            return (Stage("probe", hp.probe_epochs, hp.probe_lr, schedule_epochs=hp.probe_schedule_epochs),
                    Stage("finetune", -1, hp.finetune_lr))  # fmt: skip
        return super().stages

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        if self.hparams.setting == "ttt":
            return super().trainable(stage)
        params = list(self.adapter.parameters())
        if self.hparams.setting == "fft":
            params.append(self.head)
            if stage == "finetune":
                params += [p for _, p in self.clip.image_parameters()]
        return params

    def class_embeddings(self, classnames: list[str], templates: list[str]) -> Tensor:
        rows = self.head_rows(self.head, classnames) if self.hparams.setting == "fft" else None
        return rows if rows is not None else super().class_embeddings(classnames, templates)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The open_clip weights, the adapter (`adapter.*`) and, in FFT, the linear head W (`head`)."""
        extras = {f"adapter.{name}": tensor for name, tensor in self.adapter.state_dict().items()}
        if self.hparams.setting == "fft":
            extras["head"] = self.head.detach()
        return super().export_state_dict() | extras

    def _encoders_frozen(self) -> bool:
        return not any(p.requires_grad for _, p in self.clip.image_parameters())

    def _features(self, images: Tensor) -> Tensor:
        frozen = self._encoders_frozen()
        self.clip.train(self.training and not frozen)  # a frozen tower runs as at inference (public code)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return self.image_features(images).float()  # (B, D) unit

    def _scale(self) -> Tensor:
        return self.clip.logit_scale.detach().exp().float()  # s, frozen

    def training_losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        text = self.class_embeddings(self.hparams.classnames, self.hparams.templates).float()  # (C, D)
        return self._feature_losses(self._features(images), labels, text, self._encoders_frozen())

    def _feature_losses(self, features: Tensor, labels: Tensor, text: Tensor, frozen: bool) -> dict[str, Tensor]:
        """The training losses from (B, D) unit image features and (C, D) class rows."""
        logits, mask = self.adapter(features, text, self._scale())  # (B, C), (B, C, D)
        self._shown = (mask[:8].detach(), (features[0, None] * text).detach())
        losses = {"ce": F.cross_entropy(logits, labels)}
        if self.hparams.mask_reg_weight > 0 and frozen:  # L_reg only while the encoders are frozen
            losses["mask_reg"] = self.hparams.mask_reg_weight * mask_regularizer(mask, self.hparams.mask_reg)
        return losses

    def classify(self, images: Tensor, text: Tensor) -> Tensor:
        if self.hparams.setting == "ttt":
            return self._test_time(images, text.float())
        return self.adapter(self._features(images), text.float(), self._scale())[0]

    @rank_zero_only
    def on_train_epoch_end(self) -> None:
        writers = [lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers or self._shown is None:
            return
        masks, rational = self._shown
        # App. B: the mask value distribution, and M, R, M ⊙ R of one sample as (C, D) heatmaps.
        for name, grid in (("M", masks[0]), ("R", rational), ("MR", masks[0] * rational)):
            heat = (grid - grid.min()) / (grid.max() - grid.min()).clamp_min(1e-12)
            writers[0].add_image(f"mask/heatmap_{name}", heat.float().cpu(), self.global_step, dataformats="HW")
        writers[0].add_histogram("mask/values", masks.float().cpu(), self.global_step)

    # ---- TTT ----

    def _test_time(self, images: Tensor, text: Tensor) -> Tensor:
        """(N, 3, H, W) test images -> (N, C) logits of the original views after per-sample adaptation."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError("RAda TTT trains at test time: set `trainer: inference_mode: false` in the config")
        views = self._views(images)  # (N, V, 3, H, W)
        with torch.no_grad():
            features = torch.stack([self._features(v) for v in views])  # (N, V, D)
        return self.adapt(features, text)

    def adapt(self, features: Tensor, text: Tensor, mode: str | None = None) -> Tensor:
        """TTT from view features (N, V, D), view 0 the original, and (C, D) class rows -> (N, C) logits."""
        initial = {n: p.detach().clone() for n, p in self.adapter.named_parameters()}
        with torch.enable_grad():
            if (mode or self.hparams.ttt_mode) == "loop":
                return torch.stack([self._adapt_one(f, text, initial) for f in features])
            return self._adapt_batched(features, text, initial)

    def _views(self, images: Tensor) -> Tensor:
        return crop_views(images, self.hparams.ttt_views, self.ttt_seed)  # (N, V, 3, H, W)

    def _adapt_one(self, features: Tensor, text: Tensor, initial: dict[str, Tensor]) -> Tensor:
        """TPT literally: reset, then `ttt_steps` AdamW steps on one sample's (V, D) views -> (C,)."""
        hp, scale = self.hparams, self._scale()
        self.adapter.load_state_dict(initial)
        self.adapter.requires_grad_(True)
        optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=hp.ttt_lr, weight_decay=hp.ttt_weight_decay)
        chosen = features
        for step in range(hp.ttt_steps):
            logits, _ = self.adapter(chosen, text, scale)  # (V or k, C)
            if step == 0:
                keep = confident_views(logits.detach(), hp.ttt_select)
                logits, chosen = logits[keep], features[keep]
            optimizer.zero_grad()
            marginal_entropy(logits).backward()
            optimizer.step()
        with torch.no_grad():
            out = self.adapter(features[:1], text, scale)[0][0]
        self.adapter.load_state_dict(initial)
        return out

    def _adapt_batched(self, features: Tensor, text: Tensor, initial: dict[str, Tensor]) -> Tensor:
        """All samples at once with stacked per-sample weights; equal to `_adapt_one` per sample."""
        hp, scale = self.hparams, self._scale()
        count, views, dim = features.shape
        with torch.no_grad():  # step 0's selection uses the shared initial weights: one chunked pass
            logits = functional_call(self.adapter, initial, (features.flatten(0, 1), text, scale))[0]
        keep = confident_views(logits.unflatten(0, (count, views)), hp.ttt_select)  # (N, k)
        chosen = features.gather(1, keep[..., None].expand(-1, -1, dim))  # (N, k, D)

        def loss(params: dict[str, Tensor], x: Tensor) -> Tensor:
            out = functional_call(self.adapter, params, (x, text, scale), {"checkpoint_chunks": False})[0]
            return marginal_entropy(out)

        def predict(params: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.adapter, params, (x[None], text, scale), {"checkpoint_chunks": False})[0][0]

        params = {n: p.expand(count, *p.shape).clone() for n, p in initial.items()}  # (N, ...) per sample
        names, stacked = list(params), list(params.values())
        avgs, sqs = [torch.zeros_like(p) for p in stacked], [torch.zeros_like(p) for p in stacked]
        counts = [torch.tensor(0.0) for _ in stacked]
        # Samples per vmap call: the attention-map budget of the adapter also bounds the vmapped batch.
        per_sample = keep.shape[1] * self.adapter.num_heads * text.shape[0] ** 2
        step_grad = vmap(grad(loss), chunk_size=max(1, self.adapter.max_map_elements // per_sample))
        for _ in range(hp.ttt_steps):
            grads = step_grad(params, chosen)
            # AdamW is elementwise: torch's own update on the stacked tensors is the per-sample update.
            adamw(stacked, [grads[n] for n in names], avgs, sqs, [], counts, amsgrad=False, beta1=0.9, beta2=0.999,
                  lr=hp.ttt_lr, weight_decay=hp.ttt_weight_decay, eps=1e-8, maximize=False)  # fmt: skip
        with torch.no_grad():
            return vmap(predict)(params, features[:, 0])  # (N, C)
