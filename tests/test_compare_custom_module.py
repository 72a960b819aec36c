"""``compare`` measures a run of a LightningModule of the user's own (built from the run's config.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from helpers.custom_module import ConvNet
from lightning_sparse.compare import compare


def _run_dir(root: Path, model: ConvNet, config: dict) -> Path:
    run = root / "runs" / "custom" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.csv").write_text("epoch,step,test/acc\n0,3,0.5\n")
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(run / "checkpoints" / "last.ckpt")
    return run


def test_a_run_of_another_lightning_module_is_measured(tmp_path):
    torch.manual_seed(0)
    model = ConvNet(width=6)
    config = {"model": {"class_path": "helpers.custom_module.ConvNet", "init_args": {"width": 6}},
              "data": {"class_path": "lightning_sparse.data.DigitsDataModule", "init_args": {"image_size": 16}}}
    run = _run_dir(tmp_path, model, config)
    (row,) = compare([str(run)], out=str(tmp_path / "out"), timing=False)
    with FlopCounterMode(display=False) as counter:  # counted here, independently of the package
        ConvNet(width=6)(torch.zeros(1, 1, 16, 16))
    assert row["flops"] == counter.get_total_flops()
    assert row["params"] == sum(p.numel() for p in model.parameters())
    assert row["test_acc"] == 0.5


def test_a_run_of_another_module_without_a_model_class_path_is_refused(tmp_path):
    run = _run_dir(tmp_path, ConvNet(), {"data": {"class_path": "lightning_sparse.data.DigitsDataModule"}})
    with pytest.raises(ValueError, match=r"no config.yaml next to it naming its model's class_path"):
        compare([str(run)], out=str(tmp_path / "out"), timing=False)
