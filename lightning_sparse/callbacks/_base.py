"""The small interfaces every mask source implements, so SAD tracking and the figures find and describe
masks without knowing the callbacks' classes; and helpers the callbacks share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

from lightning_sparse.sparsity.engine import MaskEngine
from lightning_sparse.utils.inputs import example_inputs

__all__ = ["KeepMasked", "MaskProvider", "MaskSource", "MaskSourceInfo", "log_metrics", "check_strategy", "example_input"]


@dataclass(frozen=True)
class MaskSourceInfo:
    """What a mask source says about itself, for figure titles, the layer chart and run summaries.

    Attributes:
        method: a short label, e.g. ``"RigL (ERK, density 0.1)"`` or ``"2:4 SR-STE"``.
        kind: what its masks look like in a layer: ``"unstructured"`` or an N:M pattern such as ``"2:4"``.
        density: the kept fraction it aims at in the layers it masks (``None``: not fixed).
        n: kept weights per group of an N:M pattern (``None`` otherwise).
        m: the group size of an N:M pattern (``None`` otherwise).
    """

    method: str
    kind: str = "unstructured"
    density: float | None = None
    n: int | None = None
    m: int | None = None


@runtime_checkable
class MaskProvider(Protocol):
    """Anything that can report the current sparsity masks of a LightningModule (all SAD tracking needs).

    ``current_masks`` returns ``{parameter name from named_parameters(): bool tensor of the
    parameter's shape}`` (True = weight kept). DynamicSparsity and Chase return their explicit masks;
    NMSparsity derives them from the weights.
    """

    def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class MaskSource(MaskProvider, Protocol):
    """A mask method: its masks, what it is, and when its topology changes.

    :class:`~lightning_sparse.callbacks.SADTracker` finds every :class:`MaskProvider` on
    ``trainer.callbacks``; a :class:`MaskSource` also names the method in the figures (``describe``), gives
    its layers' kind to the per-layer chart, and marks its schedule (``schedule_marks``). A new method
    (DynamicSparsity, Chase and NMSparsity are three) plugs in by implementing these three methods.

    Read when present (duck typing): an ``int`` attribute ``num_updates`` (mask updates so far: the figures
    mark the steps where it grew) and ``active_channels(pl_module) -> {layer: channels}`` (channel history).
    """

    def describe(self) -> MaskSourceInfo:
        """The method label and the facts about its masks (see :class:`MaskSourceInfo`)."""
        ...

    def schedule_marks(self, trainer: pl.Trainer) -> dict[str, int]:
        """``{label: optimizer step}`` where the schedule changes, e.g. ``{"DST stop": 7500}``; ``{}`` if none."""
        ...


class KeepMasked(pl.Callback):
    """The hooks of a callback whose masks change only at its own updates (GMP, one-shot): gradients outside
    ``self.engine``'s masks are zeroed before every optimizer step, and weights after every batch (so the weight
    decay of a decoupled optimizer such as AdamW cannot move them either)."""

    engine: MaskEngine

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.engine.mask_grads()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        self.engine.apply_weights()


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
    return example_inputs(shape)
