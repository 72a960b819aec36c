"""Chase's schedule and argument checks (CHASE.md), as plain code (no Lightning).

The :class:`~lightning_sparse.callbacks.Chase` callback feeds :class:`ChaseSchedule` the step counts of its
Trainer; every schedule decision of Chase lives here. The update rules and the channel planning are in
:mod:`lightning_sparse.sparsity.chase`, which re-exports these names.

Three points of the schedule are spans of training: the end of the channel schedule (``stop_gmp``), the length
of phase 2 (``stop_dst``) and the interval between channel removals (``channel_interval``). Each is given either
in epochs (``stop_gmp_epochs``, an int) or as a fraction of training (``stop_gmp_fraction``, a float: the
fraction of the fit's optimizer steps, so it scales with ``max_epochs`` and works for ``max_steps``-bounded
runs), never both; with neither, the reference ratio (:data:`REFERENCE_FRACTIONS`, CHASE.md §4: ImageNet
ResNet-50, 80, 20 and 2 of 100 epochs). :func:`resolve_spans` turns them into optimizer steps.

Example:
    >>> s = ChaseSchedule(total_steps=100, phase2_steps=20, channel_stop=60, channel_interval=20,
    ...                   channel_sparsity=0.5, update_interval=10)
    >>> s.phase2_start, s.is_channel_step(15), s.is_channel_step(20), s.is_channel_step(75), s.is_update_step(20)
    (80, True, False, False, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from lightning_sparse.checks import check_choice, check_patterns, check_range
from lightning_sparse.sparsity.channels import SCORE_MODES, channel_sparsity_schedule
from lightning_sparse.sparsity.distributions import DISTRIBUTIONS
from lightning_sparse.sparsity.dst import GROWTH_MODES, cosine_drop_fraction

__all__ = ["ChaseSchedule", "check_chase_args", "resolve_spans", "Spans", "SLIM_MODES", "PHASE1_MODES",
           "PHASE1_FINAL_GROWTH", "REFERENCE_FRACTIONS", "SPANS"]

SLIM_MODES = ("during", "end", "never")
PHASE1_MODES = ("layerwise", "global")
PHASE1_FINAL_GROWTH = 0.005  # r_t ends at D + 0.005 (reference ``CosineDecay(p0 + D, T1, D + 0.005)``)
SPANS = ("stop_gmp", "stop_dst", "channel_interval")
# CHASE.md §4, ImageNet ResNet-50 (luuyin/chase Chase_0.4): 100 epochs, --stop_gmp_epochs 80,
# --stop_dst_epochs 20, --layer_interval 2. (CIFAR: channel schedule until epoch 130 of 160 = 0.8125.)
REFERENCE_FRACTIONS = {"stop_gmp": 0.8, "stop_dst": 0.2, "channel_interval": 0.02}
# (lowest epochs, fraction range as check_range arguments) per span
_EPOCH_LOW = {"stop_gmp": 1, "stop_dst": 0, "channel_interval": 1}
_FRACTION_RANGE = {"stop_gmp": dict(high_inclusive=True), "stop_dst": dict(low_inclusive=True),
                   "channel_interval": dict(high_inclusive=True)}
_FRACTION_WHAT = {"stop_gmp": "end of the channel schedule, a fraction of training",
                  "stop_dst": "length of phase 2, a fraction of training",
                  "channel_interval": "between channel removals, a fraction of training"}


def _span_args(a: Mapping[str, Any], span: str) -> tuple[Any, Any]:
    return a.get(f"{span}_epochs"), a.get(f"{span}_fraction")


def _check_spans(a: Mapping[str, Any]) -> None:
    for span in SPANS:
        epochs, fraction = _span_args(a, span)
        if epochs is not None and fraction is not None:
            raise ValueError(
                f"Give `{span}_epochs` (an int of epochs) or `{span}_fraction` (a fraction of training), not both, got "
                f"{span}_epochs={epochs!r}, {span}_fraction={fraction!r}. To override one given by a config, set "
                "the other to null."
            )
        if epochs is not None:
            check_range(f"{span}_epochs", epochs, _EPOCH_LOW[span], low_inclusive=True, integer=True)
        if fraction is not None:
            check_range(f"{span}_fraction", fraction, 0, 1, what=_FRACTION_WHAT[span], **_FRACTION_RANGE[span])
    interval, stop = (_span_args(a, "channel_interval"), _span_args(a, "stop_gmp"))
    for unit, i in (("epochs", 0), ("fraction", 1)):
        if interval[i] is not None and stop[i] is not None and interval[i] > stop[i]:
            raise ValueError(
                f"Conflicting channel schedule: the first removal (`channel_interval_{unit}`={interval[i]}) comes "
                f"after the schedule ends (`stop_gmp_{unit}`={stop[i]})."
            )


def check_chase_args(a: Mapping[str, Any]) -> None:
    """Validate the Chase callback's arguments (one ``ValueError`` naming the argument and its value)."""
    check_range("density", a["density"], 0, 1)
    check_range("channel_sparsity", a["channel_sparsity"], 0, 1, low_inclusive=True, what="S_c")
    check_range("minimum_ratio", a["minimum_ratio"], 0, 1, high_inclusive=True, what="β")
    for name in ("update_interval", "max_postponed"):
        check_range(name, a[name], 1, low_inclusive=True, integer=True)
    _check_spans(a)
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


