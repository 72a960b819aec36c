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
  ``runs/<run_name>/version_N``, and a run is its folder (:mod:`lightning_sparse.cli.runs`): ``fit --ckpt_path``
  continues the checkpoint's folder, a command naming a run's checkpoint without ``--config`` reads the run's
  ``config.yaml``, ``runs/<run_name>/latest`` points at the newest version, and a start that fails before its
  first training step removes its folder;
- running without a subcommand does ``fit`` and then ``test`` on the best checkpoint;
- a bad value, at the command line or in YAML, whatever class it belongs to, ends the run with one line
  naming the option path, the value and what is allowed (exit code 2; :mod:`lightning_sparse.cli.errors`);
- option names are never matched by prefix (``--trainer.max_epoch`` is an unknown option).
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import pytorch_lightning as pl
from jsonargparse import ArgumentError
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.loggers import Logger
from pytorch_lightning.plugins import CheckpointIO
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_sparse.cli.checkpoints import (
    RUNS_DIR,
    best_checkpoint,
    best_checkpoint_patterns,
    last_checkpoint_patterns,
    resolve_ckpt_path,
)
from lightning_sparse.cli.errors import (
    INPUT_ERRORS,
    BadValue,
    LoopsStarted,
    class_nodes,
    debug,
    fail,
    hook_error_line,
    instances_of,
    refused_line,
    trainer_error_line,
)
from lightning_sparse.cli.parse_errors import parse_error_line
from lightning_sparse.cli.parser import SparseArgumentParser, default_instantiator, refused_in
from lightning_sparse.cli.runs import cli_managed_loggers, run_loggers, with_run_config
from lightning_sparse.cli.summary import example_input, silence_known_warnings, summary_lines
from lightning_sparse.preemption import AtomicCheckpointIO, PreemptionCheckpoint, lost_process_line
from lightning_sparse.run.folder import RunFolder
from lightning_sparse.sparsity.counting import count_weights

