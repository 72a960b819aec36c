"""SR-STE vs vanilla STE: how much the N:M architecture still moves at the end of training (SAD).

The SR-STE paper (Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From
Scratch", arXiv 2102.04010, Sec. 4) defines the sparse architecture divergence SAD = |M_a XOR M_b| and
finds that vanilla STE keeps flipping its N:M masks late in training, while SR-STE's decay of the pruned
weights (grad + λ_W · (1 − M) ⊙ W) makes the masks settle: SR-STE ends with a lower SAD.

This script trains the same model twice on the embedded digits data, with the same seed, data order and
schedule, once with ``NMSparsity(mode="srste")`` and once with ``mode="ste"``; a ``SADTracker`` measures
the N:M masks M(W) every ``--interval`` steps. It prints, per mode, the mean step-to-step SAD (fraction
of N:M-masked weights) over the measurements of the last epoch, the SAD of the final masks vs the first
ones, the running sum, and validation accuracy; then the ratio SR-STE / STE of the last-epoch SAD
(< 1 reproduces the paper's finding).

λ_W: the paper's 2e-4 acts over ~600k ImageNet steps. A digits run has a few hundred steps, so the
default here is larger (``--decay 0.1``) to give the pruned weights a comparable total pull
(lr · λ_W · steps); pass ``--decay 2e-4`` for the paper's value.

    PYTHONPATH=. python benchmarks/sad_srste_vs_ste.py                   # 2:4, resnet18, 16 px, 8 epochs
    PYTHONPATH=. python benchmarks/sad_srste_vs_ste.py --n 1 --m 4 --epochs 12 --decay 2e-4
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import pytorch_lightning as pl

from lightning_sparse.callbacks import SADTracker
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.models import ImageClassifier

MODES = ("srste", "ste")


def run(
    mode: str,
    n: int = 2,
    m: int = 4,
    decay: float = 0.1,
    epochs: int = 8,
    interval: int = 5,
    seed: int = 0,
    model_name: str = "resnet18",
    image_size: int = 16,
    batch_size: int = 64,
    lr: float = 0.1,
    out_dir: str = "runs/sad_srste_vs_ste",
) -> dict[str, Any]:
    """Train once with ``NMSparsity(mode=mode)``; return SAD statistics and accuracy.

    The tracker's figures go to ``<out_dir>/<mode>/figures/*.png``.
    """
    from lightning_sparse.callbacks.nm import NMSparsity

    pl.seed_everything(seed, workers=True)
    dm = DigitsDataModule(image_size=image_size, batch_size=batch_size)
    model = ImageClassifier(model_name, num_classes=10, in_chans=1, lr=lr, warmup_epochs=1)
    tracker = SADTracker(interval=interval)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        default_root_dir=f"{out_dir}/{mode}",
        enable_progress_bar=False, enable_model_summary=False, deterministic=True,
        callbacks=[NMSparsity(n=n, m=m, mode=mode, decay=decay), tracker],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    val_acc = float(trainer.validate(model, datamodule=dm, verbose=False)[0]["val/acc"])

    h = tracker.history
    last_epoch_begins = trainer.global_step - trainer.num_training_batches
    last = [s for step, s in zip(h["step"], h["sad_norm"]) if step > last_epoch_begins]
    if not last:
        raise ValueError(
            f"no SAD measurement in the last epoch: interval={interval} exceeds the "
            f"{trainer.num_training_batches} steps of an epoch."
        )
    return {
        "mode": mode,
        "last_epoch_sad_norm": statistics.fmean(last),
        "last_epoch_sad": sum(s for step, s in zip(h["step"], h["sad"]) if step > last_epoch_begins),
        "final_vs_init_norm": h["sad_vs_init_norm"][-1],
        "cumulative": h["cumulative"][-1],
        "val_acc": val_acc,
        "steps": trainer.global_step,
        "seconds": seconds,
        "history": h,
    }


def compare(**kwargs: Any) -> dict[str, Any]:
    """Run both modes with identical settings; ``ratio`` = SR-STE / STE mean last-epoch SAD."""
    results = {mode: run(mode, **kwargs) for mode in MODES}
    ste = results["ste"]["last_epoch_sad_norm"]
    results["ratio"] = results["srste"]["last_epoch_sad_norm"] / ste if ste else float("inf")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--decay", type=float, default=0.1, help="SR-STE λ_W (STE uses 0)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--interval", type=int, default=5, help="SAD measurement interval in steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-name", default="resnet18")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out-dir", default="runs/sad_srste_vs_ste", help="figures: <out-dir>/<mode>/figures")
    args = parser.parse_args(argv)
    results = compare(**{k.replace("-", "_"): v for k, v in vars(args).items()})
    print(f"\n{args.n}:{args.m} {args.model_name}, {args.epochs} epochs, λ_W={args.decay}, seed {args.seed}")
    print(f"{'mode':>6} {'last-epoch SAD (frac)':>22} {'last-epoch SAD':>15} {'final vs init':>14} "
          f"{'cumulative':>11} {'val acc':>8} {'time s':>7}")
    for mode in MODES:
        r = results[mode]
        print(f"{mode:>6} {r['last_epoch_sad_norm']:>22.3e} {r['last_epoch_sad']:>15d} "
              f"{r['final_vs_init_norm']:>14.4f} {r['cumulative']:>11d} {r['val_acc']:>8.3f} {r['seconds']:>7.1f}")
    print(f"ratio SR-STE / STE of last-epoch SAD: {results['ratio']:.3f} (< 1: SR-STE's masks settle more)")
    return results


if __name__ == "__main__":
    main()
