"""A run is its folder, as a newcomer uses it through ``train.py`` (subprocesses).

- fit, stopped by SIGTERM, ``fit --ckpt_path last`` and ``test --ckpt_path best`` with no ``--config``: one version
  folder, one continuous ``metrics.csv``, one W&B run id, ModelCheckpoint's best carried across the stop;
- ``train.py --config ... --ckpt_path last`` (fit, then test) ends with the same ``metrics.csv`` as the
  uninterrupted run, and tests the same best checkpoint;
- a run folder moved elsewhere resumes in its new place; ``latest`` follows the newest version;
- a start that fails before its first training step leaves no folder and no W&B run.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_sparse.run.folder import expand_latest, run_folder_of, update_latest, wandb_run_id

ROOT = Path(__file__).resolve().parents[1]
STOP_AT = 6  # mid-epoch 1 of 3 (4 batches per epoch)


def _config(cwd: Path, name: str = "qs") -> Path:
    cfg = yaml.safe_load((ROOT / "configs/quickstart.yaml").read_text())
    cfg["run_name"] = name
    cfg["trainer"].update(max_epochs=3, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2,
                          log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False)
    # SIGTERM at STOP_AT while $STOP_ONCE is set: the run's recorded config resumes without stopping again
    cfg["trainer"]["callbacks"] = [{"class_path": "helpers.signal_at.SignalAt",
                                    "init_args": {"step": STOP_AT, "only_if_env": "STOP_ONCE"}}]
    cfg["model"]["init_args"]["model_name"] = "resnet10t"
    cfg["data"]["init_args"].update(image_size=16, batch_size=32)
    path = cwd / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(cwd: Path, *args: str, stop: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    env.pop("STOP_ONCE", None)
    if stop:
        env["STOP_ONCE"] = "1"
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _ok(proc: subprocess.CompletedProcess, rc: int = 0) -> subprocess.CompletedProcess:
    assert proc.returncode == rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _losses(rows: list[dict[str, str]]) -> list[tuple[int, str]]:
    return [(int(r["step"]), r["train/loss"]) for r in rows if r.get("train/loss")]


def _wandb_ids(folder: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[1] for p in (folder / "wandb").glob("offline-run-*")}


def _model_checkpoint_state(ckpt: Path) -> dict:
    states = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    return next(v for k, v in states.items() if k.startswith("ModelCheckpoint{'monitor': 'val/acc'"))


def test_newcomer_sequence_one_folder(tmp_path: Path) -> None:
    config = _config(tmp_path)
    stopped = _ok(_train(tmp_path, "fit", "--config", str(config), stop=True), 128 + 15)
    assert "resume with --ckpt_path last" in stopped.stderr + stopped.stdout
    run = tmp_path / "runs/qs"
    assert (run / "latest").is_symlink() and os.readlink(run / "latest") == "version_0"
    before = _rows(run / "version_0/metrics.csv")
    assert max(s for s, _ in _losses(before)) == STOP_AT  # the step SIGTERM arrived in completed

    _ok(_train(tmp_path, "fit", "--run_name", "qs", "--ckpt_path", "last"))  # no --config: the run's own
    assert sorted(p.name for p in run.iterdir()) == ["latest", "version_0"]
    folder = run / "version_0"
    rows = _rows(folder / "metrics.csv")
    assert rows[: len(before)] == before  # appended, not rewritten
    assert [s for s, _ in _losses(rows)] == list(range(12))  # every step once, in order
    ids = _wandb_ids(folder)
    assert len(ids) == 1 and len(list((folder / "wandb").glob("offline-run-*"))) == 2, ids  # one run, resumed
    assert wandb_run_id(folder) in ids
    best = _model_checkpoint_state(folder / "checkpoints/last.ckpt")
    val = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val) == 3 and float(best["best_model_score"]) == max(val)  # best tracked across the stop
    assert (tmp_path / best["best_model_path"]).is_file()

    assert yaml.safe_load((folder / "config.yaml").read_text())["ckpt_path"] is None  # run again: a new run
    tested = _ok(_train(tmp_path, "test", "--run_name", "qs", "--ckpt_path", "best"))
    assert "Reading the run's config" in tested.stderr + tested.stdout
    assert sorted(p.name for p in run.iterdir()) == ["latest", "version_0"]
    test_rows = _rows(folder / "test/version_0/metrics.csv")
    assert any(r.get("test/acc") for r in test_rows)
    assert _rows(folder / "metrics.csv") == rows  # evaluating leaves the run's own metrics as they were


@pytest.mark.slow
def test_resumed_fit_then_test_equals_uninterrupted(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = _ok(_train(tmp_path / "a", "--config", str(_config(tmp_path / "a"))))
    config = _config(tmp_path / "b")
    _ok(_train(tmp_path / "b", "--config", str(config), stop=True), 128 + 15)
    resumed = _ok(_train(tmp_path / "b", "--config", str(config), "--ckpt_path", "last"))
    a, b = (_rows(d / "runs/qs/version_0/metrics.csv") for d in (tmp_path / "a", tmp_path / "b"))
    assert _losses(a) == _losses(b)
    assert [r for r in a if r.get("test/acc")] == [r for r in b if r.get("test/acc")]  # the same best, tested
    assert [r for r in a if r.get("val/acc")] == [r for r in b if r.get("val/acc")]
    assert "test/acc" in full.stdout and "test/acc" in resumed.stdout
    assert not (tmp_path / "b/runs/qs/version_1").exists()


@pytest.mark.slow
def test_moved_run_resumes_in_its_new_place(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _ok(_train(tmp_path, "fit", "--config", str(config), stop=True), 128 + 15)
    moved = tmp_path / "elsewhere/renamed"
    moved.parent.mkdir()
    (tmp_path / "runs/qs").rename(moved)
    _ok(_train(tmp_path, "fit", "--ckpt_path", str(moved / "latest/checkpoints/last.ckpt")))
    assert not (tmp_path / "runs/qs").exists()
    folder = moved / "version_0"
    rows = _rows(folder / "metrics.csv")  # resumed from last.ckpt (end of epoch 0): that epoch's rows stay
    assert [s for s, _ in _losses(rows)] == list(range(12))
    assert [r["step"] for r in rows if r.get("train/acc")] == [r["step"] for r in rows if r.get("val/acc")] == \
        ["3", "7", "11"]
    best = _model_checkpoint_state(folder / "checkpoints/last.ckpt")
    assert (tmp_path / best["best_model_path"]).parent.resolve() == (folder / "checkpoints").resolve()
    assert all((tmp_path / p).is_file() for p in best["best_k_models"])


@pytest.mark.slow
def test_failed_start_leaves_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    _ok(_train(tmp_path, "fit", "--config", str(config), "--trainer.max_epochs=1"))
    # a schedule that cannot fit fails in setup, after the folder and the W&B run were started
    bad = _ok(_train(tmp_path, "fit", "--config", str(config), "--sparsity=lightning_sparse.callbacks.Chase",
                     "--sparsity.density=0.1", "--sparsity.stop_gmp_epochs=8"), 2)
    assert "Removed" in bad.stderr and "before its first training step" in bad.stderr
    run = tmp_path / "runs/qs"
    assert sorted(p.name for p in run.iterdir()) == ["latest", "version_0"]
    assert os.readlink(run / "latest") == "version_0"


def test_latest_link_and_text_fallback(tmp_path: Path) -> None:
    name = tmp_path / "runs/x"
    for v in (0, 2, 10):
        (name / f"version_{v}/checkpoints").mkdir(parents=True)
        (name / f"version_{v}/config.yaml").write_text("run_name: x\n")
        (name / f"version_{v}/metrics.csv").write_text("step\n")
    assert update_latest(name) == name / "version_10"
    assert os.readlink(name / "latest") == "version_10"
    ckpt = name / "latest/checkpoints/last.ckpt"
    assert run_folder_of(ckpt).resolve() == (name / "version_10").resolve()
    (name / "latest").unlink()
    (name / "latest").write_text("version_2\n")  # where symlinks cannot be created
    assert expand_latest(ckpt) == name / "version_2/checkpoints/last.ckpt"
    assert run_folder_of(ckpt) == name / "version_2"
    for v in (0, 2, 10):
        (name / f"version_{v}/config.yaml").unlink()
        (name / f"version_{v}/metrics.csv").unlink()
        for d in (name / f"version_{v}/checkpoints", name / f"version_{v}"):
            d.rmdir()
    assert update_latest(name) is None and not (name / "latest").exists()
    assert run_folder_of(tmp_path / "model.ckpt") is None


@pytest.mark.parametrize("symlink", [True, False])
def test_compare_reads_latest_in_either_form(tmp_path: Path, monkeypatch, symlink: bool) -> None:
    from lightning_sparse.compare.runs import resolve_runs

    for v in (0, 1):
        (tmp_path / f"runs/x/version_{v}").mkdir(parents=True)
        (tmp_path / f"runs/x/version_{v}/config.yaml").write_text("run_name: x\n")
        (tmp_path / f"runs/x/version_{v}/metrics.csv").write_text("step\n")
    if symlink:
        update_latest(tmp_path / "runs/x")
    else:
        (tmp_path / "runs/x/latest").write_text("version_1\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_runs(["runs/x/*"]) == [Path("runs/x/version_0"), Path("runs/x/version_1")]  # latest not twice
    assert [p.resolve() for p in resolve_runs(["runs/x/latest"])] == [(tmp_path / "runs/x/version_1").resolve()]


def test_only_the_clis_own_loggers_are_replaced() -> None:
    from lightning_sparse.cli.runs import cli_managed_loggers

    record = [{"class_path": "lightning_sparse.run.folder.RunCSVLogger", "init_args": {"save_dir": "runs"}},
              {"class_path": "lightning_sparse.loggers.WandbLogger", "init_args": {"id": "abc"}}]
    assert cli_managed_loggers(None) and cli_managed_loggers(True) and cli_managed_loggers(record)
    mine = {"class_path": "lightning_sparse.loggers.WandbLogger", "init_args": {"project": "mine", "mode": "online"}}
    assert not cli_managed_loggers(mine) and not cli_managed_loggers([mine])
    assert not cli_managed_loggers([{"class_path": "pytorch_lightning.loggers.CSVLogger"}])
    assert not cli_managed_loggers([*record, {"class_path": "pytorch_lightning.loggers.TensorBoardLogger"}])


def test_a_folder_is_a_run_only_with_a_run_s_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text("a: 1\n")
    (tmp_path / "model.ckpt").write_bytes(b"")
    (tmp_path / "latest").write_text("my notes\n")
    assert run_folder_of("model.ckpt") is None and run_folder_of("hpc") is None and run_folder_of("last") is None
    (tmp_path / "metrics.csv").write_text("step\n")
    assert run_folder_of("model.ckpt") is None  # a run's checkpoint is in checkpoints/, or SLURM's hpc_ckpt_N
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert run_folder_of("hpc_ckpt_1.ckpt") == tmp_path.resolve()  # never "." (empty folder names)
    assert update_latest(tmp_path) is None and (tmp_path / "latest").read_text() == "my notes\n"  # not ours: kept
    assert expand_latest("latest/x.ckpt") == Path("latest/x.ckpt")