class Spans(NamedTuple):
    """The three spans of :data:`SPANS` in optimizer steps, resolved for one training."""

    channel_stop: int  # T: the channel schedule reaches S_c here
    phase2_steps: int  # phase 2 = the last ``phase2_steps`` steps
    channel_interval: int  # steps between channel removals


def _fraction_steps(fraction: float, total: int) -> int:
    """``floor(fraction × total)``, immune to float noise (``k / E`` of ``E`` epochs is the start of epoch ``k``)."""
    return int(math.floor(fraction * total + 1e-9))


def resolve_spans(a: Mapping[str, Any], total_steps: int, steps_per_epoch: int | None, limits: str) -> Spans:
    """The Chase spans of the arguments ``a`` in optimizer steps, checked against a training of ``total_steps``.

    An ``*_epochs`` argument counts ``steps_per_epoch`` steps per epoch; a ``*_fraction`` argument is
    ``floor(fraction × total_steps)`` (the channel interval at least 1 step); with neither, the
    :data:`REFERENCE_FRACTIONS`. ``limits`` describes what bounds the training, for the messages.

    Raises:
        ValueError: a span that does not fit (the channel schedule ends after training or at step 0, phase 2
            as long as training, the first removal after the schedule ends), naming the argument and what to
            set; or an ``*_epochs`` argument when the epoch length is unknown (``steps_per_epoch=None``).

    Example:
        >>> resolve_spans({"stop_gmp_fraction": 0.8, "stop_dst_epochs": 1}, 40, 10, "max_epochs=4")
        Spans(channel_stop=32, phase2_steps=10, channel_interval=1)
        >>> resolve_spans({"stop_gmp_epochs": 8}, 40, 10, "max_epochs=4")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: Chase schedule does not fit max_epochs=4: stop_gmp_epochs=8 (step 80) must be <= the 40 ...
    """
    steps, given = {}, {}
    for span in SPANS:
        epochs, fraction = _span_args(a, span)
        if epochs is not None:
            if steps_per_epoch is None:
                raise ValueError(
                    f"`{span}_epochs`={epochs} needs the number of steps per epoch, which is unknown (an iterable "
                    f"dataset without __len__): give `{span}_fraction` (a fraction of training) instead."
                )
            steps[span], given[span] = int(epochs) * steps_per_epoch, f"{span}_epochs={epochs}"
        else:
            fraction = REFERENCE_FRACTIONS[span] if fraction is None else fraction
            steps[span], given[span] = _fraction_steps(fraction, total_steps), f"{span}_fraction={fraction:g}"
    steps["channel_interval"] = max(1, steps["channel_interval"])
    problems = []
    if steps["stop_gmp"] > total_steps:
        problems.append(f"{given['stop_gmp']} (step {steps['stop_gmp']}) must be <= the {total_steps} training steps")
    if steps["stop_gmp"] < 1 and a.get("channel_sparsity", 0) > 0:
        problems.append(f"{given['stop_gmp']} ends the channel schedule at step 0 of {total_steps}")
    if steps["stop_dst"] >= total_steps:
        problems.append(f"{given['stop_dst']} ({steps['stop_dst']} steps of phase 2) must be < the {total_steps} "
                        "training steps")
    if problems:
        ratios = ", ".join(f"{REFERENCE_FRACTIONS[k]:g}" for k in SPANS)
        raise ValueError(
            f"Chase schedule does not fit {limits}: {'; '.join(problems)}. Give the schedule as fractions of training "
            "instead, which scale with max_epochs and max_steps: stop_gmp_fraction, stop_dst_fraction, "
            f"channel_interval_fraction (the reference: {ratios}), each instead of its `*_epochs` argument (set that "
            "one to null)."
        )
    if a.get("channel_sparsity", 0) > 0 and steps["channel_interval"] > steps["stop_gmp"]:
        raise ValueError(
            f"Conflicting channel schedule: the first removal ({given['channel_interval']}, step "
            f"{steps['channel_interval']}) comes after the schedule ends ({given['stop_gmp']}, step {steps['stop_gmp']})."
        )
    return Spans(steps["stop_gmp"], steps["stop_dst"], steps["channel_interval"])


