"""The one compatibility shim that rebuilds a checkpoint's slim architecture before its weights load, for a
LightningModule that does not call :func:`~lightning_sparse.slim.restore_channel_config` in its own
``on_load_checkpoint``; :class:`~lightning_sparse.callbacks.Chase` installs it in ``setup`` of every stage.

Lightning offers no public hook a callback can use before the model weights load (a callback's
``on_load_checkpoint`` runs after them, and ``trainer.ckpt_path`` is only set once loading has begun), so this
shim wraps the strategy's ``load_model_state_dict``, which receives the whole checkpoint, and reads the module
from the strategy at call time. ``tests/test_slim_checkpoint.py`` fails if Lightning's order changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_sparse.slim.checkpoint import ChannelConfig, find_channel_config, restore_channel_config

__all__ = ["restore_before_weights_load"]


def restore_before_weights_load(
    trainer: pl.Trainer,
    example_inputs: Callable[[nn.Module], torch.Tensor] | None = None,
    on_restore: Callable[[nn.Module, ChannelConfig], None] | None = None,
) -> None:
    """Make ``trainer`` rebuild a checkpoint's slim architecture on its LightningModule before the weights load.

    The compatibility shim for LightningModules that do not call
    :func:`~lightning_sparse.slim.restore_channel_config` in their
    own ``on_load_checkpoint`` (see the module docstring): ``trainer.strategy.load_model_state_dict`` (which
    every ``Trainer`` restore calls with the whole checkpoint, after the module's ``on_load_checkpoint``) is
    wrapped once; the wrapper rebuilds the module that the strategy holds at call time. Calling this again
    on the same trainer only replaces ``example_inputs``/``on_restore``.

    Args:
        trainer: a ``pytorch_lightning.Trainer``.
        example_inputs: module -> a batch for tracing (default: see :func:`~lightning_sparse.slim.restore_channel_config`).
        on_restore: called with the module and the configuration after a rebuild.
    """
    strategy = trainer.strategy
    current = strategy.load_model_state_dict
    if getattr(current, "restores_channel_config", False):
        current.example_inputs, current.on_restore = example_inputs, on_restore
        return

    def load_model_state_dict(checkpoint: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        module = strategy.lightning_module
        make = load_model_state_dict.example_inputs
        if module is not None and restore_channel_config(module, checkpoint, make and (lambda: make(module))):
            if load_model_state_dict.on_restore is not None:
                load_model_state_dict.on_restore(module, find_channel_config(checkpoint))
        return current(checkpoint, *args, **kwargs)

    load_model_state_dict.restores_channel_config = True  # type: ignore[attr-defined]
    load_model_state_dict.example_inputs = example_inputs  # type: ignore[attr-defined]
    load_model_state_dict.on_restore = on_restore  # type: ignore[attr-defined]
    strategy.load_model_state_dict = load_model_state_dict  # type: ignore[method-assign]
