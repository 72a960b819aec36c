"""``GradualMagnitudePruning``: Zhu & Gupta's gradual magnitude pruning (GMP) as a Lightning Callback."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from lightning_sparse.callbacks._base import KeepMasked, MaskSourceInfo, check_strategy, log_metrics
from lightning_sparse.callbacks._schedule import (
    DEFAULT_STOP_FRACTION,
    check_stop_args,
    describe_limits,
    fast_dev_run_step,
    resolve_stop_step,
    total_steps,
)
from lightning_sparse.checks import check_choice, check_patterns, check_range
from lightning_sparse.sparsity.engine import MaskEngine
from lightning_sparse.sparsity.gmp import SCOPES, cubic_sparsity, final_counts, prune_global, prune_layers, update_steps
from lightning_sparse.sparsity.masks import Masks
from lightning_sparse.sparsity.targets import select_targets

__all__ = ["GradualMagnitudePruning"]


def _check_args(density: float, distribution: str, initial_sparsity: float, update_interval: int, start_step: int,
                stop_step: int | None, stop_epoch: int | None, stop_fraction: float | None) -> None:
    check_range("density", density, 0, 1, high_inclusive=True, what="final fraction of kept weights")
    check_choice("distribution", distribution, SCOPES, "'global' = one threshold over all layers")
    check_range("initial_sparsity", initial_sparsity, 0, 1, low_inclusive=True, what="s_i")
    check_range("update_interval", update_interval, 1, low_inclusive=True, integer=True, what="Δt, in steps")
    check_range("start_step", start_step, 0, low_inclusive=True, integer=True, what="t0")
    if initial_sparsity > 1.0 - density:
        raise ValueError(f"`initial_sparsity` (s_i) must be <= the final sparsity 1 - density = {1.0 - density:g}, "
                         f"got initial_sparsity={initial_sparsity}.")
    # the final update runs at the stop step itself, so a stop at the very end (fraction 1) would never run
    check_stop_args(stop_step, stop_epoch, stop_fraction, start_step, high_inclusive=False)


class GradualMagnitudePruning(KeepMasked):
    """Gradual magnitude pruning (Zhu & Gupta 2017), the ``prune`` baseline of google-research/rigl.

    Training starts dense. At ``start_step`` (t0) and every ``update_interval`` (Δt) optimizer steps after it
    until the stop step (and at the stop step itself), the sparsity is set to the cubic schedule
    ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t_end − t0))³`` (:func:`~lightning_sparse.sparsity.gmp.cubic_sparsity`)
    by keeping the largest ``|w|`` among the weights still kept: per layer (``distribution="uniform"`` or
    ``"erk"``: each layer follows the schedule towards its own final density, with an exact global budget at
    the end) or with one global threshold (``"global"``). A pruned weight never comes back: its weight,
    gradient and every optimizer state tensor stay exactly 0 (:class:`~lightning_sparse.sparsity.engine.MaskEngine`).
    The update at step ``t`` runs at the start of the iteration that follows ``t`` optimizer steps.

    Targets are chosen as in :class:`~lightning_sparse.callbacks.DynamicSparsity` (Conv/Linear/attention weights
    minus the first and the last one unless ``sparse_first_last`` or ``include``). Masks and counters live in the
    callback's ``state_dict`` (a resumed run continues the schedule bitwise); decisions depend only on the
    weights, which DDP keeps identical, so every rank holds the same masks. Under ``fast_dev_run`` the schedule
    is compressed to one update to the final density at the smoke run's last step.

    Args:
        density: final fraction of kept weights over the target layers, in (0, 1] (s_f = 1 − density).
        distribution: ``"uniform"`` / ``"erk"`` (per layer) or ``"global"`` (one threshold over all layers).
        initial_sparsity: s_i, the sparsity set at ``start_step`` (0: the first update changes nothing).
        update_interval: Δt, optimizer steps between updates.
        start_step: t0, the first update step (dense before it).
        stop_step: t_end, the last update step, where the final density is reached (optimizer steps).
        stop_epoch: like ``stop_step`` in epochs (an int).
        stop_fraction: like ``stop_step`` as a fraction of training in (0, 1): ``floor(stop_fraction × total)``,
            total = the fit's optimizer steps (``max_steps`` or ``max_epochs`` × steps per epoch, whichever ends
            training first), resolved at each fit start, so it scales with ``max_epochs``. Give at most one of
            ``stop_step``, ``stop_epoch`` and ``stop_fraction``; with none, 0.75. Whichever is given, the stop
            step must come before the end of training (the final density is reached there), else
            ``on_train_start`` raises and names ``stop_fraction``.
        include: fnmatch patterns of parameter names to prune (any weight with >= 2 dims).
        exclude: fnmatch patterns of parameter names to keep dense.
        sparse_first_last: also prune the first and the last candidate weight.
        log_per_layer: log ``sparsity/<param>`` for every layer at each update.

    Raises:
        ValueError: for any argument outside its range (the message names it and its value), in ``setup`` for
            an include/exclude pattern that matches no parameter, at train start when the stop step is not
            after ``start_step``.

    Example:
        >>> cb = GradualMagnitudePruning(density=0.1, update_interval=100, stop_step=10_000)
        >>> cb.state_key
        "GradualMagnitudePruning{'density': 0.1, 'distribution': 'uniform'}"
    """

    def __init__(
        self,
        density: float = 0.1,
        distribution: str = "uniform",
        initial_sparsity: float = 0.0,
        update_interval: int = 100,
        start_step: int = 0,
        stop_step: int | None = None,
        stop_epoch: int | None = None,
        stop_fraction: float | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        sparse_first_last: bool = False,
        log_per_layer: bool = True,
    ) -> None:
        _check_args(density, distribution, initial_sparsity, update_interval, start_step, stop_step, stop_epoch,
                    stop_fraction)
        check_patterns("include", include)
        check_patterns("exclude", exclude)
        self.density, self.distribution, self.initial_sparsity = density, distribution, initial_sparsity
        self.update_interval, self.start_step = update_interval, start_step
        self.stop_step, self.stop_epoch, self.stop_fraction = stop_step, stop_epoch, stop_fraction
        self.include, self.exclude, self.sparse_first_last = include, exclude, sparse_first_last
        self.log_per_layer = log_per_layer
        self.engine = MaskEngine()
        self.num_updates = 0
        self.last_update_step: int | None = None
        self._finals: dict[str, int] = {}
        self._start, self._stop = start_step, stop_step
        self._steps: set[int] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(density=self.density, distribution=self.distribution)

    @property
    def masks(self) -> Masks:
        """``{parameter name: bool mask}`` (True = kept): a new dict of the live mask tensors; masks change
        only through the callback's updates (the engine's methods)."""
        return dict(self.engine.masks)

    # ----------------------------------------------------------------------------------- public API
    def target_names(self, pl_module: pl.LightningModule) -> list[str]:
        """Names of the parameters this callback prunes (override to customise)."""
        selection = select_targets(pl_module, self.include, self.exclude, first_last=not self.sparse_first_last,
                                   owner=type(self).__name__)
        for note in selection.notes:
            rank_zero_info(note)
        rank_zero_info(f"{type(self).__name__}: {selection.describe()}")
        return selection.names

    def current_masks(self, pl_module: pl.LightningModule) -> Masks:
        """The live masks (``MaskSource`` protocol)."""
        return dict(self.engine.masks)

    def describe(self) -> MaskSourceInfo:
        """``"GMP (density 0.1)"``, unstructured masks (MaskSource protocol)."""
        return MaskSourceInfo(method=f"GMP (density {self.density:g})", density=self.density)

    def schedule_marks(self, trainer: pl.Trainer) -> dict[str, int]:
        """``{"GMP start": t0, "GMP stop": t0 + nΔt}``; only the start when training has no known length."""
        marks = {"GMP start": int(self.start_step)}
        try:
            marks["GMP stop"] = int(self.resolved_stop_step(trainer))
        except ValueError:  # e.g. an iterable dataset without a length: no stop step to mark
            pass
        return marks

    def resolved_stop_step(self, trainer: pl.Trainer) -> int:
        """The step of the last update, where the final density is reached (``stop_step``, ``stop_epoch`` or
        ``stop_fraction``)."""
        fraction = DEFAULT_STOP_FRACTION if self.stop_fraction is None else self.stop_fraction
        return resolve_stop_step(trainer, self.stop_step, self.stop_epoch, fraction)

    def sparsity_at(self, step: int) -> float:
        """The scheduled global sparsity s_t at ``step`` (needs the resolved stop step: after train start)."""
        stop = self._stop if self._stop is not None else step
        return cubic_sparsity(step, self._start, stop, 1.0 - self.density, self.initial_sparsity)

    # ------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if stage == "fit" and not self.engine.masks:
            names = self.target_names(pl_module)
            params = dict(pl_module.named_parameters())
            self.engine.set_masks({n: torch.ones_like(params[n], dtype=torch.bool) for n in names}, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.bind(pl_module)
        params = self.engine.params
        self._finals = final_counts({n: tuple(p.shape) for n, p in params.items()}, self.density, self.distribution)
        smoke = fast_dev_run_step(trainer, type(self).__name__, "one update to the final density")
        if smoke is not None:
            self._start = self._stop = smoke
        else:
            self._start, self._stop = self.start_step, self.resolved_stop_step(trainer)
            if self._stop <= self._start:
                raise ValueError(
                    f"{type(self).__name__} ends before it starts: start_step={self.start_step}, stop step="
                    f"{self._stop} (stop_step={self.stop_step}, stop_epoch={self.stop_epoch}, "
                    f"stop_fraction={self.stop_fraction})."
                )
            if self._stop >= total_steps(trainer):
                given = next((f"{k}={v}" for k, v in (("stop_step", self.stop_step), ("stop_epoch", self.stop_epoch))
                              if v is not None), f"stop_fraction={self.stop_fraction}")
                raise ValueError(
                    f"{type(self).__name__} schedule does not fit {describe_limits(trainer)}: {given} puts the last "
                    f"update at step {self._stop}, which never runs, so the final density would not be reached. "
                    f"Set `stop_fraction` (a fraction of training below 1 that scales with max_epochs, e.g. "
                    f"{DEFAULT_STOP_FRACTION}) instead, or an earlier stop."
                )
        self._steps = set(update_steps(self._start, self._stop, self.update_interval))
        self.engine.enforce(trainer.optimizers)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step in self._steps and step != self.last_update_step:  # once per step under gradient accumulation
            self._run_update(trainer, step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.engine.state_dict(), "num_updates": self.num_updates, "last_update_step": self.last_update_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
        self.num_updates = int(state_dict["num_updates"])
        last = state_dict.get("last_update_step")
        self.last_update_step = None if last is None else int(last)

    # ----------------------------------------------------------------------------------- internals
    def _run_update(self, trainer: pl.Trainer, step: int) -> None:
        """Prune to the scheduled sparsity at ``step`` (kept sets only shrink) and zero what was pruned."""
        params, masks = self.engine.params, self.engine.masks
        if self.distribution == "global":
            new = prune_global(params, masks, self.density, step, self._start, self._stop, self.initial_sparsity)
        else:
            new = prune_layers(params, masks, self._finals, step, self._start, self._stop, self.initial_sparsity)
        pruned = sum(int((masks[n] & ~new[n]).sum()) for n in new)
        self.engine.replace_masks(new)
        self.engine.enforce(trainer.optimizers)
        self.num_updates += 1
        self.last_update_step = step
        metrics = {"sparsity/global": 1.0 - self.engine.density(), "gmp/target_sparsity": self.sparsity_at(step),
                   "gmp/pruned": float(pruned), "gmp/updates": float(self.num_updates)}
        if self.log_per_layer:
            metrics.update({f"sparsity/{n}": 1.0 - m.float().mean().item() for n, m in new.items()})
        log_metrics(trainer, metrics, step)
