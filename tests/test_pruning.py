"""Adapt's pruning functions on hand-computed numbers: scores, accumulation, one pruning step, budgets."""

import pytest
import torch

from clipadapt.pruning import (
    accumulate,
    live_after,
    live_per_layer,
    prune_step,
    pruning_rate,
    split_budget,
    token_scores,
)


def test_scores_reduce_over_the_width_by_mean_or_sum():
    tokens = torch.tensor([[[1.0, -2.0], [0.5, 4.0]]])  # (L=1, ξ=2, W=2)
    grad = torch.tensor([[[3.0, 1.0], [-2.0, 0.0]]])
    # snip |g ⊙ P|: token 0 -> (3, 2), token 1 -> (1, 0)
    assert token_scores(tokens, grad, "snip").tolist() == [[2.5, 0.5]]
    assert token_scores(tokens, grad, "snip", "sum").tolist() == [[5.0, 1.0]]
    assert token_scores(tokens, grad, "grad").tolist() == [[2.0, 1.0]]
    assert token_scores(tokens, grad, "l2", "sum").tolist() == [[3.0, 4.5]]
    assert token_scores(tokens, None, "snip").tolist() == [[0.0, 0.0]]  # no gradient reached the tower
    assert token_scores(tokens, None, "l2").tolist() == [[1.5, 2.25]]  # l2 needs none


def test_mean_makes_towers_of_different_width_comparable():
    narrow, wide = torch.ones(1, 1, 4), torch.ones(1, 1, 12)
    assert token_scores(narrow, narrow, "snip") == token_scores(wide, wide, "snip")
    assert token_scores(narrow, narrow, "snip", "sum") < token_scores(wide, wide, "snip", "sum")


def test_unknown_score_is_refused():
    with pytest.raises(ValueError, match="snip"):
        token_scores(torch.ones(1, 1, 1), None, "fisher")


def test_accumulate_adds_in_place():
    totals = {"image": torch.zeros(1, 2), "text": torch.ones(1, 2)}
    accumulate(totals, {"image": torch.tensor([[1.0, 2.0]]), "text": torch.tensor([[0.5, 0.0]])})
    accumulate(totals, {"image": torch.tensor([[1.0, 2.0]]), "text": torch.tensor([[0.5, 0.0]])})
    assert totals["image"].tolist() == [[2.0, 4.0]] and totals["text"].tolist() == [[2.0, 1.0]]


def test_global_step_prunes_the_lowest_live_tokens_across_towers():
    scores = {"image": torch.tensor([[5.0, 1.0, 7.0]]), "text": torch.tensor([[0.5, 9.0], [3.0, 0.1]])}
    masks = {"image": torch.tensor([[True, True, True]]), "text": torch.tensor([[True, True], [True, False]])}
    # live: image 5, 1, 7; text 0.5, 9, 3 (0.1 is already pruned and must not count)
    new = prune_step(scores, masks, prune_per_step=2, target=2)
    assert new["image"].tolist() == [[True, False, True]]
    assert new["text"].tolist() == [[False, True], [True, False]]
    assert masks["image"].all(), "the input masks are not modified"


def test_never_below_target_and_ties_go_to_the_earliest_position():
    scores = {"image": torch.zeros(1, 3), "text": torch.zeros(1, 2)}
    masks = {"image": torch.ones(1, 3, dtype=torch.bool), "text": torch.ones(1, 2, dtype=torch.bool)}
    new = prune_step(scores, masks, prune_per_step=4, target=3)  # only 2 may go
    assert new["image"].tolist() == [[False, False, True]] and new["text"].all()
    again = prune_step(scores, new, prune_per_step=4, target=3)
    assert all(torch.equal(again[t], new[t]) for t in new)


def test_per_branch_budget_prunes_each_tower_to_its_share():
    assert split_budget(128, 0.5) == {"image": 64, "text": 64}
    assert split_budget(10, 0.3) == {"image": 7, "text": 3}
    scores = {"image": torch.tensor([[1.0, 2.0, 3.0, 4.0]]), "text": torch.tensor([[9.0, 8.0, 7.0]])}
    masks = {t: torch.ones_like(s, dtype=torch.bool) for t, s in scores.items()}
    new = prune_step(scores, masks, prune_per_step=2, target={"image": 3, "text": 1})
    # a global ranking would take image tokens only; per branch each tower loses its own lowest
    assert new["image"].tolist() == [[False, True, True, True]]
    assert new["text"].tolist() == [[True, False, False]]
    assert live_per_layer(new) == {"image": [3], "text": [1]}


def test_the_papers_schedule_leaves_eurosat_above_target_and_the_rate_that_reaches_it():
    # ViT-B/16: 12 blocks x ξ=16 per tower = 384 tokens. EuroSAT, 16 shots x 10 classes at batch 4:
    # 40 steps per epoch, 95 epochs after the 5 warmup ones, one pruning per n_k=80 steps: 47 steps.
    pool, windows = {"image": 192, "text": 192}, (100 - 5) * 40 // 80
    assert windows == 47
    assert live_after(pool, 128, windows, rate=4) == 384 - 47 * 4 == 196
    assert pruning_rate(pool, 128, windows) == 6  # ceil(256 / 47): 47 x 6 = 282 >= 256
    assert live_after(pool, 128, windows, rate=6) == 128
    assert pruning_rate(pool, 128, 64) == 4  # 64 steps x 4 = 256: the paper's r_p suffices
    assert pruning_rate(pool, 384, 0) == 0  # nothing to prune needs no pruning step


def test_per_branch_rate_follows_the_tower_with_most_to_prune():
    pool, target = {"image": 12, "text": 12}, {"image": 2, "text": 8}  # 10 and 4 tokens to prune
    assert pruning_rate(pool, target, 3) == 4  # ceil(10 / 3); each tower prunes up to r_p of its own
    assert live_after(pool, target, 3, rate=2) == (12 - 6) + 8  # image stops at 6, text reaches its 8
    with pytest.raises(ValueError, match="no pruning step"):
        pruning_rate(pool, target, 0)
