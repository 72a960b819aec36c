"""Resume as users do it: `train.py fit` is SIGKILLed mid-epoch, then resumed with `--ckpt_path last`.

The resumed run must end with the same masks, channel configuration, weights and per-step metrics as an
uninterrupted run. Checkpoints are written every epoch (the default), so the kill loses the partial epoch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.training import train_losses

ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = {
    "quickstart_rigl.yaml": {"update_interval": 2},
    # channels removed every epoch until epoch 2, phase 2 = the last epoch (of 3)
    "quickstart_chase.yaml": {"update_interval": 2, "channel_interval_fraction": 1 / 3, "stop_gmp_fraction": 2 / 3,
                              "stop_dst_fraction": 1 / 3},
    "quickstart_nm24.yaml": {},
}


def _config(tmp_path: Path, name: str, kill_step: int | None) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    cfg["trainer"].update(max_epochs=3, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2,
                          log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    cfg["sparsity"]["init_args"].update(OVERRIDES[name])
    if kill_step is not None:
        cfg["trainer"]["callbacks"].append({"class_path": "helpers.kill.KillAt", "init_args": {"step": kill_step}})
    cfg["model"]["init_args"]["model_name"] = "resnet10t"
    cfg["data"]["init_args"].update(image_size=16, batch_size=32)
    out = tmp_path / f"{'kill' if kill_step else 'full'}_{name}"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _train(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _state(run_dir: Path) -> tuple[dict, dict]:
    ckpt = torch.load(sorted(run_dir.glob("version_*/checkpoints/last.ckpt"))[-1], weights_only=False)
    return ckpt["state_dict"], {k: v for k, v in ckpt["callbacks"].items() if "Checkpoint" not in k}


def _equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
@pytest.mark.parametrize("config", list(OVERRIDES))
def test_kill_and_resume_matches_uninterrupted(tmp_path, config):
    full_dir, crash_dir = tmp_path / "full", tmp_path / "crash"
    full_dir.mkdir(), crash_dir.mkdir()
    run = yaml.safe_load((ROOT / "configs" / config).read_text())["run_name"]
    assert _train(full_dir, "--config", str(_config(tmp_path, config, None))).returncode == 0
    killed = _train(crash_dir, "--config", str(_config(tmp_path, config, kill_step=6)))  # epoch 2, mid-epoch
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = _train(crash_dir, "--config", str(_config(tmp_path, config, None)), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from runs/" in resumed.stdout + resumed.stderr

    full_w, full_cb = _state(full_dir / "runs" / run)
    res_w, res_cb = _state(crash_dir / "runs" / run)
    assert full_cb.keys() == res_cb.keys() and full_cb
    assert _equal(full_cb, res_cb)  # masks, channel config, counters
    assert _equal(full_w, res_w)
    full_losses, res_losses = train_losses(full_dir / "runs" / run), train_losses(crash_dir / "runs" / run)
    for step in range(8, 12):  # steps after the resume point
        assert res_losses[step] == pytest.approx(full_losses[step], rel=0, abs=0), step
