"""CLIP-AST selection (clipadapt/selection.py): scores and selections against hand-computed values.

The fake model has open_clip's block names, 2 blocks per tower and width 2. One AdamW step with
betas (0.9, 0.5) and eps 1 from a constant gradient c leaves exp_avg_sq = 0.5·c², step 1, so
v̂ = c² and the corrected score is 1 / (|c| + 1): every number below is worked out by hand.
"""

import math

import pytest
import torch
from torch import nn

from clipadapt.selection import (
    SUBLAYER_TYPES,
    adam_importance,
    bias_units,
    block_units,
    filter_encoders,
    importance_scores,
    random_units,
    row_masks,
    select_units,
    selection_grid,
    top_k_per_block,
    top_k_types,
)

W = 2
SHAPES = {
    "ln_1.weight": (W,),
    "ln_1.bias": (W,),
    "attn.in_proj_weight": (3 * W, W),
    "attn.in_proj_bias": (3 * W,),
    "attn.out_proj.weight": (W, W),
    "attn.out_proj.bias": (W,),
    "ln_2.weight": (W,),
    "ln_2.bias": (W,),
    "mlp.c_fc.weight": (4 * W, W),
    "mlp.c_fc.bias": (4 * W,),
    "mlp.c_proj.weight": (W, 4 * W),
    "mlp.c_proj.bias": (W,),
}
PREFIX = {"image": "visual.transformer.resblocks", "text": "transformer.resblocks"}
# Constant gradient c per tensor (index j = position in SUBLAYER_TYPES); None: no gradient at all.
GRADS = {
    ("image", 0): list(range(12)),  # scores 1/1, 1/2, ... -> top-3: j = 0, 1, 2
    ("image", 1): [11 - j for j in range(12)],  # reversed -> top-3: j = 11, 10, 9
    ("text", 0): [(5 * j) % 12 for j in range(12)],  # c = 0 at j=0, 1 at j=5, 2 at j=10
    ("text", 1): [3, 3, 3, 3, 3, 3, 0, None, 3, 3, 3, 3],  # ln_2.weight first, then ties in model order
}


def fake_model() -> dict[str, nn.Parameter]:
    """open_clip-named block tensors plus two tensors outside the blocks, which are never units."""
    params = {"visual.conv1.weight": nn.Parameter(torch.ones(W, 3, 1, 1))}
    for (encoder, block), grads in GRADS.items():
        for kind, c in zip(SUBLAYER_TYPES, grads, strict=True):
            p = nn.Parameter(torch.ones(SHAPES[kind]))
            p.grad = None if c is None else torch.full(SHAPES[kind], float(c))
            params[f"{PREFIX[encoder]}.{block}.{kind}"] = p
    params["ln_final.weight"] = nn.Parameter(torch.ones(W))
    return params


def stepped(params: dict[str, nn.Parameter], order: list[str] | None = None) -> torch.optim.AdamW:
    """AdamW after one step from the preset gradients (params registered in `order`)."""
    blocks = [p for n, p in params.items() if "resblocks" in n]
    ordered = blocks if order is None else [params[n] for n in order]
    optimizer = torch.optim.AdamW(ordered, lr=1e-3, betas=(0.9, 0.5), eps=1.0, weight_decay=0.0)
    optimizer.step()
    return optimizer


def name(encoder: str, block: int, kind: str) -> str:
    return f"{PREFIX[encoder]}.{block}.{kind}"


def test_units_are_the_block_tensors_in_model_order():
    params = fake_model()
    units = block_units((n, p.shape) for n, p in params.items())
    assert len(units) == 4 * 12
    assert [u.kind for u in units[:12]] == list(SUBLAYER_TYPES)
    assert {(u.encoder, u.block) for u in units} == set(GRADS)
    assert units[0].name == "visual.transformer.resblocks.0.ln_1.weight" and units[0].rows is None
    assert units[-1] == block_units([("transformer.resblocks.1.mlp.c_proj.bias", (W,))])[0]


def test_split_qkv_gives_row_units():
    units = block_units([("visual.transformer.resblocks.3.attn.in_proj_weight", (6, 2))], split_qkv=True)
    assert [(u.name, u.kind, u.rows) for u in units] == [
        ("visual.transformer.resblocks.3.attn.in_proj_weight[q]", "attn.in_proj_weight[q]", (0, 2)),
        ("visual.transformer.resblocks.3.attn.in_proj_weight[k]", "attn.in_proj_weight[k]", (2, 4)),
        ("visual.transformer.resblocks.3.attn.in_proj_weight[v]", "attn.in_proj_weight[v]", (4, 6)),
    ]
    assert len(block_units(((n, p.shape) for n, p in fake_model().items()), split_qkv=True)) == 4 * 16


