"""Independent PyTorch transcription of gradual magnitude pruning as google-research/rigl runs it.

Source: google-research/rigl @ d39fc7d46505cb3196cb1edeb32ed0b6dd44c0f9
  rigl/rigl_tf2/utils.py            get_pruning_params(mode='prune'): pruning_schedule.PolynomialDecay
  rigl/cifar_resnet/resnet_train_eval.py  training_method='prune' (contrib model_pruning, same cubic schedule:
                                    sparsity_function_exponent=3, threshold_decay=0)
and TF model-optimization (tensorflow_model_optimization/python/core/sparsity/keras):
  pruning_schedule.py  PruningSchedule._should_prune_in_step, PolynomialDecay.__call__ (power=3)
  pruning_impl.py      Pruning._update_mask (per layer: k = max(1, round(size·(1 − s))), keep |w| >= k-th largest)
  pruning_callbacks.py UpdatePruningStep: the step seen by iteration i is i (optimizer steps done before it),
                       and the mask update runs in that iteration's forward, before its optimizer step.

Plain torch, CPU; the schedule's arithmetic is float32 as in TF.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["should_prune_in_step", "polynomial_decay", "update_mask", "update_steps"]


def should_prune_in_step(step: int, begin_step: int, end_step: int, frequency: int) -> bool:
    """``PruningSchedule._should_prune_in_step``: in [begin, end] (end < 0: forever) and (step − begin) % f == 0."""
    in_range = step >= begin_step and (step <= end_step or end_step < 0)
    return in_range and (step - begin_step) % frequency == 0


def polynomial_decay(step: int, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                     power: int = 3, frequency: int = 100) -> tuple[bool, float]:
    """``PolynomialDecay.__call__``: ``(should_prune, sparsity)``;
    p = clip((step − begin)/(end − begin), 0, 1) in float32; s = (s_i − s_f)·(1 − p)^power + s_f."""
    f32 = torch.float32
    p = torch.tensor(step - begin_step, dtype=f32) / torch.tensor(end_step - begin_step, dtype=f32)
    p = torch.clamp(p, 0.0, 1.0)
    sparsity = (torch.tensor(initial_sparsity - final_sparsity, dtype=f32) * torch.pow(1 - p, power)
                + torch.tensor(final_sparsity, dtype=f32))
    return should_prune_in_step(step, begin_step, end_step, frequency), float(sparsity)


def update_mask(weights: Tensor, sparsity: float) -> Tensor:
    """``Pruning._update_mask`` (no blocks): the weights are the masked weights (``weight_mask_op`` wrote
    ``w·mask`` into the variable); k = max(1, round(float32(size)·(1 − s))); keep ``|w| >= `` the k-th largest."""
    abs_w = weights.detach().abs()
    k = int(torch.clamp(torch.round(torch.tensor(float(abs_w.numel()), dtype=torch.float32)
                                    * (1 - torch.tensor(sparsity, dtype=torch.float32))), min=1))
    values = torch.sort(abs_w.reshape(-1), descending=True).values
    return abs_w >= values[k - 1]


def update_steps(begin_step: int, end_step: int, frequency: int, last_step: int) -> list[int]:
    """The steps ``0 .. last_step`` at which the schedule prunes."""
    return [t for t in range(last_step + 1) if should_prune_in_step(t, begin_step, end_step, frequency)]
