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
- Under DDP, SIGTERM may reach one rank, some or all (a scheduler's kill, ``kill <pid>``): the handler only
  records it, and at the end of every training step the ranks share what they received (one small
  all-reduce), so every rank stops after the same step and one ``interrupted-*.ckpt`` is written (by rank
  zero). Lightning's own SIGTERM handler runs a collective inside the signal handler and decides from rank
  zero's flag only: a SIGTERM that reaches rank 1 alone makes rank 1 stop while rank 0 waits in the next
  collective, a hang.
- A process of a multi-process run that dies (SIGKILL, out of memory) breaks the others' next collective:
  with gloo or NCCL on one machine they see it at once (connection reset); across machines whose peer
  vanished without closing its connections, after the process group's ``timeout`` (``DDPStrategy(timeout=)``;
  torch's default is 30 minutes for gloo, 10 for NCCL). No checkpoint is written then (the survivors' state
  may be half-way through a step); each survivor prints one line naming the newest checkpoint to resume
  from (:func:`lost_process_line`), and ``train.py`` exits with code 1 without the traceback.
- :func:`find_last_checkpoint` is what ``--ckpt_path last`` resolves to: the newest readable checkpoint
  of a run; an unreadable newest file falls back to the previous good one with one warning.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from pytorch_lightning.utilities.rank_zero import rank_prefixed_message
from typing_extensions import override

from lightning_sparse.utils.checkpoints import TRUSTED_GLOBALS, load_checkpoint
from lightning_sparse.utils.errors import InputError

__all__ = ["AtomicCheckpointIO", "PreemptionCheckpoint", "find_last_checkpoint", "checkpoint_is_readable",
           "lost_process_line"]

INTERRUPTED = "interrupted-epoch={epoch:03d}-step={step:06d}"
LAST_PATTERNS = ("last*.ckpt", "interrupted-*.ckpt", "hpc_ckpt_*.ckpt")
# what the gloo and NCCL transports say when a peer process is gone or stopped answering; torch raises a plain
# RuntimeError for these (gloo) or a DistBackendError (NCCL), so the text is the only mark. Pinned by
# tests/test_ddp_preemption.py::test_sigkill_of_one_rank_ends_the_others_with_one_line_then_resumes.
LOST_PEER_MARKS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting",
                   "NCCL communicator was aborted", "remote process exited or there was a network error")


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


def lost_process_line(exception: BaseException) -> str | None:
    """The one line :class:`PreemptionCheckpoint` printed (and attached to ``exception``) when it ended a
    multi-process fit because another process died or stopped answering (``None`` for any other exception)."""
    return getattr(exception, "lost_process_line", None)


def _is_lost_peer(exception: BaseException) -> bool:
    """A communication failure of the default process group: a peer exited or stopped answering."""
    if not isinstance(exception, RuntimeError) or not (dist.is_available() and dist.is_initialized()):
        return False
    return any(mark in str(exception) for mark in LOST_PEER_MARKS)


