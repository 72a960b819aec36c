"""Tracing helpers shared by the slim modules: Torch-Pruning's dependency graph, eval-mode tracing,
the tensors each supported layer type loses for an input/output channel prune."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch_pruning import _helpers
from torch_pruning import ops as tp_ops
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.dependency.node import Node
from torch_pruning.pruner import function as tp_function

from lightning_sparse.utils.modules import device_inputs, eval_mode

try:  # timm's mixed-kernel conv (MixNet): a torch.split over sub-convs, sizes in ``.splits``
    from timm.layers import Conv2dSame, MixedConv2d
except ImportError:  # pragma: no cover - timm is a dependency
    Conv2dSame = MixedConv2d = None

ADD_OPS = ("AddBackward", "SubBackward")


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of ``model`` (traced in eval mode).

    Raises:
        ValueError: naming the model, when Torch-Pruning cannot build the graph (e.g. a concat whose input
            channels it cannot infer); the model is then not slimmable.
    """
    with eval_mode(model), torch.enable_grad():
        inputs = device_inputs(model, example_inputs)
        try:
            graph = tp.DependencyGraph().build_dependency(model, inputs, verbose=False)
        except Exception as err:
            try:
                model(inputs)
            except Exception:
                raise  # the inputs do not fit the model: not a graph problem
            raise ValueError(
                f"Torch-Pruning cannot build the channel dependency graph of {type(model).__name__} "
                f"({type(err).__name__}: {err}); its channels cannot be slimmed."
            ) from err
    _order_mixed_split_outputs(graph, model)
    return graph


def _order_mixed_split_outputs(graph: tp.DependencyGraph, model: nn.Module) -> None:
    """Torch-Pruning maps a split's i-th chunk to the i-th consumer it discovered while tracing backwards,
    which for a ``MixedConv2d`` is not branch i (its branches came out swapped). Put each MixedConv2d
    split's consumers in branch order; its index mapping is rebuilt from that order."""
    parents = mixed_parents(model)
    if not parents:
        return
    for node in graph.module2node.values():
        owner = mixed_conv_of(node, parents) if isinstance(node.module, tp_ops._SplitOp) else None
        if owner is not None:
            rank = {c: i for i, c in enumerate(owner.values())}
            node.outputs.sort(key=lambda n: rank[n.module])
    tp_index_mapping.update_index_mapping(graph)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_plain_conv(m: nn.Module) -> bool:
    """An ``nn.Conv2d`` whose output is the plain convolution with its weight and bias (timm's
    ``Conv2dSame`` pads first); subclasses such as ``StdConv2d``/``ScaledStdConv2d`` are not."""
    return type(m) is nn.Conv2d or (Conv2dSame is not None and type(m) is Conv2dSame)


def local_entries(module: nn.Module, is_out: bool) -> list[tuple[str, int, bool]]:
    """(local tensor name, dim, is_buffer) a supported module loses for an out/in channel prune."""
    if isinstance(module, nn.Conv2d):
        if not is_plain_conv(module):
            raise ValueError(
                f"unsupported conv type {type(module).__name__} (its forward uses more than weight and bias per "
                "channel, e.g. weight standardization or a gain)"
            )
        if is_depthwise(module) or is_out:
            return [("weight", 0, False)] + ([("bias", 0, False)] if module.bias is not None else [])
        return [("weight", 1, False)]
    if isinstance(module, nn.Linear):
        if is_out:
            return [("weight", 0, False)] + ([("bias", 0, False)] if module.bias is not None else [])
        return [("weight", 1, False)]
    if isinstance(module, _BatchNorm):
        out = [("weight", 0, False), ("bias", 0, False)] if module.affine else []
        if module.track_running_stats:
            out += [("running_mean", 0, True), ("running_var", 0, True)]
        return out
    raise ValueError(f"unsupported layer type {type(module).__name__}")


# ---------------------------------------------------------------------------------------------------------
# Pruning groups traced with a step budget, and the forward-code constructs slimming cannot update.

