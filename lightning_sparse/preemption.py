"""Preemption-safe checkpoints: nothing lost to SIGTERM, a time limit or a SLURM requeue.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target directory,
  fsyncs it and renames it into place, so a kill during a save never leaves a half-written ``.ckpt``.
- :class:`PreemptionCheckpoint` saves ``interrupted-epoch=E-step=S.ckpt`` next to ``last.ckpt`` when a
  run is stopped by SIGTERM (Lightning turns it into ``SIGTERMException`` at the next batch boundary), or
  by another exception raised between training steps. Under SLURM auto-requeue it also moves Lightning's
  requeue handler (``SIGUSR1``: save ``hpc_ckpt_N.ckpt``, ``scontrol requeue``) from wherever the signal
  lands to the next batch boundary, so the HPC checkpoint is a consistent state too.
- :class:`AtomicCheckpointIO` also reads every checkpoint Lightning loads (``ckpt_path=``) through
  :func:`lightning_sparse.utils.checkpoints.load_checkpoint`: weights-only, under the project's one policy.
- :func:`find_last_checkpoint` is what ``--ckpt_path last`` resolves to: the newest readable checkpoint
  of a run; an unreadable newest file falls back to the previous good one with one warning.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from typing_extensions import override

from lightning_sparse.utils.checkpoints import TRUSTED_GLOBALS, load_checkpoint
from lightning_sparse.utils.errors import InputError

__all__ = ["AtomicCheckpointIO", "PreemptionCheckpoint", "find_last_checkpoint", "checkpoint_is_readable"]

INTERRUPTED = "interrupted-epoch={epoch:03d}-step={step:06d}"
LAST_PATTERNS = ("last*.ckpt", "interrupted-*.ckpt", "hpc_ckpt_*.ckpt")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: temp file in the same directory, ``fsync``,
    ``os.replace``. Lightning's own save goes through a temp file in ``$TMPDIR`` and ``shutil.move``,
    which copies (not atomically) when the run directory is on another file system, as on clusters."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote file systems keep fsspec's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}.")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @override
    def load_checkpoint(self, path: _PATH, map_location: Any | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Load as :func:`lightning_sparse.utils.checkpoints.load_checkpoint` does: ``weights_only=True``, said
        explicitly, for our own checkpoints and any other file (the reason is in that module's docstring).
        ``map_location`` defaults to Lightning's (tensors stay on the CPU until the strategy moves them).

        Raises:
            ValueError: ``weights_only=False`` was asked for (this project never unpickles arbitrary objects).
            UnreadableCheckpoint, UntrustedCheckpoint: as :func:`~lightning_sparse.utils.checkpoints.load_checkpoint`.
        """
        if weights_only is False:
            raise ValueError(f"{type(self).__name__} loads every checkpoint with weights_only=True "
                             "(lightning_sparse.utils.checkpoints); got weights_only=False.")
        if "://" in str(path):  # remote file systems: Lightning's fsspec reader, with the same decision
            with torch.serialization.safe_globals(list(TRUSTED_GLOBALS)):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(path, map_location=map_location)


def checkpoint_is_readable(path: str | Path) -> str | None:
    """``None`` if ``path`` loads as a Lightning checkpoint, else the reason it does not."""
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except InputError as err:  # missing, truncated, not a torch file, or holding objects we never unpickle
        return str(err)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        return "not a Lightning checkpoint (no 'state_dict')"
    return None


def find_last_checkpoint(candidates: Iterable[Path], warn: Callable[[str], None] = rank_zero_warn) -> Path | None:
    """The newest (by modification time) readable file among ``candidates``.

    If the newest file cannot be read (truncated, zero bytes, not a checkpoint), the next newest readable
    one is returned and ``warn`` is called once naming both files. ``None`` if none is readable.
    """
    found = sorted({Path(p) for p in candidates if Path(p).is_file()}, key=lambda p: p.stat().st_mtime, reverse=True)
    bad: list[tuple[Path, str]] = []
    for path in found:
        reason = checkpoint_is_readable(path)
        if reason is None:
            if bad:
                skipped = ", ".join(f"{p} ({r})" for p, r in bad)
                warn(f"--ckpt_path last: the newest checkpoint is unreadable: {skipped}; "
                     f"resuming from the previous good one, {path}.")
            return path
        bad.append((path, reason))
    return None


