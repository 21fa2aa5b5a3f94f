"""Which sub-layers of the transformer blocks train: CLIP-AST's importance and selection, as pure functions.

CLIP-AST (Zhang et al., CVPR 2025) scores every sub-layer tensor of a residual block by the mean
AdamW effective step it received in a short probe (Eq. 8):

    v'_i = mean_elements( 1 / (sqrt(v̂_i) + eps) ),   v̂ = exp_avg_sq / (1 - β2^t)

and trains only the top-K per block (`granularity="layer"`) or the top-K sub-layer *types* of an
encoder in every block (`granularity="global"`). Controls: every bias (`bitfit`) and K random
tensors per block (`random`, seeded).

Deviation (a decision; the paper is silent): the key rows of `attn.in_proj_bias` are left out of its
score. Softmax attention ignores a key bias, its gradient is round-off, and 1/(sqrt(v̂)+eps) ≈ 1/eps
would otherwise put the fused bias first in every block.

A *unit* is one selectable piece: a parameter tensor of a block (12 per native CLIP block), or with
`split_qkv` one of the q/k/v row ranges of the fused `attn.in_proj_{weight,bias}` (16 per block).
For other towers (timm, ResNet, Hugging Face) a unit is likewise a parameter tensor of one of the
tower's residual blocks (a timm block, a ResNet bottleneck, an encoder layer).
Units are named after open_clip's state-dict keys, so a selection reads like the model it came from:
`visual.transformer.resblocks.3.mlp.c_fc.weight`, `transformer.resblocks.0.attn.in_proj_weight[q]`.
"""

import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ENCODERS",
    "SUBLAYER_TYPES",
    "Unit",
    "adam_importance",
    "bias_units",
    "block_units",
    "filter_encoders",
    "importance_scores",
    "random_units",
    "row_masks",
    "select_units",
    "selection_grid",
    "top_k_per_block",
    "top_k_types",
]

