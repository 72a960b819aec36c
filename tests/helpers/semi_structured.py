"""Models shared by the 2:4 semi-structured tests."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn


class Mixed(nn.Module):
    """Eligible and ineligible linears, a 3x3 conv and a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc_ok = nn.Linear(64, 32)  # (out=32, in=64): both backends
        self.fc_small_in = nn.Linear(32, 32)  # in=32: cuSPARSELt yes, CUTLASS needs in % 64
        self.fc_odd_in = nn.Linear(30, 32)
        self.head = nn.Linear(64, 10)  # out=10

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 10)
        return self.head(torch.cat([self.fc_ok(x), self.fc_small_in(self.fc_ok(x))], dim=-1))


class MLP(pl.LightningModule):
    """8x8 digits -> 64 -> 128 -> 64 -> 10: every hidden linear 2:4-eligible."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)



def baked_2to4(w: torch.Tensor) -> torch.Tensor:
    """2:4 by magnitude along the last dim, written independently of the package."""
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return (groups * keep).reshape(w.shape)
