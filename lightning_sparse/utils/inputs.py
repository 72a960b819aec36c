"""Example inputs: random image batches of a given shape, seeded where a caller needs them reproducible."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_sparse.utils.modules import first_conv

__all__ = ["default_inputs", "example_inputs"]


def example_inputs(shape: Sequence[int], batch_size: int = 1, seed: int | None = None) -> torch.Tensor:
    """A ``(batch_size, *shape)`` float32 batch from a standard normal; seeded (own generator) when ``seed`` is given.

    Example:
        >>> x = example_inputs((3, 8, 8), batch_size=2, seed=0)
        >>> tuple(x.shape), bool(torch.equal(x, example_inputs((3, 8, 8), batch_size=2, seed=0)))
        ((2, 3, 8, 8), True)
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got batch_size={batch_size!r}.")
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *shape, generator=generator)


def default_inputs(model: nn.Module, size: int = 64) -> torch.Tensor:
    """One ``size`` x ``size`` image with as many channels as ``model``'s first conv takes."""
    return example_inputs((first_conv(model).in_channels, size, size))
