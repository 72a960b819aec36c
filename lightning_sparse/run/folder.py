"""A run is its folder: ``runs/<run_name>/version_N`` holds everything of one training run, across resumes.

- :func:`run_folder_of`: the run version folder a checkpoint belongs to (``<folder>/checkpoints/<file>.ckpt``
  next to ``<folder>/config.yaml``), wherever the folder was moved or renamed to.
- :class:`RunCSVLogger`: Lightning's ``CSVLogger`` that continues the folder's ``metrics.csv`` when a run resumes
  (Lightning's own deletes it), dropping the rows logged after the checkpoint it resumes from.
- :class:`RunFolder`: the callback the CLI adds. It keeps ``runs/<name>/latest`` pointing at the newest version,
  records in each checkpoint how many ``metrics.csv`` rows it covers, points ``ModelCheckpoint``'s best/top-k
  state at the folder's new place after a move, and removes a new version folder (and its W&B run) when the run
  fails before its first training step.
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
import string
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

__all__ = ["LATEST", "RunCSVLogger", "RunFolder", "expand_latest", "new_wandb_id", "run_folder_of", "update_latest",
           "wandb_run_id"]

LATEST = "latest"
_VERSION = re.compile(r"version_(\d+)$")
_WANDB_DIR = re.compile(r"(?:offline-)?run-\d{8}_\d{6}-([a-z0-9]+)$")


def expand_latest(path: str | Path) -> Path:
    """``path`` with a ``latest`` component that is the text-file fallback replaced by the folder it names."""
    path = Path(path)
    parts = path.parts
    for i, part in enumerate(parts):
        link = Path(*parts[: i + 1])
        if part == LATEST and link.is_file() and not link.is_symlink():
            target = link.read_text().strip()
            return expand_latest(Path(*parts[:i], target, *parts[i + 1:]))
    return path


def run_folder_of(ckpt_path: str | Path) -> Path | None:
    """The run version folder holding ``ckpt_path`` (``<folder>/checkpoints/<file>`` or ``<folder>/<file>``, with
    ``<folder>/config.yaml``),
    with ``latest`` resolved to the version it points to; None for a checkpoint outside a run folder."""
    path = expand_latest(ckpt_path)
    if "://" in str(ckpt_path):
        return None
    # <folder>/checkpoints/<file>, or <folder>/hpc_ckpt_N.ckpt (SLURM's requeue checkpoint, in the run folder)
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not (folder / "config.yaml").is_file():
        return None
    if folder.name == LATEST or any(p.name == LATEST for p in folder.parents):
        folder = Path(os.path.relpath(folder.resolve())) if not folder.is_absolute() else folder.resolve()
    return folder


def update_latest(name_dir: str | Path) -> Path | None:
    """Point ``<name_dir>/latest`` at the highest-numbered ``version_N`` folder (remove it when there is none).

    Returns the folder it points to. The link is replaced atomically (a new link renamed over the old one).
    """
    name_dir = Path(name_dir)
    versions = sorted((int(m.group(1)), p.name) for p in (name_dir.iterdir() if name_dir.is_dir() else ())
                      if (m := _VERSION.match(p.name)) and p.is_dir() and not p.is_symlink())
    link = name_dir / LATEST
    if link.is_dir() and not link.is_symlink():
        rank_zero_info(f"{link} is a folder, not the run's 'latest' link: left as it is.")
        return None
    if not versions:
        link.unlink(missing_ok=True)
        return None
    target = versions[-1][1]
    tmp = name_dir / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target, tmp, target_is_directory=True)
    except OSError:  # no symlinks here: the documented text-file fallback
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
    """Lightning's CSV writer, keeping an existing ``metrics.csv`` (header included) and counting its rows."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.rows = 0
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                reader = csv.DictReader(fh)
                self.metrics_keys = list(reader.fieldnames or [])
                self.rows = sum(1 for _ in reader)

    @override
    def _check_log_dir_exists(self) -> None:  # Lightning deletes metrics.csv here; a resumed run appends to it
        pass

    @override
    def save(self) -> None:
        pending = len(self.metrics)
        super().save()
        self.rows += pending

    def keep_rows(self, n: int) -> int:
        """Drop the rows after the first ``n`` (written or pending); return how many were dropped."""
        self.save()
        if self.rows <= n:
            return 0
        with open(self.metrics_file_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        tmp = f"{self.metrics_file_path}.tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows[:n])
        os.replace(tmp, self.metrics_file_path)
        dropped, self.rows = self.rows - n, n
        return dropped


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

    def rows(self) -> int:
        """Rows of ``metrics.csv`` logged so far, written or pending (rank zero; 0 elsewhere)."""
        writer = self._experiment
        return writer.rows + len(writer.metrics) if isinstance(writer, _RunWriter) else 0


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

    @property
    def state_key(self) -> str:
        return "RunFolder"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, RunCSVLogger)), None)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"metrics_rows": self._csv_logger.rows()} if self._csv_logger is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rows = state_dict.get("metrics_rows")
        if rows is not None and self._csv_logger is not None and rank_zero_only.rank == 0:
            dropped = self._csv_logger.experiment.keep_rows(int(rows))
            if dropped:
                rank_zero_info(f"metrics.csv: dropped {dropped} row(s) logged after the checkpoint this run resumes from.")

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Point ``ModelCheckpoint``'s saved paths at this folder (they name the old place after a move or rename)."""
        ckpt_path = trainer.ckpt_path
        states = checkpoint.get("callbacks") or {}
        for cb in trainer.callbacks:
            state = states.get(cb.state_key) if isinstance(cb, ModelCheckpoint) else None
            if not state or not cb.dirpath or not state.get("dirpath") or state["dirpath"] == cb.dirpath:
                continue
            if ckpt_path is None or Path(ckpt_path).resolve().parent != Path(cb.dirpath).resolve():
                continue
            old, new = str(state["dirpath"]), str(cb.dirpath)

            def moved(path: Any, old: str = old, new: str = new) -> Any:
                return new + path[len(old):] if isinstance(path, str) and path.startswith(old) else path

            for key in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
                if key in state:
                    state[key] = moved(state[key])
            if isinstance(state.get("best_k_models"), dict):
                state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.folder.is_dir():
            update_latest(self.folder.parent)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.trained = True

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.trained or not self.created or not trainer.is_global_zero or not self.folder.exists():
            return
        for logger in trainer.loggers:  # close a W&B run that was started, before its folder goes
            if getattr(logger, "_experiment", None) is not None and hasattr(logger._experiment, "finish"):
                logger._experiment.finish(exit_code=1)
        shutil.rmtree(self.folder, ignore_errors=True)
        update_latest(self.folder.parent)
        if self.folder.parent.is_dir() and not any(self.folder.parent.iterdir()):
            self.folder.parent.rmdir()
        self.removed = True
        sys.stderr.write(f"Removed {self.folder}: the run stopped before its first training step "
                         f"({type(exception).__name__}), so nothing of it is kept.\n")
