"""Which convs may lose output channels, and every tensor slice tied to a channel (dependency graph)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_sparse.slim._graph import ADD_OPS, build_graph, is_depthwise, local_entries

__all__ = ["ChannelEntry", "ChannelGroup", "channel_candidates"]


@dataclass(frozen=True)
class ChannelEntry:
    """One tensor that loses positions when channels of a group's root conv are removed.

    Attributes:
        name: dotted name (as in ``named_parameters()`` / ``named_buffers()`` of the model given).
        dim: the dim that shrinks (0 for filters/bias/norm, 1 for the consumer's input channels).
        is_buffer: ``True`` for norm running statistics.
        positions: indices along ``dim`` tied to the root's channels.
        roots: for each of ``positions``, the root channel it belongs to (one channel may own several
            positions, e.g. a conv flattened into a Linear).
    """

    name: str
    dim: int
    is_buffer: bool
    positions: tuple[int, ...]
    roots: tuple[int, ...]


@dataclass(frozen=True)
class ChannelGroup:
    """A candidate conv and every tensor slice tied to its output channels.

    Attributes:
        layer: the root conv's module name.
        channels: its current number of output channels.
        coupled: other convs whose output channels go along (depthwise convs; residual partners only
            with ``include_residual=True``).
        entries: the affected parameters and buffers.
        producers: the convs/linears whose *filters* make the group's channels: the root and its
            residual partners (not depthwise convs, which only carry a channel through). Chase scores a
            group channel over all of them. Empty means ``(layer,)``.
    """

    layer: str
    channels: int
    coupled: tuple[str, ...]
    entries: tuple[ChannelEntry, ...]
    producers: tuple[str, ...] = ()

    @property
    def producer_layers(self) -> tuple[str, ...]:
        """Module names of the convs/linears producing the group's channels (at least the root)."""
        return self.producers or (self.layer,)

    @property
    def producer_weights(self) -> list[str]:
        """Weight names of :attr:`producer_layers` (output channels along dim 0)."""
        return [f"{p}.weight" for p in self.producer_layers]

    @property
    def params(self) -> list[tuple[str, int]]:
        """``(parameter name, dim)`` pairs (no buffers): the masks to zero for a removed channel."""
        return [(e.name, e.dim) for e in self.entries if not e.is_buffer]

    @property
    def buffers(self) -> list[tuple[str, int]]:
        """``(buffer name, dim)`` pairs (norm running statistics)."""
        return [(e.name, e.dim) for e in self.entries if e.is_buffer]

    def indices(self, channels: Sequence[int] | torch.Tensor, buffers: bool = False) -> dict[str, tuple[int, torch.Tensor]]:
        """For root channels ``channels``: ``name -> (dim, LongTensor of positions along dim)``.

        Example:
            >>> g = ChannelGroup("c", 2, (), (ChannelEntry("fc.weight", 1, False, (0, 1, 2, 3), (0, 0, 1, 1)),))
            >>> g.indices([1])["fc.weight"][1].tolist()
            [2, 3]
        """
        chosen = set(int(c) for c in (channels.tolist() if isinstance(channels, torch.Tensor) else channels))
        bad = sorted(c for c in chosen if not 0 <= c < self.channels)
        if bad:
            raise ValueError(f"layer {self.layer!r} has {self.channels} channels, got channel indices {bad}.")
        out = {}
        for e in self.entries:
            if e.is_buffer and not buffers:
                continue
            pos = [p for p, r in zip(e.positions, e.roots) if r in chosen]
            out[e.name] = (e.dim, torch.tensor(pos, dtype=torch.long))
        return out


def analyze_conv(
    graph: tp.DependencyGraph, model: nn.Module, name: str, include_residual: bool
) -> tuple[ChannelGroup | None, str | None, Any]:
    """The ChannelGroup of conv ``name`` (or the reason it is not a candidate) and the TP group."""
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    conv = modules[name]
    if not isinstance(conv, nn.Conv2d):
        return None, f"it is a {type(conv).__name__}, only nn.Conv2d output channels are slimmed", None
    if conv.groups != 1:
        return None, f"it is a grouped conv (groups={conv.groups}); its channels follow the layer feeding it", None
    if conv not in graph.module2node:
        return None, "it is not reached by the forward pass of the example inputs", None
    group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(range(conv.out_channels)))
    coupled: list[str] = []
    producers: list[str] = [name]
    entries: list[ChannelEntry] = []
    for item in group:
        dep, target = item.dep, item.dep.target
        module = target.module
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        if isinstance(module, nn.Parameter):
            return None, "its channels reach a bare nn.Parameter (unsupported layer) used in the forward", group
        if is_out and not target.outputs:  # a node that channels pass through and nothing consumes
            return None, "its channels are outputs of the model (no layer consumes them)", group
        grad_fn = getattr(module, "_grad_fn", None)
        if grad_fn is not None and str(grad_fn).startswith(ADD_OPS) and not include_residual:
            return None, f"its channels feed a residual sum ({grad_fn})", group
        mname = names.get(module)
        if mname is None or not any(True for _ in module.parameters(recurse=False)) and not isinstance(module, _BatchNorm):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1 and not is_depthwise(module):
            return None, f"its channels reach grouped conv {mname!r} (groups={module.groups}), not supported", group
        if module is not conv and is_out and isinstance(module, (nn.Conv2d, nn.Linear)):
            if not is_depthwise(module) and not include_residual:
                return None, f"removing its channels also removes output channels of {mname!r} (residual coupling)", group
            coupled.append(mname)
            if not is_depthwise(module):
                producers.append(mname)
        try:
            local = local_entries(module, is_out)
        except ValueError as err:
            return None, f"its channels reach {mname!r}: {err}", group
        for pname, dim, is_buf in local:
            entries.append(ChannelEntry(
                name=f"{mname}.{pname}" if mname else pname, dim=dim, is_buffer=is_buf,
                positions=tuple(int(i) for i in item.idxs), roots=tuple(int(r) for r in item.root_idxs),
            ))
    return ChannelGroup(name, conv.out_channels, tuple(coupled), tuple(entries), tuple(producers)), None, group