class PreemptionCheckpoint(Callback):
    """Save a checkpoint when fit stops early, at a state the run can resume from bitwise.

    Saves ``<dirpath>/interrupted-epoch=E-step=S.ckpt`` in ``on_exception`` when the exception is Lightning's
    ``SIGTERMException`` (raised between batches after SIGTERM) or any exception raised outside a training
    step while fitting on a single process (under DDP only SIGTERM, which every rank acts on at the same step).
    An exception inside a training step leaves weights, masks and optimizer state possibly half-updated:
    then nothing is written, and the run resumes from its newest periodic checkpoint.

    SIGTERM: from the start of training, this callback's handler replaces Lightning's; it only records the
    signal. At the end of each training step the ranks share what they received (one all-reduce of a few
    integers under DDP), and if any rank got SIGTERM every rank sets the trainer's SIGTERM flag, so Lightning
    raises ``SIGTERMException`` at the end of that same step on every rank: one checkpoint, the same step
    everywhere, whether the signal reached one rank, some or all. A SIGTERM that arrives after the last
    training step lets the run finish (its end-of-fit checkpoints are written as usual).

    A process of a multi-process run that dies (SIGKILL, out of memory) makes the others' next collective
    fail; nothing is written then, and each survivor prints one line at once (:func:`lost_process_line`):
    which rank, at which step, and the newest checkpoint to resume from with ``--ckpt_path last``. At once,
    not after teardown: with Lightning's own launcher, rank 0's child-process observer SIGKILLs rank 0 within
    5 s of a child's death.

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
            if name == "SIGTERM":
                raise ValueError("defer_signals: 'SIGTERM' is always handled at batch boundaries by "
                                 "PreemptionCheckpoint itself; list other signals, such as 'SIGUSR1'.")
        self.dirpath, self.filename, self.defer_signals = dirpath, filename, tuple(defer_signals)
        self._in_step = False
        self._steps_here = 0
        self._pending: set[int] = set()
        self._deferred: dict[int, Any] = {}
        self._sigterm_installed = False  # ours replaced Lightning's SIGTERM handler for this fit
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
        if self._sigterm_installed or self._deferred:
            self._run_signals(trainer)

    # -- exceptions ----------------------------------------------------------------------------------
    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._end_of_fit()
        if trainer.state.fn != TrainerFn.FITTING or self._steps_here == 0 or trainer.fast_dev_run:
            return  # nothing trained in this process: the newest checkpoint already holds this state
        sigterm = isinstance(exception, SIGTERMException)
        if not sigterm and trainer.world_size > 1 and _is_lost_peer(exception):
            self._report_lost_peer(trainer, exception)
            return
        if not sigterm and (self._in_step or trainer.world_size > 1):
            where = "inside a training step" if self._in_step else "on one rank of a multi-process run"
            rank_zero_warn(f"No checkpoint written for {type(exception).__name__}: it was raised {where}, so the "
                           "state may be half-updated. Resume from the newest periodic checkpoint (--ckpt_path last).")
            return
        path = self._dir(trainer) / f"{self.filename.format(epoch=trainer.current_epoch, step=trainer.global_step)}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint; under DDP every rank takes part, rank zero writes
        self.saved_path = str(path)
        cause = "SIGTERM" if sigterm else type(exception).__name__
        rank_zero_info(f"{cause} at step {trainer.global_step}: saved {path}; resume with --ckpt_path last")

    def _report_lost_peer(self, trainer: pl.Trainer, exception: BaseException) -> None:
        """Print on this rank (every survivor, not only rank zero) and attach to ``exception`` the one line that
        says what happened and where to resume from."""
        folder = self._dir(trainer)
        newest = find_last_checkpoint(path for pattern in LAST_PATTERNS for path in folder.glob(pattern))
        resume = (f"the newest checkpoint is {newest}; resume with --ckpt_path last" if newest is not None else
                  "no checkpoint was written yet: start the run again")
        first = str(exception).strip().splitlines()[0] if str(exception).strip() else ""
        line = rank_prefixed_message(
            f"another process of this {trainer.world_size}-process run exited or stopped answering during step "
            f"{trainer.global_step} ({type(exception).__name__}: {first}); nothing was saved at this step, "
            f"{resume}.", trainer.global_rank)
        exception.lost_process_line = line  # type: ignore[attr-defined]
        print(line, file=sys.stderr, flush=True)

    # -- signals at batch boundaries -----------------------------------------------------------------
    @override
    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_sigterm()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._install_sigterm()
        for name in self.defer_signals:
            signum = getattr(signal, name)
            handler = signal.getsignal(signum)
            if callable(handler) and handler != self._defer:
                try:
                    signal.signal(signum, self._defer)
                except ValueError:  # not the main thread: leave the handler as it is
                    continue
                self._deferred[signum] = handler

    def _install_sigterm(self) -> None:
        if self._sigterm_installed:
            return
        try:
            signal.signal(signal.SIGTERM, self._defer)
        except ValueError:  # not the main thread: Lightning's handler stays
            return
        self._sigterm_installed = True

    def _defer(self, signum: int, frame: Any) -> None:
        self._pending.add(signum)

    def _run_signals(self, trainer: pl.Trainer) -> None:
        """At the end of a step, on every rank: act on the signals any rank received since the last step."""
        watched = [signal.SIGTERM, *self._deferred]
        received = [int(s in self._pending) for s in watched]
        self._pending.clear()
        by_rank = torch.zeros(trainer.world_size, len(watched), dtype=torch.int64)
        by_rank[trainer.global_rank] = torch.tensor(received)
        if trainer.world_size > 1:  # one collective: which rank received which signal
            by_rank = trainer.strategy.reduce(by_rank.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        for k, signum in enumerate(watched):
            ranks = by_rank[:, k].nonzero().flatten().tolist()
            if not ranks:
                continue
            name = signal.Signals(signum).name
            if signum == signal.SIGTERM:
                where = f" (received by rank {', '.join(map(str, ranks))})" if trainer.world_size > 1 else ""
                rank_zero_info(f"SIGTERM{where}: every rank stops after step {trainer.global_step}")
                _stop_after_this_step(trainer)
            else:
                rank_zero_info(f"Running the {name} handler at the end of step {trainer.global_step}")
                self._deferred[signum](signum, None)

    def _end_of_fit(self) -> None:
        """Put back the deferred signals' handlers. Our SIGTERM handler stays until Lightning's teardown puts
        back the one from before fit: Lightning's own would run a collective inside the signal handler if a
        SIGTERM came during a save or the last collectives."""
        for signum, handler in self._deferred.items():
            signal.signal(signum, handler)
        self._deferred.clear()
        self._sigterm_installed = False

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_of_fit()


def _stop_after_this_step(trainer: pl.Trainer) -> None:
    """Make Lightning raise ``SIGTERMException`` at the end of the current training step, as its own SIGTERM
    handler does. Lightning 2.x has no public way to request that: its signal connector's flag is what the
    training loop reads (``trainer.received_sigterm``). Pinned by tests/test_preemption.py."""
    trainer._signal_connector.received_sigterm = True
