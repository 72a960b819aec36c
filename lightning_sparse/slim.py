"""Physical channel removal for Chase (CHASE.md §3) on Torch-Pruning's dependency graph.

Chase zeroes whole output channels of "active" convs during training; this module deletes them: the
conv's filters (and bias), the matching channels of the norm layer after it (and of any depthwise conv
that follows channel-wise), and the matching input channels of the consuming ("passive") layer. Which
layers qualify and which parameters move together is read from ``torch_pruning.DependencyGraph``, never
hand-coded per architecture.

Public API:
    * :func:`channel_candidates` — convs whose output channels can go without touching a residual sum,
      each with the ``(parameter, dim)`` slices that go with a channel (:class:`ChannelGroup`).
    * :func:`slim_model` — remove channels in place; :class:`SlimResult` says which indices each
      parameter kept so masks and optimizer state can be sliced the same way.
    * :func:`channel_config` / :func:`apply_channel_config` — record a slim architecture and rebuild it
      on a fresh dense model (resume, export).
    * :func:`export_slim` / :func:`load_slim` — a self-contained file (timm arch + channel config + weights).
    * :func:`slim_report` — params, FLOPs (``torch.utils.flop_counter``) and channels, dense vs slim.

Torch-Pruning replaces the ``nn.Parameter`` objects it prunes, so an optimizer built before
:func:`slim_model` points at stale tensors: rebuild it (slicing its state with :meth:`SlimResult.slice`).

Example:
    >>> import timm, torch
    >>> model = timm.create_model("resnet18", num_classes=10).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> groups = channel_candidates(model, x)
    >>> sorted(groups)[:2], ("layer1.0.bn1.weight", 0) in groups["layer1.0.conv1"].params
    (['layer1.0.conv1', 'layer1.1.conv1'], True)
    >>> res = slim_model(model, {"layer1.0.conv1": [0, 1, 2]}, x, return_result=True)
    >>> model.layer1[0].conv1.out_channels, model.layer1[0].conv2.in_channels
    (61, 61)
    >>> res.kept["layer1.0.conv2.weight"][1][:3].tolist()  # dim 1 (input channels) kept 3, 4, 5, ...
    [3, 4, 5]
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ChannelEntry",
    "ChannelGroup",
    "SlimResult",
    "channel_candidates",
    "slim_model",
    "zero_channels",
    "channel_config",
    "apply_channel_config",
    "export_slim",
    "load_slim",
    "slim_report",
    "count_flops",
]

SLIM_FORMAT = "lightning_sparse.slim/1"
_ADD_OPS = ("AddBackward", "SubBackward")


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
    """

    layer: str
    channels: int
    coupled: tuple[str, ...]
    entries: tuple[ChannelEntry, ...]

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


