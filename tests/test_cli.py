"""The CLI as users run it: reduced quickstart, subcommands, offline W&B, bad inputs."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_sparse.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--model.init_args.model_name=resnet10t",
    "--data.init_args.image_size=16",
]


def test_quickstart_fit_then_test_writes_checkpoint_and_offline_wandb(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = main(["--config", str(ROOT / "configs/quickstart.yaml"), *FAST])
    run_dir = tmp_path / "runs" / "quickstart"
    ckpts = sorted(p.name for p in run_dir.glob("version_0/checkpoints/*.ckpt"))
    assert "last.ckpt" in ckpts and any(c.startswith("best-") for c in ckpts)
    assert (run_dir / "version_0" / "config.yaml").is_file()
    metrics = (run_dir / "version_0" / "metrics.csv").read_text()
    for key in ("train/loss", "val/acc", "test/acc", "lr"):
        assert key in metrics
    from pytorch_lightning.loggers import WandbLogger

    for logger in cli.trainer.loggers:  # the offline writer is its own process: finish the run before reading
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and b"val/acc" in offline[0].read_bytes()
    assert cli.trainer.callback_metrics["test/acc"] >= 0.0


def test_fit_subcommand_and_validate_from_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *FAST[:2], *FAST[5:]])
    last = tmp_path / "runs/quickstart/version_0/checkpoints/last.ckpt"
    assert last.is_file()
    cli = main(["validate", "--config", str(ROOT / "configs/quickstart.yaml"), *FAST[2:4], *FAST[5:], f"--ckpt_path={last}"])
    assert "val/acc" in cli.trainer.callback_metrics


def test_debug_config_runs_from_the_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/debug.yaml"),
         "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/acc" in out.stdout


def test_print_config_resolves_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--print_config"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "model_name: resnet18" in out and "monitor: val/acc" in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--model.init_args.model_name=resnet181"], r"resnet181.*resnet18"),
        (["--model.init_args.optimizer=adam"], r"adam"),
    ],
)
def test_bad_cli_values_fail_without_run_directory(tmp_path, monkeypatch, capsys, args, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises((ValueError, SystemExit)) as exc:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *args])
    text = str(exc.value) + capsys.readouterr().err
    assert pytest.importorskip("re").search(match, text), text
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("config", ["cifar10_resnet18.yaml", "imagenet_resnet50.yaml"])
def test_missing_data_dir_names_it(tmp_path, monkeypatch, config):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no_data_here"
    with pytest.raises(FileNotFoundError, match="no_data_here"):
        main(["fit", "--config", str(ROOT / "configs" / config), f"--data.init_args.data_dir={missing}",
              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
              "--trainer.precision=32"])
    assert not (tmp_path / "runs").exists()


def test_help_says_what_runs_without_subcommand_and_how_to_find_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Without a subcommand, `train.py --config <yaml>` runs fit and then test" in out
    assert "--model.help lightning_sparse.models.ImageClassifier" in out and "--print_config" in out
