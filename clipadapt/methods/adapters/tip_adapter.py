"""Tip-Adapter and Tip-Adapter-F: a key-value cache of the few-shot image features beside zero-shot CLIP.

Zhang, Zhang, Fang, Gao, Li, Dai, Qiao, Li, "Tip-Adapter: Training-free Adaption of CLIP for
Few-shot Classification", ECCV 2022, arXiv 2111.03930. The cache holds one key per training image,
F_train (N, D): its image features averaged over `augment_epochs` augmented views (the training
transform: RandomResizedCrop(scale 0.5–1) + flip), then L2-normalised; the values L_train (N, C) are
the one-hot labels (with `data.train_augment: false` every view is the evaluation transform's: one
pass, `split_features`, also the features Tip-Adapter-F's training steps look up). For a unit test feature f:

    A = exp(−β (1 − f F_trainᵀ))                       (B, N) affinities
    logits = s · f W_cᵀ + α · A L_train                  (zero-shot CLIP + the cache's votes)

- `TipAdapter` is training-free: `clipadapt test --config configs/tip_adapter_fewshot.yaml` builds the
  cache from the training split when the run starts, chooses α, β and tests. No parameter trains.
- `TipAdapterF` fine-tunes the keys F_train (initialised from the cache) on CE of the logits with the
  initial α, β (AdamW, lr 1e-3, eps 1e-4, cosine; 20 epochs, 100 on EuroSAT; batch 256).

α and β are chosen on the **validation** split, never on test: the grid of the public `search_hp`
(β = 0.1 + i·(S_β − 0.1)/n_β, i < n_β; α likewise), the first best accuracy winning, at the start of
every test and at the end of Tip-Adapter-F's fit (so the last checkpoint and its export carry them).
The public code does otherwise in two places: on ImageNet (`main_imagenet.py`, no validation split)
it searches α, β on the *test* features, and Tip-Adapter-F keeps the epoch with the best *test*
accuracy (`main.py`). Here the last epoch is kept, and a dataset without a validation split
(ImageNet) keeps `init_alpha`, `init_beta`; the choice is written to `tip_adapter.json` in the run folder.

Implementation choices: the cache is built in `configure_model` (before the optimizer exists, so
Tip-Adapter-F's keys have their final shape), in sequential passes over the training split, under the
trainer's precision; under DDP every rank gets rank 0's cache with the module's state. A class's embedding is its text feature
followed by its column of the cache values (`class_embeddings`), so an evaluation set of other
classes (novel, cross-dataset) gets no cache votes and is zero-shot CLIP, and a subset of the training
classes (ImageNet-A/R) votes with its own columns. The logit scale is CLIP's (100 for OpenAI weights).
"""

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader

from clipadapt.methods.base import AdaptationModule


def tip_logits(
    features: Tensor,
    text: Tensor,
    keys: Tensor,
    values: Tensor,
    alpha: float | Tensor,
    beta: float | Tensor,
    scale: float | Tensor,
) -> Tensor:
    """(B, C) s·f·textᵀ + α·exp(−β(1 − f·keysᵀ))·values from unit f (B, D), text (C, D), keys (N, D), values (N, C)."""
    affinity = features @ keys.T  # (B, N)
    return scale * features @ text.T + alpha * torch.exp(-beta * (1 - affinity)) @ values


def search_grid(upper: float, steps: int) -> list[float]:
    """The public `search_hp` grid: 0.1 + i·(upper − 0.1)/steps for i < steps."""
    return [0.1 + i * (upper - 0.1) / steps for i in range(steps)]


def search_alpha_beta(
    features: Tensor,
    labels: Tensor,
    text: Tensor,
    keys: Tensor,
    values: Tensor,
    scale: float | Tensor,
    alphas: list[float],
    betas: list[float],
) -> tuple[float, float, float]:
    """(α, β, accuracy in %) with the most correct of (M, D) unit features; β outer, α inner, first best kept."""
    zero_shot = scale * features @ text.T  # (M, C)
    affinity = features @ keys.T  # (M, N)
    alpha_t = torch.tensor(alphas, dtype=features.dtype, device=features.device)[:, None, None]  # (A, 1, 1)
    best = (-1, alphas[0], betas[0])
    for beta in betas:
        logits = zero_shot + alpha_t * (torch.exp(-beta * (1 - affinity)) @ values)  # (A, M, C)
        correct = (logits.argmax(-1) == labels).sum(-1)  # (A,)
        index = int(correct.argmax())  # the first α with the most correct
        if int(correct[index]) > best[0]:
            best = (int(correct[index]), alphas[index], beta)
    return best[1], best[2], 100 * best[0] / max(len(labels), 1)


