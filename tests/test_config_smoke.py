"""Every config under configs/ smoke-runs through train.py under ``fast_dev_run`` on FakeDataModule (CPU, 32 px),
and every sparsity mechanism it configures runs once: a mask update, a channel removal with slimming, an N:M
step, a SAD measurement.

Configs are found by glob, so a new config is covered without editing this file. A config that is not an
experiment on its own (an N:M file that needs the shared SR-STE base first) runs with the config list of the
first ``python train.py`` command in its header that names it. configs/slurm holds SLURM add-ons, not
training configs. The evidence comes from what the run logged (a recording logger, since ``fast_dev_run``
replaces the loggers) and from the model itself (parameter count, zero patterns, the weights the forward
saw), recorded by ``tests/helpers/smoke_recorder.py``, never from the callbacks' own flags.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
NOT_TRAIN_CONFIGS = {"slurm"}
# one per callback, run by default: DynamicSparsity (+ SADTracker), Chase (the paper config), NMSparsity (+ SADTracker)
FAST = {"quickstart_rigl.yaml", "imagenet_resnet50_chase.yaml", "quickstart_nm24.yaml"}
METHODS = ("DynamicSparsity", "Chase", "NMSparsity", "SADTracker")
TINY_MODELS = {"resnet18", "resnet10t", "vit_tiny_patch16_224", None}  # the ViT quickstart is narrowed to width 64


def _header_commands(path: Path) -> list[list[Path]]:
    """The ``--config`` lists of the ``python train.py`` commands in a config's comment header."""
    commands = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if "train.py" in line:
            found = [ROOT / c for c in re.findall(r"--config[ =](\S+\.yaml)", line)]
            if found:
                commands.append(found)
    return commands


def _smoke_commands() -> dict[str, list[Path]]:
    """``{config path relative to configs/: the config list to run it with}``, one entry per distinct list."""
    out: dict[str, list[Path]] = {}
    seen: set[tuple[Path, ...]] = set()
    for path in sorted(CONFIGS.rglob("*.yaml")):
        rel = path.relative_to(CONFIGS)
        if rel.parts[0] in NOT_TRAIN_CONFIGS:
            continue
        configs = next((c for c in _header_commands(path) if path in c), [path])
        if tuple(configs) not in seen:
            seen.add(tuple(configs))
            out[str(rel)] = configs
    return out


COMMANDS = _smoke_commands()


def _callbacks(configs: list[Path]) -> set[str]:
    """Callback class names the config list sets up (the last file that sets callbacks wins, as in the CLI)."""
    names: set[str] = set()
    for path in configs:
        text = yaml.safe_load(path.read_text()) or {}
        found = json.dumps(text)
        classes = set(re.findall(r'"class_path": "[\w.]+\.(\w+)"', found))
        if any(c in METHODS for c in classes):
            names = {c for c in classes if c in METHODS}
    return names


def _model_name(configs: list[Path]) -> str | None:
    name = None
    for path in configs:
        model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
        name = (model.get("init_args") or {}).get("model_name", name)
    return name


def _smoke(configs: list[Path], tmp_path: Path) -> dict:
    record = tmp_path / "record.json"
    argv = [sys.executable, str(ROOT / "train.py"), "fit"]
    for c in configs:
        argv += ["--config", str(c)]
    argv += [
        "--data", "lightning_sparse.data.FakeDataModule", "--data.init_args.image_size=32",
        "--data.init_args.batch_size=4", "--data.init_args.num_samples=16",
        "--trainer.fast_dev_run=2", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
        "--trainer.precision=32-true", "--trainer.callbacks+=tests.helpers.smoke_recorder.SmokeRecorder",
        "--run_name=smoke",
    ]
    if "checkpoint_path" in "".join(c.read_text() for c in configs):  # a second stage: train from scratch here
        argv.append("--model.init_args.checkpoint_path=null")
    if _model_name(configs) not in TINY_MODELS:  # ImageNet ResNet-50 recipes: the same code path, a smaller net
        argv.append("--model.init_args.model_name=resnet18")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SMOKE_RECORD=str(record), WANDB_MODE="offline")
    out = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert out.returncode == 0, f"{' '.join(argv)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    rec = json.loads(record.read_text())
    rec["stderr"] = out.stderr
    return rec


def _logged(rec: dict, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in rec["metrics"] if key in row}


def _check_mechanisms(rec: dict, callbacks: set[str]) -> None:
    if "DynamicSparsity" in callbacks:
        assert _logged(rec, "dst/regrown").get(1, 0) > 0, "one DST mask update at the smoke run's last step"
        assert rec["zero_flips"] > 0, "a mask update drops weights to exactly 0 and grows zero weights"
    if "Chase" in callbacks:
        assert _logged(rec, "dst/regrown"), "a Chase DST update"
        channels = _logged(rec, "channels/global_fraction")
        assert channels and min(channels.values()) < 1.0, "a channel removal"
        assert rec["params_end"] < rec["params_start"], "the removed channels are sliced out (slimming)"
    if "NMSparsity" in callbacks:
        assert rec["nm_layers"], "the training forward saw N:M-sparse weights"
    if "SADTracker" in callbacks:
        assert sorted(_logged(rec, "sad/global")) == [0, 1], "a SAD measurement after each step"
    assert "Traceback" not in rec["stderr"]


def test_every_config_is_collected() -> None:
    files = {str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml") if p.parent.name not in NOT_TRAIN_CONFIGS}
    covered = {str(c.relative_to(CONFIGS)) for configs in COMMANDS.values() for c in configs}
    assert files <= covered, files - covered
    assert FAST <= set(COMMANDS)
    assert {m for f in FAST for m in _callbacks(COMMANDS[f])} == set(METHODS)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in COMMANDS]
)
def test_config_smoke_run(name: str, tmp_path: Path) -> None:
    configs = COMMANDS[name]
    rec = _smoke(configs, tmp_path)
    callbacks = _callbacks(configs)
    _check_mechanisms(rec, callbacks)
    for method in callbacks - {"SADTracker"}:
        assert f"{method}: fast_dev_run" in rec["stderr"] or method == "NMSparsity", "one info line per compression"
