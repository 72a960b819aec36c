"""Chase's two DST update rules, its channel-removal planning and its channel bookkeeping (CHASE.md), as
plain code.

No Lightning here: the :class:`~lightning_sparse.callbacks.Chase` callback feeds these its Parameters,
masks and step counts. Every schedule decision of Chase lives in :class:`ChaseSchedule`
(:mod:`lightning_sparse.sparsity.chase_schedule`, re-exported here), every mask decision in
:func:`soft_bound_update` / :func:`strict_budget_update`, every choice of channels in
:func:`plan_channel_removal`, so a change of the recipe touches one place.

"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_sparse.sparsity.channels import (
    channel_floor,
    group_channel_scores,
    n_channels_to_remove,
    redistribute_budget,
    select_channels_to_remove,
)
from lightning_sparse.sparsity.chase_schedule import (
    PHASE1_FINAL_GROWTH,
    PHASE1_MODES,
    REFERENCE_FRACTIONS,
    SLIM_MODES,
    SPANS,
    ChaseSchedule,
    Spans,
    check_chase_args,
    resolve_spans,
)
from lightning_sparse.sparsity.dst import global_grow, global_magnitude_prune

__all__ = ["ChaseSchedule", "ChannelBook", "Update", "soft_bound_update", "strict_budget_update",
           "layer_magnitude_prune", "budget_targets", "cap_budget", "check_chase_args", "total_weights_of_old_state",
           "ChannelRemoval", "plan_channel_removal", "scheduled_update", "SLIM_MODES", "PHASE1_MODES", "PHASE1_FINAL_GROWTH",
           "REFERENCE_FRACTIONS", "SPANS", "Spans", "resolve_spans"]

Masks = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Update:
    """The result of one Chase DST update.

    Attributes:
        masks: the new masks.
        pruned: per layer, the positions the prune step removed (a regrown one among them restarts at 0,
            as the reference zeroes a pruned weight and its momentum before it grows).
        grown: the number of positions activated by the grow step.
        phase: 1 (soft memory bound) or 2 (strict budget); 0 when not set by :func:`scheduled_update`.
        rate: r_t of phase 1 (the fraction of N carried) or p_t of phase 2 (the drop fraction).
    """

    masks: Masks
    pruned: Masks
    grown: int
    phase: int = 0
    rate: float = 0.0


def _count(masks: Mapping[str, torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def layer_magnitude_prune(weight: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """Drop ``ceil(fraction · n_active)`` smallest-|w| active weights of one layer (reference ``magnitude_death``)."""
    n_active = int(mask.sum())
    n_drop = min(n_active, math.ceil(fraction * n_active - 1e-9))
    return global_magnitude_prune({"w": weight}, {"w": mask}, n_active - n_drop)["w"] if n_drop > 0 else mask.clone()


def _grow_layer(name: str, mask: torch.Tensor, k: int, growth: str, grads: Mapping[str, torch.Tensor | None],
                generator: torch.Generator, allowed: Mapping[str, torch.Tensor], fill: bool) -> torch.Tensor:
    """Grow ``k`` positions of one layer by |grad| (or at random); ``fill``: a layer whose target density is 1
    becomes dense within its allowed positions (reference ``gradient_growth`` with ``density_dict == 1``)."""
    if fill:
        return allowed[name].clone() if name in allowed else torch.ones_like(mask)
    if k <= 0:
        return mask.clone()
    return global_grow({name: mask}, k, growth, {name: grads.get(name)}, generator,
                       {name: allowed[name]} if name in allowed else None)[name]


def soft_bound_update(weights: Mapping[str, torch.Tensor], masks: Masks, grads: Mapping[str, torch.Tensor | None],
                      budget: int, carry: float, growth: str, generator: torch.Generator,
                      allowed: Mapping[str, torch.Tensor], mode: str = "layerwise",
                      targets: Mapping[str, int] | None = None) -> Update:
    """Phase 1 (soft memory bound): prune the active weights beyond the budget B by magnitude, then grow until
    the network carries ``carry`` (= r_t·N) weights (reference ``truncate_weights_prune`` /
    ``truncate_weights_grow``).

    ``mode="global"`` (CIFAR script: ``--death global_magnitude --growth global_gradients``): one threshold
    over all layers for both steps, growing ``int(carry − active)``.

    ``mode="layerwise"`` (ImageNet ``Chase_0.4``: the ``magnitude`` / ``gradients`` defaults): every layer
    drops ``ceil(q · n_l)`` weights, q = (active − B) / active; then layers whose ERK target (``targets``:
    redistributed counts) is dense are filled, and every other layer grows ``int(n_l · g)`` by its own
    |gradient|, g = (to_grow − room of the dense layers) / (active − active of the dense layers), capped by
    the layer's room.
    """
    active = _count(masks)
    if mode == "global":
        pruned_masks = global_magnitude_prune(weights, masks, budget)
    else:
        q = (active - budget) / active if active > budget else 0.0
        pruned_masks = {n: layer_magnitude_prune(weights[n], m, q) for n, m in masks.items()}
    pruned = {n: masks[n] & ~pruned_masks[n] for n in masks}
    active = _count(pruned_masks)
    to_grow = carry - active
    if to_grow <= 0:
        return Update({n: m.clone() for n, m in pruned_masks.items()}, pruned, 0)
    if mode == "global":
        new = global_grow(pruned_masks, int(to_grow), growth, grads, generator, allowed or None)
        return Update(new, pruned, _count(new) - active)
    room = {n: _room(weights[n], allowed.get(n)) for n in masks}
    dense = {n for n in masks if targets is not None and targets[n] >= room[n]}
    dense_active = sum(int(pruned_masks[n].sum()) for n in dense)
    ratio = (to_grow - sum(room[n] for n in dense) + dense_active) / max(1, active - dense_active)
    new = dict(pruned_masks)
    if ratio > 0:
        for name, mask in pruned_masks.items():
            n = int(mask.sum())
            k = min(int(n * ratio), room[name] - n)
            new[name] = _grow_layer(name, mask, k, growth, grads, generator, allowed, name in dense)
    return Update(new, pruned, _count(new) - active)


def strict_budget_update(weights: Mapping[str, torch.Tensor], masks: Masks, grads: Mapping[str, torch.Tensor | None],
                         fraction: float, targets: Mapping[str, int], growth: str, generator: torch.Generator,
                         allowed: Mapping[str, torch.Tensor]) -> Update:
    """Phase 2 (reference ``truncate_weights``): per layer, drop ``ceil(fraction · n_active)`` smallest-|w| weights,
    then grow the layer back to its ERK count ``targets[name]`` by |gradient| (a dense target fills the layer).
    A layer above its count after the drop is left there (the reference never prunes to the target), so the
    total approaches B = Σ targets through the drops rather than at once.
    """
    out, pruned, grown = {}, {}, 0
    for name, mask in masks.items():
        kept = layer_magnitude_prune(weights[name], mask, fraction)
        pruned[name] = mask & ~kept
        room = _room(weights[name], allowed.get(name))
        want = int(targets[name])
        new = _grow_layer(name, kept, want - int(kept.sum()), growth, grads, generator, allowed, want >= room)
        grown += int((new & ~kept).sum())
        out[name] = new
    return Update(out, pruned, grown)


def scheduled_update(schedule: ChaseSchedule, step: int, weights: Mapping[str, torch.Tensor], masks: Masks,
                     grads: Mapping[str, torch.Tensor | None], allowed: Mapping[str, torch.Tensor], budget: int,
                     total_weights: int, growth: str, generator: torch.Generator, phase1: str = "layerwise") -> Update:
    """The DST update ``schedule`` asks for after the step that made ``step`` steps: :func:`soft_bound_update`
    towards r_t·N in phase 1, :func:`strict_budget_update` with p_t in phase 2, both towards the ERK counts
    redistributed over the remaining shapes (:func:`budget_targets`). ``phase`` and ``rate`` say which ran."""
    targets = budget_targets(weights, masks, allowed, budget)
    if not schedule.in_phase2(step):  # phase 1: soft memory bound
        rate = schedule.phase1_fraction(step)  # r_t
        update = soft_bound_update(weights, masks, grads, budget, rate * total_weights, growth, generator, allowed,
                                   phase1, targets)
        return replace(update, phase=1, rate=rate)
    rate = schedule.phase2_fraction(step)  # p_t: per-layer RigL towards the redistributed ERK counts
    update = strict_budget_update(weights, masks, grads, rate, targets, growth, generator, allowed)
    return replace(update, phase=2, rate=rate)


def _room(weight: torch.Tensor, allowed: torch.Tensor | None) -> int:
    """Positions a layer may hold: its size, less removed channels."""
    return int(allowed.sum()) if allowed is not None else weight.numel()


def budget_targets(weights: Mapping[str, torch.Tensor], masks: Masks, allowed: Mapping[str, torch.Tensor],
                   budget: int) -> dict[str, int]:
    """Per-layer counts: ERK over the remaining (channel-removed) shapes with the same total ``budget``."""
    return redistribute_budget({n: effective_shape(tuple(weights[n].shape), allowed.get(n)) for n in masks}, budget)


def cap_budget(budget: int, weights: Mapping[str, torch.Tensor], masks: Masks, allowed: Mapping[str, torch.Tensor]) -> int:
    """``budget``, or the room left when the remaining (channel-removed) shapes cannot hold it (with a warning).

    Removing many channels at a high density (e.g. residual streams at D = 0.3) can leave fewer weights than B;
    the remaining sparse layers then become dense and B is lowered to what they hold.

    Example:
        >>> w, allowed = {"a": torch.zeros(4, 2)}, {"a": torch.tensor([[True, True]] * 3 + [[False, False]])}
        >>> cap_budget(5, w, {"a": torch.ones(4, 2, dtype=torch.bool)}, allowed)  # 6 weights left: B fits
        5
    """
    room = sum(math.prod(effective_shape(tuple(weights[n].shape), allowed.get(n))) for n in masks)
    if budget > room:
        warnings.warn(f"Chase: the remaining channels hold {room:,} weights, fewer than the budget B={budget:,}; "
                      f"B is lowered to {room:,} (use a lower density or channel_sparsity to keep the network sparse).",
                      stacklevel=2)
    return min(budget, room)


def effective_shape(shape: tuple[int, ...], allowed: torch.Tensor | None) -> tuple[int, ...]:
    """``shape`` with dims 0 and 1 reduced to the slices that ``allowed`` keeps (removed channels gone)."""
    if allowed is None:
        return tuple(shape)
    dims = list(shape)
    for d in range(min(2, len(shape))):
        other = tuple(i for i in range(len(shape)) if i != d)
        dims[d] = int(allowed.any(dim=other).sum()) if other else int(allowed.sum())
    return tuple(dims)


@dataclass
class ChannelBook:
    """Which channels of each candidate layer were removed (zeroed) and which of those are slimmed away.

    Channel ids are in the *original* indexing (before any slimming); :meth:`current_index` maps them to
    the indexing of the (possibly slimmed) model.
    """

    start: dict[str, int] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    slimmed: dict[str, list[int]] = field(default_factory=dict)

    def active(self) -> dict[str, int]:
        """Candidate layer -> channels still active."""
        return {k: self.start[k] - len(self.removed.get(k, [])) for k in self.start}

    def original_channels(self, layer: str) -> list[int]:
        """Original ids of the channels the model has now (identity before slimming)."""
        slimmed = set(self.slimmed.get(layer, []))
        return [c for c in range(self.start[layer]) if c not in slimmed]

    def current_index(self, layer: str, original: list[int]) -> list[int]:
        pos = {c: i for i, c in enumerate(self.original_channels(layer))}
        return [pos[c] for c in original if c in pos]

    def active_flags(self, layer: str, channels: int) -> torch.Tensor:
        act = torch.ones(channels, dtype=torch.bool)
        act[self.current_index(layer, self.removed.get(layer, []))] = False
        return act

    def remove(self, layer: str, current: list[int]) -> None:
        original = self.original_channels(layer)
        self.removed.setdefault(layer, []).extend(original[i] for i in current)

    def pending_slim(self) -> dict[str, list[int]]:
        """Removed but not yet slimmed channels, in current indexing."""
        todo = {}
        for layer, removed in self.removed.items():
            done = set(self.slimmed.get(layer, []))
            pending = [c for c in removed if c not in done]
            if pending:
                todo[layer] = self.current_index(layer, pending)
        return todo

    def mark_slimmed(self, layer: str, current: list[int]) -> None:
        original = self.original_channels(layer)
        self.slimmed.setdefault(layer, []).extend(original[i] for i in current)

    def state_dict(self) -> dict[str, dict]:
        return {"start_channels": dict(self.start), "removed": {k: list(v) for k, v in self.removed.items()},
                "slimmed": {k: list(v) for k, v in self.slimmed.items()}}

    def load_state_dict(self, state: Mapping[str, dict]) -> None:
        self.start = dict(state["start_channels"])
        self.removed = {k: list(v) for k, v in state["removed"].items()}
        self.slimmed = {k: list(v) for k, v in state["slimmed"].items()}


@dataclass(frozen=True)
class ChannelRemoval:
    """One planned channel removal.

    Attributes:
        count: channels the cubic target asks to remove now (0: nothing to do at this step).
        chosen: candidate layer -> indices (current indexing) of its channels to remove, layers that lose
            none left out; it may hold fewer than ``count`` channels when the per-layer floors stop it.
    """

    count: int
    chosen: dict[str, torch.Tensor]


def plan_channel_removal(producers: Mapping[str, Sequence[str]], weights: Mapping[str, torch.Tensor],
                         masks: Mapping[str, torch.Tensor], book: ChannelBook, channels: Mapping[str, int],
                         target: float, channel_sparsity: float, minimum_ratio: float,
                         score: str = "umm") -> ChannelRemoval:
    """Which candidate channels to remove to reach the target fraction ``target`` (s_t) of removed channels
    (CHASE.md §2): score every active channel (UMM over its layer's producer filters ⊙ masks), then take the
    lowest scores across all layers, each layer keeping ``floor(C_l·(1 − S_c)·β)`` of its original channels.

    Args:
        producers: candidate layer -> names of the weights writing its channels (dim 0 = the channel).
        weights: parameter name -> tensor (the producers' weights).
        masks: parameter name -> enforced mask (a producer without one counts as dense).
        book: the removed/slimmed channels so far (original indexing).
        channels: candidate layer -> its channel count in the current (possibly slimmed) model.
        target: s_t, the fraction of the original candidate channels removed after this step.
        channel_sparsity: S_c, the final fraction (for the floors).
        minimum_ratio: β, the floor factor.
        score: ``"umm"`` or ``"maskwise"``.

    Example:
        >>> w = {"a": torch.tensor([[0.1, 0.1], [1.0, 1.0]]), "b": torch.tensor([[2.0], [0.2]])}
        >>> book = ChannelBook(start={"a": 2, "b": 2})
        >>> plan = plan_channel_removal({"a": ["a"], "b": ["b"]}, w, {}, book, {"a": 2, "b": 2}, 0.5, 0.5, 1.0)
        >>> plan.count, {k: v.tolist() for k, v in plan.chosen.items()}
        (2, {'a': [0], 'b': [1]})
    """
    scores = {k: group_channel_scores([weights[w] for w in names], [masks.get(w) for w in names], score).cpu()
              for k, names in producers.items()}
    active = {k: book.active_flags(k, channels[k]) for k in producers}
    count = n_channels_to_remove(sum(int(a.sum()) for a in active.values()), sum(book.start.values()), target)
    if count == 0:
        return ChannelRemoval(0, {})
    # floors are in original channels; slimmed channels are already gone from `active`
    floors = {k: channel_floor(book.start[k], channel_sparsity, minimum_ratio) for k in producers}
    chosen = select_channels_to_remove(scores, active, floors, count)
    return ChannelRemoval(count, {k: idx for k, idx in chosen.items() if idx.numel() > 0})


def total_weights_of_old_state(state: Mapping[str, Any]) -> int:
    """N of a Chase checkpoint written before N was stored: the masks' size, exact only if nothing was slimmed."""
    if state.get("arch"):
        raise ValueError("Chase: this checkpoint predates the stored weight count N and the model was slimmed, "
                         "so N cannot be recovered; resume it with the version that wrote it.")
    return sum(int(m.numel()) for m in state["masks"].values())
