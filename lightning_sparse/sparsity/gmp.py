"""Gradual magnitude pruning (Zhu & Gupta 2017) and one-shot magnitude pruning, as pure tensor functions.

The cubic schedule (TF model-optimization's ``PolynomialDecay`` with ``power=3``, the ``prune`` baseline of
google-research/rigl): dense until ``t0``, then at ``t0``, ``t0 + Δt``, ... up to ``t_end = t0 + nΔt``

    s_t = s_f + (s_i − s_f) · (1 − (t − t0) / (t_end − t0))³

and each update keeps the largest ``|w|`` among the weights still kept: per layer (every layer follows the
schedule towards its own final density, ``uniform`` or ``ERK``) or globally (one threshold over all target
layers). Kept sets only shrink, so a pruned weight never comes back. One-shot pruning is the same with
``n = 0``: one update straight to the final density.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lightning_sparse.sparsity.distributions import layer_counts, layer_densities

__all__ = ["SCOPES", "cubic_sparsity", "update_steps", "keep_largest", "layer_count_at", "prune_layers", "prune_global",
           "final_counts"]

SCOPES = ("global", "uniform", "erk")  # one global threshold, or per layer with uniform / ERK final densities


def cubic_sparsity(step: int, start: int, end: int, final: float, initial: float = 0.0, power: int = 3) -> float:
    """``s_t = s_f + (s_i − s_f)(1 − p)^power`` with ``p = (t − t0)/(t_end − t0)`` clipped to [0, 1]
    (``p = 1`` when ``end == start``: one-shot).

    Example:
        >>> cubic_sparsity(0, 0, 100, 0.9), cubic_sparsity(50, 0, 100, 0.9), cubic_sparsity(100, 0, 100, 0.9)
        (0.0, 0.7875, 0.9)
    """
    p = 1.0 if end <= start else min(1.0, max(0.0, (step - start) / (end - start)))
    return final + (initial - final) * (1.0 - p) ** power


def update_steps(start: int, end: int, interval: int) -> list[int]:
    """The steps of the schedule: ``start, start + Δt, ...`` up to ``end``, and ``end`` itself (so the
    final sparsity is always reached, also when ``end − start`` is not a multiple of Δt).

    Example:
        >>> update_steps(10, 40, 10), update_steps(0, 25, 10), update_steps(5, 5, 10)
        ([10, 20, 30, 40], [0, 10, 20, 25], [5])
    """
    steps = list(range(start, end + 1, interval))
    if not steps or steps[-1] != end:
        steps.append(end)
    return steps


def final_counts(shapes: Mapping[str, tuple[int, ...]], density: float, scope: str) -> dict[str, int]:
    """Kept weights per layer at the end of pruning: per layer from ``uniform``/``erk`` densities with an exact
    total of ``round(density × total)``; for ``global`` every layer's full size (the budget is global)."""
    if scope == "global":
        return {n: math.prod(s) for n, s in shapes.items()}
    total = sum(math.prod(s) for s in shapes.values())
    return layer_counts(layer_densities(shapes, density, scope), shapes, total=max(len(shapes), round(density * total)))


@torch.no_grad()
def keep_largest(weight: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """The new mask keeping the ``count`` largest-|w| positions among those ``mask`` keeps (never more than
    it keeps already; ties go to the lower index).

    Example:
        >>> w = torch.tensor([0.5, -3.0, 0.1, 2.0])
        >>> keep_largest(w, torch.tensor([True, True, True, False]), 2).tolist()
        [True, True, False, False]
    """
    flat = mask.flatten()
    count = max(0, min(int(count), int(flat.sum())))
    if count == int(flat.sum()):
        return mask.clone()
    score = torch.where(flat, weight.detach().flatten().abs().float(), torch.tensor(-1.0, device=weight.device))
    order = torch.sort(score, descending=True, stable=True).indices[:count]
    new = torch.zeros_like(flat)
    new[order] = True
    return new.view_as(mask)


def layer_count_at(numel: int, final_count: int, step: int, start: int, end: int, initial: float = 0.0) -> int:
    """A layer's kept count at ``step``: ``round(numel · (1 − s_t))`` with the layer's final sparsity
    ``1 − final_count/numel``; exactly ``final_count`` from ``end`` on."""
    if step >= end:
        return int(final_count)
    s = cubic_sparsity(step, start, end, 1.0 - final_count / numel, initial)
    return max(int(final_count), int(round(numel * (1.0 - s))))


@torch.no_grad()
def prune_layers(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], finals: Mapping[str, int],
                 step: int, start: int, end: int, initial: float = 0.0) -> dict[str, torch.Tensor]:
    """Per-layer pruning at ``step``: every layer keeps its largest |w| down to its scheduled count."""
    return {n: keep_largest(weights[n], m, layer_count_at(m.numel(), finals[n], step, start, end, initial))
            for n, m in masks.items()}


@torch.no_grad()
def prune_global(weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], density: float,
                 step: int, start: int, end: int, initial: float = 0.0) -> dict[str, torch.Tensor]:
    """Global pruning at ``step``: the ``round(total · (1 − s_t))`` largest |w| over all layers stay
    (one threshold; ties go to the earlier layer / lower index)."""
    names = list(masks)
    total = sum(masks[n].numel() for n in names)
    s_t = 1.0 - density if step >= end else cubic_sparsity(step, start, end, 1.0 - density, initial)
    budget = int(round(total * (1.0 - s_t)))
    flat_mask = torch.cat([masks[n].flatten().cpu() for n in names])
    flat_w = torch.cat([weights[n].detach().flatten().cpu() for n in names])
    new = keep_largest(flat_w, flat_mask, budget)
    out, i = {}, 0
    for n in names:
        out[n] = new[i:i + masks[n].numel()].view_as(masks[n]).to(masks[n].device)
        i += masks[n].numel()
    return out
