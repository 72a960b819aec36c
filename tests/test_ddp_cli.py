"""DDP through the CLI, as users run it: every quickstart config with 2 CPU processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.ddp import assert_equal_across_ranks

ROOT = Path(__file__).resolve().parents[1]
SPARSE_CONFIGS = ["quickstart_rigl.yaml", "quickstart_chase.yaml", "quickstart_nm24.yaml", "quickstart_nm24_ste.yaml"]
# Chase: channels removed every epoch until epoch 2, phase 2 = the last epoch (of 3)
SMALL = {"quickstart_chase.yaml": {"channel_interval_fraction": 1 / 3, "stop_gmp_fraction": 2 / 3,
                                   "stop_dst_fraction": 1 / 3, "update_interval": 2},
         "quickstart_rigl.yaml": {"update_interval": 2}}


@pytest.mark.slow
@pytest.mark.parametrize("config", SPARSE_CONFIGS)
def test_ddp_cli_masks_equal_across_ranks(tmp_path, config):
    cfg = yaml.safe_load((ROOT / "configs" / config).read_text())
    cfg["trainer"].update(max_epochs=3, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2,
                          enable_progress_bar=False, enable_model_summary=False, deterministic=False)
    cfg["sparsity"]["init_args"].update(SMALL.get(config, {}))
    cfg["trainer"]["callbacks"].append({"class_path": "helpers.dump_masks.DumpMasks",
                                        "init_args": {"out_dir": str(tmp_path / "masks")}})
    cfg["model"]["init_args"]["model_name"] = "resnet10t"
    cfg["data"]["init_args"].update(image_size=16, batch_size=32)
    path = tmp_path / config
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(path), "--trainer.strategy=ddp",
         "--trainer.devices=2", "--trainer.accelerator=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    states = [torch.load(tmp_path / "masks" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert_equal_across_ranks(states)
