"""TPT: test-time prompt tuning, a CoOp context tuned on each test image alone, then reset.

Paper: Shu, Nie, Huang, Yu, Goldstein, Anandkumar, Xiao, "Test-Time Prompt Tuning for Zero-Shot
Generalization in Vision-Language Models", NeurIPS 2022, arXiv 2209.07511. Public code: azshue/TPT
(`tpt_classification.py`, `data/datautils.py`).

Per test image x: V = 64 views (x itself and 63 augmented), p_v = softmax(s · cos(g(t(v_ctx)), f(x_v)));
the ⌊ρV⌋ = 6 views of lowest entropy H(p_v) are chosen once, at step 0 (ρ = 0.1), and the context
v_ctx (M = 4 word vectors from "a photo of a", or a CoOp run's context) takes `steps` = 1 AdamW step
(lr 5e-3, weight decay 0.01, torch's default as in the public code) on the entropy of their *averaged*
prediction:

    L(v_ctx) = H(p̄),   p̄ = (1/k) Σ_{v ∈ confident} p_v

then x is classified with the tuned context; the context and its optimizer start afresh for the
next image. Everything but the context is frozen. Augmented views, as the public code draws them: for
ImageNet and its variants a random resized crop + flip (`augment: crop`); for the fine-grained sets
AugMix (severity 1) on such a crop (`augment: augmix`; `clipadapt.testtime`). The public code
decides by the set's id (`augmix=len(set_id) > 1`: the one-letter ImageNet ids get crops only), so
the configs do: `tpt_imagenet_ood.yaml` crops, `tpt_finegrained.yaml` AugMix.

Exactness: images are tuned one at a time, each from its own reset context and a fresh AdamW, so a
prediction does not depend on the other images of the batch or on their order. The text features of
the initial context, the same for every image, are encoded once per batch and their graph serves
every image's first step (a backward per image through one forward: the same arithmetic as a
forward per image).

Deliberate deviations:
- Views are drawn on device from the test-transformed image and seeded by its pixels (see
  `clipadapt.testtime`), not by PIL from the raw file with the global RNG.
- `init_checkpoint` (CoOp+TPT) takes the checkpoint's context as it is: its M wins over `n_ctx`.
- Mixed precision is Lightning's (bf16 autocast, no GradScaler); the public code uses fp16 + GradScaler.
- Entropies (selection, loss) are taken in fp32 of the autocast logits (`losses.entropy`, `marginal_entropy`).
"""

from typing import Any

import torch
from torch import Tensor

from clipadapt import checkpoints
from clipadapt.errors import ClipAdaptError
from clipadapt.losses import marginal_entropy
from clipadapt.methods.base import AdaptationModule, run_seed
from clipadapt.models.context import TextContext, init_context
from clipadapt.testtime import AUGMENTS, augmented_views, confident_views


