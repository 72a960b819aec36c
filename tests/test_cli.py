"""The CLI as users run it: reduced quickstart, subcommands, offline W&B, bad inputs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

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
def test_missing_data_dir_names_it(tmp_path, monkeypatch, capsys, config):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no_data_here"
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / config), f"--data.init_args.data_dir={missing}",
              "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
              "--trainer.precision=32"])
    assert exc.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error:" in x]
    assert f"data.init_args.data_dir='{missing}'" in line and "not found" in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


# one value per section; each is refused by a different mechanism (jsonargparse's type check, the class's own
# check while LightningCLI instantiates it, Lightning's Trainer, a callback's setup before training)
ONE_LINE_CASES = {
    "model type": (["--config", "configs/quickstart.yaml", "--model.init_args.lr=abc"],
                   ["model.init_args.lr=abc", "expected float"]),
    "model value": (["--config", "configs/quickstart.yaml", "--model.init_args.model_name=resnet181"],
                    ["model.init_args.model_name='resnet181'", "Did you mean", "resnet18"]),
    "data value": (["--config", "configs/quickstart.yaml", "--data.init_args.batch_size=0"],
                   ["data.init_args.batch_size=0", "must be >= 1"]),
    "callback value": (["--config", "configs/quickstart_nm24.yaml", "--sparsity.n=5"],
                       ["sparsity.init_args.n=5", "NMSparsity", "`n` must be < `m`"]),
    "callback value in a list": (["--config", "configs/quickstart_rigl.yaml", "--trainer.callbacks.init_args.interval=0"],
                                 ["trainer.callbacks[0].init_args.interval=0", "SADTracker"]),
    "trainer value": (["--config", "configs/quickstart.yaml", "--trainer.devices=0"], ["trainer.devices=", "0"]),
    "callback schedule refused at setup": (
        ["fit", "--config", "configs/imagenet_resnet50_chase.yaml", "--data=lightning_sparse.data.FakeDataModule",
         "--data.init_args.image_size=16", "--model.init_args.model_name=resnet10t", "--trainer.accelerator=cpu",
         "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32", "--trainer.max_epochs=1",
         "--trainer.logger=false", "--trainer.enable_model_summary=false", "--trainer.enable_progress_bar=false"],
        ["sparsity.init_args.stop_gmp_epochs=80", "Chase", "max_epochs=1"]),
}


SLOW_CASES = {"model type", "callback value in a list", "trainer value"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in ONE_LINE_CASES])
def test_bad_value_is_one_line_exit_2_without_traceback(tmp_path, case):
    args, needles = ONE_LINE_CASES[case]
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**__import__("os").environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("JSONARGPARSE_DEBUG", None)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("train.py"), proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_sparsity_section_value_from_the_command_line_reaches_the_weights(tmp_path, monkeypatch):
    """``--sparsity.density=0.05`` on quickstart_rigl.yaml: the saved weights are 5 % dense, not the YAML's 10 %."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    main(["fit", "--config", str(ROOT / "configs/quickstart_rigl.yaml"), "--sparsity.density=0.05",
          "--sparsity.init_args.update_interval=2", *FAST[:2], *FAST[4:]])
    state = torch.load(tmp_path / "runs/quickstart_rigl/version_0/checkpoints/last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    convs = [k for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
    sparse = convs[1:-1]  # the stem conv and the classifier stay dense by default
    assert all(torch.count_nonzero(state[k]) == state[k].numel() for k in (convs[0], convs[-1]))
    kept = sum(torch.count_nonzero(state[k]).item() for k in sparse)
    assert kept / sum(state[k].numel() for k in sparse) == pytest.approx(0.05, abs=1e-3)
    saved = yaml.safe_load((tmp_path / "runs/quickstart_rigl/version_0/config.yaml").read_text())
    assert saved["sparsity"]["init_args"]["density"] == 0.05


def test_help_says_what_runs_without_subcommand_and_how_to_find_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Without a subcommand, `train.py --config <yaml>` runs fit and then test" in out
    assert "--model.help lightning_sparse.models.ImageClassifier" in out and "--print_config" in out
