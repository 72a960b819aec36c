"""The LightningCLI used by ``train.py``.

Adds to Lightning's CLI:
- ``sparsity``: the sparsity method's callback as its own section (``--sparsity.density=0.05``); it is put
  first in the Trainer's callbacks, before ``trainer.callbacks`` (SADTracker, Timer, ...);
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
- running without a subcommand does ``fit`` and then ``test`` on the best checkpoint;
- a bad value, at the command line or in YAML, whatever class it belongs to, ends the run with one line
  naming the option path, the value and what is allowed (exit code 2; :mod:`lightning_sparse.cli.errors`).
"""

from __future__ import annotations

import glob
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.plugins import CheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from lightning_sparse.cli.errors import condense, instances_of, located_error, trainer_error
from lightning_sparse.cli.summary import example_input, silence_known_warnings, summary_lines

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
`train.py fit --sparsity.help lightning_sparse.callbacks.DynamicSparsity` (set one with `--sparsity.density=0.05`),
`train.py fit --config <yaml> --print_config`. Resume: `train.py fit --config <yaml> --ckpt_path last`."""
RUNS_DIR = "runs"


class BadValue(SystemExit):
    """Exit code 2 after one printed line (the CLI's usage-error code, as jsonargparse uses)."""


def _debug() -> bool:
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false")


def fail(prog: str, line: str) -> BadValue:
    """Print ``<prog>: error: <line>`` on stderr and return the exit-code-2 exception to raise."""
    sys.stderr.write(f"{prog.replace(' [options]', '')}: error: {line}\n")
    sys.stderr.flush()
    return BadValue(2)


class SparseArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose usage errors are one line (``--help`` still lists every option)."""

    def error(self, message: str, ex: Exception | None = None) -> None:  # type: ignore[override]
        if not self.exit_on_error or _debug():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise fail(parser.prog, f"{condense(message)} (options: {parser.prog.replace(' [options]', '')} --help)")


class SparseCLI(LightningCLI):
    """LightningCLI with the project's defaults (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", SparseArgumentParser)
        super().__init__(*args, **kwargs)

    @property
    def prog(self) -> str:
        return f"train.py {self.subcommand}" if self.subcommand else "train.py"

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def bad_value(self, err: BaseException) -> BadValue | None:
        """The one-line exit for an input error a configured object raised (None: not one; ``JSONARGPARSE_DEBUG``)."""
        if _debug():
            return None
        init = getattr(self, "config_init", None)
        instances = instances_of(init[self.subcommand] if init is not None and self.subcommand else init)
        line = located_error(err, self._subconfig(), instances)
        return fail(self.prog, line) if line else None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
            raise (self.bad_value(err) or err) from None
        # FLOPs in Lightning's model summary (torch.utils.flop_counter needs an example batch)
        if getattr(self.model, "example_input_array", None) is None:
            example = example_input(self.model, self.datamodule)
            if example is not None:
                self.model.example_input_array = example

    def print_summary(self, fitted: bool = True) -> None:
        """The end-of-run summary (rank zero; :mod:`lightning_sparse.cli.summary`)."""
        lines = summary_lines(self.trainer, self.model, getattr(self.model, "example_input_array", None), fitted)
        title = self.prog if self.subcommand else "train.py (fit, then test)"
        _print_rank_zero("\n".join(["", f"---- {title}: summary", *lines]))

    def after_fit(self) -> None:
        self.print_summary()

    def after_validate(self) -> None:
        self.print_summary(fitted=False)

    def after_test(self) -> None:
        self.print_summary(fitted=False)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("description", HELP)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does, then resolve ``--ckpt_path last`` and check the checkpoint is readable."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if sub and self.config[sub].get("ckpt_path"):
            try:
                self._resolve_ckpt_path(self.config[sub])
            except (ValueError, FileNotFoundError) as err:
                if _debug():
                    raise
                raise fail(f"train.py {sub}", str(err)) from None

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
        elif path == "best":
            found = self.best_checkpoint(cfg)
            if found is None:
                raise FileNotFoundError(f"--ckpt_path=best: no best checkpoint of run_name={cfg.run_name!r} "
                                        f"matches {self.best_checkpoint_patterns(cfg)}.")
            cfg.ckpt_path = str(found)
            rank_zero_info(f"--ckpt_path=best: {cfg.ckpt_path}")
        elif path != "hpc" and "://" not in str(path) and not Path(path).is_file():
            raise FileNotFoundError(f"--ckpt_path={path!r}: no such file. Pass a .ckpt file, or 'last' / 'best'.")
        elif path not in ("best", "hpc") and Path(path).is_file() and (reason := checkpoint_is_readable(path)):
            raise ValueError(
                f"--ckpt_path={path!r} is not a readable Lightning checkpoint ({reason}). "
                "Pass a .ckpt file written by this project's training, or 'last' / 'best'."
            )

    @staticmethod
    def best_checkpoint_patterns(cfg: Any) -> list[str]:
        """Glob patterns of the ``checkpoint`` callback's files (best by ``val/acc``), newest version last."""
        ckpt = cfg.get("checkpoint") or {}
        prefix = re.split(r"[{]", str(ckpt.get("filename") or "best"))[0]
        dirs = [ckpt["dirpath"]] if ckpt.get("dirpath") else [f"{RUNS_DIR}/{cfg.run_name}/version_*/checkpoints"]
        return [f"{d}/{prefix}*.ckpt" for d in dirs]

    def best_checkpoint(self, cfg: Any) -> Path | None:
        """The best checkpoint of the run's newest version that has one (``--ckpt_path best``): the one the
        ``checkpoint`` callback recorded as best in that version's ``last.ckpt``, else the newest file."""
        files = [Path(p) for pattern in self.best_checkpoint_patterns(cfg) for p in glob.glob(pattern)]
        files = [p for p in files if not p.name.startswith(("last", "interrupted-"))]
        if not files:
            return None
        newest_dir = max(files, key=lambda p: p.stat().st_mtime).parent
        in_dir = sorted((p for p in files if p.parent == newest_dir), key=lambda p: p.stat().st_mtime)
        last = newest_dir / "last.ckpt"
        if len(in_dir) > 1 and last.is_file() and not checkpoint_is_readable(str(last)):
            import torch

            state = torch.load(last, map_location="cpu", weights_only=False, mmap=True).get("callbacks", {})
            named = {Path(v.get("best_model_path") or "").name for k, v in state.items() if k.startswith("ModelCheckpoint")}
            in_dir = [p for p in in_dir if p.name in named] or in_dir
        return in_dir[-1]

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
        # the sparsity method's callback as a named section: --sparsity.density=0.05 (other callbacks stay in
        # trainer.callbacks, which still takes mask callbacks too, e.g. a second one composed with the first)
        parser.add_subclass_arguments(pl.Callback, "sparsity", required=False, fail_untyped=False,
                                      help="The sparsity method's callback (DynamicSparsity, Chase, NMSparsity, ...).")
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
            kwargs["logger"] = default_loggers(run_name, eval_dir=self._evaluated_run(), stage=self.subcommand)
        if cfg.get("default_root_dir") is None:  # SLURM's hpc_ckpt_N.ckpt lands here, not in the cwd
            kwargs.setdefault("default_root_dir", f"{RUNS_DIR}/{run_name}")
        plugins = _as_list(cfg.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        sparsity = self._section("sparsity")  # the method's callback first: it owns the masks the others read
        callbacks = [*([sparsity] if sparsity is not None else []), *_as_list(cfg.get("callbacks"))]
        if cfg.get("enable_checkpointing") is not False and not any(isinstance(c, PreemptionCheckpoint) for c in callbacks):
            callbacks.append(PreemptionCheckpoint())
        kwargs.setdefault("callbacks", callbacks)
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, MisconfigurationException) as err:
            if _debug():
                raise
            raise fail(self.prog, trainer_error(err, {**dict(cfg), **kwargs})) from None
        self._record(trainer)
        return trainer


    def _evaluated_run(self) -> Path | None:
        """``runs/<name>/version_N`` when validate/test/predict evaluates a checkpoint of that run."""
        cfg = self._section("ckpt_path") if self.subcommand in ("validate", "test", "predict") else None
        path = Path(cfg) if cfg else None
        if path is not None and path.parent.name == "checkpoints" and re.match(r"version_\d+$", path.parent.parent.name):
            return path.parent.parent
        return None

    def _record(self, trainer: Trainer) -> None:
        """Write the loggers and callbacks the CLI added into the config that ``config.yaml`` saves."""
        from jsonargparse import Namespace

        cfg = self._subconfig().trainer

        def entry(obj: Any, **init_args: Any) -> Namespace:
            return Namespace(class_path=f"{type(obj).__module__}.{type(obj).__name__}", init_args=Namespace(**init_args))

        if cfg.get("logger") in (None, True) and trainer.loggers:
            records = [(lg, vars(lg).get("_init_record")) for lg in trainer.loggers]
            cfg.logger = [entry(lg, **rec) for lg, rec in records if isinstance(rec, dict)] or cfg.logger
        added = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)]
        if added and not any("PreemptionCheckpoint" in str(getattr(c, "class_path", "")) for c in _as_list(cfg.get("callbacks"))):
            cfg.callbacks = [*_as_list(cfg.get("callbacks")), entry(added[0])]


