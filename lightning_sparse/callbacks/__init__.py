"""Lightning Callbacks that do all mask work. Each works on any LightningModule."""

from lightning_sparse.callbacks._base import MaskSource
from lightning_sparse.callbacks.chase import Chase
from lightning_sparse.callbacks.dst import DynamicSparsity
from lightning_sparse.callbacks.nm import NMSparsity
from lightning_sparse.callbacks.semi_structured import SemiStructuredBenchmark

__all__ = ["Chase", "DynamicSparsity", "MaskSource", "NMSparsity", "SemiStructuredBenchmark"]