class PreemptionCheckpoint(Callback):
    """Save a checkpoint when fit stops early, at a state the run can resume from bitwise.

    Saves ``<dirpath>/interrupted-epoch=E-step=S.ckpt`` in ``on_exception`` when the exception is Lightning's
    ``SIGTERMException`` (raised between batches after SIGTERM) or any exception raised outside a training
    step while fitting on a single process (under DDP only SIGTERM, which every rank sees at the same step).
    An exception inside a training step leaves weights, masks and optimizer state possibly half-updated:
    then nothing is written, and the run resumes from its newest periodic checkpoint.

    A plain ``Callback`` (not a ``Checkpoint``), so ``trainer.checkpoint_callback`` stays the best-model
    ``ModelCheckpoint``; put it after the callbacks whose state it saves (the CLI appends it).

    Signals whose handler is installed when training starts in ``defer_signals`` (default ``SIGUSR1``,
    Lightning's SLURM requeue signal) are deferred: the handler runs at the next batch boundary (on every
    rank at the same step under DDP) instead of mid-step.

    Args:
        dirpath: where to write; default: the directory of the trainer's first ``ModelCheckpoint``
            (``runs/<run_name>/version_N/checkpoints``), else ``<default_root_dir>/checkpoints``.
        filename: format string with ``epoch`` and ``step``.
        defer_signals: signal names whose handlers run at batch boundaries.
    """

    def __init__(self, dirpath: str | None = None, filename: str = INTERRUPTED,
                 defer_signals: tuple[str, ...] = ("SIGUSR1",)) -> None:
        super().__init__()
        for name in defer_signals:
            if not hasattr(signal, name):
                raise ValueError(f"defer_signals: unknown signal {name!r}; use names such as 'SIGUSR1'.")
        self.dirpath, self.filename, self.defer_signals = dirpath, filename, tuple(defer_signals)
        self._in_step = False
        self._steps_here = 0
        self._pending: set[int] = set()
        self._deferred: dict[int, Any] = {}
        self.saved_path: str | None = None

    # -- where ---------------------------------------------------------------------------------------
    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"

    # -- step bookkeeping ----------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._in_step = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._in_step = False
        self._steps_here += 1
        if self._deferred:
            self._run_deferred(trainer)

    # -- exceptions ----------------------------------------------------------------------------------
    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if trainer.state.fn != TrainerFn.FITTING or self._steps_here == 0 or trainer.fast_dev_run:
            return  # nothing trained in this process: the newest checkpoint already holds this state
        sigterm = isinstance(exception, SIGTERMException)
        if not sigterm and (self._in_step or trainer.world_size > 1):
            where = "inside a training step" if self._in_step else "on one rank of a multi-process run"
            rank_zero_warn(f"No checkpoint written for {type(exception).__name__}: it was raised {where}, so the "
                           "state may be half-updated. Resume from the newest periodic checkpoint (--ckpt_path last).")
            return
        path = self._dir(trainer) / f"{self.filename.format(epoch=trainer.current_epoch, step=trainer.global_step)}.ckpt"
        trainer.save_checkpoint(path)
        self.saved_path = str(path)
        cause = "SIGTERM" if sigterm else type(exception).__name__
        rank_zero_info(f"{cause} at step {trainer.global_step}: saved {path}; resume with --ckpt_path last")

    # -- deferred signals ----------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name in self.defer_signals:
            signum = getattr(signal, name)
            handler = signal.getsignal(signum)
            if callable(handler) and handler != self._defer:
                try:
                    signal.signal(signum, self._defer)
                except ValueError:  # not the main thread: leave the handler as it is
                    continue
                self._deferred[signum] = handler

    def _defer(self, signum: int, frame: Any) -> None:
        self._pending.add(signum)

    def _run_deferred(self, trainer: pl.Trainer) -> None:
        pending = sorted(self._pending)
        if trainer.world_size > 1:  # every rank acts at the same step, even if the signal reached one rank
            flags = [trainer.strategy.reduce_boolean_decision(s in self._pending, all=False) for s in self._deferred]
            pending = [s for s, flag in zip(self._deferred, flags) if flag]
        self._pending.clear()
        for signum in pending:
            rank_zero_info(f"Running the {signal.Signals(signum).name} handler at the end of step {trainer.global_step}")
            self._deferred[signum](signum, None)

    def _restore_handlers(self) -> None:
        for signum, handler in self._deferred.items():
            signal.signal(signum, handler)
        self._deferred.clear()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
