"""Train a small model with 2-process DDP (gloo, CPU) and save every rank's masks.

    python tests/scripts/ddp_masks.py <method> <out_dir>

<method> names a sparsity callback factory below; each rank writes <out_dir>/rank<r>.pt with its masks.
Used by the DDP tests (each rank sees different data, so equal masks prove the decisions are synced).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from conftest import TinyNet, TinyResNet


def make_callback(method: str) -> pl.Callback:
    if method == "dst_rigl":
        from lightning_sparse.callbacks import DynamicSparsity

        return DynamicSparsity(density=0.2, update_interval=2, stop_step=12, growth="gradient")
    if method == "dst_set":
        from lightning_sparse.callbacks import DynamicSparsity

        return DynamicSparsity(density=0.2, update_interval=2, stop_step=12, growth="random")
    if method == "gmp":
        from lightning_sparse.callbacks import GradualMagnitudePruning

        return GradualMagnitudePruning(density=0.2, update_interval=2, stop_step=12, sparse_first_last=True)
    if method == "nm":
        from lightning_sparse.callbacks import NMSparsity

        return NMSparsity(n=2, m=4)
    if method == "chase":
        from lightning_sparse.callbacks import Chase

        return Chase(density=0.2, channel_sparsity=0.5, update_interval=2, channel_interval_epochs=1,
                     stop_gmp_epochs=3, stop_dst_epochs=1, minimum_ratio=0.5, input_shape=(1, 8, 8))
    if method == "chase_residual":
        from lightning_sparse.callbacks import Chase

        return Chase(density=0.1, channel_sparsity=0.5, update_interval=2, channel_interval_epochs=1,
                     stop_gmp_epochs=3, stop_dst_epochs=1, minimum_ratio=0.5, input_shape=(1, 8, 8),
                     residual_channels=True)
    raise SystemExit(f"unknown method {method!r}")


class IterationCheck(pl.Callback):
    """Around every iteration whose masks change: grown connections end at 0 with zeroed optimizer state, and
    (RigL) nothing else moved, since the update replaces the optimizer step. Counts violations per rank."""

    def __init__(self, source: pl.Callback, skips_step: bool) -> None:
        self.source, self.skips_step = source, skips_step
        self.pre: tuple | None = None
        self.updates = self.violations = 0

    def _snap(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        return ({n: p.detach().clone() for n, p in pl_module.named_parameters()},
                {n: opt.state[p]["momentum_buffer"].clone() for n, p in pl_module.named_parameters()
                 if "momentum_buffer" in opt.state.get(p, {})},
                {k: v.clone() for k, v in self.source.current_masks(pl_module).items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.pre = self._snap(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        (w0, _, m0), (w1, s1, m1) = self.pre, self._snap(trainer, pl_module)
        if m0.keys() != m1.keys() or any(m0[k].shape != m1[k].shape or not torch.equal(m0[k], m1[k]) for k in m1):
            if any(m0[k].shape != m1[k].shape for k in m1 if k in m0):
                return  # a slimming changed the shapes: not a plain mask update
            self.updates += 1
            for k in m1:
                grown = m1[k] & ~m0[k]
                self.violations += int(w1[k][grown].count_nonzero()) + int(s1.get(k, w1[k])[grown].count_nonzero())
            if self.skips_step:
                for k in w0:
                    stay = (m0[k] & m1[k]) if k in m1 else torch.ones_like(w0[k], dtype=torch.bool)
                    self.violations += int((w1[k][stay] != w0[k][stay]).sum())


class SaveMasks(pl.Callback):
    def __init__(self, source: pl.Callback, out: Path, check: IterationCheck) -> None:
        self.source, self.out, self.check = source, out, check

    def on_train_end(self, trainer, pl_module):
        masks = {k: v.cpu() for k, v in self.source.current_masks(pl_module).items()}
        removed = getattr(self.source, "removed", None)
        torch.save({"masks": masks, "removed": removed, "shapes": {k: tuple(p.shape) for k, p in pl_module.named_parameters()},
                    "weights": {k: p.detach().cpu().clone() for k, p in pl_module.named_parameters()},
                    "updates": self.check.updates, "violations": self.check.violations},
                   self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    method, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(128, 1, 8, 8, generator=g), torch.randint(0, 10, (128,), generator=g))
    cb = make_callback(method)
    check = IterationCheck(cb, skips_step=method == "dst_rigl")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, check, SaveMasks(cb, out, check)],
    )
    model = TinyResNet("basic") if method == "chase_residual" else TinyNet()
    trainer.fit(model, DataLoader(data, batch_size=16, shuffle=True))


if __name__ == "__main__":
    main()
