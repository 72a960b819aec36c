"""Finding and reading training runs: ``runs/<name>/version_N`` with ``config.yaml``, ``metrics.csv``, checkpoints.

Nothing here trains or builds a model; :mod:`lightning_sparse.compare.measure` does the measuring.
"""

from __future__ import annotations

import csv
import glob
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_sparse.run.folder import LATEST, expand_latest
from lightning_sparse.run.resolve import resolve_class
from lightning_sparse.utils.checkpoints import load_checkpoint
from lightning_sparse.utils.errors import InputError

__all__ = ["NotARunError", "Run", "resolve_runs", "read_run", "describe_method", "last_value", "series", "train_budget",
           "train_time"]

_VERSION = re.compile(r"^version_(\d+)$")


class NotARunError(InputError):
    """A path given to compare is not a run directory."""


@dataclass
class Run:
    """One training run as written by ``train.py`` (LightningCLI + CSV logger).

    Attributes:
        path: the ``version_N`` directory.
        config: the resolved ``config.yaml``.
        metrics: the rows of ``metrics.csv`` (column -> string, ``""`` where a row has no value).
        checkpoint: the checkpoint whose weights were tested (see :func:`pick_checkpoint`), or None.
        last_checkpoint: ``last.ckpt`` (end of fit), or None.
    """

    path: Path
    config: dict[str, Any]
    metrics: list[dict[str, str]]
    checkpoint: Path | None
    last_checkpoint: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """``<run_name>/version_N``."""
        return f"{self.path.parent.name}/{self.path.name}"


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "metrics.csv").is_file()


