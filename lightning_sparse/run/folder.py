"""A run is its folder: ``runs/<run_name>/version_N`` holds everything of one training run, across resumes.

- :func:`run_folder_of`: the run version folder a checkpoint belongs to (``<folder>/checkpoints/<file>.ckpt``
  next to ``<folder>/config.yaml``), wherever the folder was moved or renamed to.
- :class:`RunCSVLogger`: Lightning's ``CSVLogger`` that continues the folder's ``metrics.csv`` when a run resumes
  (Lightning's own deletes it).
- :class:`RunFolder`: the callback the CLI adds. It keeps ``runs/<name>/latest`` pointing at the newest version;
  writes ``metrics.csv`` out with every checkpoint; on resume, has the resumed run's first written rows replace
  the rows logged at or after their step (work the stop lost, which the resumed run logs again); points
  ``ModelCheckpoint``'s best/top-k state at the folder's new place after a move; and when a start fails before
  its first training step, removes a new version folder (and its W&B run) or puts a resumed folder's
  ``config.yaml`` back.
- :func:`wandb_run_id`: the W&B run id of a run folder, so a resume continues the same W&B run.

``latest`` is a relative symlink (``latest -> version_3``). Where symlinks cannot be created (Windows without
developer mode), ``latest`` is a one-line text file holding the folder name instead; :func:`expand_latest`
reads either form.
"""

from __future__ import annotations

import csv
import os
import re
import secrets
import shutil
import socket
import string
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

__all__ = ["LATEST", "RunCSVLogger", "RunFolder", "expand_latest", "new_wandb_id", "run_folder_of", "update_latest",
           "wandb_run_id"]

LATEST = "latest"
_VERSION = re.compile(r"version_(\d+)$")
_HPC = re.compile(r"hpc_ckpt_\d+\.ckpt$")
_WANDB_DIR = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-([a-z0-9]+)$")


def expand_latest(path: str | Path) -> Path:
    """``path`` with a ``latest`` component that is the text-file fallback replaced by the folder it names."""
    path = Path(path)
    parts = path.parts
    for i, part in enumerate(parts):
        link = Path(*parts[: i + 1])
        if part == LATEST and (target := _latest_text(link)) is not None:
            return expand_latest(Path(*parts[:i], target, *parts[i + 1:]))
    return path


def _latest_text(link: Path) -> str | None:
    """The folder name a text-file ``latest`` holds (``version_N``), None for anything else."""
    if link.is_symlink() or not link.is_file() or link.stat().st_size > 64:
        return None
    text = link.read_text(errors="replace").strip()
    return text if _VERSION.match(text) else None


def run_folder_of(ckpt_path: str | Path) -> Path | None:
    """The run version folder holding ``ckpt_path`` (``<folder>/checkpoints/<file>`` or ``<folder>/hpc_ckpt_N.ckpt``,
    with ``<folder>/config.yaml`` and ``<folder>/metrics.csv``),
    with ``latest`` resolved to the version it points to; None for a checkpoint outside a run folder."""
    if "://" in str(ckpt_path) or str(ckpt_path) in ("last", "best", "hpc"):
        return None
    path = expand_latest(ckpt_path)
    if path.parent.name == "checkpoints":
        folder = path.parent.parent
    elif _HPC.match(path.name):  # SLURM's requeue checkpoint, in the run folder
        folder = path.parent
    else:
        return None
    if not (folder / "config.yaml").is_file() or not (folder / "metrics.csv").is_file():
        return None
    if LATEST in folder.parts or os.path.normpath(folder).split(os.sep)[-1] in ("", ".", ".."):
        folder = folder.resolve()  # the version folder itself, by a name that is not "latest" or "."
    return folder


def update_latest(name_dir: str | Path) -> Path | None:
    """Point ``<name_dir>/latest`` at the highest-numbered ``version_N`` folder (remove it when there is none).

    Returns the folder it points to. The link is replaced atomically (a new link renamed over the old one).
    """
    name_dir = Path(name_dir)
    versions = sorted((int(m.group(1)), p.name) for p in (name_dir.iterdir() if name_dir.is_dir() else ())
                      if (m := _VERSION.match(p.name)) and p.is_dir() and not p.is_symlink())
    link = name_dir / LATEST
    if (link.exists() or link.is_symlink()) and not link.is_symlink() and _latest_text(link) is None:
        rank_zero_info(f"{link} is not the run's 'latest' link: left as it is.")
        return None
    if not versions:
        link.unlink(missing_ok=True)
        return None
    target = versions[-1][1]
    tmp = name_dir / f".{LATEST}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        os.symlink(target, tmp, target_is_directory=True)
    except FileExistsError:
        raise
    except OSError:  # no symlinks here (Windows without developer mode): the text-file fallback
        tmp.write_text(target + "\n")
    os.replace(tmp, link)
    return name_dir / target


