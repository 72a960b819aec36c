"""Lightning Callbacks that do all mask work. Each works on any LightningModule."""

__all__: list[str] = []
