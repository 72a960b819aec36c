"""In-place channel removal with index bookkeeping (masks and optimizer state are sliced alike)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_sparse.slim._graph import build_graph, local_entries, sync_mixed_convs, trace_group
from lightning_sparse.slim.candidates import ChannelGroup, analyze_conv

__all__ = ["SlimResult", "slim_model", "zero_channels"]


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


@torch.no_grad()
def zero_channels(model: nn.Module, group: ChannelGroup, channels: Sequence[int] | torch.Tensor) -> None:
    """Zero every parameter slice tied to ``channels`` of ``group`` (filters, bias, norm weight/bias,
    depthwise filters, the consumer's input slice), in place.

    After this the channels contribute exactly nothing: a norm layer with weight = bias = 0 outputs 0
    whatever its running statistics, and the consumer's input slice is 0. So :func:`slim_model` on those
    channels leaves the outputs unchanged (up to float summation order). Chase does the same through
    masks (filters, consumer slice) plus the norm affine parameters.

    Example:
        >>> from lightning_sparse.slim import channel_candidates
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
    graph = build_graph(model, example_inputs)
    names = {m: n for n, m in modules.items()}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    kept_lists: dict[tuple[str, int], list[int]] = {}
    pruned_out: dict[str, str] = {}  # conv whose out channels were already pruned -> by which request
    for name, idx in todo.items():
        group_info, reason, _ = analyze_conv(graph, model, name, include_residual)
        if reason is not None:
            raise ValueError(f"cannot slim layer {name!r}: {reason}.")
        conv = modules[name]
        c = conv.out_channels
        bad = sorted({i for i in idx if not 0 <= i < c})
        if bad or len(set(idx)) != len(idx):
            raise ValueError(f"layer {name!r} has {c} output channels; got invalid or repeated indices {idx}.")
        if len(idx) >= c:
            raise ValueError(f"cannot slim layer {name!r}: all {c} output channels would be removed.")
        # depthwise convs may be shared by several roots through a concat (each owns other channels of it);
        # producers (the root, residual partners) hold the group's channels themselves
        for other in group_info.producer_layers:
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
        group = trace_group(graph, conv, sorted(idx), names)
        before: dict[nn.Module, dict[str, tuple[int, ...]]] = {}
        for item in group:
            m = item.dep.target.module
            if isinstance(m, nn.Module) and m in names:
                before[m] = _tensor_shapes(m)
        group.prune()
        sync_mixed_convs(model)
        for item in group:
            m = item.dep.target.module
            if m not in before:
                continue
            is_out = graph.is_out_channel_pruning_fn(item.dep.handler)
            gone = set(int(i) for i in item.idxs)
            after = _tensor_shapes(m)
            for local, dim, _ in local_entries(m, is_out):
                if local not in after or after[local] == before[m][local]:
                    continue
                full = f"{names[m]}.{local}" if names[m] else local
                cur = kept_lists.get((full, dim), list(range(before[m][local][dim])))
                kept_lists[(full, dim)] = [k for pos, k in enumerate(cur) if pos not in gone]
        for other in group_info.producer_layers:
            pruned_out[other] = name
        result.removed[name] = sorted(idx)
    for n, p in model.named_parameters():
        p.requires_grad_(requires_grad.get(n, True))
    for (n, d), k in sorted(kept_lists.items()):
        result.kept.setdefault(n, {})[d] = torch.tensor(k, dtype=torch.long)
    return result if return_result else model