def _print_rank_zero(text: str) -> None:
    rank_zero_only(print)(text, flush=True)


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def default_loggers(run_name: str, save_dir: str = RUNS_DIR, eval_dir: Path | None = None,
                    stage: str | None = None) -> list[Logger]:
    """CSV + W&B (offline by default) loggers of one run version: ``<save_dir>/<run_name>/version_N`` holds
    ``metrics.csv`` and the W&B run (``wandb/offline-run-*``, W&B run name ``<run_name>/version_N``).

    ``eval_dir``: validate/test/predict of a checkpoint of that run version write into
    ``<eval_dir>/<stage>/version_K`` (the run's own ``metrics.csv`` and ``config.yaml`` stay as they are).
    """
    if eval_dir is not None:
        stage = stage or "eval"
        csv = CSVLogger(save_dir=str(eval_dir), name=stage)
        label = f"{run_name}/{eval_dir.name}/{stage}/version_{csv.version}"
        rank_zero_info(f"Evaluating a checkpoint of {eval_dir}: results go to {csv.log_dir}")
    else:
        csv = CSVLogger(save_dir=save_dir, name=run_name)
        label = f"{run_name}/version_{csv.version}"
    if not Path(csv.log_dir).exists():  # a new version: the W&B folder in it is ours, not an earlier run's logs
        warnings.filterwarnings("ignore", message=f"Experiment logs directory {re.escape(csv.log_dir)} exists")
    csv._init_record = {"save_dir": str(csv.save_dir), "name": csv.name, "version": csv.version}
    wandb = WandbLogger(save_dir=csv.log_dir, project="lightning_sparse", name=label)
    wandb._init_record = {"save_dir": csv.log_dir, "project": "lightning_sparse", "name": label}
    return [csv, wandb]


