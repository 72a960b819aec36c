"""A LightningModule that is not ImageClassifier, for tests of tools that load any run."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch import nn


class ConvNet(pl.LightningModule):
    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
