"""Chase's schedule, its two DST update rules and its channel bookkeeping (CHASE.md), as plain code.

No Lightning here: the :class:`~lightning_sparse.callbacks.Chase` callback feeds these the step counts
of its Trainer. Every schedule decision of Chase lives in :class:`ChaseSchedule`, every mask decision
in :func:`soft_bound_update` / :func:`strict_budget_update`, so a change of the recipe touches one place.

Example:
    >>> s = ChaseSchedule(steps_per_epoch=10, total_steps=100, stop_dst_epochs=2, stop_gmp_epochs=6,
    ...                   channel_interval_epochs=2, channel_sparsity=0.5)
    >>> s.phase2_start, s.is_channel_step(20), s.is_channel_step(25), s.is_channel_step(80)
    (80, True, False, False)
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

__all__ = ["ChaseSchedule", "ChannelBook", "soft_bound_update", "strict_budget_update", "redistribute_masks",
           "budget_targets", "cap_budget", "check_chase_args", "total_weights_of_old_state", "SLIM_MODES", "PHASE1_FINAL_GROWTH"]

Masks = dict[str, torch.Tensor]
SLIM_MODES = ("during", "end", "never")
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
    check_choice("growth", a["growth"], GROWTH_MODES)
    check_choice("distribution", a["distribution"], DISTRIBUTIONS)
    if a["round_to"] is not None:
        check_range("round_to", a["round_to"], 1, low_inclusive=True, integer=True)
    check_patterns("include", a["include"])
    check_patterns("exclude", a["exclude"])


@dataclass(frozen=True)
class ChaseSchedule:
    """When Chase acts, in optimizer steps, and the two DST rates (CHASE.md §1, reference ``main.py``).

    Phase 1 (soft memory bound) runs until ``phase2_start`` = total − ``stop_dst_epochs`` epochs. After a
    phase-1 update the network carries r_t·N weights, r_t a cosine stepped every optimizer step from
    D + ``drop_fraction`` (step 0) to D + 0.005 (end of phase 1). Phase 2 (strict per-layer budget) reads
    its drop fraction p_t from ONE cosine over the whole training: ``phase2_drop_fraction[0]`` at step 0 →
    ``[1]`` at the last step, so phase 2 starts near 0.05 of the reference recipe, not at 0.5. Channels
    are removed at every ``channel_interval_epochs``-th epoch boundary up to ``stop_gmp_epochs``, towards
    the cubic target s_t = S_c·(1 − (1 − t/T)^3).
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

    SMOKE = "a channel removal with slimming and a DST update at step 1 (phase 2 on the last step from 3 steps on)"

    @classmethod
    def for_training(cls, max_epochs: int, *args: Any, fast_dev_run: bool = False) -> ChaseSchedule:
        """Build the schedule (fields in order) after checking it fits ``max_epochs`` (0: no epoch limit).

        With ``fast_dev_run`` the recipe is compressed into the smoke run's ``total_steps`` instead of refused:
        "epochs" of one step, the full channel target removed at step 1, phase 2 on the last step when there
        are 3 steps or more (then step 1 is a phase-1 update); rates unchanged.

        Raises:
            ValueError: ``stop_gmp_epochs`` beyond ``max_epochs`` or phase 2 as long as training.

        Example:
            >>> s = ChaseSchedule.for_training(1, 100, 3, 20, 80, 2, 0.4, fast_dev_run=True)
            >>> [s.is_channel_step(t) for t in range(3)], s.channel_target(1), [s.in_phase2(t) for t in (1, 2)]
            ([False, True, False], 0.4, [False, True])
        """
        schedule = cls(*args)
        if fast_dev_run:
            return replace(schedule, steps_per_epoch=1, stop_dst_epochs=1 if schedule.total_steps >= 3 else 0,
                           stop_gmp_epochs=1, channel_interval_epochs=1)
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

    def is_channel_step(self, step: int) -> bool:
        if self.channel_sparsity == 0 or step == 0:
            return False
        return step % (self.channel_interval_epochs * self.steps_per_epoch) == 0 and step <= self.channel_stop

    def channel_target(self, step: int) -> float:
        """Target fraction of candidate channels removed at ``step``."""
        return channel_sparsity_schedule(step, self.channel_stop, self.channel_sparsity)

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


def soft_bound_update(weights: Mapping[str, torch.Tensor], masks: Masks, grads: Mapping[str, torch.Tensor | None],
                      budget: int, carry: int, growth: str, generator: torch.Generator,
                      allowed: Mapping[str, torch.Tensor] | None) -> tuple[Masks, int]:
    """Phase 1: keep the ``budget`` (B) largest active weights globally, then grow globally until the
    network carries ``carry`` (round(r_t·N)) weights. Returns the new masks and the number grown."""
    pruned = global_magnitude_prune(weights, masks, budget)
    grow = max(0, carry - sum(int(m.sum()) for m in pruned.values()))
    grown = global_grow(pruned, grow, growth, grads, generator, allowed or None)
    return grown, sum(int(m.sum()) for m in grown.values()) - sum(int(m.sum()) for m in pruned.values())


def strict_budget_update(weights: Mapping[str, torch.Tensor], masks: Masks, grads: Mapping[str, torch.Tensor | None],
                         fraction: float, targets: Mapping[str, int], growth: str, generator: torch.Generator,
                         allowed: Mapping[str, torch.Tensor]) -> tuple[Masks, int]:
    """Phase 2: per layer, drop ``fraction`` of the active weights by magnitude, then regrow the layer to its
    ERK count ``targets[name]`` (a layer still above its count after the drop is pruned to it by magnitude,
    so the total is exactly Σ targets = B after every update). Returns the new masks and the number grown.
    """
    out, grown = {}, 0
    for name, mask in masks.items():
        w, want = weights[name], int(targets[name])
        n_drop = int(round(fraction * int(mask.sum())))
        kept = global_magnitude_prune({name: w}, {name: mask}, min(int(mask.sum()) - n_drop, want))[name]
        new = global_grow({name: kept}, want - int(kept.sum()), growth, {name: grads.get(name)}, generator,
                          {name: allowed[name]} if name in allowed else None)[name]
        grown += int((new & ~kept).sum())
        out[name] = new
    return out, grown


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


def redistribute_masks(weights: Mapping[str, torch.Tensor], masks: Masks, allowed: Mapping[str, torch.Tensor],
                       budget: int, growth: str, seed: int) -> Masks:
    """ERK over the remaining shapes with the same budget; each layer grows (by |grad|, or at random from a
    generator seeded with ``seed``) or is pruned (by magnitude) to its new count at once."""
    targets = budget_targets(weights, masks, allowed, budget)
    out = dict(masks)
    for name, mask in masks.items():
        w, have, want = weights[name], int(mask.sum()), targets[name]
        if want > have:
            out[name] = global_grow({name: mask}, want - have, growth, {name: w.grad}, torch.Generator().manual_seed(seed),
                                    {name: allowed[name]} if name in allowed else None)[name]
        elif want < have:
            out[name] = global_magnitude_prune({name: w}, {name: mask}, want)[name]
    return out


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