ENCODERS = ("image", "text")
# The 12 tensors of a native CLIP residual block, in the column order of the selection heatmaps.
SUBLAYER_TYPES = (
    "ln_1.weight",
    "ln_1.bias",
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
_SPLIT_TENSORS = ("attn.in_proj_weight", "attn.in_proj_bias")  # rows [q; k; v], each `width` long
_QKV = ("q", "k", "v")
_BLOCK_NAME = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Unit:
    """One selectable piece of a residual block: a whole tensor, or a row range of one."""

    name: str  # "visual.transformer.resblocks.3.attn.in_proj_weight[q]"
    param: str  # the parameter it lives in: "visual.transformer.resblocks.3.attn.in_proj_weight"
    encoder: str  # "image" | "text"
    block: int
    kind: str  # sub-layer type, the heatmap column: "attn.in_proj_weight[q]"
    rows: tuple[int, int] | None = None  # [start, stop) rows of `param`; None: the whole tensor

    @property
    def is_bias(self) -> bool:
        """Whether the unit is a bias (BitFit's set: LayerNorm and linear biases)."""
        return self.kind.split("[")[0].endswith("bias")


def block_units(
    named_shapes: Iterable[tuple[str, Sequence[int]]],
    split_qkv: bool = False,
    blocks: Mapping[str, Sequence[str]] | None = None,
) -> list[Unit]:
    """Units of every tensor inside `visual.transformer.resblocks.*` and `transformer.resblocks.*`.

    `named_shapes` are (open_clip name, shape) pairs, e.g. from `model.named_parameters()`; tensors
    outside the blocks are skipped. Order: as given (the model's order), q/k/v in that order.
    `blocks` ({encoder: [name prefix of block 0, of block 1, ...]}) names the blocks of any other tower
    (timm `visual.trunk.blocks.3.`, ResNet `visual.layer2.1.`); a unit's kind is its name after the prefix.
    Only open_clip's fused `attn.in_proj_*` is split by `split_qkv`; other towers' tensors stay whole.
    """
    prefixes = [(p, e, i) for e, names in (blocks or {}).items() for i, p in enumerate(names)]
    units = []
    for name, shape in named_shapes:
        if blocks is None:
            match = _BLOCK_NAME.match(name)
            if match is None:
                continue
            encoder = "image" if match.group(1) else "text"
            block, kind = int(match.group(2)), match.group(3)
        else:
            found = next(((e, i, name[len(p) :]) for p, e, i in prefixes if name.startswith(p)), None)
            if found is None:
                continue
            encoder, block, kind = found
        if split_qkv and kind in _SPLIT_TENSORS:
            if shape[0] % 3:
                raise ValueError(f"{name}: {shape[0]} rows cannot be split into q, k, v")
            width = shape[0] // 3
            for i, part in enumerate(_QKV):
                rows = (i * width, (i + 1) * width)
                units.append(Unit(f"{name}[{part}]", name, encoder, block, f"{kind}[{part}]", rows))
        else:
            units.append(Unit(name, name, encoder, block, kind))
    return units


def filter_encoders(units: Iterable[Unit], encoders: str) -> list[Unit]:
    """Units of `encoders`: both | image | text (the paper's Table 5)."""
    if encoders not in ("both", *ENCODERS):
        raise ValueError(f"encoders must be both | image | text, got {encoders!r}")
    return [u for u in units if encoders == "both" or u.encoder == encoders]


def adam_importance(exp_avg_sq: Tensor, step: int, beta2: float, eps: float, mode: str = "corrected") -> Tensor:
    """Per-element AdamW effective step size, the summand of Eq. 8.

    corrected: 1 / (sqrt(v / (1 - β2^t)) + eps)  (PyTorch's own step denominator, Eq. 6-7);
    raw:       1 / sqrt(v + eps)                  (no bias correction, eps inside; the unofficial code).
    """
    v = exp_avg_sq.double()
    if mode == "corrected":
        if step < 1:
            raise ValueError("bias correction needs at least one optimizer step")
        return 1.0 / ((v / (1.0 - beta2**step)).sqrt() + eps)
    if mode == "raw":
        return 1.0 / (v + eps).sqrt()
    raise ValueError(f"importance must be corrected | raw, got {mode!r}")


def importance_scores(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], units: Iterable[Unit], mode: str = "corrected"
) -> dict[str, float]:
    """Eq. 8 for every unit: mean of `adam_importance` over the unit's elements.

    The optimizer state is read by parameter object (`optimizer.state[p]`), never by index, with
    β2 and eps of the parameter's own group. `params` maps unit param names to the tensors the
    optimizer holds. A unit whose tensor has no state (it never got a gradient) scores -inf: it is
    ranked last. The key rows of `attn.in_proj_bias` are left out (`_without_key_bias`).
    """
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    scores: dict[str, float] = {}
    cache: dict[str, Tensor] = {}
    for unit in units:
        p = params[unit.param]
        state = optimizer.state.get(p, {})
        if id(p) not in groups:
            raise KeyError(f"{unit.param} is not in the optimizer")
        if "exp_avg_sq" not in state:
            if state:
                raise TypeError(f"{type(optimizer).__name__} keeps no second moment (exp_avg_sq): use Adam or AdamW")
            scores[unit.name] = float("-inf")
            continue
        if unit.param not in cache:
            group = groups[id(p)]
            step = int(state["step"]) if "step" in state else int(group.get("step", 0))
            cache[unit.param] = adam_importance(state["exp_avg_sq"], step, group["betas"][1], group["eps"], mode)
        values = cache[unit.param]
        if unit.rows is not None:
            values = values[unit.rows[0] : unit.rows[1]]
        if unit.kind.startswith("attn.in_proj_bias"):
            values = _without_key_bias(values, unit)
        scores[unit.name] = float(values.mean()) if values.numel() else float("-inf")
    return scores


def _without_key_bias(values: Tensor, unit: Unit) -> Tensor:
    """Drop the key rows of `attn.in_proj_bias`: softmax is shift-invariant per query, so the key bias
    gets a zero (or round-off) gradient, v ≈ 0 and 1/(sqrt(v)+eps) ≈ 1/eps would rank the whole bias
    first in every block. **Decision** (not in the paper): score the bias by its q and v rows; the
    `[k]` unit of `split_qkv` scores -inf and is never selected."""
    if unit.rows is not None:
        return values[:0] if unit.kind.endswith("[k]") else values
    width = values.shape[0] // 3
    return torch.cat([values[:width], values[2 * width :]])


def _by_block(units: Iterable[Unit]) -> dict[tuple[str, int], list[Unit]]:
    groups: dict[tuple[str, int], list[Unit]] = {}
    for unit in units:
        groups.setdefault((unit.encoder, unit.block), []).append(unit)
    return groups


