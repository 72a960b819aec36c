"""Masks keyed by parameter name, and the operations that keep them exact.

A mask is a ``torch.bool`` tensor of the parameter's shape (True = weight kept), keyed by the dotted
name from ``named_parameters()``. The invariant every sparsity callback maintains: after every optimizer
step each masked-out weight is exactly 0. :func:`apply_masks_` zeroes weights, :func:`mask_grads_`
zeroes gradients before the step, and :func:`mask_optimizer_state_` zeroes every optimizer state tensor
of the parameter's shape (SGD ``momentum_buffer``, Adam ``exp_avg``/``exp_avg_sq``, ...), so no
optimizer can revive a pruned weight — whatever optimizer it is. Which weights get masks is decided by
:func:`lightning_sparse.sparsity.targets.select_targets`; :class:`~lightning_sparse.sparsity.engine.MaskEngine`
holds them for the callbacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

__all__ = [
    "Masks",
    "apply_masks_",
    "mask_grads_",
    "mask_optimizer_state_",
    "random_mask",
    "global_density",
]

Masks = dict[str, torch.Tensor]


@torch.no_grad()
def apply_masks_(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero every weight outside its mask, in place."""
    for name, mask in masks.items():
        params[name].mul_(mask)


@torch.no_grad()
def mask_grads_(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the gradient outside the mask, in place (parameters without a gradient are skipped)."""
    for name, mask in masks.items():
        grad = params[name].grad
        if grad is not None:
            grad.mul_(mask)


@torch.no_grad()
def mask_optimizer_state_(
    optimizers: Iterable[torch.optim.Optimizer],
    params: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> int:
    """Zero, at masked positions, every optimizer state tensor that has the parameter's shape.

    Works for any ``torch.optim`` optimizer (state is looked up by parameter). Returns the number of
    state tensors touched (useful in tests).
    """
    touched = 0
    for opt in optimizers:
        for name, mask in masks.items():
            state = opt.state.get(params[name])
            if not state:
                continue
            for value in state.values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    value.mul_(mask)
                    touched += 1
    return touched


def random_mask(shape: Sequence[int], count: int, generator: torch.Generator, device: torch.device | str = "cpu") -> torch.Tensor:
    """A bool mask of ``shape`` with exactly ``count`` True positions chosen uniformly at random.

    Example:
        >>> m = random_mask((4, 8), 5, torch.Generator().manual_seed(0))
        >>> m.shape, m.dtype, int(m.sum())
        (torch.Size([4, 8]), torch.bool, 5)
    """
    numel = int(torch.Size(shape).numel())
    if not 0 <= count <= numel:
        raise ValueError(f"count must be in [0, {numel}] for shape {tuple(shape)}, got count={count}.")
    idx = torch.randperm(numel, generator=generator)[:count]
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[idx] = True
    return mask.view(*shape).to(device)


def global_density(masks: Mapping[str, torch.Tensor]) -> float:
    """Kept positions over all masks / all positions.

    Example:
        >>> global_density({"a": torch.tensor([True, False, False, False]), "b": torch.ones(4, dtype=torch.bool)})
        0.625
    """
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return kept / max(1, total)
