"""The CLI as users run it: reduced quickstart, subcommands, offline W&B, bad inputs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers.training import trainer
from helpers.wandb_record import wandb_record
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


def test_quickstart_fit_then_test_writes_checkpoint_and_offline_wandb(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = main(["--config", str(ROOT / "configs/quickstart.yaml"), *FAST])
    run_dir = tmp_path / "runs" / "quickstart"
    version = run_dir / "version_0"
    ckpts = sorted(p.name for p in version.glob("checkpoints/*.ckpt"))
    assert "last.ckpt" in ckpts and any(c.startswith("best-") for c in ckpts)
    assert (version / "config.yaml").is_file()
    metrics = (version / "metrics.csv").read_text()
    for key in ("train/loss", "val/acc", "test/acc", "lr"):
        assert key in metrics
    from pytorch_lightning.loggers import WandbLogger

    for logger in cli.trainer.loggers:  # the offline writer is its own process: finish the run before reading
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()
    # the W&B run lives inside the run version it belongs to, and is named after it
    offline = list(version.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    record = wandb_record(offline[0], b"val/acc", b"quickstart/version_0")
    assert b"val/acc" in record and b"quickstart/version_0" in record
    assert not (run_dir / "wandb").exists()
    # the logged test accuracy is the best checkpoint's: re-evaluated here, outside the CLI, it comes out the same
    from lightning_sparse.models import ImageClassifier

    best_model = ImageClassifier.load_from_checkpoint(next(version.glob("checkpoints/best-*.ckpt")), map_location="cpu")
    again = trainer(tmp_path / "again", limit_test_batches=2).test(best_model, datamodule=cli.datamodule, verbose=False)
    assert cli.trainer.callback_metrics["test/acc"].item() == pytest.approx(again[0]["test/acc"], abs=1e-6)

    # the end-of-run summary, checked against the files and metrics.csv
    out = capfd.readouterr().out
    summary = out[out.index("summary"):]
    rows = dict(line.split(":", 1) for line in summary.splitlines()[1:] if ":" in line)
    assert rows["run directory"].strip() == "runs/quickstart/version_0"
    best = next(version.glob("checkpoints/best-*.ckpt"))
    assert f"best runs/quickstart/version_0/checkpoints/{best.name}" in rows["checkpoints"]
    assert "last runs/quickstart/version_0/checkpoints/last.ckpt" in rows["checkpoints"]
    sync = rows["W&B (offline)"].split("wandb sync ")[1].strip()
    assert (tmp_path / sync).is_dir() and (tmp_path / sync) == offline[0].parent
    import csv

    test_acc = [float(r["test/acc"]) for r in csv.DictReader((version / "metrics.csv").open()) if r.get("test/acc")]
    assert rows["accuracy"].strip() == f"test/acc {test_acc[-1]:.4f}"
    assert "0.0000 sparse" in rows["weights"] and "FLOPs" in rows["weights"]

    # config.yaml records what ran: the two default loggers and the preemption callback the CLI added
    saved = yaml.safe_load((version / "config.yaml").read_text())
    loggers = {lg["class_path"].rpartition(".")[2]: lg["init_args"] for lg in saved["trainer"]["logger"]}
    assert loggers["RunCSVLogger"]["version"] == 0 and loggers["WandbLogger"]["save_dir"] == "runs/quickstart/version_0"
    assert loggers["WandbLogger"]["id"] == offline[0].parent.name.rsplit("-", 1)[1]  # what a resume continues
    assert [c["class_path"] for c in saved["trainer"]["callbacks"]] == ["lightning_sparse.preemption.PreemptionCheckpoint"]


def test_model_summary_flops_come_from_the_flop_counter(tmp_path, monkeypatch):
    """The CLI gives the model an example batch, so Lightning's summary counts FLOPs (was 0)."""
    from pytorch_lightning.utilities.model_summary import ModelSummary
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *FAST[:2], *FAST[5:],
                "--trainer.logger=false", "--trainer.limit_val_batches=0"])
    x = cli.model.example_input_array
    assert tuple(x.shape) == (1, 1, 16, 16)
    cli.model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cli.model(x)
    assert counter.get_total_flops() > 0 and ModelSummary(cli.model).total_flops == counter.get_total_flops()