def main(args: list[str] | None = None) -> SparseCLI:
    """Entry point of ``train.py``. Without a subcommand: ``fit`` then ``test`` on the best checkpoint."""
    argv = list(sys.argv[1:] if args is None else args)
    cli_args = None if args is None else argv  # None: LightningCLI reads sys.argv itself
    silence_known_warnings()
    cli = None
    try:
        if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-h", "--help")):
            return SparseCLI(args=cli_args)
        cli = SparseCLI(args=cli_args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if not cli.trainer.interrupted:
            cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=_test_checkpoint(cli.trainer))
        cli.print_summary()
        return cli
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:  # raised by a configured object's hook
        cli = cli or _cli_of(err)
        exit_ = cli.bad_value(err) if cli is not None and getattr(cli, "config_init", None) is not None else None
        if exit_ is None:
            raise
        raise exit_ from None
    except SIGTERMException:
        # stopped by SIGTERM (preemption, time limit): the checkpoint is written; exit as killed by SIGTERM
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        _finish_wandb()


def _cli_of(err: BaseException) -> SparseCLI | None:
    """The SparseCLI whose ``__init__`` (running a subcommand) raised ``err``."""
    tb = err.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if isinstance(obj, SparseCLI):
            return obj
        tb = tb.tb_next
    return None


def _test_checkpoint(trainer: Trainer) -> str | None:
    """``"best"`` after fit, unless a callback reshaped the model during fit (Chase slimming): then an
    earlier checkpoint may not fit the final architecture, so the final weights are tested."""
    if any(getattr(cb, "changes_architecture", False) for cb in trainer.callbacks):
        rank_zero_info("Testing the final weights: the architecture changed during fit.")
        return None
    best = trainer.checkpoint_callback and trainer.checkpoint_callback.best_model_path
    return best or None


def _finish_wandb() -> None:
    """Close the W&B run (flushes an offline run to disk) if one was started in this process."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
