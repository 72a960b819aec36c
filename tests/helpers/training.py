"""Small deterministic training setups shared by the sparsity tests."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def fixed_loader(n: int = 96, batch_size: int = 16, image_size: int = 8, in_chans: int = 1, seed: int = 0) -> DataLoader:
    """Unshuffled digits (first ``n`` images) so resumed and uninterrupted runs see identical batches."""
    from lightning_sparse.data import DigitsDataModule

    dm = DigitsDataModule(image_size=image_size, max_shift=0, split_seed=seed)
    dm.setup()
    x, y = dm.train_set.base.tensors
    x = x[:n].expand(-1, in_chans, -1, -1).contiguous()
    return DataLoader(TensorDataset(x, y[:n]), batch_size=batch_size, shuffle=False)


def trainer(tmp_path: Any = None, max_steps: int = -1, callbacks: Sequence[pl.Callback] = (),
            **kwargs: Any) -> pl.Trainer:
    """The tests' one Trainer factory: CPU, one device, deterministic, no logger, checkpoint, progress bar or
    model summary; ``default_root_dir`` is ``tmp_path``. Any Trainer argument in ``kwargs`` overrides these."""
    options: dict[str, Any] = dict(
        default_root_dir=None if tmp_path is None else str(tmp_path),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        deterministic=True,
    )
    return pl.Trainer(**{**options, **kwargs})


def out_channels(config: dict[str, dict[str, int]]) -> int:
    """Total output channels of the convolutions in a channel config (``lightning_sparse.slim.channel_config``)."""
    return sum(c["out_channels"] for c in config.values() if "out_channels" in c)


def optimizer_state(trainer: pl.Trainer) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
        for s in trainer.optimizers[0].state.values()
    ]


def assert_equal_nested(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested dicts/lists/tensors (tensors also by dtype); ``path`` names the first difference."""
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_equal_nested(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> ``train/loss`` from every ``version_*/metrics.csv`` of a CLI run directory."""
    out = {}
    for path in run_dir.glob("version_*/metrics.csv"):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out
