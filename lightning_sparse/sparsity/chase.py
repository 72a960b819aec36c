"""Chase's schedule, its two DST update rules and its channel bookkeeping (CHASE.md), as plain code.

No Lightning here: the :class:`~lightning_sparse.callbacks.Chase` callback feeds these the step counts
of its Trainer. Every schedule decision of Chase lives in :class:`ChaseSchedule`, every mask decision
in :func:`soft_bound_update` / :func:`strict_budget_update`, so a change of the recipe touches one place.

Example:
    >>> s = ChaseSchedule(steps_per_epoch=10, total_steps=100, stop_dst_epochs=2, stop_gmp_epochs=6,
    ...                   channel_interval_epochs=2, channel_sparsity=0.5, update_interval=10)
    >>> s.phase2_start, s.is_channel_step(15), s.is_channel_step(20), s.is_channel_step(75), s.is_update_step(20)
    (80, True, False, False, True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_sparse.checks import check_choice, check_patterns, check_range
from lightning_sparse.sparsity.channels import SCORE_MODES, channel_sparsity_schedule, redistribute_budget
from lightning_sparse.sparsity.distributions import DISTRIBUTIONS
from lightning_sparse.sparsity.dst import (
    GROWTH_MODES,
    cosine_drop_fraction,
    global_grow,
    global_magnitude_prune,
)

__all__ = ["ChaseSchedule", "ChannelBook", "Update", "soft_bound_update", "strict_budget_update",
           "layer_magnitude_prune", "budget_targets", "cap_budget", "check_chase_args", "total_weights_of_old_state",
           "SLIM_MODES", "PHASE1_MODES", "PHASE1_FINAL_GROWTH"]

Masks = dict[str, torch.Tensor]
SLIM_MODES = ("during", "end", "never")
PHASE1_MODES = ("layerwise", "global")
PHASE1_FINAL_GROWTH = 0.005  # r_t ends at D + 0.005 (reference ``CosineDecay(p0 + D, T1, D + 0.005)``)


def check_chase_args(a: Mapping[str, Any]) -> None:
    """Validate the Chase callback's arguments (one ``ValueError`` naming the argument and its value)."""
    check_range("density", a["density"], 0, 1)
    check_range("channel_sparsity", a["channel_sparsity"], 0, 1, low_inclusive=True, what="S_c")
    check_range("minimum_ratio", a["minimum_ratio"], 0, 1, high_inclusive=True, what="β")
    for name in ("channel_interval_epochs", "stop_gmp_epochs", "update_interval", "max_postponed"):
        check_range(name, a[name], 1, low_inclusive=True, integer=True)
    check_range("stop_dst_epochs", a["stop_dst_epochs"], 0, low_inclusive=True, integer=True)
    if a["channel_interval_epochs"] > a["stop_gmp_epochs"]:
        raise ValueError(
            "Conflicting channel schedule: the first removal (epoch `channel_interval_epochs`="
            f"{a['channel_interval_epochs']}) comes after the schedule ends (`stop_gmp_epochs`={a['stop_gmp_epochs']})."
        )
    check_range("drop_fraction", a["drop_fraction"], 0, 1)
    hi, lo = a["phase2_drop_fraction"]
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(
            f"`phase2_drop_fraction` must be (start, end) with 0 <= end <= start < 1, got {a['phase2_drop_fraction']}."
        )
    check_choice("score", a["score"], SCORE_MODES)
    if not isinstance(a["residual_channels"], bool):
        raise ValueError(f"`residual_channels` must be True or False, got residual_channels={a['residual_channels']!r}.")
    check_choice("slim", a["slim"], SLIM_MODES)
    check_choice("phase1", a["phase1"], PHASE1_MODES, "'layerwise' = ImageNet reference, 'global' = CIFAR reference")
    check_choice("growth", a["growth"], GROWTH_MODES)
    check_choice("distribution", a["distribution"], DISTRIBUTIONS)
    if a["round_to"] is not None:
        check_range("round_to", a["round_to"], 1, low_inclusive=True, integer=True)
    check_patterns("include", a["include"])
    check_patterns("exclude", a["exclude"])


