"""The one small interface every mask source implements, so SAD tracking and plots find masks."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pytorch_lightning as pl
import torch

__all__ = ["MaskSource"]


@runtime_checkable
class MaskSource(Protocol):
    """Anything that can report the current sparsity masks of a LightningModule.

    ``current_masks`` returns ``{parameter name from named_parameters(): bool tensor of the
    parameter's shape}`` (True = weight kept). DynamicSparsity and Chase return their explicit masks;
    NMSparsity derives them from the weights. A user's own callback only needs this one method.
    """

    def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]: ...
