"""How sparse a model's weights are, counted on the weights themselves and against a stated reference.

The count covers every Conv/Linear/attention weight (:func:`~lightning_sparse.sparsity.targets.candidate_weights`)
and reads nothing but the weights: an N:M layer counts what it holds (2:4 holds 0.50 zeros), and a layer
is "under N:M" when every group of ``m`` along its grouping axis has at most ``n`` nonzeros
(:func:`~lightning_sparse.sparsity.nm.nm_violations` is 0). A slimmed model (channels removed physically, as
Chase does) has fewer weights than the model as built; its count says so and gives both fractions: zeros
among the weights it still has, and zeros plus removed weights among the original model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightning_sparse.sparsity.nm import Layout, is_nm_eligible, nm_violations
from lightning_sparse.sparsity.targets import candidate_weights

__all__ = ["WeightCount", "count_weights"]


@dataclass(frozen=True)
class WeightCount:
    """Zeros among a model's Conv/Linear/attention weights (see the module docstring).

    Attributes:
        zeros: weights that are exactly 0.
        total: weights the model has now.
        original_total: weights of the original model (as built, before slimming); ``None``: not known, the
            model is taken as the original.
        nm: the N:M pattern looked for (``"2:4"``), or ``None``.
        nm_weights: weights in the layers that hold that pattern.
        nm_zeros: zeros among them.

    Example:
        >>> c = WeightCount(zeros=600, total=1000, original_total=4000, nm="2:4", nm_weights=800, nm_zeros=400)
        >>> c.slimmed, c.sparsity, c.sparsity_vs_original, c.nm_sparsity
        (True, 0.6, 0.9, 0.5)
    """

    zeros: int
    total: int
    original_total: int | None = None
    nm: str | None = None
    nm_weights: int = 0
    nm_zeros: int = 0

    @property
    def slimmed(self) -> bool:
        """Whether the model has fewer weights than the original (channels were removed)."""
        return self.original_total is not None and self.original_total != self.total

    @property
    def sparsity(self) -> float:
        """Zeros among the weights the model has now."""
        return self.zeros / self.total if self.total else 0.0

    @property
    def sparsity_vs_original(self) -> float:
        """Zeros and removed weights among the original model's weights (= :attr:`sparsity` when not slimmed)."""
        original = self.original_total if self.slimmed and self.original_total else self.total
        return (self.zeros + original - self.total) / original if original else 0.0

    @property
    def nm_sparsity(self) -> float:
        """Zeros among the weights of the layers under N:M (0.5 for 2:4)."""
        return self.nm_zeros / self.nm_weights if self.nm_weights else 0.0

    def describe(self) -> str:
        """One line: the fraction, what it is counted against, and the N:M layers.

        Example:
            >>> print(*WeightCount(zeros=500, total=1000, nm="2:4", nm_weights=1000, nm_zeros=500).describe().split("; "),
            ...       sep="\\n")
            0.5000 sparse (500 of 1,000 conv/linear weights are 0, counted against the original model)
            2:4 in 1,000 of them: 0.5000 of those are 0
            >>> print(*WeightCount(zeros=600, total=1000, original_total=4000).describe().split("; "), sep="\\n")
            0.6000 sparse against the slimmed model (600 of its 1,000 conv/linear weights are 0)
            0.9000 against the original model (zeros and the 3,000 removed weights among its 4,000)
        """
        if self.slimmed and self.original_total is not None:
            text = (f"{self.sparsity:.4f} sparse against the slimmed model ({self.zeros:,} of its {self.total:,} "
                    f"conv/linear weights are 0); {self.sparsity_vs_original:.4f} against the original model (zeros "
                    f"and the {self.original_total - self.total:,} removed weights among its {self.original_total:,})")
        else:
            text = (f"{self.sparsity:.4f} sparse ({self.zeros:,} of {self.total:,} conv/linear weights are 0, "
                    "counted against the original model)")
        if self.nm is not None:
            text += (f"; {self.nm} in {self.nm_weights:,} of them: {self.nm_sparsity:.4f} of those are 0" if self.nm_weights
                     else f"; no layer holds the {self.nm} pattern")
        return text


@torch.no_grad()
def count_weights(model: nn.Module, original_total: int | None = None, nm: tuple[int, int] | None = None,
                  layout: Layout = "input_channels") -> WeightCount:
    """Count the zeros among ``model``'s Conv/Linear/attention weights.

    Args:
        model: any module.
        original_total: the number of those weights in the original model (e.g. ``count_weights(model).total``
            before it was slimmed); ``None``: ``model`` is the original.
        nm: ``(n, m)``: also count the layers that hold the N:M pattern (every group of ``m`` along the grouping
            axis of ``layout`` has at most ``n`` nonzeros).
        layout: the N:M grouping, ``"input_channels"`` or ``"flattened"``.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
        >>> _ = net[0].weight.data.copy_(torch.tensor([[1.0, 0.0, 2.0, 0.0] * 2] * 4))
        >>> c = count_weights(net, nm=(2, 4))
        >>> (c.zeros, c.total, c.nm_weights, c.nm_zeros)
        (16, 40, 32, 16)
    """
    params = dict(model.named_parameters())
    zeros = total = nm_weights = nm_zeros = 0
    for name in candidate_weights(model):
        w = params[name].detach()
        z = w.numel() - int(torch.count_nonzero(w))
        zeros, total = zeros + z, total + w.numel()
        if nm is not None and is_nm_eligible(w, nm[1], layout) and nm_violations(w, nm[0], nm[1], layout) == 0:
            nm_weights, nm_zeros = nm_weights + w.numel(), nm_zeros + z
    return WeightCount(zeros, total, original_total, None if nm is None else f"{nm[0]}:{nm[1]}", nm_weights, nm_zeros)
