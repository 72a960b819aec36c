"""Module helpers shared by the packages: eval mode that restores every flag, the first conv, the device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["device_inputs", "eval_mode", "first_conv"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module of ``model`` in eval mode for the block, then restore each module's own flag.

    Example:
        >>> net = nn.Sequential(nn.BatchNorm1d(2), nn.Dropout()).train()
        >>> net[1].eval()  # mixed flags survive
        Dropout(p=0.5, inplace=False)
        >>> with eval_mode(net):
        ...     [m.training for m in net.modules()]
        [False, False, False]
        >>> [m.training for m in net.modules()]
        [True, True, False]
    """
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags.items():
            m.training = f


def first_conv(model: nn.Module) -> nn.Conv2d:
    """The first ``nn.Conv2d`` of ``model`` in module order (the stem of an image model).

    Raises:
        ValueError: ``model`` has no ``nn.Conv2d`` (naming its class).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d; an image model (a conv stem) is needed.")


def device_inputs(model: nn.Module, example_inputs: torch.Tensor) -> torch.Tensor:
    """``example_inputs`` moved to the device of ``model``'s first parameter (unchanged for a parameterless model)."""
    p = next(iter(model.parameters()), None)
    return example_inputs.to(p.device) if p is not None else example_inputs
