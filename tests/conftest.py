from __future__ import annotations

import os

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

# Tests log to W&B only where they check W&B output; everywhere else it is switched off for speed.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


class TinyNet(pl.LightningModule):
    """A small foreign LightningModule (not ImageClassifier): conv -> conv -> linear."""

    def __init__(self, in_chans: int = 1, num_classes: int = 10, width: int = 16, lr: float = 0.05,
                 optimizer: str = "sgd") -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)
        self.lr, self.optimizer = lr, optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(torch.relu(self.stem(x))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class TinyResNet(TinyNet):
    """A narrow timm ResNet (the resnet18 / resnet50 block code, one block per stage) as a LightningModule."""

    def __init__(self, block: str = "basic", in_chans: int = 1, num_classes: int = 10, lr: float = 0.05,
                 optimizer: str = "sgd") -> None:
        pl.LightningModule.__init__(self)
        from timm.models.resnet import BasicBlock, Bottleneck, ResNet

        cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[block]
        self.model = ResNet(cls, [1, 1, 1, 1], num_classes=num_classes, in_chans=in_chans, stem_width=8,
                            channels=(8, 16, 32, 64), zero_init_last=False)
        self.lr, self.optimizer = lr, optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@pytest.fixture
def tiny_net() -> TinyNet:
    pl.seed_everything(0)
    return TinyNet()


@pytest.fixture(scope="session")
def digits_small():
    """Digits at 8 px, batch 32: enough real data for fast training tests."""
    from lightning_sparse.data import DigitsDataModule

    dm = DigitsDataModule(image_size=8, batch_size=32, max_shift=0)
    dm.setup("fit")
    return dm


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device exists, with a settable capability (``fake_gpu.capability``)."""
    from tests.helpers import fake_semi_structured

    return fake_semi_structured.install(monkeypatch)


@pytest.fixture
def few_runs(monkeypatch):
    """Keep the statistics floor out of the way of CPU tests that check the path, not the figures."""
    import lightning_sparse.semi_structured.__main__ as cli
    from lightning_sparse.callbacks import semi_structured as cb_module
    from lightning_sparse.semi_structured import bench

    for mod in (cli, bench, cb_module):
        monkeypatch.setattr(mod, "MIN_RUNS", 2)
