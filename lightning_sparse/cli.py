"""The LightningCLI used by ``train.py``.

Adds to Lightning's CLI:
- ``model`` and ``data`` take any LightningModule / LightningDataModule by ``class_path``
  (:class:`~lightning_sparse.models.ImageClassifier` and :mod:`lightning_sparse.data` in our configs);
- ``data.num_classes`` / ``data.in_chans`` are linked into the model, so configs state them once;
- ``ModelCheckpoint``s under the ``checkpoint`` key (best by ``val/acc``) and ``last_checkpoint``
  (``last.ckpt`` after every epoch; ``--last_checkpoint.every_n_train_steps=N`` for periodic saves);
- preemption safety (:mod:`lightning_sparse.preemption`): atomic checkpoint writes, an
  ``interrupted-*.ckpt`` at the step where SIGTERM stopped the run, SLURM requeue at batch boundaries;
  ``--ckpt_path last`` resumes from the newest readable one across run versions;
- ``run_name``: when no logger is configured, runs log to CSV and W&B (offline) under
  ``runs/<run_name>/``;
- running without a subcommand does ``fit`` and then ``test`` on the best checkpoint.
"""

from __future__ import annotations

import glob
import signal
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.plugins import CheckpointIO
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_sparse.loggers import WandbLogger
from lightning_sparse.preemption import (
    LAST_PATTERNS,
    AtomicCheckpointIO,
    PreemptionCheckpoint,
    checkpoint_is_readable,
    find_last_checkpoint,
)

__all__ = ["SparseCLI", "main"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
HELP = """Sparse training with LightningCLI. Without a subcommand, `train.py --config <yaml>` runs fit and then
test (on the best checkpoint). Find options: `train.py fit --model.help lightning_sparse.models.ImageClassifier`,
`train.py fit --trainer.callbacks.help lightning_sparse.callbacks.DynamicSparsity`,
`train.py fit --config <yaml> --print_config`. Resume: `train.py fit --config <yaml> --ckpt_path last`."""
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

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("description", HELP)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, then resolve ``--ckpt_path last`` and check the checkpoint is readable."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if sub and self.config[sub].get("ckpt_path"):
            self._resolve_ckpt_path(self.config[sub])

    def _resolve_ckpt_path(self, cfg: Any) -> None:
        """``last``: the newest readable ``last*.ckpt`` / ``interrupted-*.ckpt`` / ``hpc_ckpt_*.ckpt`` of the run
        (each run logs into a new ``version_N``, so Lightning's own ``"last"``, which looks in the new run's
        directory, would find nothing); a path: must be a readable Lightning checkpoint."""
        path = cfg.ckpt_path
        if path == "last":
            patterns = self.last_checkpoint_patterns(cfg)
            found = find_last_checkpoint(Path(p) for pattern in patterns for p in glob.glob(pattern))
            if found is None:
                raise FileNotFoundError(f"--ckpt_path=last: no readable checkpoint matches {patterns} "
                                        f"(run_name={cfg.run_name!r}).")
            cfg.ckpt_path = str(found)
            rank_zero_info(f"Resuming from {cfg.ckpt_path}")
        elif path not in ("best", "hpc") and Path(path).is_file() and (reason := checkpoint_is_readable(path)):
            raise ValueError(
                f"--ckpt_path={path!r} is not a readable Lightning checkpoint ({reason}). "
                "Pass a .ckpt file written by this project's training, or 'last' / 'best'."
            )

    @staticmethod
    def last_checkpoint_patterns(cfg: Any) -> list[str]:
        """Glob patterns (relative to the working directory) ``--ckpt_path last`` searches."""
        checkpoint_dir = (cfg.get("last_checkpoint") or {}).get("dirpath")
        run_dir = (cfg.get("trainer") or {}).get("default_root_dir") or f"{RUNS_DIR}/{cfg.run_name}"
        ckpt_dirs = [checkpoint_dir] if checkpoint_dir else [f"{RUNS_DIR}/{cfg.run_name}/version_*/checkpoints"]
        return [f"{d}/{p}" for d in ckpt_dirs for p in LAST_PATTERNS if not p.startswith("hpc")] + [
            f"{run_dir}/hpc_ckpt_*.ckpt"
        ]

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

    def _section(self, key: str) -> Any:
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        return config.get(key)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Adds the defaults described in the module docstring to what the config asks for."""
        cfg = self._section("trainer") or {}
        run_name = self._section("run_name")
        if cfg.get("logger") in (None, True) and "logger" not in kwargs:
            kwargs["logger"] = default_loggers(run_name)
        if cfg.get("default_root_dir") is None:  # SLURM's hpc_ckpt_N.ckpt lands here, not in the cwd
            kwargs.setdefault("default_root_dir", f"{RUNS_DIR}/{run_name}")
        plugins = _as_list(cfg.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        callbacks = _as_list(cfg.get("callbacks"))
        if cfg.get("enable_checkpointing") is not False and not any(isinstance(c, PreemptionCheckpoint) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, PreemptionCheckpoint()])
        return super().instantiate_trainer(**kwargs)


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


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
    except SIGTERMException:
        # stopped by SIGTERM (preemption, time limit): the checkpoint is written; exit as killed by SIGTERM
        raise SystemExit(128 + signal.SIGTERM) from None
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
