"""Sparse architecture divergence (SAD) between masks, plain and bit-packed.

SAD (Zhou et al. 2021, SR-STE, arXiv 2102.04010, Sec. 4) counts the positions where two masks of the
same layer differ: ``SAD(M_a, M_b) = |M_a XOR M_b|``. Summed over layers it measures how much the sparse
architecture moved between two moments of training; divided by the number of mask elements it is a
fraction in [0, 1].

Masks are ``torch.bool`` tensors keyed by parameter name (DESIGN §2). To keep references cheap
(ResNet-50: 25.5M weights -> 3.2 MB per packed mask instead of 25.5 MB as bool), masks can be packed
8 per byte with :func:`pack_mask`; :func:`packed_sad` and :func:`packed_popcount` work directly on the
packed bytes (XOR + a vectorised SWAR popcount in ``uint8``), so no unpacked copy is ever needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "sad",
    "sad_normalized",
    "layer_sad",
    "total_sad",
    "total_sad_normalized",
    "pack_mask",
    "unpack_mask",
    "packed_nbytes",
    "packed_popcount",
    "packed_sad",
    "packed_sad_tensor",
    "popcount_tensor",
]

_BIT_SHIFTS = (7, 6, 5, 4, 3, 2, 1, 0)  # first element -> most significant bit (as numpy.packbits)


def _check_mask(mask: Tensor, name: str) -> None:
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype torch.bool, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = kept), got dtype={mask.dtype}.")


def _check_pair(mask_a: Tensor, mask_b: Tensor) -> None:
    _check_mask(mask_a, "mask_a")
    _check_mask(mask_b, "mask_b")
    if mask_a.shape != mask_b.shape:
        raise ValueError(
            f"SAD needs masks of the same shape, got mask_a.shape={tuple(mask_a.shape)} and "
            f"mask_b.shape={tuple(mask_b.shape)}."
        )


def sad(mask_a: Tensor, mask_b: Tensor) -> int:
    """Number of positions where two boolean masks differ (``|mask_a XOR mask_b|``).

    Args:
        mask_a: boolean mask.
        mask_b: boolean mask of the same shape.

    Returns:
        The count of differing positions; symmetric, and 0 for identical masks.

    Raises:
        TypeError: if a mask is not a ``torch.bool`` tensor.
        ValueError: if the shapes differ.

    Example:
        >>> import torch
        >>> a = torch.tensor([[True, False], [True, True]])
        >>> b = torch.tensor([[True, True], [False, True]])
        >>> sad(a, b), sad(a, a)
        (2, 0)
    """
    _check_pair(mask_a, mask_b)
    return int(torch.count_nonzero(mask_a ^ mask_b).item())


def sad_normalized(mask_a: Tensor, mask_b: Tensor) -> float:
    """:func:`sad` divided by the number of mask elements (0.0 for empty masks).

    Example:
        >>> import torch
        >>> sad_normalized(torch.tensor([True, False, True, True]), torch.tensor([True, True, True, False]))
        0.5
    """
    count = sad(mask_a, mask_b)
    return count / mask_a.numel() if mask_a.numel() else 0.0


def _check_same_keys(masks_a: Mapping[str, Tensor], masks_b: Mapping[str, Tensor]) -> None:
    only_a = sorted(set(masks_a) - set(masks_b))
    only_b = sorted(set(masks_b) - set(masks_a))
    if only_a or only_b:
        raise ValueError(
            f"SAD over mask dicts needs the same parameter names; only in masks_a: {only_a}, "
            f"only in masks_b: {only_b}."
        )


def layer_sad(
    masks_a: Mapping[str, Tensor], masks_b: Mapping[str, Tensor], normalize: bool = False
) -> dict[str, float] | dict[str, int]:
    """Per-layer SAD between two mask dicts with the same keys.

    Args:
        masks_a: ``{parameter name: bool mask}``.
        masks_b: same keys and shapes as ``masks_a``.
        normalize: if true, each count is divided by that layer's number of elements.

    Raises:
        ValueError: if the key sets differ (lists the names on each side) or a pair of shapes differs.

    Example:
        >>> import torch
        >>> a = {"w1": torch.tensor([True, False]), "w2": torch.ones(2, 2, dtype=torch.bool)}
        >>> b = {"w1": torch.tensor([False, True]), "w2": torch.ones(2, 2, dtype=torch.bool)}
        >>> layer_sad(a, b), layer_sad(a, b, normalize=True)
        ({'w1': 2, 'w2': 0}, {'w1': 1.0, 'w2': 0.0})
    """
    _check_same_keys(masks_a, masks_b)
    fn = sad_normalized if normalize else sad
    return {name: fn(masks_a[name], masks_b[name]) for name in masks_a}


def total_sad(masks_a: Mapping[str, Tensor], masks_b: Mapping[str, Tensor]) -> int:
    """SAD summed over all layers of two mask dicts with the same keys.

    Example:
        >>> import torch
        >>> a = {"w1": torch.tensor([True, False]), "w2": torch.tensor([True, True, False])}
        >>> b = {"w1": torch.tensor([False, True]), "w2": torch.tensor([True, False, False])}
        >>> total_sad(a, b)
        3
    """
    return int(sum(layer_sad(masks_a, masks_b).values()))


def total_sad_normalized(masks_a: Mapping[str, Tensor], masks_b: Mapping[str, Tensor]) -> float:
    """:func:`total_sad` divided by the total number of mask elements (not a mean of layer fractions).

    Example:
        >>> import torch
        >>> a = {"w1": torch.tensor([True, False]), "w2": torch.tensor([True, True, False])}
        >>> b = {"w1": torch.tensor([False, True]), "w2": torch.tensor([True, False, False])}
        >>> total_sad_normalized(a, b)
        0.6
    """
    total = sum(m.numel() for m in masks_a.values())
    return total_sad(masks_a, masks_b) / total if total else 0.0


# --------------------------------------------------------------------------------------- packed masks


def packed_nbytes(numel: int) -> int:
    """Bytes of a packed mask with ``numel`` elements: ``ceil(numel / 8)``.

    Example:
        >>> packed_nbytes(17)
        3
    """
    return (int(numel) + 7) // 8


def pack_mask(mask: Tensor) -> Tensor:
    """Pack a boolean mask 8 positions per byte (row-major order, first position = most significant bit).

    The result is a 1-D ``uint8`` tensor of ``ceil(mask.numel() / 8)`` bytes on the mask's device; the
    trailing padding bits are 0, so SAD and popcounts on packed masks need no correction. The byte layout
    is that of ``numpy.packbits(mask.flatten())``.

    Args:
        mask: boolean tensor of any shape.

    Raises:
        TypeError: if ``mask`` is not a ``torch.bool`` tensor.

    Example:
        >>> import torch
        >>> pack_mask(torch.tensor([True, False, False, False, False, False, False, True, True]))
        tensor([129, 128], dtype=torch.uint8)
    """
    _check_mask(mask, "mask")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).view(torch.uint8)  # bool and uint8 share one byte per element
    packed = bits[:, 0] << _BIT_SHIFTS[0]
    for col, shift in enumerate(_BIT_SHIFTS[1:], start=1):
        packed |= bits[:, col] << shift
    return packed


def unpack_mask(packed: Tensor, shape: Sequence[int] | torch.Size) -> Tensor:
    """Inverse of :func:`pack_mask`: the boolean mask of ``shape`` stored in ``packed``.

    Args:
        packed: 1-D ``uint8`` tensor from :func:`pack_mask`.
        shape: the original mask shape.

    Raises:
        ValueError: if ``packed`` is not 1-D ``uint8`` or its length is not ``ceil(prod(shape) / 8)``.

    Example:
        >>> import torch
        >>> m = torch.rand(3, 5) > 0.5
        >>> torch.equal(unpack_mask(pack_mask(m), m.shape), m)
        True
    """
    shape = torch.Size(shape)
    numel = shape.numel()
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed must be a 1-D torch.uint8 tensor from pack_mask, got dtype={packed.dtype}, "
            f"shape={tuple(packed.shape)}."
        )
    if packed.numel() != packed_nbytes(numel):
        raise ValueError(
            f"packed has {packed.numel()} bytes but shape={tuple(shape)} needs {packed_nbytes(numel)} "
            f"(ceil({numel} / 8))."
        )
    shifts = torch.tensor(_BIT_SHIFTS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool().reshape(shape)


def _popcount_bytes(x: Tensor) -> Tensor:
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return ((x + (x >> 4)) & 0x0F).sum(dtype=torch.int64)


def _popcount_words(x: Tensor) -> Tensor:
    # Same SWAR steps on 64-bit words. Arithmetic right shifts are harmless: every shifted-in sign bit
    # is cleared by the mask that follows. The per-byte counts are then summed as uint8.
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F
    return x.view(torch.uint8).sum(dtype=torch.int64)


def popcount_tensor(packed: Tensor) -> Tensor:
    """Number of set bits in a ``uint8`` tensor, as a 0-d ``int64`` tensor (stays on the device).

    Vectorised SWAR popcount (pairs, nibbles, bytes) on 64-bit words, with the < 8 trailing bytes done
    in ``uint8``: no temporary larger than the packed mask itself.

    Example:
        >>> import torch
        >>> popcount_tensor(torch.tensor([0, 1, 3, 255], dtype=torch.uint8))
        tensor(11)
    """
    flat = packed.reshape(-1).contiguous()
    head = flat.numel() - flat.numel() % 8
    count = _popcount_bytes(flat[head:])
    if head and flat.storage_offset() % 8 == 0:
        return count + _popcount_words(flat[:head].view(torch.int64))
    return count + _popcount_bytes(flat[:head])


def packed_popcount(packed: Tensor) -> int:
    """Number of True positions in a packed mask (its number of kept weights).

    Example:
        >>> import torch
        >>> packed_popcount(pack_mask(torch.tensor([True, False, True, True, False])))
        3
    """
    return int(popcount_tensor(packed).item())


def packed_sad_tensor(packed_a: Tensor, packed_b: Tensor) -> Tensor:
    """:func:`packed_sad` as a 0-d ``int64`` tensor (no host sync; stack many, then ``tolist()`` once)."""
    if packed_a.shape != packed_b.shape or packed_a.dtype != torch.uint8 or packed_b.dtype != torch.uint8:
        raise ValueError(
            "packed SAD needs two 1-D torch.uint8 tensors of the same length from pack_mask, got "
            f"({packed_a.dtype}, {tuple(packed_a.shape)}) and ({packed_b.dtype}, {tuple(packed_b.shape)})."
        )
    return popcount_tensor(packed_a ^ packed_b)


def packed_sad(packed_a: Tensor, packed_b: Tensor) -> int:
    """SAD of two masks given packed by :func:`pack_mask` (equal to :func:`sad` of the unpacked masks).

    Example:
        >>> import torch
        >>> a = torch.tensor([[True, False], [True, True]])
        >>> b = torch.tensor([[True, True], [False, True]])
        >>> packed_sad(pack_mask(a), pack_mask(b)) == sad(a, b) == 2
        True
    """
    return int(packed_sad_tensor(packed_a, packed_b).item())