def new_wandb_id() -> str:
    """A W&B run id (8 characters of ``[a-z0-9]``, the alphabet W&B uses)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_run_id(folder: Path) -> str | None:
    """The W&B run id of a run folder: the ``id`` its ``config.yaml`` records for the W&B logger, else the id in the
    name of its newest ``wandb/[offline-]run-<date>-<id>`` folder."""
    cfg = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else None
    loggers = ((cfg or {}).get("trainer") or {}).get("logger")
    for entry in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(entry, dict) and "Wandb" in str(entry.get("class_path")) and (entry.get("init_args") or {}).get("id"):
            return str(entry["init_args"]["id"])
    found = sorted((p.name, m.group(1)) for p in (folder / "wandb").glob("*run-*") if (m := _WANDB_DIR.match(p.name)))
    return found[-1][1] if found else None


class _RunWriter(ExperimentWriter):
    """Lightning's CSV writer, keeping an existing ``metrics.csv`` (its header included).

    ``resuming``: set when the run resumes from a checkpoint. The first rows it writes then replace every row of
    the file logged at their first step or later (work the stop lost, which the resumed run logs again), so each
    step appears once; nothing is dropped before the resumed run has logged.
    """

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.resuming = False
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                self.metrics_keys = list(csv.DictReader(fh).fieldnames or [])

    @override
    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here; a resumed run appends to it
        pass

    @override
    def save(self) -> None:
        steps = [int(m["step"]) for m in self.metrics if m.get("step") is not None]
        if self.resuming and steps:
            self.resuming = False
            dropped = self._drop_from_step(min(steps))
            if dropped:
                rank_zero_info(f"metrics.csv: dropped {dropped} row(s) logged at step {min(steps)} or later before the "
                               "stop; the resumed run logs those steps again.")
        super().save()

    def _drop_from_step(self, step: int) -> int:
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        kept = [r for r in rows if not r.get("step") or int(float(r["step"])) < step]
        if len(kept) == len(rows):
            return 0
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.metrics_file_path)
        return len(rows) - len(kept)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` of a run folder: a resumed run appends to the folder's ``metrics.csv`` instead of deleting it.

    Args: as Lightning's ``CSVLogger``.
    """

    @property
    @override
    def experiment(self) -> _RunWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _RunWriter(log_dir=self.log_dir)
        return self._experiment


class RunFolder(pl.Callback):
    """The run folder's bookkeeping (added by the CLI, rank zero acts; see the module docstring).

    Args:
        folder: the run version folder (``runs/<name>/version_N``).
        created: whether this process started the folder (a new version), so a failed start may remove it.
    """

    def __init__(self, folder: str | Path, created: bool) -> None:
        self.folder = Path(folder)
        self.created = created
        self.trained = False
        self.removed = False
        self._csv_logger: RunCSVLogger | None = None
        config = self.folder / "config.yaml"  # a resumed folder's, put back if this start fails
        self._config = config.read_bytes() if not created and config.is_file() else None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, RunCSVLogger)), None)

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._csv_logger is not None and trainer.is_global_zero:  # a hard kill after this loses no logged row
            self._csv_logger.save()

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Mark ``metrics.csv`` as resuming, and point ``ModelCheckpoint``'s saved paths at this folder (they name the
        old place after a move or rename)."""
        if self._csv_logger is not None and trainer.is_global_zero and trainer.state.fn == "fit":
            self._csv_logger.experiment.resuming = True
        folder = run_folder_of(trainer.ckpt_path) if trainer.ckpt_path else None
        if folder is None or folder.resolve() != self.folder.resolve():
            return
        states = checkpoint.get("callbacks") or {}
        for cb in trainer.callbacks:
            state = states.get(cb.state_key) if isinstance(cb, ModelCheckpoint) else None
            if not state or not cb.dirpath or not state.get("dirpath") or state["dirpath"] == cb.dirpath:
                continue
            old, new = str(state["dirpath"]).rstrip(os.sep), str(cb.dirpath)

            def moved(path: Any, old: str = old, new: str = new) -> Any:
                if isinstance(path, str) and (path == old or path.startswith(old + os.sep)):
                    return new + path[len(old):]
                return path

            for key in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state:
                    state[key] = moved(state[key])
            if isinstance(state.get("best_k_models"), dict):
                state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.folder.is_dir():
            try:
                update_latest(self.folder.parent)
            except OSError as err:  # a convenience link: never the reason a run stops
                rank_zero_warn(f"Could not point {self.folder.parent / LATEST} at {self.folder.name}: {err}")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.trained = True

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.trained or not trainer.is_global_zero or not self.folder.exists():
            return
        try:
            if not self.created:  # a resume that failed to start: the folder keeps the config it ran with
                if self._config is not None:
                    (self.folder / "config.yaml").write_bytes(self._config)
                return
            for logger in trainer.loggers:  # close a W&B run that was started, before its folder goes
                if getattr(logger, "_experiment", None) is not None and hasattr(logger._experiment, "finish"):
                    logger._experiment.finish(exit_code=1)
            shutil.rmtree(self.folder)
            update_latest(self.folder.parent)
            if self.folder.parent.is_dir() and not any(self.folder.parent.iterdir()):
                self.folder.parent.rmdir()
        except Exception as err:  # noqa: BLE001 - cleanup must not hide the error that stopped the run
            rank_zero_warn(f"Could not clean up {self.folder} after the failed start: {type(err).__name__}: {err}")
            return
        self.removed = True
        sys.stderr.write(f"Removed {self.folder}: the run stopped before its first training step "
                         f"({type(exception).__name__}), so nothing of it is kept.\n")
