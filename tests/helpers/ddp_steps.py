"""Test callbacks for multi-process runs: signal or kill one rank (or the whole process group) during a chosen
step, and record every rank's per-step train losses and the step at which its fit stopped."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytorch_lightning as pl
import torch


class SignalRankAt(pl.Callback):
    """During step ``step`` (before the optimizer step) on rank ``rank``, send ``signal_name`` to this process
    (``target="self"``) or to its whole process group (``target="group"``: every rank, as a scheduler's kill)."""

    def __init__(self, step: int, rank: int = 0, signal_name: str = "SIGTERM", target: str = "self") -> None:
        if target not in ("self", "group"):
            raise ValueError(f"target must be 'self' or 'group', got {target!r}")
        self.step, self.rank, self.signum, self.target = step, rank, getattr(signal, signal_name), target

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            if self.target == "group":
                os.killpg(os.getpgid(0), self.signum)
            else:
                os.kill(os.getpid(), self.signum)


class StepLosses(pl.Callback):
    """Appends ``{"rank", "time", "step", "loss"}`` per training step, and ``{..., "stopped", "exception"}`` when fit
    ends by an exception, to ``<out_dir>/rank<r>.jsonl`` (flushed per line, so a killed process keeps its
    record). The loss is this rank's own (not reduced) ``training_step`` loss, exact as a Python float."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def _write(self, trainer, record: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"rank": trainer.global_rank, "time": time.time(), **record}) + "\n")
            f.flush()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._write(trainer, {"step": trainer.global_step - 1, "loss": float(torch.as_tensor(loss).item())})

    def on_exception(self, trainer, pl_module, exception):
        self._write(trainer, {"stopped": trainer.global_step, "exception": type(exception).__name__})


def read_records(out_dir: Path, rank: int, raw: bool = False) -> tuple[dict[int, float], list[dict]] | list[dict]:
    """``(step -> loss, the stop records)`` of one rank; ``raw``: every record as written."""
    path = Path(out_dir) / f"rank{rank}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    if raw:
        return rows
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, [r for r in rows if "stopped" in r]
