"""Chase's channel-level pieces (arXiv 2305.19454, CHASE.md §2): scores, schedule, floors, selection.

Pure tensor code (no Lightning). Chase scores each output channel of a candidate ("active") layer by
its **unmasked mean magnitude** (UMM), removes channels gradually on a cubic schedule, always the ones
with the lowest score over all candidate layers together (one global threshold) while every layer keeps
at least a floor of channels, and afterwards hands the parameter budget of the removed channels to the
remaining layers by recomputing ERK densities over the remaining shapes.

Example:
    >>> import torch
    >>> w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    >>> m = torch.tensor([[True, False], [True, True]])
    >>> channel_scores(w, m).tolist()  # UMM: sum |w*m| / full filter size
    [0.5, 1.75]
    >>> round(channel_sparsity_schedule(50, 100, 0.4), 6)
    0.35
    >>> channel_floor(64, 0.4, 0.2)  # floor(64 * 0.6 * 0.2) = floor(7.68)
    7
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from lightning_sparse.sparsity.distributions import erk_densities, layer_counts

__all__ = [
    "ScoreMode",
    "channel_scores",
    "group_channel_scores",
    "channel_sparsity_schedule",
    "channel_floor",
    "n_channels_to_remove",
    "select_channels_to_remove",
    "redistribute_budget",
]

ScoreMode = Literal["umm", "maskwise"]
SCORE_MODES = ("umm", "maskwise")
_EPS = 1e-9  # guards floor/ceil against float noise such as 100 * 0.5 * 0.2 = 10.000000000000002


def _check_final_sparsity(final_sparsity: float) -> None:
    if not 0.0 <= final_sparsity < 1.0:
        raise ValueError(
            f"final_sparsity (S_c, the final channel sparsity) must be in [0, 1), got final_sparsity={final_sparsity!r}."
        )


def channel_scores(weight: torch.Tensor, mask: torch.Tensor | None = None, mode: str = "umm") -> torch.Tensor:
    """Chase's per-output-channel score of a weight ``[C_out, ...]`` under a mask.

    ``"umm"`` (unmasked mean magnitude, the paper's default): ``sum(|w_c * m_c|) / numel(w_c)``, the mean
    absolute weight over the *whole* filter with masked-out entries counting as zero, so a channel scores
    low when it is sparse or its surviving weights are small. ``"maskwise"`` (the paper's ablation):
    mean ``|w|`` over the unmasked entries only, 0 for a channel without any.

    Args:
        weight: a Conv/Linear weight, output channels along dim 0.
        mask: bool (or 0/1) tensor of ``weight``'s shape; ``None`` means all entries are active.
        mode: ``"umm"`` or ``"maskwise"``.

    Returns:
        float tensor ``[C_out]`` on ``weight``'s device (no autograd history).

    Raises:
        ValueError: for an unknown ``mode``, a 0-d weight, or a mask of another shape.

    Example:
        >>> w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
        >>> m = torch.tensor([[True, False], [True, True]])
        >>> channel_scores(w, m, mode="maskwise").tolist()
        [1.0, 1.75]
    """
    if mode not in SCORE_MODES:
        raise ValueError(f"mode={mode!r} is not a channel score; choose one of {list(SCORE_MODES)}.")
    if weight.dim() < 1:
        raise ValueError(f"weight must have an output-channel dim 0, got a tensor of shape {tuple(weight.shape)}.")
    w = weight.detach().abs().float()
    if mask is None:
        m = torch.ones_like(w)
    else:
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}."
            )
        m = mask.detach().to(device=w.device, dtype=w.dtype)
    w, m = w.reshape(w.shape[0], -1), m.reshape(m.shape[0], -1)
    total = (w * m).sum(dim=1)
    if mode == "umm":
        return total / w.shape[1]
    count = m.sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def group_channel_scores(
    weights: Sequence[torch.Tensor], masks: Sequence[torch.Tensor | None], mode: str = "umm"
) -> torch.Tensor:
    """Chase's score of channels that several filters produce together (a residual stream's channels).

    A channel of a residual stream is written by every conv that adds into the stream (the block's last
    conv, the downsample conv, the stem), so its score pools all of those filters: ``"umm"`` is
    ``Σ_f sum(|w_f,c ⊙ m_f,c|) / Σ_f numel(w_f,c)`` over the producers f, ``"maskwise"`` the mean |w| over
    the unmasked entries of all of them. With one producer this is :func:`channel_scores`. A dense
    producer (e.g. the stem, kept dense by the first-layer rule) takes ``None`` as its mask.

    Example:
        >>> w1, w2 = torch.tensor([[1.0, -2.0], [3.0, 0.5]]), torch.tensor([[4.0], [0.0]])
        >>> m1 = torch.tensor([[True, False], [True, True]])
        >>> group_channel_scores([w1, w2], [m1, None]).tolist()  # (1 + 4) / 3, (3.5 + 0) / 3
        [1.6666666269302368, 1.1666666269302368]
    """
    if not weights or len(weights) != len(masks):
        raise ValueError(f"need one mask (or None) per producer weight, got {len(weights)} weights, {len(masks)} masks.")
    channels = {int(w.shape[0]) for w in weights}
    if len(channels) != 1:
        raise ValueError(f"producer weights disagree on the channel count: {[tuple(w.shape) for w in weights]}.")
    total = count = numel = 0
    for w, m in zip(weights, masks):
        fan = max(1, w[0].numel())
        ones = torch.ones_like(w, dtype=torch.bool) if m is None else m
        umm = channel_scores(w, ones, "umm")  # sum|w*m| / fan
        total = total + umm * fan
        count = count + ones.reshape(ones.shape[0], -1).sum(dim=1).to(umm)
        numel += fan
    if mode == "umm":
        return total / numel
    if mode not in SCORE_MODES:
        raise ValueError(f"mode={mode!r} is not a channel score; choose one of {list(SCORE_MODES)}.")
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def channel_sparsity_schedule(step: int, total_steps: int, final_sparsity: float) -> float:
    """Target channel sparsity at ``step``: ``S_c * (1 - (1 - t/T)^3)``, clipped to ``[0, S_c]``.

    Cubic gradual schedule (Zhu & Gupta); ``T = total_steps`` is ``stop_gmp_epochs * steps_per_epoch``.
    Steps before 0 give 0, steps after ``T`` give ``S_c``.

    Example:
        >>> [round(channel_sparsity_schedule(t, 4, 0.4), 4) for t in (0, 1, 2, 4, 9)]
        [0.0, 0.2313, 0.35, 0.4, 0.4]
    """
    _check_final_sparsity(final_sparsity)
    if total_steps <= 0:
        raise ValueError(f"total_steps (T) must be a positive number of steps, got total_steps={total_steps!r}.")
    t = min(max(float(step), 0.0), float(total_steps))
    s = final_sparsity * (1.0 - (1.0 - t / total_steps) ** 3)
    return min(max(s, 0.0), final_sparsity)


def channel_floor(c_start: int, final_sparsity: float, beta: float) -> int:
    """Fewest channels a layer may keep: ``floor(C_start * (1 - S_c) * beta)`` (``beta`` = ``minimum_ratio``).

    Example:
        >>> channel_floor(100, 0.5, 0.2), channel_floor(256, 0.4, 0.5)
        (10, 76)
    """
    _check_final_sparsity(final_sparsity)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta (minimum_ratio) must be in (0, 1], got beta={beta!r}.")
    if c_start < 0:
        raise ValueError(f"c_start must be a channel count >= 0, got c_start={c_start!r}.")
    return int(math.floor(c_start * (1.0 - final_sparsity) * beta + _EPS))


def n_channels_to_remove(active_now: int, c_start_total: int, s_t: float) -> int:
    """How many candidate channels to remove now to reach channel sparsity ``s_t``.

    ``ceil(active_now - (1 - s_t) * c_start_total)``, never negative: the number of channels to *keep* is
    rounded down (with a 1e-9 tolerance for float noise), as the reference removes every channel whose score
    is below the ``int(n - to_prune)``-th largest (``Masking.prune_score``); at the end of the schedule
    ``ceil(S_c * C_total)`` channels are gone.

    Example:
        >>> n_channels_to_remove(100, 100, 0.35), n_channels_to_remove(65, 100, 0.4), n_channels_to_remove(10, 10, 0.15)
        (35, 5, 2)
    """
    if not 0.0 <= s_t <= 1.0:
        raise ValueError(f"s_t (target channel sparsity) must be in [0, 1], got s_t={s_t!r}.")
    if c_start_total < 0 or active_now < 0:
        raise ValueError(
            f"channel counts must be >= 0, got active_now={active_now!r}, c_start_total={c_start_total!r}."
        )
    keep = int(math.floor((1.0 - s_t) * c_start_total + _EPS))
    return max(0, int(active_now) - keep)


def select_channels_to_remove(
    scores: Mapping[str, torch.Tensor],
    active: Mapping[str, torch.Tensor],
    floors: Mapping[str, int],
    n_remove: int,
) -> dict[str, torch.Tensor]:
    """The ``n_remove`` active channels with the lowest score over all layers, respecting per-layer floors.

    One global threshold: all active channels of all layers are ranked together by score. A layer that
    would drop below its floor loses only its lowest channels down to the floor, and the shortfall is
    taken from the remaining layers by repeating the global selection over them. This equals walking the
    global ranking from the lowest score and skipping the channels of layers already at their floor.
    Ties are broken deterministically: by the order of the layers in ``scores``, then by channel index.

    Args:
        scores: layer name -> float tensor ``[C]`` (e.g. :func:`channel_scores`).
        active: layer name -> bool tensor ``[C]``, ``True`` for channels not removed yet.
        floors: layer name -> fewest channels the layer keeps (:func:`channel_floor`).
        n_remove: total number of channels to remove now.

    Returns:
        layer name -> LongTensor of channel indices to remove (CPU), every layer present (possibly empty),
        ordered by increasing score (removal priority; :func:`lightning_sparse.slim.slim_model` with
        ``round_to`` keeps the trailing ones).

    Raises:
        ValueError: when the layer names disagree, shapes mismatch, ``n_remove`` < 0, or the floors leave
            fewer than ``n_remove`` removable channels.

    Example:
        >>> s = {"a": torch.tensor([0.1, 0.2, 0.9]), "b": torch.tensor([0.15, 0.8])}
        >>> act = {"a": torch.ones(3, dtype=torch.bool), "b": torch.ones(2, dtype=torch.bool)}
        >>> out = select_channels_to_remove(s, act, {"a": 2, "b": 1}, 2)
        >>> out["a"].tolist(), out["b"].tolist()  # "a" may lose only 1, so the next lowest comes from "b"
        ([0], [0])
    """
    if set(scores) != set(active) or set(scores) != set(floors):
        raise ValueError(
            "scores, active and floors must have the same layer names, got "
            f"scores={sorted(scores)}, active={sorted(active)}, floors={sorted(floors)}."
        )
    if n_remove < 0:
        raise ValueError(f"n_remove must be >= 0, got n_remove={n_remove!r}.")
    names = list(scores)
    values, layer_ids, channel_ids = [], [], []
    capacity: list[int] = []
    for i, name in enumerate(names):
        s = scores[name].detach().reshape(-1).to("cpu", torch.float64)
        a = active[name].detach().reshape(-1).to("cpu", torch.bool)
        if s.shape != a.shape:
            raise ValueError(f"layer {name!r}: scores has {s.numel()} channels but active has {a.numel()}.")
        if floors[name] < 0:
            raise ValueError(f"layer {name!r}: floor must be >= 0, got {floors[name]!r}.")
        idx = torch.nonzero(a).reshape(-1)
        values.append(s[idx])
        layer_ids.append(torch.full_like(idx, i))
        channel_ids.append(idx)
        capacity.append(max(0, int(a.sum()) - int(floors[name])))
    if n_remove > sum(capacity):
        raise ValueError(
            f"cannot remove n_remove={n_remove} channels: the floors leave only {sum(capacity)} removable "
            f"channels ({dict(zip(names, capacity))})."
        )
    out = {name: [] for name in names}
    if names and n_remove > 0:
        v, lid, cid = torch.cat(values), torch.cat(layer_ids), torch.cat(channel_ids)
        order = torch.sort(v, stable=True).indices  # stable: ties keep layer order, then channel order
        taken = 0
        for j in order.tolist():
            layer = int(lid[j])
            if capacity[layer] == 0:
                continue
            capacity[layer] -= 1
            out[names[layer]].append(int(cid[j]))
            taken += 1
            if taken == n_remove:
                break
    return {name: torch.tensor(idx, dtype=torch.long) for name, idx in out.items()}


def redistribute_budget(shapes_after: Mapping[str, Sequence[int]], budget: int) -> dict[str, int]:
    """Per-layer kept-weight counts after channel removal: ERK over the remaining shapes, summing to ``budget``.

    Chase keeps the total budget B fixed; recomputing ERK on the smaller shapes makes the surviving layers
    denser. Counts come from :func:`~lightning_sparse.sparsity.distributions.layer_counts` with
    ``total=budget``, so they add up to exactly ``budget`` (each between 1 and the layer's size).

    Example:
        >>> c = redistribute_budget({"a": (8, 3, 3, 3), "b": (16, 8, 3, 3)}, 300)
        >>> sum(c.values()), c["a"] <= 216
        (300, True)
    """
    if not shapes_after:
        raise ValueError("shapes_after must name at least one layer, got an empty mapping.")
    total = sum(math.prod(int(s) for s in shape) for shape in shapes_after.values())
    if not len(shapes_after) <= budget <= total:
        raise ValueError(
            f"budget={budget!r} kept weights is impossible for {len(shapes_after)} layers holding {total} "
            f"weights; it must be in [{len(shapes_after)}, {total}]."
        )
    densities = erk_densities(shapes_after, budget / total)
    return layer_counts(densities, shapes_after, total=int(budget))
