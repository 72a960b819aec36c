"""Pure tensor tests of lightning_sparse.sparsity.nm: masks, layouts, SR-STE gradient, validator, bake."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_sparse.sparsity.nm import (
    _keep_pairwise,
    _keep_sort,
    bake_nm,
    is_nm_eligible,
    nm_mask,
    nm_skip_reason,
    nm_violations,
    srste,
)


def _groups(x: torch.Tensor, m: int, layout: str) -> torch.Tensor:
    """Reference grouping by explicit permutation: (num_groups, m)."""
    if x.ndim == 2 or layout == "flattened":
        return x.reshape(x.shape[0], -1).reshape(-1, m)
    return x.permute(0, 2, 3, 1).reshape(-1, m)  # (C_out, k_h, k_w, C_in)


def _distinct_weight(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random signs, all magnitudes distinct."""
    g = torch.Generator().manual_seed(seed)
    numel = torch.Size(shape).numel()
    mags = (torch.randperm(numel, generator=g).float() + 1.0) / numel
    signs = torch.randint(0, 2, (numel,), generator=g).float() * 2 - 1
    return (mags * signs).reshape(shape)


@st.composite
def _cases(draw):
    m = draw(st.integers(2, 8) | st.sampled_from([16, 20]))
    n = draw(st.integers(1, m - 1))
    layout = draw(st.sampled_from(["input_channels", "flattened"]))
    c_out = draw(st.integers(1, 5))
    if draw(st.booleans()):
        shape = (c_out, m * draw(st.integers(1, 4)))
    else:
        k = draw(st.sampled_from([1, 3]))
        shape = (c_out, m * draw(st.integers(1, 3)), k, draw(st.sampled_from([1, 2])))
    return n, m, layout, shape, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None)
@given(_cases())
def test_mask_keeps_exactly_the_n_largest_per_group(case):
    n, m, layout, shape, seed = case
    w = _distinct_weight(shape, seed)
    mask = nm_mask(w, n, m, layout)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    g_mask, g_abs = _groups(mask, m, layout), _groups(w.abs(), m, layout)
    assert (g_mask.sum(1) == n).all()
    kept_min = torch.where(g_mask, g_abs, torch.inf).amin(1)
    dropped_max = torch.where(g_mask, -torch.inf, g_abs).amax(1)
    assert (kept_min > dropped_max).all()
    assert nm_violations(w * mask, n, m, layout) == 0


def test_input_channel_layout_groups_along_c_in_per_kernel_position():
    w = torch.zeros(1, 4, 2, 2)
    w[0, :, 0, 0] = torch.tensor([4.0, 3.0, 2.0, 1.0])  # group at (0,0): keep channels 0, 1
    w[0, :, 1, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # group at (1,1): keep channels 2, 3
    mask = nm_mask(w, 2, 4)
    assert mask[0, :, 0, 0].tolist() == [True, True, False, False]
    assert mask[0, :, 1, 1].tolist() == [False, False, True, True]
    # flattened layout groups the 16 values of the row 4 at a time: (c0: 4,0,0,0) (c1: 3,0,0,2) ...
    flat = nm_mask(w, 2, 4, layout="flattened").reshape(4, 4)
    assert (flat.sum(1) == 2).all()
    assert flat[0, 0] and flat[3, 3]


def test_ties_go_to_the_lower_index_in_every_path():
    w = torch.ones(3, 16)
    expected = torch.tensor([True, True, False, False] * 4).expand(3, 16)
    assert torch.equal(nm_mask(w, 2, 4), expected)
    a = w.view(-1, 16, 1)
    assert torch.equal(_keep_pairwise(a, 5), _keep_sort(a, 5))
    assert _keep_pairwise(a, 5)[0, :, 0].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_pairwise_and_sort_paths_agree_with_ties():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (64, 12, 3), generator=g).float()  # many ties
    for n in (1, 5, 11):
        assert torch.equal(_keep_pairwise(a, n), _keep_sort(a, n))


def test_non_contiguous_weight():
    w = _distinct_weight((8, 16, 3, 3), 0).to(memory_format=torch.channels_last)
    assert torch.equal(nm_mask(w, 2, 4), nm_mask(w.contiguous(), 2, 4))


@pytest.mark.parametrize("decay", [2e-4, 0.5])
@pytest.mark.parametrize("layout", ["input_channels", "flattened"])
def test_srste_gradient_is_ste_plus_decay_of_pruned_weights(decay, layout):
    w = _distinct_weight((6, 8, 3, 3), 3).requires_grad_()
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
    mask = nm_mask(w.detach(), 2, 4, layout)
    out = srste(w, 2, 4, decay=decay, layout=layout)
    assert torch.equal(out, w.detach() * mask)
    out.backward(g)
    expected = g + decay * (1 - mask.float()) * w.detach()
    torch.testing.assert_close(w.grad, expected, rtol=1e-6, atol=1e-9)
    assert not torch.equal(w.grad, g)


def test_ste_gradient_is_exactly_the_incoming_gradient():
    w = _distinct_weight((4, 8), 5).requires_grad_()
    g = torch.randn(4, 8)
    srste(w, 1, 4, decay=0.0).backward(g)
    assert torch.equal(w.grad, g)


def test_violations_counts_groups_with_more_than_n_nonzeros():
    w = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]])
    assert nm_violations(w, 2, 4) == 2
    assert nm_violations(w, 3, 4) == 1
    assert nm_violations(torch.zeros(4, 8), 2, 4) == 0


def test_eligibility():
    assert is_nm_eligible(torch.zeros(8, 16, 3, 3), 4)
    assert not is_nm_eligible(torch.zeros(8, 6, 3, 3), 4)
    assert is_nm_eligible(torch.zeros(8, 6, 2, 2), 4, layout="flattened")
    assert "depthwise" in nm_skip_reason(torch.zeros(8, 1, 3, 3), 4)
    assert "divisible" in nm_skip_reason(torch.zeros(10, 6), 4)


def test_bake_nm_writes_exact_zeros_and_keeps_ineligible_layers_dense():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1), nn.Flatten(),
                        nn.LazyLinear(4))
    net(torch.randn(1, 3, 8, 8))
    dw_before = net[1].weight.detach().clone()
    baked = bake_nm(net, 2, 4)
    assert baked == ["2.weight", "4.weight"]
    for name in baked:
        assert nm_violations(dict(net.named_parameters())[name], 2, 4) == 0
    assert torch.equal(net[1].weight, dw_before)


def test_bad_n():
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 1 for N:M sparsity, got n=0"):
        nm_mask(torch.zeros(2, 4), 0, 4)


def test_n_not_below_m():
    with pytest.raises(ValueError, match=r"`n` must be < `m` for N:M sparsity, got n=4, m=4"):
        nm_mask(torch.zeros(2, 4), 4, 4)


def test_unknown_layout():
    with pytest.raises(ValueError, match=r"`layout`='rows' is not supported; choose one of"):
        nm_mask(torch.zeros(2, 4), 2, 4, layout="rows")


def test_ungroupable_weight():
    with pytest.raises(ValueError, match=r"shape \(2, 6\) cannot be grouped by m=4: grouping dim in=6"):
        nm_mask(torch.zeros(2, 6), 2, 4)


def test_negative_decay():
    with pytest.raises(ValueError, match=r"`decay` must be >= 0, got decay=-0.1"):
        srste(torch.zeros(2, 4), 2, 4, decay=-0.1)


def test_bake_unknown_name():
    with pytest.raises(ValueError, match=r"bake_nm: no parameter named 'nope'"):
        bake_nm(nn.Linear(4, 4), 2, 4, names=["nope"])
