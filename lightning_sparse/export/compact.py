"""``model_sparse.pt``: the slim export with its sparse tensors stored as values + bitmask.

``model.pt`` (:func:`lightning_sparse.slim.export_slim`) stores every tensor dense, zeros included: a Chase
ResNet-18 with 5.28 M stored weights of which 1.13 M are nonzero takes 5.28 M x 4 bytes = 21 MB. Here every
floating-point tensor for which it is smaller is stored as the values of its nonzero entries (in row-major
order, its own dtype) and a bitmask of their positions (1 bit per entry, ``uint8``-packed): ``nnz x 4 + numel / 8``
bytes instead of ``numel x 4``. A tensor holding ``-0.0`` (a masked negative weight, ``w * 0``) gets a second
bitmask of those positions, so the restored tensors are bitwise the stored ones. Everything else of
``model.pt`` (architecture, channel configuration, ``meta``, example inputs and outputs) is kept as it is,
and :func:`load_compact` rebuilds the same model.

The file is a ``torch.save`` of plain tensors, ints and strings (loads with ``weights_only=True``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sparse.slim import SLIM_FORMAT, build_slim
from lightning_sparse.utils.checkpoints import load_checkpoint
from lightning_sparse.utils.errors import InputError

__all__ = ["COMPACT_FORMAT", "load_compact", "pack_tensor", "save_compact", "unpack_tensor"]

COMPACT_FORMAT = "lightning_sparse.compact/1"
_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int32)


def _packbits(flags: torch.Tensor) -> torch.Tensor:
    """A flat bool tensor -> ``uint8`` bytes, bit ``i % 8`` of byte ``i // 8`` set for entry ``i``."""
    padded = torch.zeros((flags.numel() + 7) // 8 * 8, dtype=torch.int32)
    padded[: flags.numel()] = flags.to(torch.int32)
    return (padded.view(-1, 8) * _WEIGHTS).sum(1).to(torch.uint8)


def _unpackbits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return ((packed.to(torch.int32).unsqueeze(1) >> torch.arange(8, dtype=torch.int32)) & 1).bool().flatten()[:numel]


def pack_tensor(tensor: torch.Tensor) -> torch.Tensor | dict[str, Any]:
    """``tensor`` as ``{"shape", "bitmask", "values"[, "negative_zero"]}`` when that takes fewer bytes, else a copy.

    Example:
        >>> w = torch.tensor([[0.0, 1.5, 0.0, -0.0], [0.0, 0.0, 2.0, 0.0]])
        >>> packed = pack_tensor(w)
        >>> packed["values"], packed["bitmask"], packed["negative_zero"], packed["shape"]
        (tensor([1.5000, 2.0000]), tensor([66], dtype=torch.uint8), tensor([8], dtype=torch.uint8), [2, 4])
        >>> restored = unpack_tensor(packed)
        >>> torch.equal(restored.view(torch.int32), w.view(torch.int32))  # bitwise, -0.0 included
        True
    """
    tensor = tensor.detach().cpu()
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor.clone()
    flat = tensor.contiguous().view(-1)
    flags = flat != 0  # NaN included
    negative_zero = (flat == 0) & torch.signbit(flat)
    has_negative_zero = bool(negative_zero.any())
    bits = (flat.numel() + 7) // 8 * (2 if has_negative_zero else 1)
    if int(flags.sum()) * tensor.element_size() + bits >= flat.numel() * tensor.element_size():
        return tensor.clone()
    entry = {"shape": list(tensor.shape), "bitmask": _packbits(flags), "values": flat[flags].clone()}
    if has_negative_zero:
        entry["negative_zero"] = _packbits(negative_zero)
    return entry


def unpack_tensor(entry: torch.Tensor | dict[str, Any]) -> torch.Tensor:
    """The tensor :func:`pack_tensor` stored (bitwise)."""
    if torch.is_tensor(entry):
        return entry
    shape = [int(v) for v in entry["shape"]]
    numel = 1
    for v in shape:
        numel *= v
    flags = _unpackbits(entry["bitmask"], numel)
    values = entry["values"]
    if int(flags.sum()) != values.numel():
        raise ValueError(f"a packed tensor of shape {shape} has {int(flags.sum())} bits set but {values.numel()} values.")
    out = torch.zeros(numel, dtype=values.dtype)
    out[flags] = values
    if "negative_zero" in entry:
        out[_unpackbits(entry["negative_zero"], numel)] = -0.0
    return out.view(shape)


def save_compact(slim_path: str | Path, path: str | Path) -> Path:
    """Write the compact form of the slim export ``slim_path`` (``model.pt``) to ``path``.

    Raises:
        InputError: (a ``ValueError``) ``slim_path`` is not a slim export, or not a readable file.
    """
    payload = load_checkpoint(slim_path)
    if not isinstance(payload, dict) or payload.get("format") != SLIM_FORMAT:
        raise InputError(f"{slim_path} is not a slim export (expected format {SLIM_FORMAT!r}).")
    compact = {k: v for k, v in payload.items() if k != "state_dict"}
    compact["format"] = COMPACT_FORMAT
    compact["tensors"] = {name: pack_tensor(t) for name, t in payload["state_dict"].items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(compact, path)
    return path


def load_compact(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild the model of a ``model_sparse.pt`` (eval mode): bitwise the model of the ``model.pt`` it came from.

    Args:
        path: a file written by :func:`save_compact`.
        map_location: device of the returned model.
        verify: compare the outputs on the stored example inputs with the stored outputs.

    Raises:
        InputError: (a ``ValueError``) not a compact export file, or not a readable one.
        RuntimeError: the rebuilt model's outputs differ from the stored ones.
    """
    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != COMPACT_FORMAT:
        raise InputError(f"{path} is not a compact export (expected format {COMPACT_FORMAT!r}).")
    state = {name: unpack_tensor(entry) for name, entry in payload["tensors"].items()}
    slim = {**{k: v for k, v in payload.items() if k != "tensors"}, "format": SLIM_FORMAT, "state_dict": state}
    return build_slim(slim, str(path), verify).to(map_location)