def test_ckpt_path_best_and_evaluation_write_into_the_run(tmp_path, monkeypatch, capfd):
    """``test --ckpt_path best`` resolves to the run's best checkpoint (as ``last`` does) and writes its results
    into that run (``version_0/test/version_0``), leaving the run's own metrics.csv and config.yaml alone."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *FAST[:2], *FAST[5:], "--trainer.max_epochs=2"])
    version = tmp_path / "runs/quickstart/version_0"
    fit_files = {n: (version / n).read_bytes() for n in ("metrics.csv", "config.yaml")}
    import torch as _torch

    last = _torch.load(version / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    (best_state,) = [v for k, v in last["callbacks"].items() if k.startswith("ModelCheckpoint") and "val/acc" in k]
    capfd.readouterr()
    cli = main(["test", "--config", str(ROOT / "configs/quickstart.yaml"), *FAST[3:4], *FAST[5:], "--ckpt_path=best"])
    assert Path(cli.trainer.ckpt_path).resolve() == Path(best_state["best_model_path"]).resolve()
    assert ((version / "test/version_0/metrics.csv").is_file()
            and "test/acc" in (version / "test/version_0/metrics.csv").read_text())
    assert list(version.glob("test/version_0/wandb/offline-run-*"))
    assert not (tmp_path / "runs/quickstart/version_1").exists()
    assert {n: (version / n).read_bytes() for n in fit_files} == fit_files
    out = capfd.readouterr()
    assert "runs/quickstart/version_0/test/version_0" in out.out + out.err
    with pytest.raises(SystemExit) as exc:
        main(["test", "--config", str(ROOT / "configs/quickstart.yaml"), "--run_name=nothing_here", "--ckpt_path=best"])
    assert exc.value.code == 2 and "--ckpt_path=best" in capfd.readouterr().err


def test_debug_config_runs_from_the_command_line(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs/debug.yaml"),
         "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test/acc" in out.stdout
    for noise in ("💡 Tip", "LeafSpec", "anonymous setting", "was deprecated in v4", "multiple `ModelCheckpoint`"):
        assert noise not in out.stderr + out.stdout, noise


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
          "--sparsity.init_args.update_interval=3", *FAST[:2], *FAST[4:]])  # one update, at step 0
    ckpt = torch.load(tmp_path / "runs/quickstart_rigl/version_0/checkpoints/last.ckpt", map_location="cpu",
                      weights_only=False)
    state = ckpt["state_dict"]
    convs = [k for k, v in state.items() if k.endswith("weight") and v.dim() in (2, 4)]
    sparse = convs[1:-1]  # the stem conv and the classifier stay dense by default
    assert all(torch.count_nonzero(state[k]) == state[k].numel() for k in (convs[0], convs[-1]))
    # the saved weights are 5 % dense: nothing outside the masks is nonzero, and the masks keep 5 % (weights the
    # mask keeps may still be 0: at 16 px the deep 3x3 convs' border taps never get a gradient)
    (masks,) = [v["masks"] for k, v in ckpt["callbacks"].items() if k.startswith("DynamicSparsity")]
    assert sorted(masks) == sorted(sparse)
    assert all(not state[k][~masks[k]].any() for k in sparse)
    kept = sum(int(masks[k].sum()) for k in sparse)
    assert kept / sum(state[k].numel() for k in sparse) == pytest.approx(0.05, abs=1e-3)
    assert sum(torch.count_nonzero(state[k]).item() for k in sparse) > 0.7 * kept
    saved = yaml.safe_load((tmp_path / "runs/quickstart_rigl/version_0/config.yaml").read_text())
    assert saved["sparsity"]["init_args"]["density"] == 0.05


def test_help_says_what_runs_without_subcommand_and_how_to_find_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Without a subcommand, `train.py --config <yaml>` runs fit and then test" in out
    assert "--model.help lightning_sparse.models.ImageClassifier" in out and "--print_config" in out
