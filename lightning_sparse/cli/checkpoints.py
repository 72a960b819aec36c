"""``--ckpt_path last`` / ``best`` / a file: which checkpoint of the run a subcommand starts from."""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_info

from lightning_sparse.preemption import LAST_PATTERNS, checkpoint_is_readable, find_last_checkpoint
from lightning_sparse.run.folder import expand_latest
from lightning_sparse.utils.checkpoints import load_checkpoint

__all__ = ["RUNS_DIR", "best_checkpoint", "best_checkpoint_patterns", "last_checkpoint_patterns", "resolve_ckpt_path"]

RUNS_DIR = "runs"
_HINT = "; name the run with --run_name=<name> (or give its --config)"


def resolve_ckpt_path(cfg: Any, quiet: bool = False) -> None:
    """Set ``cfg.ckpt_path`` to a file. ``last``: the newest readable ``last*.ckpt`` / ``interrupted-*.ckpt`` /
    ``hpc_ckpt_*.ckpt`` of the run (each run logs into a new ``version_N``, so Lightning's own ``"last"``, which
    looks in the new run's directory, would find nothing); ``best``: :func:`best_checkpoint`; a path: must be a
    readable Lightning checkpoint. ``quiet``: do not say which file ``last`` / ``best`` resolved to.

    Raises:
        FileNotFoundError: no checkpoint matches, or the file does not exist.
        ValueError: the file is not a readable Lightning checkpoint.
    """
    path = cfg.ckpt_path = str(expand_latest(cfg.ckpt_path)) if "://" not in str(cfg.ckpt_path) else cfg.ckpt_path
    if path == "last":
        patterns = last_checkpoint_patterns(cfg)
        found = find_last_checkpoint(Path(p) for pattern in patterns for p in glob.glob(pattern))
        if found is None:
            raise FileNotFoundError(f"--ckpt_path=last: no readable checkpoint matches {patterns} "
                                    f"(run_name={cfg.run_name!r}{_HINT if cfg.run_name == 'default' else ''}).")
        cfg.ckpt_path = str(found)
        if not quiet:
            rank_zero_info(f"Resuming from {cfg.ckpt_path}")
    elif path == "best":
        found = best_checkpoint(cfg)
        if found is None:
            raise FileNotFoundError(f"--ckpt_path=best: no best checkpoint of run_name={cfg.run_name!r} "
                                    f"matches {best_checkpoint_patterns(cfg)}"
                                    f"{_HINT if cfg.run_name == 'default' else ''}.")
        cfg.ckpt_path = str(found)
        if not quiet:
            rank_zero_info(f"--ckpt_path=best: {cfg.ckpt_path}")
    elif path != "hpc" and "://" not in str(path) and not Path(path).is_file():
        raise FileNotFoundError(f"--ckpt_path={path!r}: no such file. Pass a .ckpt file, or 'last' / 'best'.")
    elif path not in ("best", "hpc") and Path(path).is_file() and (reason := checkpoint_is_readable(path)):
        raise ValueError(
            f"--ckpt_path={path!r} is not a readable Lightning checkpoint ({reason.rstrip('.')}). "
            "Pass a .ckpt file written by this project's training, or 'last' / 'best'."
        )


def best_checkpoint_patterns(cfg: Any) -> list[str]:
    """Glob patterns of the ``checkpoint`` callback's files (best by ``val/acc``), newest version last."""
    ckpt = cfg.get("checkpoint") or {}
    prefix = re.split(r"[{]", str(ckpt.get("filename") or "best"))[0]
    dirs = [ckpt["dirpath"]] if ckpt.get("dirpath") else [f"{RUNS_DIR}/{cfg.run_name}/version_*/checkpoints"]
    return [f"{d}/{prefix}*.ckpt" for d in dirs]


def best_checkpoint(cfg: Any) -> Path | None:
    """The best checkpoint of the run's newest version that has one (``--ckpt_path best``): the one the
    ``checkpoint`` callback recorded as best in that version's ``last.ckpt``, else the newest file."""
    files = [Path(p) for pattern in best_checkpoint_patterns(cfg) for p in glob.glob(pattern)]
    files = [p for p in files if not p.name.startswith(("last", "interrupted-"))]
    if not files:
        return None
    newest_dir = max(files, key=lambda p: p.stat().st_mtime).parent
    in_dir = sorted((p for p in files if p.parent == newest_dir), key=lambda p: p.stat().st_mtime)
    last = newest_dir / "last.ckpt"
    if len(in_dir) > 1 and last.is_file() and not checkpoint_is_readable(str(last)):
        state = load_checkpoint(last, mmap=True).get("callbacks", {})
        named = {Path(v.get("best_model_path") or "").name for k, v in state.items() if k.startswith("ModelCheckpoint")}
        in_dir = [p for p in in_dir if p.name in named] or in_dir
    return in_dir[-1]


def last_checkpoint_patterns(cfg: Any) -> list[str]:
    """Glob patterns (relative to the working directory) ``--ckpt_path last`` searches."""
    checkpoint_dir = (cfg.get("last_checkpoint") or {}).get("dirpath")
    run_dir = (cfg.get("trainer") or {}).get("default_root_dir") or f"{RUNS_DIR}/{cfg.run_name}"
    ckpt_dirs = [checkpoint_dir] if checkpoint_dir else [f"{RUNS_DIR}/{cfg.run_name}/version_*/checkpoints"]
    hpc_dirs = [run_dir, f"{RUNS_DIR}/{cfg.run_name}/version_*"]  # SLURM's requeue checkpoints: in the run folder
    return [f"{d}/{p}" for d in ckpt_dirs for p in LAST_PATTERNS if not p.startswith("hpc")] + [
        f"{d}/hpc_ckpt_*.ckpt" for d in hpc_dirs
    ]