@dataclass(frozen=True)
class ChaseSchedule:
    """When Chase acts and the two DST rates (CHASE.md §1–§2, reference ``Masking.step`` and ``main.py``).

    Every method takes ``step`` = optimizer steps done, counted right *after* an iteration's optimizer step
    (the reference's ``self.steps`` after its increment): Chase acts after the step, channel removal first,
    then the DST update. A DST update runs when ``step`` is a multiple of ``update_interval`` (before the
    last step). Phase 1 (soft memory bound) runs while ``step`` < ``phase2_start`` = total − ``stop_dst_epochs``
    epochs; after a phase-1 update the network carries r_t·N weights, r_t a cosine from D +
    ``drop_fraction`` (step 0) to D + 0.005 (end of phase 1). Phase 2 (strict per-layer budget) reads its
    drop fraction p_t from ONE cosine over the whole training: ``phase2_drop_fraction[0]`` at step 0 →
    ``[1]`` at the last step, so phase 2 starts near 0.05 of the reference recipe, not at 0.5. Channels are
    removed while ``step`` < ``stop_gmp_epochs`` epochs, whenever ``step + update_interval // 2`` is a
    multiple of ``channel_interval_epochs`` epochs (halfway between two DST updates), towards the cubic
    target s_t = S_c·(1 − (1 − t/T)^3) read at t = ``step − 1`` (the reference computes it before its
    increment).
    """

    steps_per_epoch: int
    total_steps: int
    stop_dst_epochs: int
    stop_gmp_epochs: int
    channel_interval_epochs: int
    channel_sparsity: float
    drop_fraction: float = 0.05
    phase2_drop_fraction: tuple[float, float] = (0.5, 0.005)
    density: float = 0.1
    update_interval: int = 1000
    smoke: bool = False

    SMOKE = ("a channel removal with slimming and a DST update after step 1 (phase 2 after step 2 from 3 steps on)")

    @classmethod
    def for_training(cls, max_epochs: int, *args: Any, fast_dev_run: bool = False, **kwargs: Any) -> ChaseSchedule:
        """Build the schedule (fields in order) after checking it fits ``max_epochs`` (0: no epoch limit).

        With ``fast_dev_run`` the recipe is compressed into the smoke run's ``total_steps`` instead of refused:
        the full channel target removed after step 1 with a phase-1 update, phase 2 from step 2 when there
        are 3 steps or more; rates unchanged.

        Raises:
            ValueError: ``stop_gmp_epochs`` beyond ``max_epochs`` or phase 2 as long as training.

        Example:
            >>> s = ChaseSchedule.for_training(1, 100, 3, 20, 80, 2, 0.4, fast_dev_run=True)
            >>> [s.is_channel_step(t) for t in (1, 2)], s.channel_target(1), [s.in_phase2(t) for t in (1, 2)]
            ([True, False], 0.4, [False, True])
        """
        schedule = cls(*args, **kwargs)
        if fast_dev_run:
            return replace(schedule, steps_per_epoch=1, stop_dst_epochs=1 if schedule.total_steps >= 3 else 0,
                           stop_gmp_epochs=1, channel_interval_epochs=1, update_interval=1, smoke=True)
        if max_epochs > 0 and (schedule.stop_gmp_epochs > max_epochs or schedule.stop_dst_epochs >= max_epochs):
            raise ValueError(
                f"Chase schedule does not fit max_epochs={max_epochs}: stop_gmp_epochs={schedule.stop_gmp_epochs} "
                f"must be <= max_epochs and stop_dst_epochs={schedule.stop_dst_epochs} < max_epochs."
            )
        return schedule

    @property
    def phase2_start(self) -> int:
        return self.total_steps - self.stop_dst_epochs * self.steps_per_epoch

    @property
    def channel_stop(self) -> int:
        return self.stop_gmp_epochs * self.steps_per_epoch

    def is_update_step(self, step: int) -> bool:
        """A DST update after the optimizer step that made ``step`` steps (reference ``steps % ΔT == 0``)."""
        return 0 < step < self.total_steps and step % self.update_interval == 0

    def is_channel_step(self, step: int) -> bool:
        """A channel removal after the optimizer step that made ``step`` steps."""
        if self.channel_sparsity == 0 or step <= 0:
            return False
        if self.smoke:
            return step == 1
        interval = self.channel_interval_epochs * self.steps_per_epoch
        return step < self.channel_stop and (step + self.update_interval // 2) % interval == 0

    def channel_target(self, step: int) -> float:
        """Target fraction of candidate channels removed after the step that made ``step`` steps."""
        if self.smoke:
            return self.channel_sparsity
        return channel_sparsity_schedule(step - 1, self.channel_stop, self.channel_sparsity)

    def in_phase2(self, step: int) -> bool:
        return step >= self.phase2_start

    def phase1_fraction(self, step: int) -> float:
        """r_t: the fraction of N carried after a phase-1 update (D + ``drop_fraction`` → D + 0.005)."""
        return cosine_drop_fraction(step, max(1, self.phase2_start), self.density + self.drop_fraction,
                                    self.density + PHASE1_FINAL_GROWTH)

    def phase2_fraction(self, step: int) -> float:
        """p_t: the per-layer drop fraction of phase 2, read from one cosine over the whole training."""
        hi, lo = self.phase2_drop_fraction
        return cosine_drop_fraction(step, max(1, self.total_steps), hi, lo)


@dataclass(frozen=True)
class Update:
    """The result of one Chase DST update.

    Attributes:
        masks: the new masks.
        pruned: per layer, the positions the prune step removed (a regrown one among them restarts at 0,
            as the reference zeroes a pruned weight and its momentum before it grows).
        grown: the number of positions activated by the grow step.
    """

    masks: Masks
    pruned: Masks
    grown: int


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


def total_weights_of_old_state(state: Mapping[str, Any]) -> int:
    """N of a Chase checkpoint written before N was stored: the masks' size, exact only if nothing was slimmed."""
    if state.get("arch"):
        raise ValueError("Chase: this checkpoint predates the stored weight count N and the model was slimmed, "
                         "so N cannot be recovered; resume it with the version that wrote it.")
    return sum(int(m.numel()) for m in state["masks"].values())
