"""Which convs may lose output channels, and every tensor slice tied to a channel (dependency graph)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_sparse.slim._graph import (
    ADD_OPS,
    GroupRefused,
    build_graph,
    forward_code_reason,
    is_depthwise,
    is_plain_conv,
    local_entries,
    mixed_conv_of,
    mixed_parents,
    tp_ops,
    trace_group,
)

__all__ = ["ChannelCandidates", "ChannelEntry", "ChannelGroup", "channel_candidates"]


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


def _mixed_split_reason(group: Any, names: dict, parents: dict) -> str | None:
    """A group may cross a ``MixedConv2d`` split only inside one branch: then the branch sizes after slimming
    follow from the root's channel count alone, and :func:`~lightning_sparse.slim.apply_channel_config`
    (which removes trailing channels) rebuilds the same shapes. Across branches they would depend on which
    channels went."""
    for item in group:
        node = item.dep.target
        if not isinstance(node.module, tp_ops._SplitOp):
            continue
        owner = mixed_conv_of(node, parents)
        if owner is None:
            continue
        offsets = [0]
        for size in owner.splits:
            offsets.append(offsets[-1] + size)
        branches = {next(b for b in range(len(owner.splits)) if offsets[b] <= i < offsets[b + 1])
                    for i in item.idxs if i < offsets[-1]}
        if len(branches) > 1:
            return (f"its channels spread over branches {sorted(branches)} of mixed conv {names.get(owner, '?')!r} "
                    f"(splits {list(owner.splits)}), so the branch sizes after slimming would depend on which "
                    "channels go and a slim checkpoint could not be rebuilt")
    return None


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
    if not is_plain_conv(conv):
        return None, f"it is a {type(conv).__name__}, whose forward uses more than weight and bias per channel", None
    if conv not in graph.module2node:
        return None, "it is not reached by the forward pass of the example inputs", None
    parents = mixed_parents(model)

    def stop(dep: Any) -> str | None:
        grad_fn = getattr(dep.target.module, "_grad_fn", None)
        if grad_fn is not None and not include_residual:
            if str(grad_fn).startswith(ADD_OPS):
                return f"its channels feed a residual sum ({grad_fn})"
            if str(grad_fn).endswith("CopySlices") and len(dep.target.inputs) > 1:  # x += shortcut on a view
                return "its channels feed a residual sum (an in-place add on a view, CopySlices)"
        return forward_code_reason(dep.target, names, parents)

    try:
        group = trace_group(graph, conv, list(range(conv.out_channels)), names, stop)
    except GroupRefused as err:
        return None, str(err), None
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
                # Chase scores channel c over filter c of every producer: each must hold exactly the group's
                # channels, in the root's order (not e.g. a concat of two halves of them)
                n_out = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
                layout = sorted(zip(item.idxs, item.root_idxs))
                if n_out != conv.out_channels or layout != [(c, c) for c in range(n_out)]:
                    return None, (f"its channels are produced in another layout by {mname!r} ({n_out} output channels "
                                  f"for {conv.out_channels} channels, e.g. through a concat), so its channels cannot "
                                  "be scored and removed filter by filter"), group
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
    reason = _mixed_split_reason(group, names, parents)
    if reason is not None:
        return None, reason, group
    return ChannelGroup(name, conv.out_channels, tuple(coupled), tuple(entries), tuple(producers)), None, group


class ChannelCandidates(dict):
    """What :func:`channel_candidates` returns: a ``dict`` layer name -> :class:`ChannelGroup`, plus

    Attributes:
        refused: every other ``nn.Conv2d`` of the model (not a candidate and not slimmed along with one)
            -> the reason it is left out, e.g. ``"its channels feed a residual sum (AddBackward0)"``, or
            for constructs slimming cannot follow exactly, ``"its channels reach a channel split/chunk ..."``.
            :func:`~lightning_sparse.slim.slim_model` refuses these layers with the same reason.
    """

    def __init__(self, groups: dict[str, ChannelGroup] | None = None, refused: dict[str, str] | None = None) -> None:
        super().__init__(groups or {})
        self.refused: dict[str, str] = dict(refused or {})


def channel_candidates(
    model: nn.Module, example_inputs: torch.Tensor, include_residual: bool = False
) -> ChannelCandidates:
    """Convs whose output channels Chase may remove, with the tensor slices tied to each channel.

    A conv is a candidate when, in Torch-Pruning's dependency graph, removing its output channels
    removes no other conv's output channels (depthwise convs that follow channel-wise are allowed),
    reaches no add/sub (residual sum) and no model output, and touches only Conv2d / Linear / BatchNorm
    tensors. ResNet bottlenecks give ``conv1``, ``conv2``; basic blocks ``conv1``; VGG every feature
    conv; MobileNetV2 the expanding ``conv_pw`` (with its depthwise conv) of each inverted residual.

    The contract: every channel of a candidate can be removed by :func:`~lightning_sparse.slim.slim_model`,
    and once it is zeroed (:func:`~lightning_sparse.slim.zero_channels`) removing it leaves the outputs
    unchanged. Constructs the graph cannot follow exactly are refused here, never at slimming time: a
    channel slice or split whose bounds live in forward code (a Ghost module's ``[:, :oup]`` that drops
    channels, Res2Net's ``torch.split``, DPN's slices; timm's ``MixedConv2d`` is handled, its branch sizes
    are rewritten after slimming, but only for groups that stay inside one branch), two channels tied to
    each other (a concat folded back into its own input by a residual sum: GhostNet with
    ``include_residual=True``), producers holding the channels in another layout, conv subclasses that
    use their filters as a whole (``StdConv2d``), and groups whose dependency search does not close
    (ReXNet's concat/slice/sum chains). Such convs are listed with the reason in ``.refused``.

    Args:
        model: any ``nn.Module`` (names are relative to it, e.g. ``model.layer1.0.conv1`` for a
            LightningModule holding the backbone at ``self.model``).
        example_inputs: a batch the model accepts (traced once, in eval mode).
        include_residual: also return convs coupled through residual sums; their group then removes
            the same channels from every coupled conv (listed in ``ChannelGroup.coupled``), keyed by
            the first of them in module order.

    Returns:
        A :class:`ChannelCandidates` dict (layer -> :class:`ChannelGroup`) whose ``refused`` attribute
        maps every other conv to the reason it is left out.

    Raises:
        ValueError: naming the model and the reasons, when the model has no candidate conv or
            Torch-Pruning cannot build its dependency graph.
    """
    graph = build_graph(model, example_inputs)
    out = ChannelCandidates()
    refused: dict[str, str] = {}
    seen: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or name in seen:
            continue
        group, reason, _ = analyze_conv(graph, model, name, include_residual)
        if group is not None:
            out[name] = group
            seen.update(group.coupled)
        else:
            refused[name] = str(reason)
    out.refused = {n: r for n, r in refused.items() if n not in seen}
    if not out:
        examples = "; ".join(f"{n!r}: {r}" for n, r in list(out.refused.items())[:3])
        raise ValueError(
            f"{type(model).__name__} has no conv whose output channels can be removed "
            f"({len(out.refused)} convs refused, e.g. {examples})."
        )
    return out
