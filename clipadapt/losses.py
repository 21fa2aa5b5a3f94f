"""Loss terms as pure functions over tensors; each is checked against hand-computed values in tests.

Sections: CLIP-AST (PromptSRC self-consistency), RAda (mask regularizers, entropy), CLIP-CITE
(alignment, class-level contrastive, distillation), KgCoOp (knowledge-guided regularizer).
"""

import torch
import torch.nn.functional as F
from torch import Tensor

# ---- CLIP-AST: PromptSRC self-consistency ----
# PromptSRC (Khattak et al., ICCV 2023), trainers/promptsrc.py: both feature sides L2-normalized,
# L1 as F.l1_loss (mean over all elements), KL with the frozen model as the target, T = 1, / (B·C).


def consistency_l1(student: Tensor, teacher: Tensor) -> Tensor:
    """mean |student - teacher| over every element: (B, D) image or (C, D) text features, both unit-norm."""
    if student.shape != teacher.shape:
        raise ValueError(f"shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    return F.l1_loss(student.float(), teacher.detach().float())


def consistency_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) summed over (B, C) logits, times T², divided by B·C (PromptSRC's normalization)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"shapes differ: {tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}")
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)  # (B, C) student
    log_q = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)  # (B, C) teacher
    kl = F.kl_div(log_p, log_q, reduction="sum", log_target=True)  # sum q (log q - log p)
    return kl * temperature**2 / student_logits.numel()


def self_consistency_losses(
    image: Tensor,
    text: Tensor,
    logits: Tensor,
    teacher_image: Tensor | None,
    teacher_text: Tensor,
    scale: Tensor,
    weights: tuple[float, float, float],
) -> dict[str, Tensor]:
    """PromptSRC's weighted terms λ1·L1(f̂, f̂₀), λ2·L1(ŵ, ŵ₀), λ3·KL(p₀ ‖ p), p₀ = softmax(s·f̂₀ŵ₀ᵀ); zero weights omitted.

    `weights` = (λ1 image, λ2 text, λ3 logits); `teacher_image` may be None when λ1 = λ3 = 0.
    """
    image_weight, text_weight, logit_weight = weights
    losses = {}
    if image_weight:
        losses["l1_image"] = image_weight * consistency_l1(image, teacher_image)
    if text_weight:
        losses["l1_text"] = text_weight * consistency_l1(text, teacher_text)
    if logit_weight:
        teacher_logits = scale.detach() * teacher_image.float() @ teacher_text.float().T  # (B, C)
        losses["kl"] = logit_weight * consistency_kl(logits, teacher_logits)
    return losses


# ---- RAda: mask regularizers and entropy ----

MASK_REGULARIZERS = ("mse", "linf", "l1")


def mask_regularizer(mask: Tensor, kind: str = "mse") -> Tensor:
    """RAda L_reg (Eq. 7, App. E) on M (B, C, D): mse mean (M−1)², l1 mean |M−1|, linf batch mean of max |M−1|."""
    gap = mask.float() - 1  # (B, C, D)
    if kind == "mse":
        return gap.square().mean()
    if kind == "l1":
        return gap.abs().mean()
    if kind == "linf":  # what the public code's LInfLoss computes: per sample, then over the batch
        return gap.abs().flatten(1).amax(1).mean()
    raise ValueError(f"mask regularizer must be one of {MASK_REGULARIZERS}, got {kind!r}")


def entropy(logits: Tensor) -> Tensor:
    """Entropy −Σ p log p of softmax(logits) over the last dim: (..., C) -> (...)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def marginal_entropy(logits: Tensor) -> Tensor:
    """TPT's loss: entropy of the softmax averaged over views (dim −2), in log space: (..., V, C) -> (...)."""
    log_p = F.log_softmax(logits.float(), dim=-1)  # (..., V, C)
    log_mean = torch.logsumexp(log_p, dim=-2) - torch.log(torch.tensor(float(log_p.shape[-2])))  # (..., C)
    return -(log_mean.exp() * log_mean).sum(-1)


# ---- CLIP-CITE: alignment, class-level contrastive, distillation ----


def alignment_loss(image_features: Tensor, head: Tensor, labels: Tensor, scale: Tensor | float) -> Tensor:
    """CLIP-CITE L_DVA (Eq. 3): mean cross-entropy of s · cos(f_i, w_c) over a learnable head W."""
    logits = scale * F.normalize(image_features, dim=-1) @ F.normalize(head, dim=-1).T  # (B, C)
    return F.cross_entropy(logits.float(), labels)


def class_contrastive_loss(
    image_features: Tensor, text_features: Tensor, targets: Tensor, scale: Tensor | float
) -> Tensor:
    """CLIP-CITE L_SCL (Eq. 4): class-level image-text contrastive loss, mean of its two directions.

    `text_features` (K, D) are the prompts of the K distinct classes of the batch and `targets` (B,)
    the row of each image's class. image→text: cross-entropy over the K prompts. text→image: for
    image i of class c, −log of exp(s·cos(T_c, I_i)) over itself plus the images of *other* classes
    (same-class duplicates are neither positives nor negatives). Eq. 4 sums these terms over the
    (image, class) pairs of the batch, so both directions are means over the B images: a class weighs
    by its image count. A batch of one class gives 0 in both directions, not NaN.
    """
    images = F.normalize(image_features, dim=-1)  # (B, D)
    texts = F.normalize(text_features, dim=-1)  # (K, D)
    logits = (scale * images @ texts.T).float()  # (B, K); fp32 for the masked log-sum-exp
    image_to_text = F.cross_entropy(logits, targets)

    rows = logits.T[targets]  # (B, B): row i = s·cos(T_{c_i}, I_j) for every image j
    positive = rows.diagonal()  # (B,)
    other_class = targets[None, :] != targets[:, None]  # (B, B)
    keep = other_class | torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    per_image = rows.masked_fill(~keep, float("-inf")).logsumexp(dim=1) - positive  # (B,), never empty
    return (image_to_text + per_image.mean()) / 2


def similarity_distillation_loss(logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """CLIP-CITE L_VLD (Eq. 5): KL(p_teacher ‖ p) over the class prompts, temperature 1, batch mean."""
    return F.kl_div(
        F.log_softmax(logits.float(), dim=-1),
        F.log_softmax(teacher_logits.detach().float(), dim=-1),
        log_target=True,
        reduction="batchmean",
    )


# ---- KgCoOp: knowledge-guided context optimization ----


def knowledge_guided_loss(text: Tensor, anchor: Tensor) -> Tensor:
    """KgCoOp L_kg = (1/C) Σ_c ‖w_c − w_c^clip‖² over (C, D) prompted and frozen zero-shot text features."""
    if text.shape != anchor.shape:
        raise ValueError(f"shapes differ: {tuple(text.shape)} vs {tuple(anchor.shape)}")
    return (text.float() - anchor.detach().float()).square().sum(dim=-1).mean()
