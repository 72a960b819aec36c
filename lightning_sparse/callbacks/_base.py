"""The one small interface every mask source implements, so SAD tracking and plots find masks."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

__all__ = ["MaskSource", "log_metrics", "check_strategy", "example_input"]


@runtime_checkable
class MaskSource(Protocol):
    """Anything that can report the current sparsity masks of a LightningModule.

    ``current_masks`` returns ``{parameter name from named_parameters(): bool tensor of the
    parameter's shape}`` (True = weight kept). DynamicSparsity and Chase return their explicit masks;
    NMSparsity derives them from the weights. A user's own callback only needs this one method.
    """

    def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]: ...


@rank_zero_only
def log_metrics(trainer: pl.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Send metrics straight to every logger at ``step`` (default: the current global step; rank zero only).

    Callbacks use this instead of ``LightningModule.log`` so they can log from any hook, at exactly the
    steps where something happened (a mask update, a SAD measurement).
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step if step is None else step)


def check_strategy(trainer: pl.Trainer | None, callback: str) -> None:
    """Refuse sharded strategies: masks are per full parameter, so FSDP/DeepSpeed shards would break them.

    Raises:
        ValueError: naming the strategy and what to use instead.
    """
    if trainer is None:
        return
    name = type(trainer.strategy).__name__
    if "FSDP" in name or "DeepSpeed" in name or "ModelParallel" in name:
        raise ValueError(
            f"{callback} does not support the sharded strategy {name}: masks cover whole parameters. "
            "Use a single device or DDP (--trainer.strategy=ddp)."
        )


def example_input(
    trainer: pl.Trainer | None, pl_module: pl.LightningModule, input_shape: tuple[int, ...] | None, owner: str
) -> torch.Tensor:
    """One example input (batch of 1) for tracing ``pl_module``: its ``example_input_array``, else
    ``input_shape``, else the datamodule's ``in_chans``/``image_size``.

    Raises:
        ValueError: none of these is available.
    """
    example = getattr(pl_module, "example_input_array", None)
    if torch.is_tensor(example):
        return example[:1].detach()
    shape = input_shape
    dm = getattr(trainer, "datamodule", None)
    if shape is None and dm is not None and hasattr(dm, "in_chans") and hasattr(dm, "image_size"):
        shape = (int(dm.in_chans), int(dm.image_size), int(dm.image_size))
    if shape is None:
        raise ValueError(
            f"{owner} needs an example input to trace the model: set `input_shape=(C, H, W)`, or "
            "`example_input_array` on the LightningModule, or use a datamodule with `in_chans` and `image_size`."
        )
    return torch.randn(1, *shape)