#: Propagation steps one group may take through the dependency graph. The timm CNNs tested take at most
#: ~700 (ResNeSt); Torch-Pruning's own search on ReXNet's concat + slice + sum chains did not finish in
#: minutes. (Those slices are refused as soon as the search reaches them; this bound catches the rest.)
MAX_GROUP_STEPS = 20_000


class GroupRefused(ValueError):
    """A pruning group that cannot be slimmed exactly; the message is the reason."""


def _node_label(node: Node, names: dict) -> str:
    """``'name'`` of a node's module, else the op and the nearest named module upstream of it."""
    if node.module in names:
        return repr(names[node.module])
    op = node.grad_fn.name() if node.grad_fn is not None else type(node.module).__name__
    seen, stack = set(), list(node.inputs)
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if n.module in names:
            return f"{op} after {names[n.module]!r}"
        stack.extend(n.inputs)
    return op


def trace_group(
    graph: tp.DependencyGraph,
    module: nn.Module,
    idxs: list[int],
    names: dict[nn.Module, str],
    stop: Callable[[Any], str | None] | None = None,
    max_steps: int = MAX_GROUP_STEPS,
) -> Group:
    """``graph.get_pruning_group(module, prune_conv_out_channels, idxs)`` with two guarantees more.

    Same search and merge as Torch-Pruning 1.6 (a group item per (layer, pruning function), with
    ``root_idxs``), but it raises :class:`GroupRefused` when

    * the search takes more than ``max_steps`` steps,
    * ``stop(dependency)`` returns a reason for a dependency the search reaches (checked as it goes),
    * two root channels meet at one position of any layer or op (a concat folded back onto its own input
      by a sum, e.g. a Ghost module in a residual stream; a split-attention reshape): removing one of
      them removes the other, so the group's channels are not independent.
    """
    if module not in graph.module2node:
        raise GroupRefused("it is not reached by the forward pass of the example inputs")
    fn = tp.prune_conv_out_channels
    if isinstance(module, nn.Conv2d) and module.groups == module.out_channels and module.out_channels > 1:
        fn = tp_function.prune_depthwise_conv_out_channels
    refresh_split_offsets(graph)
    tp_index_mapping.update_index_mapping(graph)
    root = graph.module2node[module]
    first = (Dependency(fn, fn, source=root, target=root), [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs])
    items, stack = [first], [first]
    seen = {(root, fn, tuple(first[1]))}
    steps = 0
    while stack:
        dep, cur = stack.pop()
        steps += 1
        if steps > max_steps:
            raise GroupRefused(
                f"its dependency group did not close within {max_steps} steps (chains of concat/slice/sum the "
                f"graph cannot follow, last at {_node_label(dep.target, names)})"
            )
        for new_dep in dep.target.dependencies:
            if not new_dep.is_triggered_by(dep.handler):
                continue
            new = cur
            for mapping in new_dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            if not new:
                continue
            key = (new_dep.target, new_dep.handler, tuple(new))
            if key in seen:
                continue
            seen.add(key)
            if stop is not None and (reason := stop(new_dep)):
                raise GroupRefused(reason)
            items.append((new_dep, new))
            stack.append((new_dep, new))
    owners: dict[tuple[Any, Any], dict[int, set[int]]] = {}
    for dep, cur in items:
        pos = owners.setdefault((dep.target, dep.handler), {})
        for h in cur:
            pos.setdefault(h.idx, set()).add(h.root_idx)
            if len(pos[h.idx]) > 1:
                a, b = sorted(pos[h.idx])[:2]
                raise GroupRefused(
                    f"its channels {a} and {b} meet at channel {h.idx} of {_node_label(dep.target, names)} "
                    "(the graph ties them together, e.g. a concat added back onto its own input or a reshape "
                    "across channels), so removing one removes the other"
                )
    group = Group()
    for dep, cur in items:
        if isinstance(dep.target.module, nn.Parameter) and any(dep.target.module is p for p in graph.ignored_params):
            continue
        group.add_and_merge(dep, cur)
    group._DG = graph
    for i in range(len(group)):
        hybrid = group[i].idxs
        group[i] = _helpers.GroupItem(group[i].dep, _helpers.to_plain_idxs(hybrid))
        group[i].root_idxs = _helpers.to_root_idxs(hybrid)
    return group


