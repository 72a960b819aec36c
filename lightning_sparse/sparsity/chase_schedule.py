"""Chase's schedule and argument checks (CHASE.md), as plain code (no Lightning).

The :class:`~lightning_sparse.callbacks.Chase` callback feeds :class:`ChaseSchedule` the step counts of its
Trainer; every schedule decision of Chase lives here. The update rules and the channel planning are in
:mod:`lightning_sparse.sparsity.chase`, which re-exports these names.

Example:
    >>> s = ChaseSchedule(steps_per_epoch=10, total_steps=100, stop_dst_epochs=2, stop_gmp_epochs=6,
    ...                   channel_interval_epochs=2, channel_sparsity=0.5, update_interval=10)
    >>> s.phase2_start, s.is_channel_step(15), s.is_channel_step(20), s.is_channel_step(75), s.is_update_step(20)
    (80, True, False, False, True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from lightning_sparse.checks import check_choice, check_patterns, check_range
from lightning_sparse.sparsity.channels import SCORE_MODES, channel_sparsity_schedule
from lightning_sparse.sparsity.distributions import DISTRIBUTIONS
from lightning_sparse.sparsity.dst import GROWTH_MODES, cosine_drop_fraction

__all__ = ["ChaseSchedule", "check_chase_args", "SLIM_MODES", "PHASE1_MODES", "PHASE1_FINAL_GROWTH"]

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
