"""What ``train.py`` prints at the end of a run (rank zero), and what it needs to say it.

The summary is a few lines: the run directory, the best and last checkpoints, the figures folder, the W&B
offline folder with its ``wandb sync`` command, the final test accuracy, the sparsity of the weights and the
model's forward FLOPs (``torch.utils.flop_counter``). Everything is read from the trainer, the model and
the files on disk, not from a callback's bookkeeping: the sparsity counts the zeros in the model's weights
(:func:`~lightning_sparse.sparsity.counting.count_weights`), an N:M layer at what it holds (2:4: 0.50), and a
slimmed model both against itself and against the original model as built.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from lightning_sparse.callbacks import MaskSource
from lightning_sparse.sparsity.counting import WeightCount, count_weights
from lightning_sparse.sparsity.targets import candidate_weights
from lightning_sparse.utils.inputs import example_inputs

__all__ = ["weight_sparsity", "weight_count", "forward_flops", "summary_lines", "example_input", "silence_known_warnings"]

# third-party messages that say nothing about the run (the CLI filters them; library code does not)
KNOWN_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # torch pytree deprecation inside Lightning
    r".*is called with Trainer configured with multiple `ModelCheckpoint`",  # the CLI passes the best path itself
    r".*was deprecated in v4\.\d+\.\d+ and will be removed",  # jsonargparse deprecations inside LightningCLI
    r".*parameter was deprecated in v4\.\d+\.\d+",
    r".*The dirpath has changed from",  # evaluating a checkpoint restores its ModelCheckpoint state elsewhere
)


class _DropTips:
    """A logging filter for Lightning's advertising lines ("💡 Tip: ... litlogger / litmodels")."""

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith("💡 Tip")


def silence_known_warnings() -> None:
    """Filter the known third-party noise of a ``train.py`` run (called by the CLI only)."""
    import logging

    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning", "lightning.pytorch", "pytorch_lightning.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())


def example_input(model: nn.Module, datamodule: Any) -> torch.Tensor | None:
    """A one-image batch ``(1, in_chans, size, size)`` from the DataModule's ``image_size`` and the model's
    ``in_chans`` (what Lightning's model summary needs to count FLOPs), or None if either is unknown."""
    size = getattr(datamodule, "image_size", None)
    hparams = getattr(model, "hparams", {}) or {}
    chans = hparams.get("in_chans") if hasattr(hparams, "get") else None
    if not isinstance(size, int) or not isinstance(chans, int):
        return None
    return example_inputs((chans, size, size), seed=0)  # own generator: the global RNG stays untouched


def weight_sparsity(model: nn.Module) -> tuple[float, int, int]:
    """``(fraction of zeros, zeros, total)`` over every conv/linear/attention weight of ``model``."""
    params = dict(model.named_parameters())
    names = candidate_weights(model)
    total = sum(params[n].numel() for n in names)
    zeros = sum(int((params[n].detach() == 0).sum()) for n in names)
    return (zeros / total if total else 0.0), zeros, total


def weight_count(trainer: pl.Trainer, model: nn.Module, original_total: int | None = None) -> WeightCount:
    """The zeros of ``model``'s conv/linear weights (:func:`~lightning_sparse.sparsity.counting.count_weights`);
    the N:M pattern looked for is the one a mask source on ``trainer.callbacks`` declares (``describe()``),
    and ``original_total`` is the weight count of the model as built (the CLI records it before the run)."""
    nm, layout = None, "input_channels"
    for cb in trainer.callbacks:
        info = cb.describe() if isinstance(cb, MaskSource) else None
        if info is not None and info.n is not None and info.m is not None:
            nm, layout = (info.n, info.m), getattr(cb, "layout", "input_channels")
            break
    return count_weights(model, original_total=original_total, nm=nm, layout=layout)


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Dense forward FLOPs of ``model`` on ``x`` (``torch.utils.flop_counter``; 2 per multiply-add)."""
    from lightning_sparse.slim.flops import count_flops

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return count_flops(model, x.to(device))


def _wandb_dirs(trainer: pl.Trainer) -> list[Path]:
    from pytorch_lightning.loggers import WandbLogger

    out = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            run_dir = getattr(logger.experiment, "dir", None)  # <save_dir>/wandb/offline-run-*/files
            if run_dir and getattr(logger.experiment.settings, "mode", "") == "offline":
                out.append(Path(run_dir).parent)
    return out


def _fmt_flops(flops: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}FLOPs"
    return f"{flops} FLOPs"


def summary_lines(trainer: pl.Trainer, model: nn.Module, example: torch.Tensor | None, fitted: bool = True,
                  original_total: int | None = None) -> list[str]:
    """The end-of-run summary of ``train.py`` (see module docstring); ``fitted``: this run trained (lists the
    checkpoints it wrote), else it evaluated ``trainer.ckpt_path``; ``original_total``: the conv/linear
    weights of the model as built, before any slimming (``None``: ``model`` is taken as built)."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    lines = []
    if trainer.log_dir:
        lines.append(f"run directory:   {trainer.log_dir}")
    ckpts = [cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    best = next((cb.best_model_path for cb in ckpts if cb.monitor and cb.best_model_path), "")
    last = ""
    for cb in ckpts:  # the unmonitored one writes last.ckpt (the CLI's ``last_checkpoint``)
        path = cb.last_model_path or (Path(cb.dirpath or "") / f"{cb.filename}{cb.FILE_EXTENSION}" if not cb.monitor else "")
        if path and Path(path).is_file():
            last = str(path)
    if fitted and (best or last):
        lines.append(f"checkpoints:     best {best or '-'} | last {last or '-'}")
    if trainer.state.fn != "fit" and trainer.ckpt_path:
        lines.append(f"evaluated:       {trainer.ckpt_path}")
    figures = Path(trainer.log_dir or "") / "figures"
    if trainer.log_dir and figures.is_dir() and any(figures.iterdir()):
        lines.append(f"figures:         {figures}")
    for run in _wandb_dirs(trainer):
        lines.append(f"W&B (offline):   {run}  ->  upload: wandb sync {run}")
    metrics = trainer.callback_metrics
    scores = [f"{k} {float(metrics[k]):.4f}" for k in ("test/acc", "val/acc") if k in metrics]
    if scores:
        lines.append("accuracy:        " + ", ".join(scores[:1]))
    text = f"weights:         {weight_count(trainer, model, original_total).describe()}"
    if example is not None:
        text += f"; forward {_fmt_flops(forward_flops(model, example))} dense-equivalent at {tuple(example.shape)}"
    lines.append(text)
    return lines