def _ranked(names: Sequence[str], scores: Mapping[str, float]) -> list[str]:
    """Highest score first; ties keep the given order (sorted is stable), so the ranking is deterministic."""
    return sorted(names, key=lambda n: -scores[n])


def top_k_per_block(units: Iterable[Unit], scores: Mapping[str, float], top_k: int) -> list[str]:
    """Layer granularity: the `top_k` highest-scoring units of each (encoder, block)."""
    units = list(units)
    chosen = set()
    for members in _by_block(units).values():
        chosen.update(_ranked([u.name for u in members], scores)[:top_k])
    return [u.name for u in units if u.name in chosen]


def top_k_types(units: Iterable[Unit], scores: Mapping[str, float], top_k: int) -> list[str]:
    """Global granularity: per encoder, average each type's score over blocks; train the top-K types in every block."""
    units = list(units)
    chosen: set[tuple[str, str]] = set()
    for encoder in ENCODERS:
        by_kind: dict[str, list[float]] = {}
        for u in units:
            if u.encoder == encoder:
                by_kind.setdefault(u.kind, []).append(scores[u.name])
        means = {kind: sum(values) / len(values) for kind, values in by_kind.items()}
        chosen.update((encoder, kind) for kind in _ranked(list(means), means)[:top_k])
    return [u.name for u in units if (u.encoder, u.kind) in chosen]


def bias_units(units: Iterable[Unit]) -> list[str]:
    """BitFit: every bias of every block (LayerNorm and linear), chosen without a probe."""
    return [u.name for u in units if u.is_bias]


def random_units(units: Iterable[Unit], top_k: int, seed: int) -> list[str]:
    """The control: `top_k` units drawn uniformly per (encoder, block), reproducible from `seed`."""
    units = list(units)
    rng = random.Random(seed)
    chosen = set()
    groups = _by_block(units)
    for key in sorted(groups):
        members = groups[key]
        chosen.update(u.name for u in rng.sample(members, min(top_k, len(members))))
    return [u.name for u in units if u.name in chosen]


def select_units(
    units: Sequence[Unit],
    scheme: str = "adaptive",
    granularity: str = "layer",
    top_k: int = 6,
    scores: Mapping[str, float] | None = None,
    seed: int = 0,
) -> list[str]:
    """The selected unit names, in `units` order (filter `units` by encoder first)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if scheme == "bitfit":
        return bias_units(units)
    if scheme == "random":
        return random_units(units, top_k, seed)
    if scheme != "adaptive":
        raise ValueError(f"scheme must be adaptive | bitfit | random, got {scheme!r}")
    if scores is None:
        raise ValueError("the adaptive scheme needs importance scores")
    if granularity == "layer":
        return top_k_per_block(units, scores, top_k)
    if granularity == "global":
        return top_k_types(units, scores, top_k)
    raise ValueError(f"granularity must be layer | global, got {granularity!r}")


def row_masks(units: Iterable[Unit], selected: Iterable[str]) -> dict[str, tuple[int, list[tuple[int, int]]]]:
    """Parameters that are only partly selected (split q/k/v): name -> (rows, selected row ranges)."""
    selected = set(selected)
    parts: dict[str, list[Unit]] = {}
    for unit in units:
        if unit.rows is not None:
            parts.setdefault(unit.param, []).append(unit)
    masks = {}
    for param, members in parts.items():
        kept = [u.rows for u in members if u.name in selected]
        if kept and len(kept) < len(members):
            masks[param] = (max(u.rows[1] for u in members), kept)
    return masks


def selection_grid(
    units: Iterable[Unit], encoder: str, scores: Mapping[str, float | None] | None, selected: Iterable[str]
) -> dict[str, Any]:
    """One encoder's selection as a table (rows = blocks, columns = sub-layer types): the heatmap's data."""
    units = [u for u in units if u.encoder == encoder]
    kinds = list(dict.fromkeys(u.kind for u in units))
    blocks = sorted({u.block for u in units})
    selected = set(selected)
    score = [[None] * len(kinds) for _ in blocks]
    chosen = [[False] * len(kinds) for _ in blocks]
    for u in units:
        i, j = blocks.index(u.block), kinds.index(u.kind)
        chosen[i][j] = u.name in selected
        value = None if scores is None else scores.get(u.name)
        score[i][j] = value if value is not None and value != float("-inf") else None
    return {"blocks": blocks, "kinds": kinds, "scores": score, "selected": chosen}