def refresh_split_offsets(graph: tp.DependencyGraph) -> None:
    """Torch-Pruning 1.6 shrinks a split op's ``split_sizes`` when it prunes through it but keeps the
    offsets its index mapping reads; recompute them so a later group on the same graph maps correctly."""
    for node in graph.module2node.values():
        op = node.module
        if isinstance(op, tp_ops._SplitOp) and op.split_sizes is not None:
            offsets = [0]
            for size in op.split_sizes:
                offsets.append(offsets[-1] + size)
            op.offsets = offsets


def _channel_dim(sizes: Sequence[int]) -> int:
    return len(sizes) - 1 if len(sizes) == 3 else 1


def mixed_parents(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Branch conv -> the timm ``MixedConv2d`` holding it."""
    if MixedConv2d is None:
        return {}
    return {c: m for m in model.modules() if isinstance(m, MixedConv2d) for c in m.values()}


def mixed_conv_of(node: Node, parents: dict[nn.Module, nn.Module]) -> nn.Module | None:
    """The timm ``MixedConv2d`` whose ``torch.split`` the split node ``node`` is, else ``None``.

    That split's sizes live in ``MixedConv2d.splits``, which :func:`sync_mixed_convs` rewrites after
    slimming; any other channel split is fixed in forward code slimming cannot reach.
    """
    outs = [parents.get(n.module) for n in node.outputs]
    owner = outs[0] if outs else None
    if owner is None or MixedConv2d is None or not isinstance(owner, MixedConv2d):
        return None
    if any(o is not owner for o in outs) or len(outs) != len(owner):
        return None
    return owner


def forward_code_reason(node: Node, names: dict, parents: dict[nn.Module, nn.Module]) -> str | None:
    """Why channels passing ``node`` cannot be slimmed exactly (a channel slice/split whose sizes are
    written in the forward code), or ``None`` when the node is fine."""
    module, grad_fn = node.module, node.grad_fn
    if not isinstance(module, (tp_ops._SliceOp, tp_ops._SplitOp, tp_ops._UnbindOp)) or grad_fn is None:
        return None
    sizes = tuple(getattr(grad_fn, "_saved_self_sym_sizes", ()) or ())
    dim = getattr(grad_fn, "_saved_dim", None)
    if sizes and dim is not None and dim % len(sizes) != _channel_dim(sizes):
        return None  # a spatial/batch slice or split: channels pass unchanged
    where = _node_label(node, names)
    if isinstance(module, tp_ops._SliceOp):
        start, end, step = grad_fn._saved_start or 0, grad_fn._saved_end, grad_fn._saved_step or 1
        size = sizes[_channel_dim(sizes)] if sizes else None
        if start == 0 and step == 1 and size is not None and (end is None or end >= size):
            return None  # x[:, :C] of a C-channel tensor stays a no-op when C shrinks
        return (f"its channels pass a channel slice [{start}:{end}:{step}] of a {size}-channel tensor ({where}) "
                "whose bounds are fixed in the forward code, so slimming would select different channels")
    if isinstance(module, tp_ops._SplitOp) and mixed_conv_of(node, parents) is not None:
        return None
    return (f"its channels reach a channel split/chunk/unbind ({where}) whose sizes are fixed in the forward code, "
            "so slimming would split at the wrong channels")


def sync_mixed_convs(model: nn.Module) -> None:
    """Rewrite the channel bookkeeping of timm ``MixedConv2d`` modules after their branches were slimmed."""
    if MixedConv2d is None:
        return
    for m in model.modules():
        if isinstance(m, MixedConv2d):
            convs = list(m.values())
            m.splits = [c.in_channels for c in convs]
            m.in_channels = sum(m.splits)
            m.out_channels = sum(c.out_channels for c in convs)
