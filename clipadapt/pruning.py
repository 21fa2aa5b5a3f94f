"""Pure functions of Adapt's prompt pruning (Algorithm 1): token scores and one pruning step.

Paper: Huang, Pedapati, Chen, Gao, "Adapt: Adaptive Prompt Tuning for Pre-trained Vision-Language
Models" (ICLR 2025 submission, later TMLR). Spec: shared/specs/adapt.md.

Score of prompt token t (Eq. 6), a W-vector reduced to a scalar:

    snip = |∂L/∂P_t ⊙ P_t|,   grad = |∂L/∂P_t|,   l2 = |P_t|

Deliberate choices the paper leaves open: the W-vector is reduced by its mean (option: sum), so the
768-wide image tower and the 512-wide text tower compare fairly in one ranking; scores are summed over
the n_k steps of a window (Σ|g ⊙ P|, not |Σg| ⊙ |P|); ties are broken by position (tower order, then
block, then token), so every rank decides the same.

Reaching T_target: a schedule of W pruning steps (one per n_k optimizer steps after the warmup epochs)
prunes at most W·r_p tokens (per tower, for a per-tower budget). `pruning_rate` is the smallest r_p that
gets there in W steps, `live_after` what a given r_p leaves.
"""

import math

import torch
from torch import Tensor

SCORES = ("snip", "grad", "l2")


def token_scores(tokens: Tensor, grad: Tensor | None, score: str = "snip", reduce: str = "mean") -> Tensor:
    """(..., ξ, W) tokens and their gradient -> (..., ξ) scores; a missing gradient scores 0 (snip, grad)."""
    if score not in SCORES or reduce not in ("mean", "sum"):
        raise ValueError(f"score must be one of {SCORES} and reduce mean | sum, got {score!r}, {reduce!r}")
    tokens = tokens.detach().float()
    if score == "l2":
        values = tokens.abs()
    elif grad is None:
        values = torch.zeros_like(tokens)
    else:
        grad = grad.detach().float()
        values = (grad * tokens).abs() if score == "snip" else grad.abs()  # (..., ξ, W)
    return values.mean(-1) if reduce == "mean" else values.sum(-1)


def accumulate(totals: dict[str, Tensor], scores: dict[str, Tensor]) -> None:
    """S_b += score_b in place, per tower (the accumulators of Algorithm 1)."""
    for tower, value in scores.items():
        totals[tower] += value.to(totals[tower])


def split_budget(target: int, text_ratio: float) -> dict[str, int]:
    """T_target split over the towers for `budget: per_branch`: text gets round(ratio · T), image the rest."""
    text = int(round(target * text_ratio))
    return {"image": target - text, "text": text}


def prune_step(
    scores: dict[str, Tensor],
    masks: dict[str, Tensor],
    prune_per_step: int,
    target: int | dict[str, int],
) -> dict[str, Tensor]:
    """New keep-masks with the `prune_per_step` lowest-scored live tokens removed, never below `target`.

    `scores` / `masks`: tower -> (L, ξ). An int `target` is one global budget and ranking over all
    towers (Eq. 5); a dict is a per-tower budget, each tower losing up to `prune_per_step` of its own.
    """
    towers = list(masks)
    if isinstance(target, dict):
        new = {}
        for tower in towers:
            new.update(prune_step({tower: scores[tower]}, {tower: masks[tower]}, prune_per_step, target[tower]))
        return new
    flat_scores = torch.cat([scores[t].detach().float().flatten().cpu() for t in towers])  # (T,)
    flat_masks = torch.cat([masks[t].flatten().cpu() for t in towers])  # (T,)
    count = min(prune_per_step, int(flat_masks.sum()) - target)
    if count <= 0:
        return {t: masks[t].clone() for t in towers}
    ranked = torch.where(flat_masks, flat_scores, torch.inf)  # pruned tokens are never chosen again
    order = torch.sort(ranked, stable=True).indices  # stable: ties go to the earliest position
    flat_masks = flat_masks.clone()
    flat_masks[order[:count]] = False
    new, start = {}, 0
    for tower in towers:
        size = masks[tower].numel()
        new[tower] = flat_masks[start : start + size].view_as(masks[tower]).to(masks[tower].device)
        start += size
    return new


def _excess(pool: dict[str, int], target: int | dict[str, int]) -> dict[str, int]:
    """Tokens to prune: one global count (key "all"), or one per tower for a per-tower budget."""
    if isinstance(target, dict):
        return {tower: max(0, size - target[tower]) for tower, size in pool.items()}
    return {"all": max(0, sum(pool.values()) - target)}


def pruning_rate(pool: dict[str, int], target: int | dict[str, int], windows: int) -> int:
    """Smallest r_p that prunes `pool` (tower -> tokens at start) down to `target` in `windows` pruning steps."""
    worst = max(_excess(pool, target).values())
    if worst == 0:
        return 0
    if windows < 1:
        raise ValueError(f"{worst} tokens to prune but no pruning step")
    return math.ceil(worst / windows)


def live_after(pool: dict[str, int], target: int | dict[str, int], windows: int, rate: int) -> int:
    """Live tokens (all towers) after `windows` pruning steps of up to `rate` tokens each, never below `target`."""
    pruned = sum(min(count, windows * rate) for count in _excess(pool, target).values())
    return sum(pool.values()) - pruned


def live_per_layer(masks: dict[str, Tensor]) -> dict[str, list[int]]:
    """Tower -> live tokens per block (the paper's Fig. 3 context lengths)."""
    return {tower: mask.sum(-1).tolist() for tower, mask in masks.items()}
