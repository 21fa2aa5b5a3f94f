"""The rational adapter against a literal re-statement of the spec, its chunking, and the RAda loss terms."""

import math

import pytest
import torch
import torch.nn.functional as F

from clipadapt.losses import entropy, marginal_entropy, mask_regularizer
from clipadapt.models.rational import QUERIES, RationalAdapter


def unit(*shape: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape), dim=-1)


def perturbed(adapter: RationalAdapter, std: float = 0.1) -> RationalAdapter:
    """Leave the zero-init so the mask is not identically one."""
    for p in adapter.out_proj.parameters():
        torch.nn.init.normal_(p, std=std)
    return adapter


def spec_forward(adapter: RationalAdapter, f: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The spec's pseudo-code, line by line, without chunking: (B, D), (C, D) -> logits (B, C)."""
    B, C, D = f.shape[0], w.shape[0], f.shape[1]
    H = adapter.num_heads
    R = f[:, None, :] * w[None, :, :]
    Q = {
        "image": s.sqrt() * f[:, None, :].expand(B, C, D),
        "text": s.sqrt() * w[None].expand(B, C, D),
        "rational": s * R,
    }

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(B, C, H, D // H).permute(0, 2, 1, 3)

    k, v = heads(adapter.k_proj(s * R)), heads(adapter.v_proj(s * R))
    maps = []
    for name in adapter.queries:
        A = heads(adapter.q_proj[name](Q[name])) @ k.transpose(-1, -2) / math.sqrt(D // H) / adapter.temperature
        maps.append(C * torch.softmax(A.reshape(B, H, C * C), -1).reshape(B, H, C, C))
    P = sum(maps) / len(maps)
    out = adapter.out_proj((P @ v).permute(0, 2, 1, 3).reshape(B, C, D))
    M = torch.relu(1 + out)
    return s * (M * R).sum(-1)


@pytest.mark.parametrize(
    "queries", [QUERIES, ("rational",), ("image",), ("text",), ("image", "rational"), ("text", "rational")]
)
def test_adapter_matches_the_spec_pseudo_code(queries):
    adapter = perturbed(RationalAdapter(32, queries=queries, temperature=0.7))
    f, w, s = unit(3, 32), unit(5, 32), torch.tensor(100.0)
    with torch.no_grad():
        logits, mask = adapter(f, w, s)
        expected = spec_forward(adapter, f, w, s)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    assert mask.shape == (3, 5, 32) and (mask >= 0).all() and not torch.allclose(mask, torch.ones_like(mask))


@pytest.mark.parametrize("mask_net", ["attention", "mlp"])
def test_at_init_the_mask_is_one_and_the_logits_are_zero_shot(mask_net):
    adapter = RationalAdapter(32, mask_net=mask_net)
    f, w, s = unit(4, 32), unit(7, 32), torch.tensor(100.0)
    logits, mask = adapter(f, w, s)
    assert torch.equal(mask, torch.ones_like(mask))
    torch.testing.assert_close(logits, s * f @ w.T)


def test_the_grid_softmax_has_mass_c_per_head():
    """P_i sums to C over the whole C×C grid (not to 1 per row): checked through v = ones."""
    adapter = RationalAdapter(16, num_heads=2)
    with torch.no_grad():
        adapter.v_proj.weight.zero_()
        adapter.v_proj.bias.fill_(1.0)  # every value is 1, so P·v sums the map over keys
        f, w, s = unit(2, 16), unit(6, 16), torch.tensor(50.0)
        out = adapter._attend(f, w, s, s * f[:, None] * w[None])  # (B, C, D), P·1 per query row
    torch.testing.assert_close(out.sum(1), torch.full((2, 16), 6.0))  # Σ_rows Σ_keys P = C
    assert not torch.allclose(out, torch.ones_like(out))  # rows do not each sum to 1


@pytest.mark.parametrize("budget", [8 * 7 * 7 * 2, 8 * 7 * 7, 8 * 7 * 3, 1])
def test_chunked_and_unchunked_are_equal_forward_and_backward(budget):
    torch.manual_seed(1)
    adapter = perturbed(RationalAdapter(32))
    f, w, s = unit(5, 32).requires_grad_(), unit(7, 32), torch.tensor(100.0)
    logits, mask = adapter(f, w, s)
    (logits.sum() + mask.square().sum()).backward()
    full_grads = {n: p.grad.clone() for n, p in adapter.named_parameters()}
    full_input_grad = f.grad.clone()
    adapter.zero_grad()
    f.grad = None
    adapter.max_map_elements = budget  # 2 samples per chunk, 1, then 3 and 1 query rows per chunk
    chunked_logits, chunked_mask = adapter(f, w, s)
    (chunked_logits.sum() + chunked_mask.square().sum()).backward()
    torch.testing.assert_close(chunked_logits, logits, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked_mask, mask, rtol=1e-5, atol=1e-5)
    for name, p in adapter.named_parameters():
        torch.testing.assert_close(p.grad, full_grads[name], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(f.grad, full_input_grad, rtol=1e-4, atol=1e-3)


def test_a_thousand_classes_fit_in_memory_on_the_tiny_model():
    adapter = perturbed(RationalAdapter(32), std=0.02)
    f, w, s = unit(1, 32), unit(1000, 32), torch.tensor(100.0)
    with torch.no_grad():
        logits, mask = adapter(f, w, s)  # one 8·10⁶-entry map per query and sample
        adapter.max_map_elements = 2**20  # forces query-row chunks of 131 classes
        chunked, _ = adapter(f, w, s)
    assert logits.shape == (1, 1000) and mask.shape == (1, 1000, 32) and torch.isfinite(logits).all()
    torch.testing.assert_close(chunked, logits, rtol=1e-5, atol=1e-4)


def test_adapter_rejects_bad_switches():
    with pytest.raises(ValueError, match="subset"):
        RationalAdapter(32, queries=("image", "pixels"))
    with pytest.raises(ValueError, match="subset"):
        RationalAdapter(32, queries=())
    with pytest.raises(ValueError, match="mlp"):
        RationalAdapter(32, mask_net="transformer")
    with pytest.raises(ValueError, match="divisible"):
        RationalAdapter(30, num_heads=8)


def test_mask_regularizers_by_hand():
    mask = torch.tensor([[[1.0, 3.0], [1.0, 1.0]], [[0.0, 1.0], [1.5, 1.0]]])  # (2, 2, 2); M − 1: 0 2 0 0 | −1 0 .5 0
    assert mask_regularizer(mask, "mse").item() == pytest.approx((4 + 1 + 0.25) / 8)
    assert mask_regularizer(mask, "l1").item() == pytest.approx((2 + 1 + 0.5) / 8)
    assert mask_regularizer(mask, "linf").item() == pytest.approx((2 + 1) / 2)
    assert mask_regularizer(torch.ones(3, 4, 5)).item() == 0.0
    with pytest.raises(ValueError, match="linf"):
        mask_regularizer(mask, "l2")


def test_entropies_by_hand():
    uniform = torch.zeros(4)
    assert entropy(uniform).item() == pytest.approx(math.log(4))
    confident = torch.tensor([[100.0, 0.0], [0.0, 100.0]])  # two views, each sure, of different classes
    assert entropy(confident).max().item() < 1e-6
    assert marginal_entropy(confident).item() == pytest.approx(math.log(2))  # their average is uniform
    logits = torch.randn(3, 5, 7)  # (N, V, C)
    expected = -(torch.softmax(logits, -1).mean(1) * torch.softmax(logits, -1).mean(1).log()).sum(-1)
    torch.testing.assert_close(marginal_entropy(logits), expected)
