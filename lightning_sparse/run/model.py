"""What loading a run gives: the deployable network, its architecture, input size and N:M layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from lightning_sparse.utils.inputs import example_inputs

__all__ = ["NM", "RunModel"]


@dataclass(frozen=True)
class NM:
    """An N:M pattern: at most ``n`` nonzeros in every group of ``m`` weights.

    Example:
        >>> p = NM(2, 4)
        >>> str(p), p.fraction, NM.parse("1:8")
        ('2:4', 0.5, NM(n=1, m=8))
    """

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m):
            raise ValueError(f"an N:M pattern needs ints 0 < n < m, got n={self.n!r}, m={self.m!r}.")

    @property
    def fraction(self) -> float:
        """``n / m``: the share of the weights (and of their FLOPs) a sparse kernel keeps."""
        return self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str) -> NM:
        """The pattern ``"n:m"`` names."""
        try:
            n, m = (int(v) for v in str(text).split(":"))
        except ValueError:
            raise ValueError(f"an N:M pattern is written 'n:m', e.g. '2:4', got {text!r}.") from None
        return cls(n, m)


@dataclass
class RunModel:
    """A run's deployable network (eval mode) and what is known about it.

    ``nm`` maps the parameter names (of ``model``) whose N:M masks were baked in to their pattern;
    ``masked`` lists those whose unstructured masks (DynamicSparsity, Chase, GMP, one-shot) the stored weights
    hold; ``preprocessing`` is what the model expects of a raw image
    (:func:`lightning_sparse.run.preprocess.run_preprocessing`; ``None`` where it was not looked up).
    """

    model: nn.Module
    arch: str
    num_classes: int
    in_chans: int
    image_size: int
    model_kwargs: dict[str, Any]
    kind: str  # "lightning checkpoint" | "slim export"
    nm: dict[str, NM] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    masked: list[str] = field(default_factory=list)
    preprocessing: dict[str, Any] | None = None
    factory: Callable[[], nn.Module] | None = field(default=None, repr=False, compare=False)  # not timm: builds it

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One sample's shape, ``(C, H, W)``."""
        return (self.in_chans, self.image_size, self.image_size)

    def dense(self) -> nn.Module:
        """A dense model of the same architecture (random weights, eval mode): timm's, or ``factory``'s."""
        if self.factory is not None:
            return self.factory().eval()
        return timm.create_model(
            self.arch, pretrained=False, num_classes=self.num_classes, in_chans=self.in_chans, **self.model_kwargs
        ).eval()

    def example_inputs(self, batch_size: int, seed: int = 0) -> torch.Tensor:
        """A seeded random batch of ``input_shape`` samples."""
        return example_inputs(self.input_shape, batch_size, seed)

    def nm_text(self) -> dict[str, str]:
        """``nm`` with every pattern written ``"n:m"`` (for JSON and the slim export's metadata)."""
        return {name: str(p) for name, p in self.nm.items()}
