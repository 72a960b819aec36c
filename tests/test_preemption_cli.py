"""Preemption as on a cluster, through ``train.py fit`` in subprocesses (slow).

For RigL, Chase (slimming during training) and 2:4 SR-STE: a run stopped mid-epoch by SIGTERM, or killed
after an ``every_n_train_steps`` checkpoint, or requeued by SLURM, then resumed, ends bitwise equal to
the uninterrupted run: weights, optimizer state, every callback's state (masks, channel configuration,
SAD history) and the per-step train losses. Each test prints one ``RESUME`` line (method, stop step,
checkpoint, max |Δ| of the weights).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.training import assert_equal_nested, train_losses

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCHES = 3, 4  # 12 steps; steps 4-7 are epoch 1
OVERRIDES = {
    "quickstart_rigl.yaml": {"update_interval": 2},
    # channels removed every epoch until epoch 2, phase 2 = the last epoch (of 3)
    "quickstart_chase.yaml": {"update_interval": 2, "channel_interval_fraction": 1 / 3, "stop_gmp_fraction": 2 / 3,
                              "stop_dst_fraction": 1 / 3},
    "quickstart_nm24.yaml": {},
}
SLURM_ENV = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "lightning_sparse",
             "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
             "SLURM_NODELIST": "localhost"}

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, name: str, extra_callbacks: list[dict], tag: str, **trainer) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    cfg["trainer"].update(max_epochs=EPOCHS, limit_train_batches=BATCHES, limit_val_batches=2, limit_test_batches=2,
                          log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False, **trainer)
    cfg["sparsity"]["init_args"].update(OVERRIDES[name])
    cfg["trainer"]["callbacks"] += extra_callbacks
    cfg["model"]["init_args"]["model_name"] = "resnet10t"
    cfg["data"]["init_args"].update(image_size=16, batch_size=32)
    out = tmp_path / f"{tag}_{name}"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _signal(step: int, name: str = "SIGTERM") -> dict:
    return {"class_path": "helpers.signal_at.SignalAt", "init_args": {"step": step, "signal_name": name}}


def _train(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


def _run_dir(cwd: Path, config: str) -> Path:
    return cwd / "runs" / yaml.safe_load((ROOT / "configs" / config).read_text())["run_name"]


def _final(run_dir: Path) -> dict:
    """The last checkpoint of the newest version: weights, optimizer and callback state (not the
    checkpoint callbacks' own bookkeeping, which names paths)."""
    ckpt = torch.load(sorted(run_dir.glob("version_*/checkpoints/last.ckpt"))[-1], weights_only=False)
    callbacks = {k: v for k, v in ckpt["callbacks"].items() if "Checkpoint" not in k}
    return {"weights": ckpt["state_dict"], "optimizer": ckpt["optimizer_states"], "callbacks": callbacks,
            "step": ckpt["global_step"]}


def _max_delta(a: dict, b: dict) -> float:
    return max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()),
               default=0.0)


_FULL: dict[tuple[str, ...], tuple[dict, dict]] = {}


