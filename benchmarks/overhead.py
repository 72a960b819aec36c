"""Train-step time with DynamicSparsity ÷ dense, same model and data, measured side by side.

Arms alternate in rounds (dense, sparse, dense, sparse, ...); each round is a fresh Trainer running
``update_interval + 1`` steps, so every sparse round contains exactly one mask update at step ΔT — the
same amortisation as a long run. Step time = on_train_batch_start → on_train_batch_end (forward,
backward, optimizer step and every callback hook). Reports medians and their ratio.

    python benchmarks/overhead.py                       # resnet18, digits 32 px, batch 64, ΔT = 100
    python benchmarks/overhead.py --model resnet50 --image-size 64 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import pytorch_lightning as pl
import torch

from lightning_sparse.callbacks import DynamicSparsity
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import ImageClassifier


class StepTimer(pl.Callback):
    def __init__(self, skip: int = 3) -> None:
        self.times: list[float] = []
        self.skip, self._t0 = skip, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.skip:
            self.times.append(time.perf_counter() - self._t0)


def run_round(args: argparse.Namespace, sparse: bool) -> list[float]:
    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(args.model, num_classes=10, in_chans=1)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if sparse:
        callbacks.insert(0, DynamicSparsity(density=args.density, update_interval=args.update_interval,
                                            stop_step=10**9, growth="gradient"))
    trainer = pl.Trainer(
        max_steps=args.update_interval + 1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, limit_val_batches=0,
    )
    dm = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size)
    trainer.fit(model, dm)
    return timer.times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--update-interval", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    dense: list[float] = []
    sparse: list[float] = []
    for _ in range(args.rounds):
        dense += run_round(args, sparse=False)
        sparse += run_round(args, sparse=True)
    d, s = statistics.mean(dense), statistics.mean(sparse)
    print(f"{args.model} @ {args.image_size}px, batch {args.batch_size}, ΔT={args.update_interval}, "
          f"density {args.density}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    print(f"dense  step: mean {d * 1e3:.1f} ms (median {statistics.median(dense) * 1e3:.1f})")
    print(f"sparse step: mean {s * 1e3:.1f} ms (median {statistics.median(sparse) * 1e3:.1f}), one RigL update per ΔT steps")
    print(f"overhead ratio (mean sparse / mean dense): {s / d:.3f}")


if __name__ == "__main__":
    main()
