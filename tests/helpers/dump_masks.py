"""A callback that writes every rank's masks (from all MaskSource callbacks) to ``<out_dir>/rank<r>.pt``."""

from pathlib import Path

import pytorch_lightning as pl
import torch


class DumpMasks(pl.Callback):
    def __init__(self, out_dir: str) -> None:
        self.out = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        masks = {}
        for cb in trainer.callbacks:
            if hasattr(cb, "current_masks") and cb is not self:
                masks.update({k: v.cpu() for k, v in cb.current_masks(pl_module).items()})
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save({"masks": masks, "shapes": {k: tuple(p.shape) for k, p in pl_module.named_parameters()}},
                   self.out / f"rank{trainer.global_rank}.pt")
