"""The LightningCLI used by ``train.py``.

Adds to Lightning's CLI:
- ``model`` and ``data`` take any LightningModule / LightningDataModule by ``class_path``
  (:class:`~lightning_sparse.models.ImageClassifier` and :mod:`lightning_sparse.data` in our configs);
- ``data.num_classes`` / ``data.in_chans`` are linked into the model, so configs state them once;
- ``ModelCheckpoint``s under the ``checkpoint`` key (best by ``val/acc``) and ``last_checkpoint``
  (``last.ckpt`` after every epoch; ``--ckpt_path last`` finds it across run versions);
- ``run_name``: when no logger is configured, runs log to CSV and W&B (offline) under
  ``runs/<run_name>/``;
- running without a subcommand does ``fit`` and then ``test`` on the best checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_sparse.loggers import WandbLogger

__all__ = ["SparseCLI", "main"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
RUNS_DIR = "runs"


class SparseCLI(LightningCLI):
    """LightningCLI with the project's defaults (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        self._resolve_last_checkpoint()
        try:
            super()._parse_ckpt_path()
        except Exception as err:  # noqa: BLE001 - one clear message for any unreadable checkpoint
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise ValueError(
                f"--ckpt_path={path!r} is not a readable Lightning checkpoint ({type(err).__name__}). "
                "Pass a .ckpt file written by this project's training, or 'last' / 'best'."
            ) from None

    def _resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest ``runs/<run_name>/version_*/checkpoints/last.ckpt``.

        Each run logs into a new ``version_N`` directory, so Lightning's own ``"last"`` (which looks in
        the new run's directory) would find nothing after a crash; this looks across earlier versions.
        """
        sub = self.config.get("subcommand")
        if not sub or self.config[sub].get("ckpt_path") != "last":
            return
        cfg = self.config[sub]
        checkpoint_dir = cfg.get("last_checkpoint", {}).get("dirpath")
        pattern = f"{checkpoint_dir}/last*.ckpt" if checkpoint_dir else f"{RUNS_DIR}/{cfg.run_name}/version_*/checkpoints/last*.ckpt"
        found = sorted(Path().glob(pattern), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"--ckpt_path=last: no checkpoint matches {pattern!r} (run_name={cfg.run_name!r}).")
        cfg.ckpt_path = str(found[-1])
        rank_zero_info(f"Resuming from {cfg.ckpt_path}")

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--run_name", type=str, default="default", help="Run directory name under runs/.")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_chans", "model.init_args.in_chans", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ModelCheckpoint, "last_checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best-{epoch:03d}",
                "checkpoint.auto_insert_metric_name": False,
                # last.ckpt after every epoch, improved or not: what `--ckpt_path last` resumes from
                "last_checkpoint.filename": "last",
                "last_checkpoint.save_top_k": 1,
                "last_checkpoint.enable_version_counter": False,
            }
        )

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        cfg = self._get(self.config_init, "trainer", default={})
        if cfg.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(self._get(self.config_init, "run_name"))
        return super().instantiate_trainer(**kwargs)


def default_loggers(run_name: str, save_dir: str = RUNS_DIR) -> list[Logger]:
    """CSV + W&B (offline by default) loggers writing under ``<save_dir>/<run_name>/``."""
    return [
        CSVLogger(save_dir=save_dir, name=run_name),
        WandbLogger(save_dir=f"{save_dir}/{run_name}", project="lightning_sparse", name=run_name),
    ]


def main(args: list[str] | None = None) -> SparseCLI:
    """Entry point of ``train.py``. Without a subcommand: ``fit`` then ``test`` on the best checkpoint."""
    argv = list(sys.argv[1:] if args is None else args)
    cli_args = None if args is None else argv  # None: LightningCLI reads sys.argv itself
    try:
        if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help")):
            return SparseCLI(args=cli_args)
        cli = SparseCLI(args=cli_args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if not cli.trainer.interrupted:
            cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=_test_checkpoint(cli.trainer))
        return cli
    finally:
        _finish_wandb()


def _test_checkpoint(trainer: Trainer) -> str | None:
    """``"best"`` after fit, unless a callback reshaped the model during fit (Chase slimming): then an
    earlier checkpoint may not fit the final architecture, so the final weights are tested."""
    if any(getattr(cb, "changes_architecture", False) for cb in trainer.callbacks):
        rank_zero_info("Testing the final weights: the architecture changed during fit.")
        return None
    best = trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path
    return "best" if best else None


def _finish_wandb() -> None:
    """Close the W&B run (flushes an offline run to disk) if one was started in this process."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