def channel_candidates(
    model: nn.Module, example_inputs: torch.Tensor, include_residual: bool = False
) -> dict[str, ChannelGroup]:
    """Convs whose output channels Chase may remove, with the tensor slices tied to each channel.

    A conv is a candidate when, in Torch-Pruning's dependency graph, removing its output channels
    removes no other conv's output channels (depthwise convs that follow channel-wise are allowed),
    reaches no add/sub (residual sum) and no model output, and touches only Conv2d / Linear / BatchNorm
    tensors. ResNet bottlenecks give ``conv1``, ``conv2``; basic blocks ``conv1``; VGG every feature
    conv; MobileNetV2 the expanding ``conv_pw`` (with its depthwise conv) of each inverted residual.

    Args:
        model: any ``nn.Module`` (names are relative to it, e.g. ``model.layer1.0.conv1`` for a
            LightningModule holding the backbone at ``self.model``).
        example_inputs: a batch the model accepts (traced once, in eval mode).
        include_residual: also return convs coupled through residual sums; their group then removes
            the same channels from every coupled conv (listed in ``ChannelGroup.coupled``), keyed by
            the first of them in module order.

    Raises:
        ValueError: when the model has no candidate conv.
    """
    graph = build_graph(model, example_inputs)
    out: dict[str, ChannelGroup] = {}
    seen: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or name in seen:
            continue
        group, _, _ = analyze_conv(graph, model, name, include_residual)
        if group is not None:
            out[name] = group
            seen.update(group.coupled)
    if not out:
        raise ValueError(f"{type(model).__name__} has no conv whose output channels can be removed.")
    return out

