"""SAD between masks: hand-built cases, properties (hypothesis), packed == unpacked, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sparse.sparsity.sad import (
    layer_sad,
    pack_mask,
    packed_nbytes,
    packed_popcount,
    packed_sad,
    sad,
    sad_normalized,
    total_sad,
    total_sad_normalized,
    unpack_mask,
)


@st.composite
def mask_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    shape = tuple(draw(st.lists(st.integers(1, 7), min_size=1, max_size=4)))
    numel = int(np.prod(shape))
    a = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    b = draw(st.lists(st.booleans(), min_size=numel, max_size=numel))
    return torch.tensor(a).reshape(shape), torch.tensor(b).reshape(shape)


def test_sad_hand_built() -> None:
    a = torch.tensor([[1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    assert sad(a, b) == 3  # (0,1), (0,2), (1,3)
    assert sad_normalized(a, b) == pytest.approx(3 / 8)
    assert sad(a, ~a) == 8


def test_sad_dicts_per_layer_and_total() -> None:
    a = {"conv.weight": torch.zeros(2, 3, dtype=torch.bool), "fc.weight": torch.ones(4, dtype=torch.bool)}
    b = {"conv.weight": torch.eye(2, 3, dtype=torch.bool), "fc.weight": torch.tensor([1, 0, 0, 1]).bool()}
    assert layer_sad(a, b) == {"conv.weight": 2, "fc.weight": 2}
    assert layer_sad(a, b, normalize=True) == {"conv.weight": pytest.approx(2 / 6), "fc.weight": 0.5}
    assert total_sad(a, b) == 4
    assert total_sad_normalized(a, b) == pytest.approx(4 / 10)  # over all elements, not a mean of layers


@settings(max_examples=60, deadline=None)
@given(mask_pairs())
def test_sad_properties(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = pair
    assert sad(a, a) == 0
    assert sad(a, b) == sad(b, a)
    assert sad(a, b) == int((a != b).sum())
    assert 0.0 <= sad_normalized(a, b) <= 1.0


@settings(max_examples=60, deadline=None)
@given(mask_pairs())
def test_packed_matches_unpacked(pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    a, b = pair
    pa, pb = pack_mask(a), pack_mask(b)
    assert pa.dtype == torch.uint8 and pa.numel() == packed_nbytes(a.numel())
    assert np.array_equal(pa.numpy(), np.packbits(a.flatten().numpy()))  # numpy's layout
    assert torch.equal(unpack_mask(pa, a.shape), a)
    assert packed_sad(pa, pb) == sad(a, b)
    assert packed_popcount(pa) == int(a.sum())


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 64, 65, 1000, 4099])
def test_packed_word_and_tail_paths(numel: int) -> None:
    """Popcount runs on 64-bit words plus a byte tail: lengths around multiples of 64 bits."""
    g = torch.Generator().manual_seed(numel)
    a, b = torch.rand(numel, generator=g) > 0.3, torch.rand(numel, generator=g) > 0.6
    assert packed_sad(pack_mask(a), pack_mask(b)) == int((a ^ b).sum())
    assert packed_popcount(pack_mask(a)[1:]) == int(a[8:].sum())  # unaligned view: byte path


def test_pack_non_contiguous() -> None:
    m = torch.rand(6, 10) > 0.5
    assert torch.equal(unpack_mask(pack_mask(m.t()), (10, 6)), m.t())


def test_sad_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"same shape, got mask_a.shape=\(2, 3\) and mask_b.shape=\(3, 2\)"):
        sad(torch.zeros(2, 3, dtype=torch.bool), torch.zeros(3, 2, dtype=torch.bool))


def test_sad_needs_bool() -> None:
    with pytest.raises(TypeError, match=r"mask_b must have dtype torch.bool .* got dtype=torch.float32"):
        sad(torch.zeros(3, dtype=torch.bool), torch.zeros(3))


def test_sad_needs_tensor() -> None:
    with pytest.raises(TypeError, match="mask_a must be a torch.Tensor of dtype torch.bool, got list"):
        sad([True], torch.zeros(1, dtype=torch.bool))


def test_layer_sad_key_mismatch() -> None:
    m = torch.zeros(2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"only in masks_a: \['b'\], only in masks_b: \['c'\]"):
        layer_sad({"a": m, "b": m}, {"a": m, "c": m})


def test_unpack_wrong_length() -> None:
    with pytest.raises(ValueError, match=r"packed has 2 bytes but shape=\(3, 8\) needs 3"):
        unpack_mask(torch.zeros(2, dtype=torch.uint8), (3, 8))


def test_unpack_wrong_dtype() -> None:
    with pytest.raises(ValueError, match="packed must be a 1-D torch.uint8 tensor"):
        unpack_mask(torch.zeros(2, dtype=torch.int32), (16,))


def test_packed_sad_length_mismatch() -> None:
    with pytest.raises(ValueError, match="packed SAD needs two 1-D torch.uint8 tensors of the same length"):
        packed_sad(torch.zeros(2, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