__all__ = ["BadValue", "SparseCLI", "default_loggers", "main"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
HELP = """Sparse training with LightningCLI. Without a subcommand, `train.py --config <yaml>` runs fit and then
test (on the best checkpoint). Find options: `train.py fit --model.help lightning_sparse.models.ImageClassifier`,
`train.py fit --sparsity.help lightning_sparse.callbacks.DynamicSparsity` (set one with `--sparsity.density=0.05`),
`train.py fit --config <yaml> --print_config`. Resume a run in its folder: `train.py fit --run_name <name> --ckpt_path last`;
evaluate it: `train.py test --run_name <name> --ckpt_path best` (both read the run's config.yaml)."""


class SparseCLI(LightningCLI):
    """LightningCLI with the project's defaults (see module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", pl.LightningModule)
        kwargs.setdefault("datamodule_class", pl.LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", SparseArgumentParser)
        self.subcommand: str | None = None
        self.config_init: Any = None
        self.loops_started = LoopsStarted()
        self.logger_records: list[tuple[Logger, dict[str, Any]]] = []
        argv = kwargs.get("args")
        argv = list(sys.argv[1:] if argv is None else argv) if not isinstance(argv, dict) else []
        try:
            super().__init__(*args, **kwargs)
        except ArgumentError as err:
            if debug():
                raise
            sub = argv[0] if argv and argv[0] in SUBCOMMANDS and kwargs.get("run", True) else None
            prog = f"train.py {sub}" if sub else "train.py"
            raise fail(prog, self.parse_error(argv, str(err), prog)) from None
        except INPUT_ERRORS as err:
            located = self.input_error(err)
            if located is None:
                raise  # not an input error: the original exception with its traceback and cause
            raise located from None

    @property
    def prog(self) -> str:
        return f"train.py {self.subcommand}" if self.subcommand else "train.py"

    def _subconfig(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config

    def parse_error(self, argv: list[str], message: str, prog: str) -> str:
        """The one line for arguments the parser refused (:mod:`lightning_sparse.cli.parse_errors`)."""
        sections = {"trainer": self.trainer_class, "checkpoint": ModelCheckpoint, "last_checkpoint": ModelCheckpoint}
        bases = {"model": self._model_class, "data": self._datamodule_class, "sparsity": pl.Callback}
        return parse_error_line(self.parser.parse_args, argv, message, SUBCOMMANDS, sections, bases, prog)

    def input_error(self, err: BaseException) -> BadValue | None:
        """The one-line exit for an input error a configured object raised: while instantiated, or before any
        loop ran (None: not one, or ``JSONARGPARSE_DEBUG``)."""
        if debug() or getattr(self, "config", None) is None:
            return None
        refused = refused_in(err)
        if refused is not None:
            return fail(self.prog, refused_line(refused, self._subconfig()))
        if self.loops_started.started:
            return None
        if self.config_init is None:  # raised while instantiating, outside a constructor (an argument link)
            instances = {path: None for path, _ in class_nodes(self._subconfig())}
        else:
            instances = instances_of(self.config_init[self.subcommand] if self.subcommand else self.config_init)
        line = hook_error_line(err, self._subconfig(), instances)
        return fail(self.prog, line) if line else None

    @override
    def instantiate_classes(self) -> None:
        self.parser.add_instantiator(default_instantiator, object, subclasses=True)
        super().instantiate_classes()
        self.weights_as_built = count_weights(self.model).total  # the summary counts a slimmed model against it
        # FLOPs in Lightning's model summary (torch.utils.flop_counter needs an example batch)
        if getattr(self.model, "example_input_array", None) is None:
            example = example_input(self.model, self.datamodule)
            if example is not None:
                self.model.example_input_array = example

    def print_summary(self, fitted: bool = True) -> None:
        """The end-of-run summary (rank zero; :mod:`lightning_sparse.cli.summary`)."""
        lines = summary_lines(self.trainer, self.model, getattr(self.model, "example_input_array", None), fitted,
                              getattr(self, "weights_as_built", None))
        title = self.prog if self.subcommand else "train.py (fit, then test)"
        _print_rank_zero("\n".join(["", f"---- {title}: summary", *lines]))

    def after_fit(self) -> None:
        self.print_summary()

    def after_validate(self) -> None:
        self.print_summary(fitted=False)

    def after_test(self) -> None:
        self.print_summary(fitted=False)

    @override
    def setup_parser(self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]) -> None:
        """Without subcommands (``train.py --config ...``: fit, then test) the parser takes ``fit``'s own arguments
        too (``--ckpt_path``, ``--weights_only``), as ``train.py fit`` does."""
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            self.parser.add_method_arguments(self.trainer_class, "fit", skip=self.subcommands()["fit"])

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("description", HELP)
        return super().init_parser(**kwargs)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse as LightningCLI does (reading the run's ``config.yaml`` when ``--ckpt_path`` names a run's checkpoint
        and no ``--config`` is given: :func:`~lightning_sparse.cli.runs.with_run_config`), then resolve
        ``--ckpt_path last`` / ``best`` and check the checkpoint is readable."""
        argv = list(sys.argv[1:] if args is None else args) if isinstance(args, list) or args is None else None
        with_config = with_run_config(argv, SUBCOMMANDS) if argv is not None else None
        if args is None and with_config != argv:  # sys.argv plus the run's config (super() warns on args + argv)
            self.config = parser.parse_args(with_config)
        else:
            super().parse_arguments(parser, with_config if with_config is not None else args)
        sub = self.config.get("subcommand")
        node = self.config[sub] if sub else self.config
        if node.get("ckpt_path"):
            try:
                resolve_ckpt_path(node)
            except (ValueError, FileNotFoundError) as err:
                if debug():
                    raise
                raise fail(f"train.py {sub}" if sub else "train.py", str(err)) from None

    best_checkpoint_patterns = staticmethod(best_checkpoint_patterns)
    best_checkpoint = staticmethod(best_checkpoint)
    last_checkpoint_patterns = staticmethod(last_checkpoint_patterns)

    @override
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

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Adds the defaults described in the module docstring to what the config asks for."""
        cfg = self._section("trainer") or {}
        run_name = self._section("run_name")
        run_folder = None
        if cli_managed_loggers(cfg.get("logger")) and "logger" not in kwargs:
            self.logger_records, folder, created = run_loggers(run_name, self._section("ckpt_path"), self.subcommand)
            kwargs["logger"] = [logger for logger, _ in self.logger_records]
            if self.subcommand in (None, "fit"):
                run_folder = RunFolder(folder, created)
        if cfg.get("default_root_dir") is None:  # SLURM's hpc_ckpt_N.ckpt lands here (the run folder), not in the cwd
            kwargs.setdefault("default_root_dir", str(run_folder.folder) if run_folder else f"{RUNS_DIR}/{run_name}")
        plugins = _as_list(cfg.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        sparsity = self._section("sparsity")  # the method's callback first: it owns the masks the others read
        callbacks = [*([sparsity] if sparsity is not None else []), *_as_list(cfg.get("callbacks"))]
        if cfg.get("enable_checkpointing") is not False and not any(isinstance(c, PreemptionCheckpoint) for c in callbacks):
            callbacks.append(PreemptionCheckpoint())
        kwargs["callbacks"] = [*kwargs.get("callbacks", callbacks), *([run_folder] if run_folder else []),
                               self.loops_started]
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except INPUT_ERRORS as err:
            if debug():
                raise
            raise fail(self.prog, trainer_error_line(err, {**dict(cfg), **kwargs})) from None
        self._record(trainer)
        return trainer

    def _record(self, trainer: Trainer) -> None:
        """Write the loggers and callbacks the CLI added into the config that ``config.yaml`` saves."""
        from jsonargparse import Namespace

        self._subconfig().ckpt_path = None  # a config.yaml run again starts a new run; it does not rewind this one
        cfg = self._subconfig().trainer

        def entry(obj: Any, **init_args: Any) -> Namespace:
            return Namespace(class_path=f"{type(obj).__module__}.{type(obj).__name__}", init_args=Namespace(**init_args))

        if cli_managed_loggers(cfg.get("logger")) and trainer.loggers:
            records = [(lg, rec) for lg, rec in self.logger_records if any(lg is x for x in trainer.loggers)]
            cfg.logger = [entry(lg, **rec) for lg, rec in records] or cfg.logger
        added = [cb for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)]
        if added and not any("PreemptionCheckpoint" in str(getattr(c, "class_path", "")) for c in _as_list(cfg.get("callbacks"))):
            cfg.callbacks = [*_as_list(cfg.get("callbacks")), entry(added[0])]


def _print_rank_zero(text: str) -> None:
    rank_zero_only(print)(text, flush=True)


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def default_loggers(run_name: str) -> list[Logger]:
    """The CSV + W&B (offline by default) loggers of a new run version ``runs/<run_name>/version_N``
    (:func:`~lightning_sparse.cli.runs.run_loggers`)."""
    return [logger for logger, _ in run_loggers(run_name, None, "fit")[0]]


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
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config_init.get("ckpt_path"),
                        weights_only=cli.config_init.get("weights_only"))
        if not cli.trainer.interrupted:
            cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=_test_checkpoint(cli.trainer))
        cli.print_summary()
        return cli
    except INPUT_ERRORS as err:  # raised by a configured object's hook (a subcommand's are handled by SparseCLI)
        exit_ = cli.input_error(err) if cli is not None else None
        if exit_ is None:
            raise
        raise exit_ from None
    except SIGTERMException:
        # stopped by SIGTERM (preemption, time limit): the checkpoint is written; exit as killed by SIGTERM
        raise SystemExit(128 + signal.SIGTERM) from None
    except RuntimeError as err:  # another process of a multi-process run died: its one line is printed already
        if lost_process_line(err) is None:
            raise
        raise SystemExit(1) from None
    finally:
        _finish_wandb()


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