def _resize_cache(module: nn.Module, state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: give the cache the size of the one being loaded (it is empty until built)."""
    keys, labels = state_dict.get(prefix + "cache_keys"), state_dict.get(prefix + "cache_labels")
    if keys is not None:
        module.cache_keys.data = keys.new_empty(keys.shape, device=module.cache_keys.device)
    if labels is not None:
        module.cache_labels = labels.new_empty(labels.shape, device=module.cache_labels.device)


class TipAdapter(AdaptationModule):
    """Training-free cache model over frozen CLIP; α, β chosen on the validation split (`clipadapt test`)."""

    def __init__(
        self,
        *args: Any,
        init_alpha: float = 1.17,  # α before (or without) the search; the public configs' init_alpha
        init_beta: float = 1.0,  # β likewise
        augment_epochs: int = 10,  # augmented views averaged into each key
        search: bool = True,
        beta_search: tuple[float, int] = (7.0, 200),  # (upper end, steps) of β's grid (search_scale[0], search_step[0])
        alpha_search: tuple[float, int] = (3.0, 20),  # (upper end, steps) of α's grid
        **kwargs: Any,
    ) -> None:
        """
        Args:
            init_alpha: α, the weight of the cache logits, used in training and when nothing is searched.
            init_beta: β, the sharpness of the affinities, likewise.
            augment_epochs: passes over the training split whose features are averaged into the keys.
            search: choose α, β on the validation split (else keep the initial values).
            beta_search: upper end and number of steps of β's grid.
            alpha_search: upper end and number of steps of α's grid.
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        if augment_epochs < 1 or min(beta_search[1], alpha_search[1]) < 1:
            raise ValueError(f"augment_epochs and the search steps must be >= 1, got {augment_epochs}, "
                             f"{beta_search}, {alpha_search}")  # fmt: skip
        self.cache_keys = nn.Parameter(torch.zeros(0, self.clip.embed_dim), requires_grad=False)  # (N, D) F_train
        self.register_buffer("cache_labels", torch.zeros(0, dtype=torch.long))  # (N,) training label of each key
        self.register_buffer("alpha", torch.tensor(float(init_alpha)))  # the chosen α
        self.register_buffer("beta", torch.tensor(float(init_beta)))  # the chosen β
        self.register_load_state_dict_pre_hook(_resize_cache)

    # ---- the cache ----

    def _encode_split(self, loader: DataLoader, normalize: bool) -> tuple[Tensor, Tensor]:
        """(N, D) features and (N,) labels of a loader's dataset, in its order, under the trainer's precision."""
        ordered = DataLoader(loader.dataset, batch_size=loader.batch_size, num_workers=loader.num_workers)
        features, labels = [], []
        with torch.no_grad(), self.trainer.precision_plugin.forward_context():
            for images, label in ordered:
                features.append(self.clip.encode_image(images.to(self.device), normalize=normalize).float())
                labels.append(label.to(self.device))
        return torch.cat(features), torch.cat(labels)

    def configure_model(self) -> None:
        """Build the cache from the training split, unless it exists or a checkpoint is about to restore it."""
        # load_from_checkpoint also calls this hook, with no trainer (and the checkpoint has the cache).
        if self.cache_keys.numel() or self._trainer is None or self._trainer.ckpt_path:
            return
        self.to(self.trainer.strategy.root_device)  # the cache pass runs on the run's device, not the CPU
        datamodule = self.trainer.datamodule
        train = datamodule.train_dataloader()
        if getattr(datamodule, "train_augment", True) is False:
            # Every view is the evaluation transform's, so their mean is the view: one pass, through the feature
            # store entry that Tip-Adapter-F's training steps then look up (and, with data.feature_cache, a sweep).
            keys = self.split_features(train.dataset, train.batch_size, num_workers=train.num_workers)
            self.cache_keys.data = keys.float().clone()  # (N, D), unit; a copy: Tip-Adapter-F trains it in place
            self.cache_labels = torch.tensor([d.label for d in train.dataset.items], device=self.device)
            rank_zero_info(f"Tip-Adapter: {len(self.cache_labels)} keys from one pass (data.train_augment false: "
                           f"the {self.hparams.augment_epochs} augment_epochs would all be the same view)")  # fmt: skip
            return
        views = [self._encode_split(train, normalize=False) for _ in range(self.hparams.augment_epochs)]
        # Under DDP the ranks' views differ; Lightning then syncs parameters and buffers from rank 0 (DDP's start
        # when fitting, `_sync_module_states` otherwise), so every rank uses rank 0's cache.
        self.cache_keys.data = F.normalize(torch.stack([v for v, _ in views]).mean(0), dim=-1)  # (N, D)
        self.cache_labels = views[0][1]
        rank_zero_info(
            f"Tip-Adapter: {len(self.cache_labels)} keys from {self.hparams.augment_epochs} augmented passes"
        )

    def choose_alpha_beta(self) -> None:
        """Set α, β to the grid point with the best validation accuracy (kept where there is no validation split)."""
        hp = self.hparams
        val = self.trainer.datamodule.val_dataloader()
        if not hp.search or not val:
            rank_zero_info(f"Tip-Adapter: no search (no validation split or search off): alpha={hp.init_alpha}, "
                           f"beta={hp.init_beta}")  # fmt: skip
            return
        features = self.split_features(val.dataset, val.batch_size).float()  # (M, D), once per run / sweep
        labels = torch.tensor([d.label for d in val.dataset.items], device=self.device)  # (M,)
        text = super().class_embeddings(hp.classnames, hp.templates).float()  # (C, D)
        values = F.one_hot(self.cache_labels, len(hp.classnames)).float()  # (N, C)
        scale = self.clip.logit_scale.exp().float()
        alpha, beta, acc = search_alpha_beta(features, labels, text, self.cache_keys.detach().float(), values, scale,
                                             search_grid(*hp.alpha_search), search_grid(*hp.beta_search))  # fmt: skip
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        rank_zero_info(f"Tip-Adapter: alpha={alpha:.3f}, beta={beta:.3f} (validation accuracy {acc:.2f})")
        self.write_json("tip_adapter.json", {"alpha": alpha, "beta": beta, "val_acc": acc, "val_images": len(labels)})

    def on_test_start(self) -> None:
        self.choose_alpha_beta()

    def on_predict_start(self) -> None:
        self.choose_alpha_beta()

    # ---- classification ----

    def class_embeddings(self, classnames: list[str], templates: list[str]) -> Tensor:
        """(C, D + N): each class's text feature, then its column of the cache values (zeros off the training classes)."""
        text = super().class_embeddings(classnames, templates)  # (C, D)
        rows = {name: i for i, name in enumerate(self.hparams.classnames)}
        labels = torch.tensor([rows.get(name, -1) for name in classnames], device=text.device)  # (C,)
        values = (labels[:, None] == self.cache_labels[None, :]).to(text.dtype)  # (C, N)
        return torch.cat([text, values], dim=1)

    def classify(self, images: Tensor, classes: Tensor) -> Tensor:
        dim = self.clip.embed_dim
        text, values = classes[:, :dim], classes[:, dim:].T  # (C, D), (N, C)
        with torch.no_grad():  # the image tower is frozen
            features = self.image_features(images)  # (B, D)
        hp = self.hparams
        alpha, beta = (hp.init_alpha, hp.init_beta) if self.training else (self.alpha, self.beta)
        return tip_logits(features, text, self.cache_keys, values, alpha, beta, self.clip.logit_scale.exp())

    def export_state_dict(self) -> dict[str, Tensor]:
        """The frozen open_clip state dict plus the cache model under `tip_adapter.`.

        `tip_adapter.keys` (N, D) F_train, `tip_adapter.labels` (N,) the training-class index of each key
        (L_train is their one-hot rows), `tip_adapter.alpha`, `tip_adapter.beta` (the validation choice):
        logits = s·f·Wᵀ + α·exp(−β(1 − f·keysᵀ))·L_train. `clipadapt export` writes them into the extras file
        beside the weights.
        """
        cache = {"keys": self.cache_keys, "labels": self.cache_labels, "alpha": self.alpha, "beta": self.beta}
        return super().export_state_dict() | {f"tip_adapter.{k}": v.detach().clone() for k, v in cache.items()}


class TipAdapterF(TipAdapter):
    """Tip-Adapter with the cache keys fine-tuned on CE (Tip-Adapter-F)."""

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        yield self.cache_keys

    def on_train_epoch_end(self) -> None:
        # Module hooks run before ModelCheckpoint's: the last checkpoint holds the chosen α, β.
        if self.current_epoch + 1 == self.trainer.max_epochs:
            self.choose_alpha_beta()
