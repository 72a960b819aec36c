"""When mask updates happen: real optimizer steps per epoch, the stop step, and postponed updates.

``trainer.global_step`` counts optimizer steps, so every schedule is in optimizer steps. Per epoch that
is ``ceil(batches / accumulate_grad_batches)`` (Lightning steps once more at the end of an epoch whose
last accumulation window is short); under manual optimization each optimizer is taken to step once per
batch. Training ends at ``max_steps`` or at ``max_epochs`` × steps per epoch, whichever comes first.

Schedule points given as a *fraction of training* (``stop_fraction``, Chase's ``stop_gmp_fraction`` ...) are
resolved against :func:`total_steps` at each fit start (:func:`fraction_step`), so they scale with ``max_epochs``
and also work for ``max_steps``-bounded runs and datasets without a length; points given in epochs need the
epoch length and are checked against the training by the callbacks that use them.

Under ``fast_dev_run`` (a smoke test of a few batches) the callbacks do not refuse a schedule written for
the full run: like Lightning's own loops and checkpointing adapt, each one compresses its schedule so every
mechanism runs once (:func:`fast_dev_run_step`), and says so in one info line.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_sparse.checks import check_range

__all__ = ["DEFAULT_STOP_FRACTION", "check_stop_args", "steps_per_epoch", "total_steps", "fraction_step",
           "resolve_stop_step", "describe_limits", "fast_dev_run_step", "UpdateGuard"]


DEFAULT_STOP_FRACTION = 0.75  # RigL's ``end_step``: updates stop at 75 % of training


def check_stop_args(stop_step: int | None, stop_epoch: int | None, stop_fraction: float | None, start_step: int,
                    high_inclusive: bool = True) -> None:
    """At most one of ``stop_step``/``stop_epoch``/``stop_fraction``, each in its range (DynamicSparsity, GMP)."""
    given = {k: v for k, v in (("stop_step", stop_step), ("stop_epoch", stop_epoch), ("stop_fraction", stop_fraction))
             if v is not None}
    if len(given) > 1:
        raise ValueError(
            f"Give one of `stop_step`, `stop_epoch` or `stop_fraction`, not several (got "
            f"{', '.join(f'{k}={v}' for k, v in given.items())})."
        )
    if stop_step is not None:
        check_range("stop_step", stop_step, 0, low_inclusive=True, integer=True)
        if stop_step <= start_step:
            raise ValueError(
                f"`stop_step` must be after `start_step`, got start_step={start_step}, stop_step={stop_step}."
            )
    if stop_epoch is not None:
        check_range("stop_epoch", stop_epoch, 1, low_inclusive=True, integer=True)
    if stop_fraction is not None:
        check_range("stop_fraction", stop_fraction, 0, 1, high_inclusive=high_inclusive,
                    what="a fraction of the training's optimizer steps")


def steps_per_epoch(trainer: pl.Trainer) -> int:
    """Optimizer steps in one epoch of ``trainer`` (needs the train dataloader, i.e. from ``on_train_start``).

    Raises:
        ValueError: the epoch length is unknown (an iterable dataset without ``__len__``).
    """
    batches = trainer.num_training_batches
    if batches == float("inf"):
        raise ValueError(
            "The number of batches per epoch is unknown (an iterable dataset without __len__): give the "
            "schedule in steps (e.g. `stop_step`) instead of epochs."
        )
    module = trainer.lightning_module
    if module is not None and not module.automatic_optimization:
        return max(1, int(batches) * max(1, len(trainer.optimizers)))
    return max(1, math.ceil(int(batches) / max(1, trainer.accumulate_grad_batches)))


def total_steps(trainer: pl.Trainer) -> int:
    """Optimizer steps of the whole fit: ``max_steps`` or ``max_epochs`` × steps per epoch, the smaller.

    Raises:
        ValueError: neither ``max_steps`` nor ``max_epochs`` limits training.
    """
    limits = []
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        limits.append(int(trainer.max_steps))
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        limits.append(int(trainer.max_epochs) * steps_per_epoch(trainer))
    if not limits:
        raise ValueError("Training has no end (max_steps=-1, max_epochs=-1): give the schedule an explicit `stop_step`.")
    return min(limits)


def fraction_step(fraction: float, total: int) -> int:
    """The optimizer step at ``fraction`` of a training of ``total`` steps: ``floor(fraction × total)``, immune to
    float noise (``0.29 × 100`` is step 29), so ``k / E`` of ``E`` epochs is exactly the start of epoch ``k``.

    Example:
        >>> fraction_step(0.8, 240), fraction_step(0.29, 100), fraction_step(1 / 3, 12)
        (192, 29, 4)
    """
    return int(math.floor(fraction * total + 1e-9))


def resolve_stop_step(
    trainer: pl.Trainer, stop_step: int | None = None, stop_epoch: int | None = None, fraction: float = 0.75
) -> int:
    """An explicit ``stop_step`` wins; else ``stop_epoch`` × steps per epoch; else ``fraction`` of training
    (:func:`fraction_step` of :func:`total_steps`)."""
    if stop_step is not None:
        return int(stop_step)
    if stop_epoch is not None:
        return max(1, int(stop_epoch) * steps_per_epoch(trainer))
    return max(1, fraction_step(fraction, total_steps(trainer)))


def describe_limits(trainer: pl.Trainer) -> str:
    """``"max_epochs=4 (80 optimizer steps)"``: what bounds the training, for error messages."""
    parts = []
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        parts.append(f"max_epochs={trainer.max_epochs}")
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        parts.append(f"max_steps={trainer.max_steps}")
    return f"{', '.join(parts)} ({total_steps(trainer)} optimizer steps)"


def fast_dev_run_step(trainer: pl.Trainer, owner: str, what: str, first: int = 0) -> int | None:
    """Under ``fast_dev_run``: the step at which a compressed schedule acts once (the last step of the smoke
    run, at least ``first``), announced in one info line; ``None`` outside ``fast_dev_run``.

    ``what`` describes the compressed schedule, e.g. ``"one mask update"``. When the smoke run is too short
    (the last step is before ``first``), the line says how many batches it needs and ``None`` is returned.
    """
    if not getattr(trainer, "fast_dev_run", False):
        return None
    step = max(0, total_steps(trainer) - 1)
    if step < first:
        rank_zero_info(f"{owner}: fast_dev_run={int(trainer.fast_dev_run)} runs {step + 1} optimizer step(s); "
                       f"{what} needs {first + 1} (use --trainer.fast_dev_run={first + 1}), so it is skipped.")
        return None
    where = "" if "step" in what else f" at step {step}"
    rank_zero_info(f"{owner}: fast_dev_run: schedule compressed to {what}{where} "
                   "(the configured schedule applies to real runs).")
    return step


class UpdateGuard:
    """Postpones a mask update whose gradients or weights are not finite (e.g. an fp16 overflow that the
    GradScaler will skip) to the next step where they are, with one warning; gives up after
    ``max_postponed`` consecutive postponements (a persistent NaN) with a ``FloatingPointError``.

    Usage in ``on_before_optimizer_step``: ``if guard.due(is_update_step, find_problem, step, owner): update()``,
    where ``find_problem()`` returns ``None`` when the values can drive an update, else a description such as
    ``"non-finite gradient in 'layer.weight'"``; it is only called at update steps (and while one is pending).
    """

    def __init__(self, max_postponed: int = 10) -> None:
        self.max_postponed = max_postponed
        self.pending = 0  # consecutive postponements of the current update
        self.postponed_total = 0
        self._warned = False

    def due(self, scheduled: bool, find_problem: Callable[[], str | None], step: int, owner: str) -> bool:
        """Whether to run the update now (a scheduled or a postponed one, on finite values)."""
        if not scheduled and not self.pending:
            return False
        problem = find_problem()
        if problem is None:
            self.pending = 0
            return True
        self.pending += 1
        self.postponed_total += 1
        if self.pending > self.max_postponed:
            raise FloatingPointError(
                f"{owner}: {problem} at step {step}; refusing the mask update after {self.max_postponed} "
                "postponements (lower the learning rate or enable gradient clipping)."
            )
        if not self._warned:
            hint = " (e.g. an fp16 overflow the GradScaler skips)" if problem.startswith("non-finite") else ""
            rank_zero_warn(
                f"{owner}: {problem} at step {step}{hint}; the mask update is postponed to the next step with "
                "usable values. Further postponements are not reported."
            )
            self._warned = True
        return False

    def state_dict(self) -> dict[str, int]:
        return {"pending": self.pending, "postponed_total": self.postponed_total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.pending = int(state.get("pending", 0))
        self.postponed_total = int(state.get("postponed_total", 0))