def _versions(path: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in path.iterdir() if p.is_dir() and (m := _VERSION.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_runs(patterns: list[str]) -> list[Path]:
    """Run directories for run dirs or glob patterns; ``runs/<name>`` means its latest ``version_N``.

    Raises:
        ValueError: a pattern that matches nothing (or an empty list of patterns).
        NotARunError: a path that is neither a run (``config.yaml`` + ``metrics.csv``) nor a
            ``runs/<name>`` directory whose latest ``version_N`` is one; the message names it.
    """
    if not patterns:
        raise InputError("no runs given: pass run directories or glob patterns, e.g. 'runs/*'.")
    out: list[Path] = []
    for pattern in patterns:
        # a glob skips runs/<name>/latest (an alias of a version it also matches)
        matches = sorted(m for m in glob.glob(pattern) if Path(m).name != LATEST) if glob.has_magic(pattern) else [pattern]
        if not matches or not Path(matches[0]).exists():
            raise InputError(f"{pattern!r} matches no file or directory.")
        for match in map(expand_latest, matches):  # runs/<name>/latest: the link, or its text-file fallback
            run = match if _is_run(match) else None
            if run is None and match.is_dir():
                versions = _versions(match)
                run = versions[-1] if versions and _is_run(versions[-1]) else None
            if run is None:
                raise NotARunError(_not_a_run(match))
            if run.resolve() not in {p.resolve() for p in out}:
                out.append(run)
    return out


def _not_a_run(path: Path) -> str:
    msg = (f"{str(path)!r} is not a run directory: expected config.yaml and metrics.csv in it "
           "(runs/<name>/version_N), or version_N subdirectories whose latest holds them (runs/<name>).")
    if path.is_dir():
        nested = [p.name for p in path.iterdir() if p.is_dir() and _versions(p)]
        if nested:
            msg += f" It holds runs ({', '.join(sorted(nested)[:3])}, ...): pass '{path}/*'."
        elif _versions(path):
            msg += f" Its latest version {_versions(path)[-1].name} lacks config.yaml or metrics.csv."
    return msg


def read_run(path: Path) -> Run:
    """Read ``config.yaml`` and ``metrics.csv`` of a run and locate its checkpoints."""
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    with (path / "metrics.csv").open(newline="") as f:
        metrics = list(csv.DictReader(f))
    run = Run(path, config, metrics, None, None)
    run.checkpoint, run.last_checkpoint = pick_checkpoint(path, config)
    if run.checkpoint is None:
        run.notes.append("no checkpoint: nonzero params, params/FLOPs and timing are missing")
    return run


def callbacks_of(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The callbacks a run's config names: its ``sparsity`` section first, then ``trainer.callbacks``."""
    cbs = (config.get("trainer") or {}).get("callbacks") or []
    cbs = [cbs] if isinstance(cbs, dict) else [c for c in cbs if isinstance(c, dict)]
    sparsity = config.get("sparsity")
    return [sparsity, *cbs] if isinstance(sparsity, dict) else cbs


def _changes_architecture(config: dict[str, Any]) -> bool:
    """Whether a callback of the run reshapes the model during fit (Chase slimming), as train.py decides."""
    for cb in callbacks_of(config):
        try:
            cls = resolve_class(cb.get("class_path", ""))
        except ValueError:
            continue
        if getattr(cls, "changes_architecture", False):
            return True
    return False


def pick_checkpoint(path: Path, config: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """``(tested checkpoint, last.ckpt)``: the one ``train.py`` tests after fit, and the end-of-fit one.

    ``train.py`` tests the best checkpoint (``checkpoint`` callback, by ``val/acc``), or the final weights
    when a callback reshaped the model during fit; ``last.ckpt`` holds the final weights.
    """
    dirs = [path / "checkpoints"]
    for key in ("checkpoint", "last_checkpoint"):
        dirpath = (config.get(key) or {}).get("dirpath")
        if dirpath:
            dirs.append(Path(dirpath))
    ckpts = sorted({p for d in dirs if d.is_dir() for p in d.glob("*.ckpt")})
    if not ckpts:
        return None, None
    last = next((p for p in ckpts if p.name.startswith("last")), None)
    best = [p for p in ckpts if not p.name.startswith("last")]
    if _changes_architecture(config) and last is not None:
        return last, last
    if len(best) > 1 and last is not None:  # save_top_k > 1: ask the checkpoint callback which is best
        state = load_checkpoint(last, mmap=True)
        named = [s.get("best_model_path") for k, s in state.get("callbacks", {}).items() if k.startswith("ModelCheckpoint")]
        best = [p for p in best if str(p) in named or p.name in {Path(n).name for n in named if n}] or best
    return (best[0] if best else last), last


def describe_method(config: dict[str, Any]) -> dict[str, Any]:
    """Method label and its key settings from the callbacks in a run's config.

    ``{"method", "density", "S_c", "N:M", "mode", "seed"}``; settings a method does not have are None.
    DynamicSparsity with gradient growth is RigL, with random growth SET; NMSparsity is SR-STE or STE;
    GradualMagnitudePruning is GMP; OneShotPruning is one-shot (unstructured) or one-shot N:M.
    """
    out: dict[str, Any] = {"method": "dense", "density": 1.0, "S_c": None, "N:M": None, "mode": None,
                           "seed": config.get("seed_everything")}
    labels = []
    for cb in callbacks_of(config):
        cls = str(cb.get("class_path", "")).rpartition(".")[2]
        args = cb.get("init_args") or {}
        if cls == "DynamicSparsity":
            labels.append({"gradient": "RigL", "random": "SET"}.get(args.get("growth", "gradient"), f"DST-{args.get('growth')}"))
            out["density"] = args.get("density", 0.1)
        elif cls == "Chase":
            labels.append("Chase (prune skip)" if args.get("residual_channels") else "Chase")
            out["density"], out["S_c"] = args.get("density", 0.1), args.get("channel_sparsity", 0.4)
            out["mode"] = f"slim:{args.get('slim', 'during')}"
        elif cls == "GradualMagnitudePruning":
            labels.append("GMP")
            out["density"] = args.get("density", 0.1)
        elif cls == "OneShotPruning":
            nm = args.get("pattern", "unstructured") == "nm"
            labels.append("one-shot N:M" if nm else "one-shot")
            out["density"] = args.get("n", 2) / args.get("m", 4) if nm else args.get("density", 0.1)
            out["N:M"] = f"{args.get('n', 2)}:{args.get('m', 4)}" if nm else None
        elif cls == "NMSparsity":
            mode = args.get("mode", "srste")
            n, m = args.get("n", 2), args.get("m", 4)
            labels.append("SR-STE" if mode == "srste" else "STE")
            out["N:M"], out["mode"] = f"{n}:{m}", mode
            out["density"] = n / m if len(labels) == 1 else out["density"] * n / m
    if labels:
        out["method"] = " + ".join(labels)
    return out


def _float(value: str) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def last_value(metrics: list[dict[str, str]], key: str) -> float | None:
    """The last logged value of ``key`` in ``metrics.csv`` rows, or None if it was never logged.

    Example:
        >>> rows = [{"step": "0", "val/acc": "0.5"}, {"step": "1", "val/acc": "0.75"}, {"step": "2", "val/acc": ""}]
        >>> last_value(rows, "val/acc"), last_value(rows, "test/acc")
        (0.75, None)
    """
    for row in reversed(metrics):
        v = _float(row.get(key, ""))
        if v is not None:
            return v
    return None


def series(metrics: list[dict[str, str]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of every row that logged ``key``."""
    steps, values = [], []
    for row in metrics:
        v, s = _float(row.get(key, "")), _float(row.get("step", ""))
        if v is not None and s is not None:
            steps.append(s)
            values.append(v)
    return steps, values


def train_time(run: Run) -> tuple[float | None, str | None]:
    """Wall-clock seconds of fit: Lightning's ``Timer`` state in ``last.ckpt`` when the run had one, else the
    time between writing ``config.yaml`` (fit start) and ``last.ckpt`` (end of the last epoch)."""
    if run.last_checkpoint is None:
        return None, None
    state = load_checkpoint(run.last_checkpoint, mmap=True)
    for key, value in state.get("callbacks", {}).items():
        if key.startswith("Timer") and isinstance(value, dict):
            elapsed = (value.get("time_elapsed") or {}).get("train")
            if elapsed is not None:
                return float(elapsed), "Timer"
    seconds = run.last_checkpoint.stat().st_mtime - (run.path / "config.yaml").stat().st_mtime
    return (seconds, "file times") if seconds > 0 else (None, None)


def _world_size(config: dict[str, Any]) -> int | None:
    """Training processes of a run from its ``trainer`` section (devices x nodes), None where the config does
    not say (``devices: auto`` on an accelerator other than the CPU)."""
    trainer = config.get("trainer") or {}
    devices, nodes = trainer.get("devices", "auto"), trainer.get("num_nodes", 1)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif devices in ("auto", None) and str(trainer.get("accelerator", "auto")) == "cpu":
        devices = 1
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1 or not isinstance(nodes, int):
        return None
    return devices * nodes


def train_budget(run: Run) -> dict[str, Any]:
    """What fit spent, from Lightning's loop state in ``last.ckpt``: ``epochs`` (whole epochs trained),
    ``optimizer_steps`` (``global_step``), ``train_batches`` (per process) and ``images_seen`` (train batches x
    ``data.init_args.batch_size`` x processes; the train loaders drop their last partial batch). A value the
    run does not hold (no ``last.ckpt``, no batch size in its config, an unknown number of processes) is None.

    Example:
        >>> import tempfile, torch
        >>> d = Path(tempfile.mkdtemp())
        >>> loops = {"fit_loop": {"epoch_loop.batch_progress": {"total": {"completed": 60}, "is_last_batch": True}}}
        >>> torch.save({"epoch": 2, "global_step": 30, "loops": loops}, d / "last.ckpt")
        >>> config = {"trainer": {"devices": 1}, "data": {"init_args": {"batch_size": 32}}}
        >>> budget = train_budget(Run(d, config, [], None, d / "last.ckpt"))
        >>> budget["epochs"], budget["optimizer_steps"], budget["images_seen"]
        (3, 30, 1920)
    """
    out: dict[str, Any] = {"epochs": None, "optimizer_steps": None, "train_batches": None, "images_seen": None}
    if run.last_checkpoint is None:
        return out
    state = load_checkpoint(run.last_checkpoint, mmap=True)
    progress = ((state.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.batch_progress") or {}
    if "epoch" in state:  # saved at the end of an epoch: that epoch counts; mid-epoch: the whole ones before it
        out["epochs"] = int(state["epoch"]) + (1 if progress.get("is_last_batch") else 0)
    if "global_step" in state:
        out["optimizer_steps"] = int(state["global_step"])
    batches = (progress.get("total") or {}).get("completed")
    batch_size = ((run.config.get("data") or {}).get("init_args") or {}).get("batch_size")
    world = _world_size(run.config)
    if isinstance(batches, int):
        out["train_batches"] = batches
        if isinstance(batch_size, int) and world is not None:
            out["images_seen"] = batches * batch_size * world
    return out
