"""Slim models in checkpoints: find the channel configuration a checkpoint holds, rebuild it on a model
before the checkpoint's weights load.

A slimmed model's weights do not fit the dense model its class builds, so every loader first rebuilds the
slim shapes (:func:`restore_channel_config`) and then loads the weights strictly. Where that happens:

* :class:`~lightning_sparse.models.ImageClassifier` writes its channel configuration into every checkpoint
  and rebuilds it in its ``on_load_checkpoint`` hook, which Lightning runs before the weights load in
  ``load_from_checkpoint`` and in every ``Trainer`` restore (``fit``/``validate``/``test``/``predict``).
* Any other LightningModule gets the same behaviour from the same public hook with one line::

      def on_load_checkpoint(self, checkpoint):
          restore_channel_config(self, checkpoint)

* A LightningModule without that line, run by a ``Trainer`` whose callbacks include ``Chase``: Chase
  installs the compatibility shim of :mod:`lightning_sparse.callbacks._slim_restore` in ``setup`` of every
  stage, which calls :func:`restore_channel_config` right before the weights load.

This module is plain PyTorch (no Lightning).

Where the configuration is stored (looked up in this order): the top-level ``"channel_config"`` entry
(written by ``ImageClassifier`` and by :func:`~lightning_sparse.slim.export_slim`), else the ``"arch"``
entry of a callback's state (``Chase``). Names are relative to the module that saved the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lightning_sparse.slim.config import apply_channel_config, channel_config

__all__ = ["CHANNEL_CONFIG_KEY", "ChannelConfig", "find_channel_config", "restore_channel_config"]

CHANNEL_CONFIG_KEY = "channel_config"
ChannelConfig = dict[str, dict[str, int]]
ExampleInputs = torch.Tensor | Callable[[], torch.Tensor] | None


def find_channel_config(checkpoint: Mapping[str, Any], prefix: str = "") -> ChannelConfig | None:
    """The channel configuration stored in ``checkpoint``, or ``None`` when it holds none.

    Args:
        checkpoint: a Lightning checkpoint dict, or a :func:`~lightning_sparse.slim.export_slim` payload.
        prefix: keep only the modules under this name and drop the prefix (``"model."``: the timm backbone
            of an ``ImageClassifier`` checkpoint).

    Raises:
        ValueError: when two callback states hold different configurations.

    Example:
        >>> ckpt = {"callbacks": {"Chase{...}": {"arch": {"model.fc": {"in_features": 4, "out_features": 2}}}}}
        >>> find_channel_config(ckpt, prefix="model.")
        {'fc': {'in_features': 4, 'out_features': 2}}
        >>> find_channel_config({"state_dict": {}}) is None
        True
    """
    config = checkpoint.get(CHANNEL_CONFIG_KEY)
    if not config:
        found = {
            key: state["arch"] for key, state in (checkpoint.get("callbacks") or {}).items()
            if isinstance(state, Mapping) and state.get("arch")
        }
        if len({repr(sorted(a.items())) for a in found.values()}) > 1:
            raise ValueError(f"the checkpoint holds different channel configurations in callbacks {sorted(found)}.")
        config = next(iter(found.values()), None)
    if not config:
        return None
    return {name[len(prefix):]: dict(counts) for name, counts in config.items() if name.startswith(prefix)}


def restore_channel_config(
    module: nn.Module, checkpoint: Mapping[str, Any], example_inputs: ExampleInputs = None, prefix: str = ""
) -> bool:
    """Rebuild the slim architecture stored in ``checkpoint`` on ``module`` (in place) before its weights load.

    Nothing happens when the checkpoint holds no channel configuration or ``module`` already has it; a
    dense model of the same architecture loses the channels the slim one lacks
    (:func:`~lightning_sparse.slim.apply_channel_config`), so ``load_state_dict(strict=True)`` then fits.
    Call it from a LightningModule's ``on_load_checkpoint``.

    Args:
        module: the model the checkpoint's weights are for (names as in the checkpoint).
        checkpoint: a Lightning checkpoint dict or an export payload (see :func:`find_channel_config`).
        example_inputs: a batch for tracing the model, or a function returning one (called only when a
            rebuild is needed); default: ``example_input_array`` of the module if it has one, else
            ``randn(1, in_chans, 64, 64)``.
        prefix: the name of ``module`` inside the module that saved the checkpoint (``"model."`` for the
            timm backbone of an ``ImageClassifier`` checkpoint); ``""`` when it is that module.

    Returns:
        ``True`` when the module was rebuilt.

    Raises:
        ValueError: the configuration does not fit the module (other modules, more channels than it has).

    Example:
        >>> dense = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 2, 1))
        >>> ckpt = {"channel_config": {"0": {"in_channels": 1, "out_channels": 5, "groups": 1}}}
        >>> restore_channel_config(dense, ckpt), dense[0].out_channels, dense[2].in_channels
        (True, 5, 5)
        >>> restore_channel_config(dense, ckpt)
        False
    """
    config = find_channel_config(checkpoint, prefix)
    if not config:
        return False
    current = channel_config(module)
    if all(current.get(name) == counts for name, counts in config.items()):
        return False
    if callable(example_inputs):
        example_inputs = example_inputs()
    if example_inputs is None:
        example = getattr(module, "example_input_array", None)
        example_inputs = example[:1] if torch.is_tensor(example) else None
    apply_channel_config(module, config, example_inputs)
    return True