class TPT(AdaptationModule):
    """Zero-shot CLIP whose prompt context takes an entropy-minimizing step on each test image (`clipadapt test`)."""

    test_time_args = AdaptationModule.test_time_args | {
        "views", "select", "steps", "lr", "weight_decay", "augment", "view_seed", "chunk_size"
    }  # fmt: skip

    def __init__(
        self,
        classnames: list[str],
        templates: list[str],
        n_ctx: int = 4,  # M
        context_init: str | None = "a photo of a",
        class_position: str = "end",
        init_std: float = 0.02,
        init_checkpoint: str | None = None,
        views: int = 64,  # V: the image + 63 augmented views
        select: float = 0.1,  # ρ, share of lowest-entropy views
        steps: int = 1,
        lr: float = 5e-3,
        weight_decay: float = 0.01,
        augment: str = "crop",
        view_seed: int | None = None,
        chunk_size: int = 1000,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            n_ctx: M, context tokens (at most 4 with "a photo of a").
            context_init: words whose token embeddings start the context; None: random N(0, init_std²).
            class_position: end | middle | front, where the class name sits relative to the context.
            init_std: std of the random context init.
            init_checkpoint: a CoOp checkpoint (`clipadapt fit`) or export whose shared context starts TPT.
            views: V, views per test image, the image itself included.
            select: ρ, the share of the views (lowest entropy) the loss is taken over.
            steps: AdamW steps per test image.
            lr: AdamW learning rate.
            weight_decay: AdamW weight decay.
            augment: crop (random resized crop + flip; ImageNet sets) | augmix (AugMix on the crop; fine-grained).
            view_seed: seeds the views with each image's pixels; None: the run's seed (data.seed under the CLI).
            chunk_size: prompts (classes) per text-tower call.
            **kwargs: the AdaptationModule options (arch, pretrained, prompts, ...).
        """
        super().__init__(classnames, templates, **kwargs)
        if augment not in AUGMENTS or views < 1 or steps < 0 or not 0 < select <= 1:
            raise ValueError(
                f"need augment in {AUGMENTS}, views >= 1, steps >= 0 and 0 < select <= 1; "
                f"got {augment!r}, {views}, {steps}, {select}"
            )
        if init_checkpoint:
            vectors = coop_context(init_checkpoint, self.clip.width_text)
        else:
            vectors = init_context(self.clip, n_ctx, context_init, None, init_std)
        self.context = TextContext(vectors, class_position).requires_grad_(False)  # tuned on copies only
        self.view_seed = run_seed() if view_seed is None else view_seed

    def class_logits(self, images: Tensor, classnames: list[str], templates: list[str]) -> Tensor:
        if torch.is_inference_mode_enabled():
            raise ClipAdaptError(
                "TPT tunes its prompt at test time: set `trainer.inference_mode: false` (the configs do)"
            )
        views = augmented_views(images, self.hparams.views, self.view_seed, self.hparams.augment)  # (N, V, 3, H, W)
        with torch.no_grad():
            features = torch.stack([self.clip.encode_image(v) for v in views]).float()  # (N, V, D), frozen
            contexts = self.tune(features, classnames)  # (N, M, W)
            scale = self.clip.logit_scale.exp().float()
            logits = [scale * f[0] @ self._text(classnames, c).T for f, c in zip(features, contexts, strict=True)]
        return torch.stack(logits)  # (N, C): each image by its own tuned context

    def tune(self, features: Tensor, classnames: list[str]) -> Tensor:
        """(N, V, D) unit view features, view 0 the image itself -> (N, M, W) contexts, each tuned on its image alone."""
        hp = self.hparams
        scale = self.clip.logit_scale.detach().exp().float()
        with torch.enable_grad():
            start = self.context.vectors.detach().clone().requires_grad_()  # (M, W)
            text = self._text(classnames, start)  # (C, D): every image's first step starts from here
            keep = confident_views(scale * features @ text.detach().T, hp.select)  # (N, k), fixed at step 0
            tuned = []
            for image, chosen in zip(features, keep, strict=True):
                context = start.detach().clone()  # reset: each image starts from the initial context ...
                optimizer = torch.optim.AdamW([context], lr=hp.lr, weight_decay=hp.weight_decay)  # ... and state
                for step in range(hp.steps):
                    leaf = start if step == 0 else context.requires_grad_()
                    classes = text if step == 0 else self._text(classnames, context)  # (C, D)
                    loss = marginal_entropy(scale * image[chosen] @ classes.T)  # H(p̄) over the k chosen views
                    (context.grad,) = torch.autograd.grad(loss, leaf, retain_graph=step == 0)
                    optimizer.step()
                tuned.append(context.detach())
        return torch.stack(tuned)  # (N, M, W)

    def _text(self, classnames: list[str], context: Tensor) -> Tensor:
        return self.context.features(self.clip, classnames, context=context, chunk_size=self.hparams.chunk_size).float()


def coop_context(path: str, width: int) -> Tensor:
    """The shared (M, W) context of a CoOp checkpoint (`context.vectors`) or export (`prompts.vectors`)."""
    state = checkpoints.load(path, "init_checkpoint")
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    vectors = next((state[k] for k in ("context.vectors", "prompts.vectors") if k in state), None)
    if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[1] != width:
        found = "none" if vectors is None else f"shape {tuple(getattr(vectors, 'shape', ()))}"
        raise ClipAdaptError(
            f"init_checkpoint {path} holds no shared CoOp context of width {width} ({found}): pass a checkpoint "
            "or export of a CoOp run on the same arch with class_specific false"
        )
    return vectors.detach().float().clone()
