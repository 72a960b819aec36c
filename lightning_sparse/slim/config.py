"""The channel configuration of a slim model: record it, and rebuild it on a fresh dense model."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_sparse.slim._graph import (
    build_graph,
    is_depthwise,
    refresh_split_offsets,
    sync_mixed_convs,
)
from lightning_sparse.utils.inputs import default_inputs

__all__ = ["channel_config", "apply_channel_config"]


def channel_config(model: nn.Module) -> dict[str, dict[str, int]]:
    """Channel counts of every Conv2d / Linear / BatchNorm module: the slim architecture.

    Example:
        >>> channel_config(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        {'0': {'in_channels': 3, 'out_channels': 8, 'groups': 1}, '1': {'num_features': 8}}
    """
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = {"in_channels": m.in_channels, "out_channels": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            out[name] = {"in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, _BatchNorm):
            out[name] = {"num_features": m.num_features}
    return out


def apply_channel_config(
    model: nn.Module, config: Mapping[str, Mapping[str, int]], example_inputs: torch.Tensor | None = None
) -> nn.Module:
    """Rebuild the slim architecture ``config`` (from :func:`channel_config`) on a fresh dense model.

    Convs with more output channels than ``config`` lose their trailing channels through Torch-Pruning
    (with everything tied to them), so the model's shapes then match and a slim ``state_dict`` loads with
    ``strict=True``. Weights are not meaningful until that state dict is loaded.

    Args:
        model: a freshly created model of the same architecture (modified in place and returned).
        config: module name -> channel counts.
        example_inputs: a batch for tracing; default ``randn(1, in_chans, 64, 64)``.

    Raises:
        ValueError: when ``config`` names modules the model lacks or whose type differs, or the result
            does not match ``config`` (e.g. a config with *more* channels than the model).
    """
    current = channel_config(model)
    missing = [n for n in config if n not in current]
    if missing:
        raise ValueError(f"channel config names modules the model lacks or that are not Conv/Linear/BN: {missing}.")
    wrong_type = [n for n in config if set(config[n]) != set(current[n])]
    if wrong_type:
        raise ValueError(f"channel config entries do not match the module types for {wrong_type}.")
    if example_inputs is None:
        example_inputs = default_inputs(model)
    modules = dict(model.named_modules())
    graph = None
    for name, want in config.items():
        m = modules[name]
        if isinstance(m, nn.Conv2d) and not is_depthwise(m):
            have, target, fn = m.out_channels, want["out_channels"], tp.prune_conv_out_channels
        elif isinstance(m, nn.Linear):
            have, target, fn = m.out_features, want["out_features"], tp.prune_linear_out_channels
        else:
            continue
        if target < have:
            graph = graph or build_graph(model, example_inputs)
            refresh_split_offsets(graph)
            graph.get_pruning_group(m, fn, list(range(target, have))).prune()
            sync_mixed_convs(model)
    now = channel_config(model)
    diff = {n: (now[n], dict(config[n])) for n in config if now[n] != dict(config[n])}
    if diff:
        raise ValueError(f"could not rebuild the channel config; (model, config) differ at {diff}.")
    return model
