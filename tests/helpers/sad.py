"""Mask sources and data shared by the SADTracker tests."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Subset


def topk_masks(module: pl.LightningModule, density: float = 0.5) -> dict[str, torch.Tensor]:
    """Magnitude top-k mask of every conv weight: changes as the weights train."""
    masks = {}
    for name, p in module.named_parameters():
        if p.dim() == 4:
            k = max(1, int(density * p.numel()))
            idx = p.detach().abs().flatten().topk(k).indices
            masks[name] = torch.zeros(p.numel(), dtype=torch.bool).index_fill_(0, idx, True).view_as(p)
    return masks


class FakeMaskSource(pl.Callback):
    """Explicit masks; every step moves ``swap`` kept positions of each layer elsewhere (seeded)."""

    def __init__(self, density: float = 0.5, swap: int = 3, channels: bool = False) -> None:
        self.density, self.swap, self.channels = density, swap, channels
        self.masks: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, p in pl_module.named_parameters():
            if p.dim() > 1:
                self.masks[name] = torch.rand(p.shape, generator=self.gen) < self.density

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        for m in self.masks.values():
            flat = m.view(-1)
            on, off = flat.nonzero().flatten(), (~flat).nonzero().flatten()
            drop = on[torch.randperm(len(on), generator=self.gen)[: self.swap]]
            grow = off[torch.randperm(len(off), generator=self.gen)[: self.swap]]
            flat[drop], flat[grow] = False, True

    def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return dict(self.masks)

    def active_channels(self, pl_module: pl.LightningModule) -> dict[str, int]:
        if not self.channels:
            return {}
        return {n.removesuffix(".weight"): int(m.flatten(1).any(1).sum()) for n, m in self.masks.items()}


def digits_loader(dm: Any, n: int = 128) -> DataLoader:
    """Fixed order (no shuffle) so that a resumed run sees the same batches as an uninterrupted one."""
    return DataLoader(Subset(dm.train_set, range(n)), batch_size=32, shuffle=False)
