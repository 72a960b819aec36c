"""Per-layer densities for a global density target: ``uniform`` and ``ERK`` (Erdős–Rényi-Kernel).

ERK (RigL, Evci et al. 2020): density_l = ε · sum(shape_l) / prod(shape_l). ε is solved so that the
number of kept weights equals ``density × total``; while a layer's density would exceed 1 it is made
dense and ε is solved again over the others (the largest one first, one at a time, as in RigL's
reference implementation). Integer per-layer counts come from :func:`layer_counts`, exact to the weight.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

__all__ = ["Distribution", "erk_densities", "uniform_densities", "layer_densities", "layer_counts"]

Distribution = Literal["uniform", "erk"]
DISTRIBUTIONS = ("uniform", "erk")


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got density={density}.")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """Every layer gets ``density``."""
    _check_density(density)
    return {name: float(density) for name in shapes}


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """ERK densities over exactly these layers.

    ``sum(d_l * numel_l) == density * sum(numel_l)`` up to float rounding; a layer whose ERK density
    would exceed 1 gets 1.0 and ε is re-solved for the rest.

    Example:
        >>> d = erk_densities({"a": (64, 3, 3, 3), "b": (128, 64, 3, 3), "fc": (10, 128)}, 0.1)
        >>> round(sum(d[k] * n for k, n in {"a": 1728, "b": 73728, "fc": 1280}.items()) / 76736, 6)
        0.1
        >>> d["a"] > d["b"]
        True
    """
    _check_density(density)
    if not shapes:
        raise ValueError("erk_densities needs at least one layer shape, got an empty mapping.")
    numel = {k: _numel(s) for k, s in shapes.items()}
    raw = {k: sum(int(x) for x in s) / numel[k] for k, s in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        dense_params = sum(numel[k] for k in dense)
        free = [k for k in shapes if k not in dense]
        if not free:
            return {k: 1.0 for k in shapes}
        eps = (budget - dense_params) / sum(raw[k] * numel[k] for k in free)
        worst = max(free, key=lambda k: raw[k])
        if eps * raw[worst] > 1.0:
            dense.add(worst)
            continue
        out = {k: 1.0 for k in dense}
        out.update({k: eps * raw[k] for k in free})
        return {k: out[k] for k in shapes}


def layer_densities(
    shapes: Mapping[str, Sequence[int]], density: float, distribution: str = "erk"
) -> dict[str, float]:
    """Dispatch on ``distribution`` (``"uniform"`` or ``"erk"``)."""
    if distribution == "uniform":
        return uniform_densities(shapes, density)
    if distribution == "erk":
        return erk_densities(shapes, density)
    raise ValueError(f"distribution={distribution!r} is not supported; choose one of {list(DISTRIBUTIONS)}.")


def layer_counts(densities: Mapping[str, float], shapes: Mapping[str, Sequence[int]], total: int | None = None) -> dict[str, int]:
    """Integer kept-weight counts per layer from densities, at least 1 and at most numel.

    With ``total`` given, counts are adjusted by largest remainder so they add up to exactly ``total``
    (the global budget B); otherwise each is ``round(d * numel)``.

    Example:
        >>> layer_counts({"a": 0.15, "b": 0.25}, {"a": (10, 5), "b": (4, 3)}, total=11)  # 7.5 and 3 weights
        {'a': 8, 'b': 3}
    """
    numel = {k: _numel(shapes[k]) for k in densities}
    exact = {k: min(1.0, max(0.0, densities[k])) * numel[k] for k in densities}
    counts = {k: min(numel[k], max(1, int(math.floor(v)))) for k, v in exact.items()}
    if total is None:
        return {k: min(numel[k], max(1, int(round(v)))) for k, v in exact.items()}
    if not len(counts) <= total <= sum(numel.values()):
        raise ValueError(f"total={total} kept weights is impossible for {len(counts)} layers of {sum(numel.values())} weights.")
    order = sorted(densities, key=lambda k: exact[k] - math.floor(exact[k]), reverse=True)
    diff = total - sum(counts.values())
    while diff != 0:
        changed = False
        for k in order if diff > 0 else reversed(order):
            if diff > 0 and counts[k] < numel[k]:
                counts[k] += 1
                diff -= 1
                changed = True
            elif diff < 0 and counts[k] > 1:
                counts[k] -= 1
                diff += 1
                changed = True
            if diff == 0:
                break
        if not changed:
            break
    return counts