def test_adam_importance_by_hand():
    v = torch.tensor([0.75, 3.0])
    # β2 = 0.5, t = 2: v̂ = v / 0.75 = [1, 4]; corrected 1/(sqrt(v̂)+eps), raw 1/sqrt(v+eps)
    assert adam_importance(v, 2, 0.5, 0.0).tolist() == [1.0, 0.5]
    assert adam_importance(v, 2, 0.5, 1.0).tolist() == pytest.approx([1 / 2, 1 / 3])
    assert adam_importance(v, 2, 0.5, 1.0, mode="raw").tolist() == pytest.approx([1 / math.sqrt(1.75), 0.5])
    with pytest.raises(ValueError, match="corrected"):
        adam_importance(v, 2, 0.5, 1.0, mode="other")


def test_scores_from_a_known_optimizer_state():
    params = fake_model()
    units = block_units((n, p.shape) for n, p in params.items())
    scores = importance_scores(stepped(params), params, units)
    assert scores[name("image", 0, "ln_1.weight")] == pytest.approx(1.0)  # c = 0
    assert scores[name("image", 0, "mlp.c_proj.bias")] == pytest.approx(1 / 12)  # c = 11
    assert scores[name("image", 1, "ln_1.weight")] == pytest.approx(1 / 12)
    assert scores[name("text", 0, "attn.out_proj.bias")] == pytest.approx(1 / 2)  # c = 1
    assert scores[name("text", 1, "ln_2.bias")] == float("-inf")  # never got a gradient
    params = fake_model()
    raw = importance_scores(stepped(params), params, units, mode="raw")
    # raw: v = 0.5 c², score 1 / sqrt(0.5 c² + 1)
    assert raw[name("text", 0, "mlp.c_proj.weight")] == pytest.approx(1 / math.sqrt(0.5 * 4 + 1))  # c = 2


def test_scores_follow_the_parameter_not_the_registration_order():
    params = fake_model()
    units = block_units((n, p.shape) for n, p in params.items())
    expected = importance_scores(stepped(params), params, units)
    params = fake_model()
    shuffled = [n for n in reversed(params) if "resblocks" in n]
    assert importance_scores(stepped(params, shuffled), params, units) == expected


def test_split_scores_by_hand():
    params = fake_model()
    key = name("image", 0, "attn.in_proj_weight")
    params[key].grad = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [3.0, 3.0], [3.0, 3.0]])
    units = block_units(((n, p.shape) for n, p in params.items()), split_qkv=True)
    scores = importance_scores(stepped(params), params, units)
    assert [scores[f"{key}[{part}]"] for part in "qkv"] == pytest.approx([1.0, 1 / 2, 1 / 4])


def test_layer_granularity_top_k_per_block_by_hand():
    params = fake_model()
    units = block_units((n, p.shape) for n, p in params.items())
    scores = importance_scores(stepped(params), params, units)
    selected = top_k_per_block(units, scores, 3)
    expected = {
        ("image", 0): ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight"],
        ("image", 1): ["mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"],
        ("text", 0): ["ln_1.weight", "attn.out_proj.bias", "mlp.c_proj.weight"],
        ("text", 1): ["ln_1.weight", "ln_1.bias", "ln_2.weight"],  # ln_2.weight + ties in model order
    }
    assert selected == [name(e, b, kind) for (e, b), kinds in expected.items() for kind in kinds]
    assert select_units(units, "adaptive", "layer", 3, scores) == selected
    assert len(top_k_per_block(units, scores, 50)) == len(units)  # K larger than a block: all of it


