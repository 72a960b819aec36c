"""Where a mask update sits in its training iteration, relative to the optimizer step (DESIGN.md §3).

The reference implementations differ, and the difference is the growth initialisation:

- **RigL** (google-research/rigl ``SparseRigLOptimizerBase.apply_gradients``: a ``cond`` chooses the mask
  update *or* the optimizer update) runs the update **instead of** that iteration's optimizer step.
  :func:`skip_optimizer_step` does it through the optimizer's documented behaviour: ``torch.optim``
  optimizers skip every parameter whose ``grad`` is ``None`` (no weight, moment, step count or
  weight-decay change), and ``GradScaler.step`` still runs its bookkeeping (Lightning unscales before
  ``on_before_optimizer_step``).
- **SET** (``SparseSETOptimizerBase.apply_gradients``: the optimizer update, then the mask update) and
  **Chase** (``Masking.step``: ``optimizer.step()``, ``apply_mask()``, then ``truncate_weights``) step
  first and update the masks after it, with the gradient still held from that batch.
  :class:`AfterStep` carries the decision and a copy of that gradient from ``on_before_optimizer_step``
  (before the gradient is masked) to ``on_train_batch_end`` (after the step), which works the same under
  gradient accumulation, AMP, manual optimization (where the user may clear gradients right after the
  step) and DDP (the gradient is already all-reduced when it is copied).

Either way the new connections end the iteration at exactly 0 with zeroed optimizer state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

__all__ = ["skip_optimizer_step", "AfterStep", "check_update_iteration"]


def check_update_iteration(trainer: object, owner: str, skips_step: bool) -> None:
    """Refuse the set-ups where the update iteration cannot be kept exact, with the reason and what to use.

    - Manual optimization with several optimizers: each ``optimizer.step()`` counts as a step, so one batch
      would hold several update points (and RigL would skip only one optimizer's step).
    - RigL under a GradScaler with an optimizer that unscales inside its own ``step`` (``fused=True``):
      Lightning then does not unscale before ``on_before_optimizer_step``, and a step without gradients
      leaves the scaler with no inf check to update from.

    Raises:
        ValueError: naming the set-up.
    """
    module = getattr(trainer, "lightning_module", None)
    optimizers = list(getattr(trainer, "optimizers", []))
    if module is not None and not module.automatic_optimization and len(optimizers) > 1:
        raise ValueError(
            f"{owner} supports manual optimization with one optimizer, got {len(optimizers)}: the mask update is "
            "tied to one optimizer step per batch. Use one optimizer, or automatic optimization."
        )
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    fused = [type(o).__name__ for o in optimizers if getattr(o, "defaults", {}).get("fused")]
    if skips_step and scaler is not None and fused:
        raise ValueError(
            f"{owner} (RigL) replaces the optimizer step on update iterations, which a GradScaler cannot follow "
            f"with a fused optimizer ({', '.join(fused)}, fused=True). Use fused=False, or bf16-mixed precision."
        )


def skip_optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """Make this iteration's ``optimizer.step()`` leave every parameter and its state untouched.

    Sets each parameter's gradient to ``None``: ``torch.optim`` optimizers step only parameters with a
    gradient, so nothing moves (no momentum or weight decay either). Gradient clipping, GradScaler and
    learning-rate schedulers run as usual, and the step counter (``trainer.global_step``) still advances. The
    reference does not count that iteration, so between two updates it takes ΔT optimizer steps where ours
    takes ΔT − 1 (README, fidelity table).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


class AfterStep:
    """A mask update decided before the optimizer step and run after it, with that batch's gradient.

    ``arm`` (in ``on_before_optimizer_step``, before gradients are masked) copies the gradients the update
    will read; ``take`` (in ``on_train_batch_end``) returns them once, after the step, or ``None`` when no
    update is pending (e.g. a batch that only accumulated gradients).
    """

    def __init__(self) -> None:
        self.step: int | None = None
        self._grads: dict[str, torch.Tensor | None] = {}

    def arm(self, step: int, params: Mapping[str, torch.nn.Parameter], names: Iterable[str], copy: bool = True) -> None:
        """Schedule an update for after the step that ends at ``step``; keep a copy of the named gradients."""
        self.step = step
        self._grads = {n: (params[n].grad.detach().clone() if copy and params[n].grad is not None else None)
                       for n in names}

    def take(self) -> tuple[int, dict[str, torch.Tensor | None]] | None:
        """The pending ``(step, gradients)``, cleared; ``None`` when nothing is pending."""
        if self.step is None:
            return None
        out = (self.step, self._grads)
        self.step, self._grads = None, {}
        return out