@dataclass(frozen=True)
class ChaseSchedule:
    """When Chase acts and the two DST rates (CHASE.md §1–§2, reference ``Masking.step`` and ``main.py``).

    Every method takes ``step`` = optimizer steps done, counted right *after* an iteration's optimizer step
    (the reference's ``self.steps`` after its increment): Chase acts after the step, channel removal first,
    then the DST update. A DST update runs when ``step`` is a multiple of ``update_interval`` (before the
    last step). Phase 1 (soft memory bound) runs while ``step`` < ``phase2_start`` = total − ``phase2_steps``;
    after a phase-1 update the network carries r_t·N weights, r_t a cosine from D + ``drop_fraction``
    (step 0) to D + 0.005 (end of phase 1). Phase 2 (strict per-layer budget) reads its drop fraction p_t
    from ONE cosine over the whole training: ``phase2_drop_fraction[0]`` at step 0 → ``[1]`` at the last
    step, so phase 2 starts near 0.05 of the reference recipe, not at 0.5. Channels are removed while
    ``step`` < ``channel_stop``, whenever ``step + update_interval // 2`` is a multiple of
    ``channel_interval`` (halfway between two DST updates), towards the cubic target
    s_t = S_c·(1 − (1 − t/T)^3), T = ``channel_stop``, read at t = ``step − 1`` (the reference computes it
    before its increment). All spans are in optimizer steps (:meth:`from_epochs` builds one from epochs).
    """

    total_steps: int
    phase2_steps: int
    channel_stop: int
    channel_interval: int
    channel_sparsity: float
    drop_fraction: float = 0.05
    phase2_drop_fraction: tuple[float, float] = (0.5, 0.005)
    density: float = 0.1
    update_interval: int = 1000
    smoke: bool = False

    SMOKE = ("a channel removal with slimming and a DST update after step 1 (phase 2 after step 2 from 3 steps on)")

    @classmethod
    def from_epochs(cls, steps_per_epoch: int, total_steps: int, stop_dst_epochs: int, stop_gmp_epochs: int,
                    channel_interval_epochs: int, channel_sparsity: float, *args: Any, **kwargs: Any) -> ChaseSchedule:
        """The schedule of the reference's epoch arguments (the other fields follow in order).

        Example:
            >>> ChaseSchedule.from_epochs(10, 100, 2, 6, 2, 0.5).phase2_start
            80
        """
        spe = steps_per_epoch
        return cls(total_steps, stop_dst_epochs * spe, stop_gmp_epochs * spe, channel_interval_epochs * spe,
                   channel_sparsity, *args, **kwargs)

    @classmethod
    def for_training(cls, a: Mapping[str, Any], total_steps: int, steps_per_epoch: int | None = None,
                     limits: str = "", fast_dev_run: bool = False) -> ChaseSchedule:
        """The schedule of the Chase arguments ``a`` for a training of ``total_steps`` optimizer steps
        (:func:`resolve_spans`; ``steps_per_epoch`` is needed only by ``*_epochs`` arguments).

        With ``fast_dev_run`` the recipe is compressed into the smoke run's ``total_steps`` instead of refused:
        the full channel target removed after step 1 with a phase-1 update, phase 2 from step 2 when there
        are 3 steps or more; rates unchanged.

        Raises:
            ValueError: a span that does not fit the training (:func:`resolve_spans`).

        Example:
            >>> s = ChaseSchedule.for_training({"channel_sparsity": 0.4}, 3, fast_dev_run=True)
            >>> [s.is_channel_step(t) for t in (1, 2)], s.channel_target(1), [s.in_phase2(t) for t in (1, 2)]
            ([True, False], 0.4, [False, True])
            >>> s = ChaseSchedule.for_training({"channel_sparsity": 0.4, "stop_gmp_fraction": 0.75}, 240)
            >>> s.channel_stop, s.phase2_start, s.channel_interval
            (180, 192, 4)
        """
        rates = {k: a[k] for k in ("drop_fraction", "phase2_drop_fraction", "density", "update_interval") if k in a}
        if fast_dev_run:
            return cls(total_steps, 1 if total_steps >= 3 else 0, 1, 1, a["channel_sparsity"],
                       **{**rates, "update_interval": 1}, smoke=True)
        spans = resolve_spans(a, total_steps, steps_per_epoch, limits or f"{total_steps} optimizer steps")
        return cls(total_steps, spans.phase2_steps, spans.channel_stop, spans.channel_interval, a["channel_sparsity"],
                   **rates)

    @property
    def phase2_start(self) -> int:
        return self.total_steps - self.phase2_steps

    def is_update_step(self, step: int) -> bool:
        """A DST update after the optimizer step that made ``step`` steps (reference ``steps % ΔT == 0``)."""
        return 0 < step < self.total_steps and step % self.update_interval == 0

    def is_channel_step(self, step: int) -> bool:
        """A channel removal after the optimizer step that made ``step`` steps."""
        if self.channel_sparsity == 0 or step <= 0:
            return False
        if self.smoke:
            return step == 1
        return step < self.channel_stop and (step + self.update_interval // 2) % self.channel_interval == 0

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
