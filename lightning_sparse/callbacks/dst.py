"""``DynamicSparsity``: unstructured dynamic sparse training (RigL / SET) as a Lightning Callback."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from typing_extensions import override

from lightning_sparse.callbacks._base import check_strategy, log_metrics
from lightning_sparse.sparsity.distributions import DISTRIBUTIONS, layer_counts, layer_densities
from lightning_sparse.sparsity.dst import GROWTH_MODES, cosine_drop_fraction, drop_grow
from lightning_sparse.sparsity.masks import (
    Masks,
    apply_masks_,
    global_density,
    mask_grads_,
    mask_optimizer_state_,
    prunable_weights,
    random_mask,
    select_names,
)

__all__ = ["DynamicSparsity"]


def _check_args(
    density: float,
    distribution: str,
    growth: str,
    drop_fraction: float,
    update_interval: int,
    start_step: int,
    stop_step: int | None,
    stop_epoch: int | None,
) -> None:
    if not 0.0 < density < 1.0:
        raise ValueError(f"`density` must be in (0, 1), got density={density}.")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"`distribution`={distribution!r} is not supported; choose one of {list(DISTRIBUTIONS)}.")
    if growth not in GROWTH_MODES:
        raise ValueError(
            f"`growth`={growth!r} is not supported; choose one of {list(GROWTH_MODES)} "
            "('gradient' = RigL, 'random' = SET)."
        )
    if not 0.0 < drop_fraction < 1.0:
        raise ValueError(f"`drop_fraction` must be in (0, 1), got drop_fraction={drop_fraction}.")
    if update_interval < 1:
        raise ValueError(f"`update_interval` (ΔT, in steps) must be >= 1, got update_interval={update_interval}.")
    if start_step < 0:
        raise ValueError(f"`start_step` must be >= 0, got start_step={start_step}.")
    if stop_step is not None and stop_epoch is not None:
        raise ValueError(
            f"Give `stop_step` or `stop_epoch`, not both (got stop_step={stop_step}, stop_epoch={stop_epoch})."
        )
    if stop_step is not None and stop_step <= start_step:
        raise ValueError(f"`stop_step` must be after `start_step`, got start_step={start_step}, stop_step={stop_step}.")
    if stop_epoch is not None and stop_epoch < 1:
        raise ValueError(f"`stop_epoch` must be >= 1, got stop_epoch={stop_epoch}.")


class DynamicSparsity(pl.Callback):
    """Unstructured dynamic sparse training: RigL (gradient growth) or SET (random growth).

    Sparse layers are the ``weight`` of every Conv/Linear module, minus the first and the last one
    (stem conv and classifier) unless ``sparse_first_last=True``; ``include``/``exclude`` fnmatch
    patterns over ``named_parameters()`` names refine the choice. Per-layer densities come from
    ``distribution`` with an exact global budget; masks start random (seeded). Every ``update_interval``
    steps until the stop step, each layer drops the cosine-decayed fraction of its smallest-|w| active
    weights and regrows as many (DESIGN.md §3). Masked weights, gradients and optimizer state are kept
    at exactly 0 after every optimizer step, for any optimizer.

    Args:
        density: target fraction of kept weights over the sparse layers (RigL: 0.1 for 90 % sparsity).
        distribution: ``"erk"`` (Erdős–Rényi-Kernel) or ``"uniform"``.
        growth: ``"gradient"`` (RigL: largest dense-gradient magnitude) or ``"random"`` (SET).
        drop_fraction: α, the initial drop fraction (RigL: 0.3), decayed with a cosine to 0.
        update_interval: ΔT, steps between mask updates (RigL ImageNet: 100).
        start_step: first step at which updates may happen.
        stop_step: last update step (exclusive). Exclusive with ``stop_epoch``; if neither is given,
            updates stop at 75 % of training (RigL's ``end_step``).
        stop_epoch: like ``stop_step`` in epochs.
        include: fnmatch patterns of parameter names to make sparse (default: all Conv/Linear weights).
        exclude: fnmatch patterns of parameter names to keep dense.
        sparse_first_last: also sparsify the first and the last Conv/Linear layer.
        seed: seed of the random initial masks and SET growth (identical on every rank).
        log_per_layer: log ``sparsity/<param>`` for every layer at each update.

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
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        sparse_first_last: bool = False,
        seed: int = 0,
        log_per_layer: bool = True,
    ) -> None:
        _check_args(density, distribution, growth, drop_fraction, update_interval, start_step, stop_step, stop_epoch)
        self.density, self.distribution, self.growth = density, distribution, growth
        self.drop_fraction, self.update_interval = drop_fraction, update_interval
        self.start_step, self.stop_step, self.stop_epoch = start_step, stop_step, stop_epoch
        self.include, self.exclude, self.sparse_first_last = include, exclude, sparse_first_last
        self.seed, self.log_per_layer = seed, log_per_layer
        self.masks: Masks = {}
        self.num_updates = 0
        self._params: dict[str, torch.nn.Parameter] = {}
        self._mult: dict[str, torch.Tensor] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(density=self.density, distribution=self.distribution, growth=self.growth)

    # ----------------------------------------------------------------------------------- public API
    def target_names(self, pl_module: pl.LightningModule) -> list[str]:
        """Names of the parameters this callback makes sparse (override to customise)."""
        names = prunable_weights(pl_module)
        if not names:
            raise ValueError(
                f"{type(pl_module).__name__} has no Conv/Linear weight to make sparse; DynamicSparsity needs at least one."
            )
        if not self.sparse_first_last and self.include is None and len(names) > 2:
            names = names[1:-1]
        return select_names(names, self.include, self.exclude)

    def current_masks(self, pl_module: pl.LightningModule) -> Masks:
        """The live masks (``MaskSource`` protocol)."""
        return self.masks

    def resolved_stop_step(self, trainer: pl.Trainer) -> int:
        """The step at which mask updates stop."""
        if self.stop_step is not None:
            return self.stop_step
        total = int(trainer.estimated_stepping_batches)
        if self.stop_epoch is not None:
            per_epoch = total / max(1, trainer.max_epochs or 1)
            return max(1, int(round(self.stop_epoch * per_epoch)))
        return max(1, int(0.75 * total))

    # ------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if stage == "fit" and not self.masks:
            self._run_init_masks(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._refresh_params(pl_module)
        self._check_stop(trainer)
        self._enforce(trainer)
        self._log(trainer, {})

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if self._is_update_step(step, trainer):
            self._run_update(trainer, pl_module, step)
        mask_grads_(self._params, self._multipliers())

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Weights only: with masked gradients, optimizer state at masked positions stays 0 by itself;
        # it is zeroed explicitly whenever the masks change (see ``_enforce``).
        apply_masks_(self._params, self._multipliers())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {k: v.detach().cpu().clone() for k, v in self.masks.items()},
            "num_updates": self.num_updates,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        device = {k: p.device for k, p in self._params.items()}
        self.masks = {k: v.to(device.get(k, "cpu")).bool() for k, v in state_dict["masks"].items()}
        self.num_updates = int(state_dict["num_updates"])
        self._mult = None

    # ----------------------------------------------------------------------------------- internals
    def _enforced_masks(self) -> Masks:
        """The masks applied to parameters (Chase adds the zero-slices of removed channels)."""
        return self.masks

    def _multipliers(self) -> dict[str, torch.Tensor]:
        """Masks as 0/1 tensors of each parameter's dtype, cached: multiplying by them is ~3x faster
        than by bool masks, and it runs twice per step (gradients, weights)."""
        if self._mult is None:
            self._mult = {k: m.to(self._params[k].dtype) for k, m in self._enforced_masks().items()}
        return self._mult

    def _refresh_params(self, pl_module: pl.LightningModule) -> None:
        self._mult = None
        named = dict(pl_module.named_parameters())
        self._params = {k: named[k] for k in self.masks}
        for k, m in self.masks.items():
            if m.device != self._params[k].device:
                self.masks[k] = m.to(self._params[k].device)

    def _check_stop(self, trainer: pl.Trainer) -> None:
        stop = self.resolved_stop_step(trainer)
        if stop <= self.start_step:
            raise ValueError(
                f"DynamicSparsity stops before it starts: start_step={self.start_step}, stop step={stop} "
                f"(stop_step={self.stop_step}, stop_epoch={self.stop_epoch})."
            )

    def _is_update_step(self, step: int, trainer: pl.Trainer) -> bool:
        return (
            step > self.start_step
            and (step - self.start_step) % self.update_interval == 0
            and step < self.resolved_stop_step(trainer)
        )

    def _generator(self, step: int) -> torch.Generator:
        # Same seed on every rank -> identical random choices under DDP without communication.
        return torch.Generator().manual_seed(self.seed * 1_000_003 + step)

    def _run_init_masks(self, pl_module: pl.LightningModule) -> None:
        names = self.target_names(pl_module)
        params = dict(pl_module.named_parameters())
        shapes = {n: tuple(params[n].shape) for n in names}
        total = sum(params[n].numel() for n in names)
        densities = layer_densities(shapes, self.density, self.distribution)
        counts = layer_counts(densities, shapes, total=int(round(self.density * total)))
        gen = self._generator(-1)
        self.masks = {n: random_mask(shapes[n], counts[n], gen, params[n].device) for n in names}
        self._params = {n: params[n] for n in names}
        apply_masks_(self._params, self.masks)
        rank_zero_info(
            f"DynamicSparsity: {len(names)} sparse layers, {total:,} weights, density {global_density(self.masks):.4f} "
            f"({self.distribution}, growth={self.growth})"
        )

    def _enforce(self, trainer: pl.Trainer) -> None:
        """After any mask change: zero masked weights and every optimizer state tensor there."""
        self._mult = None
        apply_masks_(self._params, self._multipliers())
        mask_optimizer_state_(trainer.optimizers, self._params, self._enforced_masks())

    def _check_finite(self, step: int) -> None:
        """Refuse a mask update from NaN/inf weights or gradients (it would pick arbitrary positions)."""
        for name in self.masks:
            p = self._params[name]
            for what, t in (("weight", p), ("gradient", p.grad)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise FloatingPointError(
                        f"{type(self).__name__}: non-finite {what} in {name!r} at step {step}; refusing the mask "
                        "update (lower the learning rate or enable gradient clipping)."
                    )

    def _run_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._check_finite(step)
        alpha = cosine_drop_fraction(step - self.start_step, self.resolved_stop_step(trainer) - self.start_step,
                                     self.drop_fraction)
        gen = self._generator(step)
        swapped = 0
        for name, mask in self.masks.items():
            p = self._params[name]
            n_swap = int(round(alpha * int(mask.sum())))
            new = drop_grow(p, mask, n_swap, self.growth, p.grad, gen)
            swapped += int((new & ~mask).sum())
            self.masks[name] = new
        self.num_updates += 1
        # Dropped weights and their optimizer state go to 0 now; grown ones are 0 already.
        self._enforce(trainer)
        self._log(trainer, {"dst/drop_fraction": alpha, "dst/regrown": float(swapped), "dst/updates": float(self.num_updates)})

    def _log(self, trainer: pl.Trainer, extra: dict[str, float]) -> None:
        metrics = {"sparsity/global": 1.0 - global_density(self.masks), **extra}
        if self.log_per_layer:
            metrics.update({f"sparsity/{n}": 1.0 - m.float().mean().item() for n, m in self.masks.items()})
        log_metrics(trainer, metrics)
