"""Dynamic sparse training steps: magnitude drop, gradient (RigL) or random (SET) growth, decay.

RigL (Evci et al., 2020) / SET (Mocanu et al., 2018), as in DESIGN.md §3: every ΔT steps until
``T_stop`` each layer drops the fraction α_t of its active weights with the smallest |w| and grows as
many at inactive positions — by the largest dense-gradient magnitude (RigL) or uniformly at random
(SET). α_t = α/2 · (1 + cos(π t / T_stop)). Grown weights start at 0; the per-layer count of active
weights never changes. Global variants (one threshold across layers) serve Chase's soft memory bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from lightning_sparse.sparsity.distributions import layer_counts, layer_densities
from lightning_sparse.sparsity.masks import random_mask

__all__ = [
    "Growth",
    "cosine_drop_fraction",
    "drop_grow",
    "topk_indices",
    "global_magnitude_prune",
    "global_grow",
    "initial_masks",
]

Growth = Literal["gradient", "random"]
GROWTH_MODES = ("gradient", "random")


def cosine_drop_fraction(step: int, stop_step: int, drop_fraction: float, final_fraction: float = 0.0) -> float:
    """α_t = final + (α − final)/2 · (1 + cos(π t / T_stop)); ``final_fraction`` after ``stop_step``."""
    if step >= stop_step:
        return final_fraction
    return final_fraction + (drop_fraction - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * step / stop_step))


def topk_indices(score: torch.Tensor, k: int, largest: bool = True) -> torch.Tensor:
    """Indices of the ``k`` largest (or smallest) entries of a 1-D tensor; same set as ``torch.topk``.

    For small ``k`` over big tensors, a threshold estimated on a fixed subsample first narrows the
    candidates (one O(n) comparison), and ``topk`` runs on the survivors only. The answer is exact
    either way: if the survivors are fewer than ``k`` it falls back to the full ``topk``. The subsample
    uses a fixed seed, so the choice is deterministic (identical on every DDP rank).
    """
    n = score.numel()
    if k <= 0:
        return torch.empty(0, dtype=torch.long, device=score.device)
    if n < 1 << 16 or k * 8 > n:
        return torch.topk(score, k, largest=largest, sorted=False).indices
    s = score if largest else -score
    sample_idx = torch.randint(n, (1 << 14,), generator=torch.Generator().manual_seed(0)).to(score.device)
    sample = s[sample_idx].float()
    # keep ~2x the expected fraction (plus a margin) so the k-th value lies above the threshold
    q = max(0.0, 1.0 - 2.0 * k / n - 0.002)
    thr = torch.quantile(sample, q)
    cand = (s >= thr).nonzero().squeeze(1)
    if cand.numel() < k:
        return torch.topk(s, k, sorted=False).indices
    return cand[torch.topk(s[cand], k, sorted=False).indices]


def _grow_scores(
    growth: str, grad: torch.Tensor | None, numel: int, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    if growth == "gradient":
        if grad is None:
            return torch.zeros(numel, device=device)
        return grad.detach().abs().flatten().float()
    if growth == "random":
        return torch.rand(numel, generator=generator).to(device)
    raise ValueError(f"growth={growth!r} is not supported; choose one of {list(GROWTH_MODES)}.")


@torch.no_grad()
def drop_grow(
    weight: torch.Tensor,
    mask: torch.Tensor,
    n_swap: int,
    growth: str = "gradient",
    grad: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer's update: drop ``n_swap`` smallest-|w| active weights, grow ``n_swap`` inactive ones.

    Candidates for growth are all positions inactive after the drop (a just-dropped weight may be
    regrown, as in RigL), restricted to ``allowed`` when given. Returns the new mask; the number of
    active positions is unchanged (unless fewer than ``n_swap`` allowed candidates exist, in which
    case only that many are grown back — the caller sees it in the returned mask).

    Example:
        >>> w = torch.tensor([[0.1, -2.0, 0.0, 0.0]])
        >>> m = torch.tensor([[True, True, False, False]])
        >>> g = torch.tensor([[0.0, 0.0, 5.0, 1.0]])
        >>> drop_grow(w, m, 1, "gradient", g).tolist()
        [[False, True, True, False]]
    """
    flat_m = mask.flatten()
    n_active = int(flat_m.sum())
    n_swap = min(int(n_swap), n_active)
    if n_swap <= 0:
        return mask.clone()
    active_idx = flat_m.nonzero().squeeze(1)
    active_mag = weight.detach().flatten()[active_idx].abs().float()
    new = flat_m.clone()
    new[active_idx[topk_indices(active_mag, n_swap, largest=False)]] = False
    score = _grow_scores(growth, grad, flat_m.numel(), generator, weight.device)
    blocked = new if allowed is None else new | ~allowed.flatten()
    score = score.masked_fill(blocked, float("-inf"))
    n_grow = min(n_swap, flat_m.numel() - int(blocked.sum()))
    new[topk_indices(score, n_grow)] = True
    return new.view_as(mask)


@torch.no_grad()
def global_magnitude_prune(
    weights: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], budget: int
) -> dict[str, torch.Tensor]:
    """Keep the ``budget`` largest-|w| active weights across all layers (one global threshold).

    Masks with at most ``budget`` active weights are returned unchanged (copied).
    """
    names = list(masks)
    active = sum(int(masks[n].sum()) for n in names)
    if active <= budget:
        return {n: masks[n].clone() for n in names}
    scores = torch.cat(
        [torch.where(masks[n], weights[n].detach().abs().float(), -1.0).flatten().cpu() for n in names]
    )
    keep_idx = torch.topk(scores, budget, sorted=False).indices
    flat = torch.zeros_like(scores, dtype=torch.bool)
    flat[keep_idx] = True
    return _split(flat, masks)


@torch.no_grad()
def global_grow(
    masks: Mapping[str, torch.Tensor],
    k: int,
    growth: str = "gradient",
    grads: Mapping[str, torch.Tensor | None] | None = None,
    generator: torch.Generator | None = None,
    allowed: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Activate ``k`` inactive positions across all layers: largest |grad| (or random), one threshold."""
    names = list(masks)
    parts = []
    for n in names:
        m = masks[n]
        s = _grow_scores(growth, (grads or {}).get(n), m.numel(), generator, torch.device("cpu")).cpu()
        blocked = m.flatten().cpu()
        if allowed is not None and n in allowed:
            blocked = blocked | ~allowed[n].flatten().cpu()
        parts.append(torch.where(blocked, -1.0, s))
    scores = torch.cat(parts)
    k = min(int(k), int((scores >= 0).sum()))
    flat = torch.cat([masks[n].flatten().cpu() for n in names])
    if k > 0:
        flat[torch.topk(scores, k, sorted=False).indices] = True
    return _split(flat, masks)


def _split(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for n, m in like.items():
        out[n] = flat[i : i + m.numel()].view_as(m).to(m.device)
        i += m.numel()
    return out


def initial_masks(
    weights: Mapping[str, torch.Tensor], density: float, distribution: str, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random masks with per-layer densities from ``distribution`` and exactly ``round(density × total)``
    kept weights in all, each on its weight's device.

    Example:
        >>> ms = initial_masks({"a": torch.zeros(8, 8), "b": torch.zeros(4, 8)}, 0.25, "uniform", torch.Generator())
        >>> {k: int(m.sum()) for k, m in ms.items()}
        {'a': 16, 'b': 8}
    """
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    counts = layer_counts(layer_densities(shapes, density, distribution), shapes, total=int(round(density * total)))
    return {n: random_mask(shapes[n], counts[n], generator, weights[n].device) for n in shapes}
