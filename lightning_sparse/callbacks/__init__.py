"""Lightning Callbacks that do all mask work. Each works on any LightningModule."""

from lightning_sparse.callbacks.nm import NMSparsity

__all__: list[str] = ["NMSparsity"]
