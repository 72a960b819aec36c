"""Which run folder a command works in, and its loggers (:mod:`lightning_sparse.run.folder`).

- ``fit`` without a checkpoint starts a new ``runs/<run_name>/version_N``;
- ``fit --ckpt_path last|best|<file of a run>`` continues that run's folder: the same ``metrics.csv``, the same
  W&B run id, the same ``checkpoints/``;
- ``validate|test|predict --ckpt_path <file of a run>`` write into ``<run folder>/<stage>/version_K`` and leave
  the run's own files as they are;
- a command that names a run's checkpoint and gives no ``--config`` reads the run's ``config.yaml``
  (:func:`with_run_config`); options given on the command line override it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_info

from lightning_sparse.cli.checkpoints import RUNS_DIR, resolve_ckpt_path
from lightning_sparse.loggers import WandbLogger
from lightning_sparse.run.folder import RunCSVLogger, new_wandb_id, run_folder_of, wandb_run_id

__all__ = ["RECORDED_LOGGERS", "cli_managed_loggers", "run_loggers", "with_run_config"]

PROJECT = "lightning_sparse"
#: the loggers the CLI creates and records in ``config.yaml``; a ``trainer.logger`` that holds only these, the
#: ``RunCSVLogger`` among them (a run's own ``config.yaml``), gets them placed in the run folder the command works
#: in, not where they were. A logger configured by hand (without ``RunCSVLogger``) is used as configured.
RECORDED_LOGGERS = ("lightning_sparse.run.folder.RunCSVLogger", "lightning_sparse.loggers.WandbLogger")


def cli_managed_loggers(logger: Any) -> bool:
    """Whether ``trainer.logger`` leaves the loggers to the CLI: unset, ``true``, or the CLI's own record."""
    if logger in (None, True):
        return True
    paths = [_class_path(e) for e in (logger if isinstance(logger, (list, tuple)) else [logger])]
    return RECORDED_LOGGERS[0] in paths and all(p in RECORDED_LOGGERS for p in paths)


def _class_path(entry: Any) -> str | None:
    """A logger's class path: from its config entry, or from the instance the config became."""
    if isinstance(entry, (Mapping, Namespace)):
        return (vars(entry) if isinstance(entry, Namespace) else entry).get("class_path")
    return f"{type(entry).__module__}.{type(entry).__qualname__}" if isinstance(entry, Logger) else None


def _option(argv: list[str], name: str) -> str | None:
    """The last value given to ``--name`` (``--name=v`` or ``--name v``) in ``argv``."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def with_run_config(argv: list[str], subcommands: tuple[str, ...]) -> list[str]:
    """``argv`` with ``--config <run folder>/config.yaml`` inserted (after the subcommand, so every option given
    overrides it) when it names a run's checkpoint with ``--ckpt_path`` (a file, or ``last`` / ``best`` of
    ``--run_name``) and gives no ``--config``. Otherwise ``argv`` unchanged (errors are reported by the parse)."""
    if any(a in ("-c", "--config") or a.startswith("--config=") for a in argv):
        return argv
    ckpt = _option(argv, "--ckpt_path")
    if ckpt is None:
        return argv
    if ckpt in ("last", "best"):
        cfg = Namespace(run_name=_option(argv, "--run_name") or "default", ckpt_path=ckpt)
        try:
            resolve_ckpt_path(cfg, quiet=True)
        except (FileNotFoundError, ValueError):
            return argv
        ckpt = cfg.ckpt_path
    folder = run_folder_of(ckpt)
    if folder is None:
        return argv
    config = folder / "config.yaml"
    rank_zero_info(f"Reading the run's config {config}; options given on the command line override it.")
    at = 1 if argv and argv[0] in subcommands else 0
    return [*argv[:at], "--config", str(config), *argv[at:]]


def run_loggers(run_name: str, ckpt_path: str | None, stage: str | None
                ) -> tuple[list[tuple[Logger, dict[str, Any]]], Path, bool]:
    """``([(logger, its init arguments)], run folder, whether this command creates the folder)``: CSV and W&B
    (offline by default) loggers of the run folder the command works in (module docstring).

    W&B names the run ``<run_name>/version_N`` (``.../<stage>/version_K`` for an evaluation) and keeps its files in
    the folder's ``wandb/``.
    """
    folder = run_folder_of(ckpt_path) if ckpt_path else None
    resume = None
    if folder is not None and stage in ("validate", "test", "predict"):
        csv = RunCSVLogger(save_dir=str(folder), name=stage)
        label = f"{folder.parent.name}/{folder.name}/{stage}/version_{csv.version}"
        rank_zero_info(f"Evaluating a checkpoint of {folder}: results go to {csv.log_dir}")
    elif folder is not None:  # fit from a checkpoint of a run: continue that run's folder
        csv = RunCSVLogger(save_dir=str(folder.parent.parent), name=folder.parent.name, version=folder.name)
        label = f"{folder.parent.name}/{folder.name}"
        resume = wandb_run_id(folder)
        rank_zero_info(f"Continuing the run in {folder}")
    else:
        csv = RunCSVLogger(save_dir=RUNS_DIR, name=run_name)
        label = f"{run_name}/version_{csv.version}"
    log_dir = Path(csv.log_dir)
    created = not log_dir.exists()
    if created:  # a new version: the W&B folder in it is ours, not an earlier run's logs
        warnings.filterwarnings("ignore", message=f"Experiment logs directory {re.escape(str(log_dir))} exists")
    run_id = resume or new_wandb_id()
    wandb_args = {"save_dir": str(log_dir), "project": PROJECT, "name": label, "id": run_id}
    wandb = WandbLogger(**wandb_args, resume="allow") if resume else WandbLogger(**wandb_args)
    csv_args = {"save_dir": str(csv.save_dir), "name": csv.name, "version": csv.version}
    return [(csv, csv_args), (wandb, wandb_args)], log_dir, created
