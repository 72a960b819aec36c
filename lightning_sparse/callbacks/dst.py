"""``DynamicSparsity``: unstructured dynamic sparse training (RigL / SET) as a Lightning Callback."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from lightning_sparse.callbacks._base import MaskSourceInfo, check_strategy, log_metrics
from lightning_sparse.callbacks._iteration import AfterStep, check_update_iteration, skip_optimizer_step
from lightning_sparse.callbacks._schedule import (
    DEFAULT_STOP_FRACTION,
    UpdateGuard,
    check_stop_args,
    describe_limits,
    fast_dev_run_step,
    resolve_stop_step,
    total_steps,
)
from lightning_sparse.checks import check_choice, check_patterns, check_range
from lightning_sparse.sparsity.distributions import DISTRIBUTIONS
from lightning_sparse.sparsity.dst import GROWTH_MODES, cosine_drop_fraction, drop_grow, initial_masks
from lightning_sparse.sparsity.engine import MaskEngine
from lightning_sparse.sparsity.masks import Masks
from lightning_sparse.sparsity.targets import select_targets

__all__ = ["DynamicSparsity"]


def _check_args(density: float, distribution: str, growth: str, drop_fraction: float, update_interval: int,
                start_step: int, stop_step: int | None, stop_epoch: int | None, stop_fraction: float | None,
                max_postponed: int) -> None:
    check_range("density", density, 0, 1)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    check_choice("growth", growth, GROWTH_MODES, "'gradient' = RigL, 'random' = SET")
    check_range("drop_fraction", drop_fraction, 0, 1)
    check_range("update_interval", update_interval, 1, low_inclusive=True, integer=True, what="ΔT, in steps")
    check_range("start_step", start_step, 0, low_inclusive=True, integer=True)
    check_range("max_postponed", max_postponed, 1, low_inclusive=True, integer=True)
    check_stop_args(stop_step, stop_epoch, stop_fraction, start_step)


class DynamicSparsity(pl.Callback):
    """Unstructured dynamic sparse training: RigL (gradient growth) or SET (random growth).

    Sparse layers are the matmul/conv weights of the module (:mod:`lightning_sparse.sparsity.targets`:
    Linear, Conv1d/2d/3d, ``nn.MultiheadAttention.in_proj_weight``), minus the first and the last one in
    registration order (for timm CNNs: stem conv and classifier; the log names them) unless
    ``sparse_first_last=True`` or ``include`` is given; ``include``/``exclude`` fnmatch patterns over
    ``named_parameters()`` names refine the choice. Per-layer densities come from ``distribution`` with
    an exact global budget; masks start random (seeded). At ``start_step`` and every ``update_interval``
    optimizer steps after it until the stop step, each layer drops ``int(α_t · n)`` of its smallest-|w|
    active weights and regrows as many (DESIGN.md §3). As in google-research/rigl, RigL's update runs
    *instead of* that iteration's optimizer step (weights and optimizer state end as if no step had run;
    the step counter and the learning-rate schedule advance), and SET's runs right after the step
    (:mod:`lightning_sparse.callbacks._iteration`); either way grown connections end the iteration at 0
    with zeroed optimizer state. Masked weights, gradients and optimizer state are kept at exactly 0
    after every optimizer step, for any optimizer (:class:`~lightning_sparse.sparsity.engine.MaskEngine`).

    Under ``fast_dev_run`` the schedule is compressed to one mask update at the smoke run's last step (one
    info line says so), so a smoke test exercises the update instead of skipping it.

    An update whose gradients or weights are not finite (an fp16 overflow the GradScaler skips) is
    postponed to the next finite step with one warning; after ``max_postponed`` consecutive
    postponements the run stops with a ``FloatingPointError``.

    Args:
        density: target fraction of kept weights over the sparse layers (RigL: 0.1 for 90 % sparsity).
        distribution: ``"erk"`` (Erdős–Rényi-Kernel) or ``"uniform"``.
        growth: ``"gradient"`` (RigL: largest dense-gradient magnitude) or ``"random"`` (SET).
        drop_fraction: α, the initial drop fraction (RigL: 0.3), decayed with a cosine to 0.
        update_interval: ΔT, optimizer steps between mask updates (RigL ImageNet: 100).
        start_step: first step at which updates may happen.
        stop_step: last update step (exclusive), in optimizer steps. A stop step after the end of training
            means updates until the end.
        stop_epoch: like ``stop_step`` in epochs (an int); it must fit the training (at most ``max_epochs``,
            and within ``max_steps``), else ``on_train_start`` raises and names ``stop_fraction``.
        stop_fraction: like ``stop_step`` as a fraction of training in (0, 1]: ``floor(stop_fraction × total)``
            with total = the fit's optimizer steps (``max_steps`` or ``max_epochs`` × steps per epoch, whichever
            ends training first; gradient accumulation and manual optimization respected), resolved at each fit
            start, so it scales with ``max_epochs`` and works for ``max_steps``-bounded runs. Give at most one of
            ``stop_step``, ``stop_epoch`` and ``stop_fraction``; with none, 0.75 (RigL's ``end_step``).
        include: fnmatch patterns of parameter names to make sparse (any weight with >= 2 dims).
        exclude: fnmatch patterns of parameter names to keep dense.
        sparse_first_last: also sparsify the first and the last candidate weight.
        seed: seed of the random initial masks and SET growth (identical on every rank).
        log_per_layer: log ``sparsity/<param>`` for every layer at each update.
        max_postponed: consecutive non-finite update steps tolerated before giving up.

    Raises:
        ValueError: for any argument outside its range (the message names it and its value), or in
            ``setup`` for an include/exclude pattern that matches no parameter.

    Example:
        >>> cb = DynamicSparsity(density=0.1, growth="gradient", update_interval=100)
        >>> cb.state_key
        "DynamicSparsity{'density': 0.1, 'distribution': 'erk', 'growth': 'gradient'}"
    """

    def __init__(
        self,
        density: float = 0.1,
        distribution: str = "erk",
        growth: str = "gradient",
        drop_fraction: float = 0.3,
        update_interval: int = 100,
        start_step: int = 0,
        stop_step: int | None = None,
        stop_epoch: int | None = None,
        stop_fraction: float | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        sparse_first_last: bool = False,
        seed: int = 0,
        log_per_layer: bool = True,
        max_postponed: int = 10,
    ) -> None:
        _check_args(density, distribution, growth, drop_fraction, update_interval, start_step, stop_step, stop_epoch,
                    stop_fraction, max_postponed)
        check_patterns("include", include)
        check_patterns("exclude", exclude)
        self.density, self.distribution, self.growth = density, distribution, growth
        self.drop_fraction, self.update_interval = drop_fraction, update_interval
        self.start_step, self.stop_step, self.stop_epoch = start_step, stop_step, stop_epoch
        self.stop_fraction = stop_fraction
        self.include, self.exclude, self.sparse_first_last = include, exclude, sparse_first_last
        self.seed, self.log_per_layer = seed, log_per_layer
        self.engine = MaskEngine()
        self.guard = UpdateGuard(max_postponed)
        self._after = AfterStep()  # SET: the update waits for the optimizer step
        self.num_updates = 0
        self._stop: int | None = None
        self._smoke_step: int | None = None  # under fast_dev_run: the one update step
        self._excluded: list[str] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(density=self.density, distribution=self.distribution, growth=self.growth)

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{parameter name: bool mask}`` (True = kept): a new dict of the live mask tensors; masks change
        only through the callback's updates (the engine's methods)."""
        return dict(self.engine.masks)

    # ----------------------------------------------------------------------------------- public API
    def target_names(self, pl_module: pl.LightningModule) -> list[str]:
        """Names of the parameters this callback makes sparse (override to customise)."""
        selection = select_targets(pl_module, self.include, self.exclude, first_last=not self.sparse_first_last,
                                   owner=type(self).__name__)
        self._excluded = selection.excluded_first_last
        for note in selection.notes:
            rank_zero_info(note)
        return selection.names

    def current_masks(self, pl_module: pl.LightningModule) -> Masks:
        """The live masks (``MaskSource`` protocol)."""
        return dict(self.engine.masks)

    def describe(self) -> MaskSourceInfo:
        """``"RigL (ERK, density 0.1)"`` or ``"SET (...)"``, unstructured masks (MaskSource protocol)."""
        growth = "RigL" if self.growth == "gradient" else "SET"
        return MaskSourceInfo(method=f"{growth} ({self.distribution.upper()}, density {self.density:g})",
                              density=self.density)

    def schedule_marks(self, trainer: pl.Trainer) -> dict[str, int]:
        """``{"DST stop": step}``; ``{}`` when training has no known length (MaskSource protocol)."""
        try:
            return {"DST stop": int(self.resolved_stop_step(trainer))}
        except ValueError:  # e.g. an iterable dataset without a length: no stop step to mark
            return {}

    def resolved_stop_step(self, trainer: pl.Trainer) -> int:
        """The optimizer step at which mask updates stop (``stop_step``, ``stop_epoch`` or ``stop_fraction``)."""
        fraction = DEFAULT_STOP_FRACTION if self.stop_fraction is None else self.stop_fraction
        return resolve_stop_step(trainer, self.stop_step, self.stop_epoch, fraction)

    # ------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if stage == "fit" and not self.engine.masks:
            self._run_init_masks(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_update_iteration(trainer, type(self).__name__, skips_step=self.growth == "gradient")
        self._after = AfterStep()
        self.engine.bind(pl_module)
        self._smoke_step = fast_dev_run_step(trainer, type(self).__name__, "one mask update")
        if self._smoke_step is not None:  # a smoke run: one update at its last step, whatever the schedule
            self._stop = self._smoke_step + 1
        else:
            self._stop = self.resolved_stop_step(trainer)
            self._check_fits(trainer)
        if self._smoke_step is None and self._stop <= self.start_step:
            raise ValueError(
                f"DynamicSparsity stops before it starts: start_step={self.start_step}, stop step={self._stop} "
                f"(stop_step={self.stop_step}, stop_epoch={self.stop_epoch}, stop_fraction={self.stop_fraction})."
            )
        self.engine.enforce(trainer.optimizers)
        self._log(trainer, {})

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if self.guard.due(self._is_update_step(step), self.engine.unusable, step, type(self).__name__):
            if self.growth == "gradient":  # RigL: the mask update *instead of* this iteration's optimizer step
                params = self.engine.params
                self._run_update(trainer, step, {n: params[n].grad for n in self.engine.masks})
                skip_optimizer_step(optimizer)
                return
            self._after.arm(step, self.engine.params, self.engine.masks, copy=False)  # SET: after the step
        self.engine.mask_grads()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Weights only: with masked gradients, optimizer state at masked positions stays 0 by itself;
        # it is zeroed explicitly whenever the masks change (``MaskEngine.enforce``).
        self.engine.apply_weights()
        pending = self._after.take()
        if pending is not None:
            self._run_update(trainer, *pending)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.engine.state_dict(), "num_updates": self.num_updates, "guard": self.guard.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
        self.num_updates = int(state_dict["num_updates"])
        self.guard.load_state_dict(state_dict.get("guard", {}))

    # ----------------------------------------------------------------------------------- internals
    def _check_fits(self, trainer: pl.Trainer) -> None:
        """A ``stop_epoch`` after the end of training cannot be meant (the cosine would never decay)."""
        assert self._stop is not None
        if self.stop_epoch is not None and self._stop > total_steps(trainer):
            raise ValueError(
                f"DynamicSparsity schedule does not fit {describe_limits(trainer)}: stop_epoch={self.stop_epoch} "
                f"(step {self._stop}) is after the end of training. Set `stop_fraction` (a fraction of training that "
                f"scales with max_epochs, e.g. {DEFAULT_STOP_FRACTION}) instead, or a smaller `stop_epoch`."
            )

    def _is_update_step(self, step: int) -> bool:
        if self._smoke_step is not None:
            return step == self._smoke_step
        stop = self._stop if self._stop is not None else step + 1
        # as google-research/rigl ``is_mask_update_iter``: from ``start_step`` itself (step 0 by default) every ΔT
        return self.start_step <= step < stop and (step - self.start_step) % self.update_interval == 0

    def _generator(self, step: int) -> torch.Generator:
        # Same seed on every rank -> identical random choices under DDP without communication.
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def _run_init_masks(self, pl_module: pl.LightningModule) -> None:
        names = self.target_names(pl_module)
        params = dict(pl_module.named_parameters())
        total = sum(params[n].numel() for n in names)
        self.engine.set_masks(initial_masks({n: params[n] for n in names}, self.density, self.distribution,
                                            self._generator(-1)), pl_module)
        self.engine.apply_weights()
        dense = f"; kept dense as first/last: {', '.join(self._excluded)}" if self._excluded else ""
        rank_zero_info(
            f"DynamicSparsity: {len(names)} sparse layers, {total:,} weights, density {self.engine.density():.4f} "
            f"({self.distribution}, growth={self.growth}){dense}"
        )

    def _run_update(self, trainer: pl.Trainer, step: int, grads: dict[str, torch.Tensor | None]) -> None:
        """One RigL/SET update at iteration ``step`` (google-research/rigl ``_get_update_op``): each layer drops
        ``int(α_t · n_active)`` (floor) smallest-|w| active weights and grows as many among the positions not
        kept (the just-dropped included); a weight dropped and regrown keeps its value and state."""
        stop = self._stop if self._stop is not None else self.resolved_stop_step(trainer)
        start = 0 if self._smoke_step is not None else self.start_step
        alpha = cosine_drop_fraction(step - start, stop - start, self.drop_fraction)
        gen = self._generator(step)
        swapped = 0
        params, updated = self.engine.params, {}
        for name, mask in self.engine.masks.items():
            n_swap = int(alpha * int(mask.sum()))
            updated[name] = drop_grow(params[name], mask, n_swap, self.growth, grads.get(name), gen)
            swapped += int((updated[name] & ~mask).sum())
        self.engine.replace_masks(updated)
        self.num_updates += 1
        # Dropped weights and their optimizer state go to 0 now; grown ones are 0 already.
        self.engine.enforce(trainer.optimizers)
        self._log(trainer, {"dst/drop_fraction": alpha, "dst/regrown": float(swapped), "dst/updates": float(self.num_updates)},
                  step)

    def _log(self, trainer: pl.Trainer, extra: dict[str, float], step: int | None = None) -> None:
        """Log at ``step``: the iteration (optimizer steps before it) whose update this is; default: now."""
        metrics = {"sparsity/global": 1.0 - self.engine.density(), **extra}
        if self.log_per_layer:
            metrics.update({f"sparsity/{n}": 1.0 - m.float().mean().item() for n, m in self.engine.masks.items()})
        log_metrics(trainer, metrics, step)
