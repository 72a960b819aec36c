"""A tiny transformer language model (nn.TransformerEncoder: MultiheadAttention's in_proj_weight and
out_proj, fused fast path in eval) and its token data, for tests of callbacks on transformers."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

VOCAB, DIM, SEQ = 32, 16, 8


class TinyLM(pl.LightningModule):
    """Embedding -> 2 TransformerEncoderLayers (MultiheadAttention reads out_proj.weight itself; in eval the
    layers take the fused fast path) -> linear head. Records the logits each step computes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        layer = nn.TransformerEncoderLayer(DIM, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(DIM, VOCAB)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.seen.append((x, logits.detach().clone()))
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    def validation_step(self, batch, batch_idx):
        self.seen.append((batch[0], self(batch[0]).clone()))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def tokens(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return DataLoader(TensorDataset(x, x.roll(1, dims=1)), batch_size=8)