def test_global_granularity_picks_types_by_mean_over_blocks():
    units = block_units([(name(e, b, k), SHAPES[k]) for e in ("image", "text") for b in (0, 1) for k in SHAPES])
    # image: ln_1.bias 0.9 and 0.1 (mean .5), c_fc.weight .4 and .4 (mean .4), ln_2.weight .2 and .7 (mean .45)
    scores = {u.name: 0.0 for u in units}
    scores |= {name("image", 0, "ln_1.bias"): 0.9, name("image", 1, "ln_1.bias"): 0.1}
    scores |= {name("image", b, "mlp.c_fc.weight"): 0.4 for b in (0, 1)}
    scores |= {name("image", 0, "ln_2.weight"): 0.2, name("image", 1, "ln_2.weight"): 0.7}
    scores |= {name("text", b, "attn.out_proj.weight"): 1.0 for b in (0, 1)}
    selected = top_k_types(units, scores, 2)
    assert selected == [
        name("image", 0, "ln_1.bias"),
        name("image", 0, "ln_2.weight"),
        name("image", 1, "ln_1.bias"),
        name("image", 1, "ln_2.weight"),
        name("text", 0, "ln_1.weight"),  # the text tie at 0 is broken by model order
        name("text", 0, "attn.out_proj.weight"),
        name("text", 1, "ln_1.weight"),
        name("text", 1, "attn.out_proj.weight"),
    ]
    assert select_units(units, "adaptive", "global", 2, scores) == selected


def test_bitfit_random_and_encoder_filter():
    units = block_units((n, p.shape) for n, p in fake_model().items())
    biases = bias_units(units)
    assert len(biases) == 4 * 6 and all(n.endswith("bias") for n in biases)
    image = filter_encoders(units, "image")
    assert {u.encoder for u in image} == {"image"} and len(image) == 24
    assert select_units(filter_encoders(units, "text"), "bitfit") == [n for n in biases if not n.startswith("visual")]

    first, again, other = random_units(units, 4, seed=1), random_units(units, 4, seed=1), random_units(units, 4, seed=2)
    assert first == again and first != other
    for key in GRADS:
        assert sum(name(*key, k) in first for k in SUBLAYER_TYPES) == 4
    with pytest.raises(ValueError, match="scores"):
        select_units(units, "adaptive")
    with pytest.raises(ValueError, match="encoders"):
        filter_encoders(units, "audio")


def test_sgd_state_is_refused():
    params = fake_model()
    units = block_units((n, p.shape) for n, p in params.items())
    sgd = torch.optim.SGD([p for n, p in params.items() if "resblocks" in n], lr=0.1, momentum=0.9)
    sgd.step()
    with pytest.raises(TypeError, match="Adam"):
        importance_scores(sgd, params, units)


def test_row_masks_only_for_partly_selected_tensors():
    key = name("image", 0, "attn.in_proj_weight")
    bias = name("image", 0, "attn.in_proj_bias")
    units = block_units([(key, (6, 2)), (bias, (6,))], split_qkv=True)
    masks = row_masks(units, [f"{key}[q]", f"{key}[v]", f"{bias}[q]", f"{bias}[k]", f"{bias}[v]"])
    assert masks == {key: (6, [(0, 2), (4, 6)])}


def test_selection_grid_is_blocks_by_types():
    params = fake_model()
    units = block_units((n, p.shape) for n, p in params.items())
    scores = importance_scores(stepped(params), params, units)
    selected = top_k_per_block(units, scores, 3)
    grid = selection_grid(units, "text", scores, selected)
    assert grid["blocks"] == [0, 1] and grid["kinds"] == list(SUBLAYER_TYPES)
    assert grid["selected"][1][:3] == [True, True, False] and grid["selected"][1][6] is True
    assert grid["scores"][0][5] == pytest.approx(0.5) and grid["scores"][1][7] is None  # -inf shown as missing


def test_key_bias_rows_are_left_out_of_the_score():
    # in_proj_bias rows [q; k; v] with gradients 0 | 3 | 1: the k rows (a no-op of softmax attention,
    # round-off gradients in practice) must not count; the score is the mean over q and v rows.
    bias = nn.Parameter(torch.ones(3 * W))
    bias.grad = torch.tensor([0.0, 0.0, 3.0, 3.0, 1.0, 1.0])
    params = {"visual.transformer.resblocks.0.attn.in_proj_bias": bias}
    optimizer = torch.optim.AdamW([bias], lr=1e-3, betas=(0.9, 0.5), eps=1.0, weight_decay=0.0)
    optimizer.step()
    (unit,) = block_units((n, p.shape) for n, p in params.items())
    assert importance_scores(optimizer, params, [unit])[unit.name] == pytest.approx((1 / 1 + 1 / 2) / 2)
    split = block_units(((n, p.shape) for n, p in params.items()), split_qkv=True)
    scores = importance_scores(optimizer, params, split)
    assert [scores[u.name] for u in split] == [pytest.approx(1.0), float("-inf"), pytest.approx(0.5)]