def _full(tmp_path_factory, config: str, *args: str) -> tuple[dict, dict]:
    """The uninterrupted run of ``config`` with ``args`` (once per session). The final ``last.ckpt`` must be
    written at the same point (epoch end, or step end with ``every_n_train_steps``) as the resumed run's."""
    key = (config, *args)
    if key not in _FULL:
        cwd = tmp_path_factory.mktemp("full")
        proc = _train(cwd, "--config", str(_config(cwd, config, [], "full")), *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _FULL[key] = (_final(_run_dir(cwd, config)), train_losses(_run_dir(cwd, config)))
    return _FULL[key]


def _compare(tmp_path_factory, cwd: Path, config: str, stop: str, resumed: subprocess.CompletedProcess,
             *full_args: str) -> None:
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, full_losses = _full(tmp_path_factory, config, *full_args)
    res = _final(_run_dir(cwd, config))
    losses = train_losses(_run_dir(cwd, config))
    assert res["step"] == full["step"] == EPOCHS * BATCHES
    assert full["callbacks"] and res["callbacks"].keys() == full["callbacks"].keys()
    assert_equal_nested(res, full)  # weights, optimizer state, masks, channel configuration, SAD history
    assert sorted(losses) == sorted(full_losses)
    assert all(losses[s] == full_losses[s] for s in losses)  # per-step train losses, bitwise
    source = next(line for line in (resumed.stdout + resumed.stderr).splitlines() if "Resuming from" in line
                  or "Restoring states from the checkpoint path" in line)
    print(f"\nRESUME {config}: {stop}; {source.split('path at ')[-1].split('Resuming from ')[-1]}; "
          f"max|dW|={_max_delta(res['weights'], full['weights'])}")


@pytest.mark.parametrize("config", list(OVERRIDES))
def test_sigterm_mid_epoch_then_resume_last_is_bitwise(tmp_path, tmp_path_factory, config):
    stopped = _train(tmp_path, "--config", str(_config(tmp_path, config, [_signal(6)], "term")))
    assert stopped.returncode == 143 and "SIGTERM at step 7: saved" in stopped.stdout + stopped.stderr, stopped.stderr[-3000:]
    saved = list(_run_dir(tmp_path, config).glob("version_0/checkpoints/interrupted-*.ckpt"))
    assert [p.name for p in saved] == ["interrupted-epoch=001-step=000007.ckpt"]  # mid-epoch 1 (steps 4-7)
    resumed = _train(tmp_path, "--config", str(_config(tmp_path, config, [], "resume")), "--ckpt_path", "last")
    assert "Resuming from runs/" in resumed.stdout + resumed.stderr and "interrupted-" in resumed.stderr + resumed.stdout
    _compare(tmp_path_factory, tmp_path, config, "SIGTERM during step 6 (stopped after step 7 of 12)", resumed)


@pytest.mark.parametrize("config", list(OVERRIDES))
def test_killed_after_every_n_train_steps_checkpoint_resumes_bitwise(tmp_path, tmp_path_factory, config):
    every = ["--last_checkpoint.every_n_train_steps=3"]
    kill = {"class_path": "helpers.kill.KillAt", "init_args": {"step": 8}}
    killed = _train(tmp_path, "--config", str(_config(tmp_path, config, [kill], "kill")), *every)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert torch.load(next(_run_dir(tmp_path, config).glob("version_0/checkpoints/last.ckpt")),
                      weights_only=False)["global_step"] == 6  # mid-epoch 1
    resumed = _train(tmp_path, "--config", str(_config(tmp_path, config, [], "resume")), "--ckpt_path", "last", *every)
    _compare(tmp_path_factory, tmp_path, config, "SIGKILL after step 8, periodic last.ckpt at step 6", resumed, *every)


def test_truncated_newest_checkpoint_falls_back_with_one_warning(tmp_path, tmp_path_factory):
    config = "quickstart_rigl.yaml"
    assert _train(tmp_path, "--config", str(_config(tmp_path, config, [_signal(6)], "term"))).returncode != 0
    ckpts = _run_dir(tmp_path, config) / "version_0" / "checkpoints"
    newest = next(ckpts.glob("interrupted-*.ckpt"))
    newest.write_bytes(newest.read_bytes()[:1000])  # as if the disk filled up while it was copied in
    resumed = _train(tmp_path, "--config", str(_config(tmp_path, config, [], "resume")), "--ckpt_path", "last")
    out = resumed.stdout + resumed.stderr
    warnings = [line for line in out.splitlines() if "the newest checkpoint is unreadable" in line]
    assert len(warnings) == 1 and newest.name in warnings[0] and "last.ckpt" in warnings[0], out[-3000:]
    assert "Resuming from runs/quickstart_rigl/version_0/checkpoints/last.ckpt" in out
    _compare(tmp_path_factory, tmp_path, config, "SIGTERM, newest truncated: epoch-end last.ckpt", resumed)


@pytest.mark.parametrize("config", ["quickstart_rigl.yaml", "quickstart_chase.yaml"])
def test_slurm_requeue_writes_hpc_checkpoint_and_restart_is_bitwise(tmp_path, tmp_path_factory, config):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {**SLURM_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    slurm = ["--config", str(ROOT / "configs" / "slurm" / "requeue.yaml")]
    # SIGUSR1 (sbatch --signal=SIGUSR1@90) during step 5; the time limit's SIGTERM during step 8
    first = _train(tmp_path, "--config", str(_config(tmp_path, config, [_signal(5, "SIGUSR1"), _signal(8)], "slurm")),
                   *slurm, env=env)
    assert first.returncode == 143, first.stderr[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]
    hpc = _run_dir(tmp_path, config) / "version_0/hpc_ckpt_1.ckpt"  # in the run folder, which the requeue continues
    assert torch.load(hpc, weights_only=False)["global_step"] == 6  # written at the end of step 5, mid-epoch 1
    # the requeued job resumes from the HPC checkpoint in the run folder (configs/slurm/train.sbatch passes
    # --ckpt_path last, which here would pick the newer interrupted-*.ckpt of the SIGTERM at step 8)
    second = _train(tmp_path, "--config", str(_config(tmp_path, config, [], "slurm_restart")), *slurm,
                    "--ckpt_path", str(hpc.relative_to(tmp_path)), env={**env, "SLURM_RESTART_COUNT": "1"})
    restored = f"Restoring states from the checkpoint path at {hpc.relative_to(tmp_path)}"
    assert restored in second.stdout + second.stderr, second.stderr[-3000:]
    _compare(tmp_path_factory, tmp_path, config, "SIGUSR1 during step 5 (hpc_ckpt at step 6), SIGTERM during step 8",
             second)