@dataclass
class SlimResult:
    """What :func:`slim_model` did.

    Attributes:
        model: the slimmed model (the same object that was passed in, modified in place).
        removed: conv name -> original channel indices actually removed (after ``round_to``).
        kept: parameter/buffer name -> ``{dim: LongTensor of the original indices kept along dim}`` for
            every tensor that changed shape (a conv whose input *and* output channels were slimmed has two
            dims); slice masks and optimizer state with :meth:`slice`.
    """

    model: nn.Module
    removed: dict[str, list[int]] = field(default_factory=dict)
    kept: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)

    def slice(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (the pre-slimming shape of ``name``: a mask, a momentum buffer) cut like ``name``.

        Tensors of names that did not change are returned as they are.

        Example:
            >>> r = SlimResult(nn.Identity(), kept={"w": {0: torch.tensor([0, 2]), 1: torch.tensor([1])}})
            >>> r.slice("w", torch.arange(6).reshape(3, 2)).tolist()
            [[1], [5]]
        """
        for dim, idx in self.kept.get(name, {}).items():
            tensor = tensor.index_select(dim, idx.to(tensor.device))
        return tensor


# ----------------------------------------------------------------------------------------------- graph


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Trace in eval mode (BN running stats must not move) and restore every module's flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def _device_inputs(model: nn.Module, example_inputs: torch.Tensor) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    return example_inputs.to(p.device) if p is not None else example_inputs


def _build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    with _eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, _device_inputs(model, example_inputs), verbose=False)


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _local_entries(module: nn.Module, is_out: bool) -> list[tuple[str, int, bool]]:
    """(local tensor name, dim, is_buffer) a supported module loses for an out/in channel prune."""
    if isinstance(module, nn.Conv2d):
        if module.transposed if hasattr(module, "transposed") else False:
            raise ValueError("transposed convs are not supported")
        if _is_depthwise(module) or is_out:
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


def _analyze(
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
        if grad_fn is not None and str(grad_fn).startswith(_ADD_OPS) and not include_residual:
            return None, f"its channels feed a residual sum ({grad_fn})", group
        mname = names.get(module)
        if mname is None or not any(True for _ in module.parameters(recurse=False)) and not isinstance(module, _BatchNorm):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1 and not _is_depthwise(module):
            return None, f"its channels reach grouped conv {mname!r} (groups={module.groups}), not supported", group
        if module is not conv and is_out and isinstance(module, (nn.Conv2d, nn.Linear)):
            if not _is_depthwise(module) and not include_residual:
                return None, f"removing its channels also removes output channels of {mname!r} (residual coupling)", group
            coupled.append(mname)
        try:
            local = _local_entries(module, is_out)
        except ValueError as err:
            return None, f"its channels reach {mname!r}: {err}", group
        for pname, dim, is_buf in local:
            entries.append(ChannelEntry(
                name=f"{mname}.{pname}" if mname else pname, dim=dim, is_buffer=is_buf,
                positions=tuple(int(i) for i in item.idxs), roots=tuple(int(r) for r in item.root_idxs),
            ))
    return ChannelGroup(name, conv.out_channels, tuple(coupled), tuple(entries)), None, group


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
    graph = _build_graph(model, example_inputs)
    out: dict[str, ChannelGroup] = {}
    seen: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Conv2d) or name in seen:
            continue
        group, _, _ = _analyze(graph, model, name, include_residual)
        if group is not None:
            out[name] = group
            seen.update(group.coupled)
    if not out:
        raise ValueError(f"{type(model).__name__} has no conv whose output channels can be removed.")
    return out


# ------------------------------------------------------------------------------------------- slimming


@torch.no_grad()
def zero_channels(model: nn.Module, group: ChannelGroup, channels: Sequence[int] | torch.Tensor) -> None:
    """Zero every parameter slice tied to ``channels`` of ``group`` (filters, bias, norm weight/bias,
    depthwise filters, the consumer's input slice), in place.

    After this the channels contribute exactly nothing: a norm layer with weight = bias = 0 outputs 0
    whatever its running statistics, and the consumer's input slice is 0. So :func:`slim_model` on those
    channels leaves the outputs unchanged (up to float summation order). Chase does the same through
    masks (filters, consumer slice) plus the norm affine parameters.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Conv2d(2, 1, 1))
        >>> g = channel_candidates(m, torch.randn(1, 1, 4, 4))["0"]
        >>> zero_channels(m, g, [1])
        >>> m[1].weight.tolist(), m[2].weight[0, 1].item()
        ([1.0, 0.0], 0.0)
    """
    params = dict(model.named_parameters())
    for name, (dim, pos) in group.indices(channels).items():
        if name not in params:
            raise ValueError(f"group of layer {group.layer!r} names {name!r}, which {type(model).__name__} lacks.")
        params[name].index_fill_(dim, pos.to(params[name].device), 0.0)


def _check_round_to(round_to: int | None) -> None:
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be None or a positive int (e.g. 8), got round_to={round_to!r}.")


def _tensor_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False)}
    shapes.update({n: tuple(b.shape) for n, b in module.named_buffers(recurse=False) if b is not None})
    return shapes


def slim_model(
    model: nn.Module,
    removed: Mapping[str, Sequence[int] | torch.Tensor],
    example_inputs: torch.Tensor,
    round_to: int | None = None,
    include_residual: bool = False,
    return_result: bool = False,
) -> nn.Module | SlimResult:
    """Physically remove output channels of candidate convs (in place), with everything tied to them.

    Returns the model (slimmed in place); with ``return_result=True`` a :class:`SlimResult` that also
    records the removed and kept indices of every tensor.

    Each conv in ``removed`` loses those output channels, its bias, the matching BN channels (weights,
    bias, running stats), depthwise convs that follow channel-wise, and the consumer's input channels.
    The outputs do not change when the removed channels were exactly zero after their norm layer (Chase
    zeroes filter masks and the BN weight/bias of removed channels).

    ``round_to`` keeps hardware-friendly channel counts: if ``C - len(removed[l])`` is not a multiple of
    ``round_to``, only the first entries of ``removed[l]`` (in the order given: pass the lowest-score
    channel first, as :func:`~lightning_sparse.sparsity.channels.select_channels_to_remove` does) are
    removed and the trailing ones are kept, so the kept count is the next multiple of ``round_to``
    (or ``C``). :attr:`SlimResult.removed` lists what was actually removed.

    Torch-Pruning replaces the pruned ``nn.Parameter`` objects (``requires_grad`` flags are restored):
    rebuild the optimizer afterwards, slicing its state with :meth:`SlimResult.slice`.

    Args:
        model: the model to slim (modified in place).
        removed: conv name -> channel indices to remove (empty sequences are skipped).
        example_inputs: a batch the model accepts (traced once, in eval mode).
        round_to: keep channel counts multiples of this (``None``: exact).
        include_residual: allow convs coupled through residual sums (see :func:`channel_candidates`).

    Returns:
        The slimmed model, or with ``return_result=True`` a :class:`SlimResult` (model, removed and kept
        indices of every tensor).

    Raises:
        ValueError: naming the layer, when it does not exist, is not a candidate (residual, grouped,
            model output, unsupported layer on its path), the indices are out of range or repeated, or all
            channels of a layer would go.
    """
    _check_round_to(round_to)
    modules = dict(model.named_modules())
    missing = [n for n in removed if n not in modules]
    if missing:
        raise ValueError(f"cannot slim layers {missing}: no such modules in {type(model).__name__}.")
    todo = {}
    for name, idx in removed.items():
        idx = [int(i) for i in (idx.tolist() if isinstance(idx, torch.Tensor) else idx)]
        if idx:
            todo[name] = idx
    result = SlimResult(model=model)
    if not todo:
        return result if return_result else model
    graph = _build_graph(model, example_inputs)
    names = {m: n for n, m in modules.items()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    kept_lists: dict[tuple[str, int], list[int]] = {}
    pruned_out: dict[str, str] = {}  # conv whose out channels were already pruned -> by which request
    for name, idx in todo.items():
        group_info, reason, _ = _analyze(graph, model, name, include_residual)
        if reason is not None:
            raise ValueError(f"cannot slim layer {name!r}: {reason}.")
        conv = modules[name]
        c = conv.out_channels
        bad = sorted({i for i in idx if not 0 <= i < c})
        if bad or len(set(idx)) != len(idx):
            raise ValueError(f"layer {name!r} has {c} output channels; got invalid or repeated indices {idx}.")
        if len(idx) >= c:
            raise ValueError(f"cannot slim layer {name!r}: all {c} output channels would be removed.")
        for other in (name, *group_info.coupled):
            if other in pruned_out:
                raise ValueError(
                    f"cannot slim layer {name!r}: its channels are coupled with {other!r}, already slimmed "
                    f"through {pruned_out[other]!r}; request each coupled group once."
                )
        if round_to is not None:
            keep = min(c, math.ceil((c - len(idx)) / round_to) * round_to)
            idx = idx[: c - keep]
            if not idx:
                continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, sorted(idx))
        before: dict[nn.Module, dict[str, tuple[int, ...]]] = {}
        for item in group:
            m = item.dep.target.module
            if isinstance(m, nn.Module) and m in names:
                before[m] = _tensor_shapes(m)
        group.prune()
        for item in group:
            m = item.dep.target.module
            if m not in before:
                continue
            is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
            gone = set(int(i) for i in item.idxs)
            after = _tensor_shapes(m)
            for local, dim, _ in _local_entries(m, is_out):
                if local not in after or after[local] == before[m][local]:
                    continue
                full = f"{names[m]}.{local}" if names[m] else local
                cur = kept_lists.get((full, dim), list(range(before[m][local][dim])))
                kept_lists[(full, dim)] = [k for pos, k in enumerate(cur) if pos not in gone]
        for other in (name, *group_info.coupled):
            pruned_out[other] = name
        result.removed[name] = sorted(idx)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, True))
    for (n, d), k in sorted(kept_lists.items()):
        result.kept.setdefault(n, {})[d] = torch.tensor(k, dtype=torch.long)
    return result if return_result else model


# ------------------------------------------------------------------------------- architecture records


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


def _first_conv(model: nn.Module) -> nn.Conv2d:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d; channel slimming needs a conv net.")


def _default_inputs(model: nn.Module, size: int = 64) -> torch.Tensor:
    return torch.randn(1, _first_conv(model).in_channels, size, size)


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
        example_inputs = _default_inputs(model)
    modules = dict(model.named_modules())
    graph = None
    for name, want in config.items():
        m = modules[name]
        if isinstance(m, nn.Conv2d) and not _is_depthwise(m):
            have, target, fn = m.out_channels, want["out_channels"], tp.prune_conv_out_channels
        elif isinstance(m, nn.Linear):
            have, target, fn = m.out_features, want["out_features"], tp.prune_linear_out_channels
        else:
            continue
        if target < have:
            graph = graph or _build_graph(model, example_inputs)
            graph.get_pruning_group(m, fn, list(range(target, have))).prune()
    now = channel_config(model)
    diff = {n: (now[n], dict(config[n])) for n in config if now[n] != dict(config[n])}
    if diff:
        raise ValueError(f"could not rebuild the channel config; (model, config) differ at {diff}.")
    return model


def export_slim(model: nn.Module, path: str | Path, example_inputs: torch.Tensor | None = None, **meta: Any) -> Path:
    """Save a slim timm model as one file that :func:`load_slim` rebuilds without any training code.

    The file (``torch.save`` of plain tensors/ints/strings, loadable with ``weights_only=True``) holds the
    timm architecture name, ``num_classes``, ``in_chans``, ``model_kwargs`` for ``timm.create_model``,
    the :func:`channel_config`, the ``state_dict`` and ``meta``. With ``example_inputs`` it also stores that
    batch and the eval-mode outputs, which :func:`load_slim` checks.

    Args:
        model: a timm model (or any model when ``arch=`` names a timm architecture that builds it).
        path: output file.
        example_inputs: optional batch for the round-trip check.
        **meta: ``arch``, ``num_classes``, ``in_chans``, ``model_kwargs`` override what is read from the
            model; anything else (plain Python values) is stored under ``meta``.

    Raises:
        ValueError: when the architecture name cannot be found (pass ``arch=``).
    """
    arch = meta.pop("arch", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise ValueError(
            f"export_slim needs the timm architecture of {type(model).__name__}; pass arch='resnet50' (for example)."
        )
    num_classes = int(meta.pop("num_classes", getattr(model, "num_classes", 0)))
    in_chans = int(meta.pop("in_chans", _first_conv(model).in_channels))
    payload: dict[str, Any] = {
        "format": SLIM_FORMAT,
        "arch": str(arch),
        "num_classes": num_classes,
        "in_chans": in_chans,
        "model_kwargs": dict(meta.pop("model_kwargs", {})),
        "channel_config": channel_config(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    if example_inputs is not None:
        with _eval_mode(model), torch.no_grad():
            out = model(_device_inputs(model, example_inputs))
        payload["example_inputs"] = example_inputs.detach().cpu().clone()
        payload["example_outputs"] = out.detach().cpu().clone()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_slim(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`export_slim` (eval mode).

    ``timm.create_model(arch, num_classes=..., in_chans=..., **model_kwargs)`` →
    :func:`apply_channel_config` → ``load_state_dict(strict=True)``. With ``verify`` and stored example
    inputs, the outputs are compared with the stored ones.

    Raises:
        ValueError: not a slim export file.
        RuntimeError: the rebuilt model's outputs differ from the stored ones.
    """
    import timm

    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != SLIM_FORMAT:
        raise ValueError(f"{path} is not a slim export (expected format {SLIM_FORMAT!r}).")
    model = timm.create_model(
        payload["arch"], pretrained=False, num_classes=payload["num_classes"], in_chans=payload["in_chans"],
        **payload["model_kwargs"],
    )
    example = payload.get("example_inputs")
    trace = example[:1] if example is not None else None
    apply_channel_config(model, payload["channel_config"], trace)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    if verify and example is not None:
        with torch.no_grad():
            out = model(example)
        ref = payload["example_outputs"]
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
            raise RuntimeError(
                f"{path}: rebuilt model's outputs differ from the stored ones (max abs diff "
                f"{(out - ref).abs().max().item():.3g})."
            )
    model.slim_meta = dict(payload["meta"], arch=payload["arch"])  # type: ignore[assignment]
    return model.to(map_location)


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs of ``model`` on ``x`` (``torch.utils.flop_counter``; eval mode, no grad)."""
    with _eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def slim_report(dense_model: nn.Module, slim_model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """Params, FLOPs (``torch.utils.flop_counter``, 2 per multiply-add) and conv channels, dense vs slim.

    Args:
        dense_model: the reference model.
        slim_model: the slimmed model.
        input_shape: full input shape including the batch, e.g. ``(1, 3, 224, 224)``.

    Returns:
        ``{"params": {"dense", "slim", "ratio"}, "flops": {"dense", "slim", "ratio"},
        "channels": {conv name: (dense out_channels, slim out_channels)}}`` (ratios are slim / dense).

    Example:
        >>> dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> slim = copy.deepcopy(dense)
        >>> _ = slim_model(slim, {"0": [0, 1, 2, 3]}, torch.randn(1, 3, 8, 8))
        >>> r = slim_report(dense, slim, (1, 3, 8, 8))
        >>> r["channels"]["0"], r["params"]["slim"] < r["params"]["dense"]
        ((8, 4), True)
    """
    def device(m: nn.Module) -> torch.device:
        p = next(iter(m.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    x = torch.zeros(tuple(int(s) for s in input_shape))
    params = [sum(p.numel() for p in m.parameters()) for m in (dense_model, slim_model)]
    flops = [count_flops(m, x.to(device(m))) for m in (dense_model, slim_model)]
    dense_c = {n: m.out_channels for n, m in dense_model.named_modules() if isinstance(m, nn.Conv2d)}
    slim_c = {n: m.out_channels for n, m in slim_model.named_modules() if isinstance(m, nn.Conv2d)}
    return {
        "params": {"dense": params[0], "slim": params[1], "ratio": params[1] / max(1, params[0])},
        "flops": {"dense": flops[0], "slim": flops[1], "ratio": flops[1] / max(1, flops[0])},
        "channels": {n: (c, slim_c.get(n, 0)) for n, c in dense_c.items()},
    }
