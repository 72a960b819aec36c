"""Run tests/scripts/ddp_masks.py in a subprocess and return each rank's saved masks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddp_masks.py"


def ddp_masks(method: str, out: Path, timeout: int = 600) -> list[dict]:
    proc = subprocess.run([sys.executable, str(SCRIPT), method, str(out)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def assert_equal_across_ranks(states: list[dict]) -> None:
    a, b = states
    assert a["masks"].keys() == b["masks"].keys() and a["masks"]
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k
    assert a["shapes"] == b["shapes"]
    assert a.get("removed") == b.get("removed")
    for k in a.get("weights", {}):  # DDP keeps the replicas identical, the mask updates included
        assert torch.equal(a["weights"][k], b["weights"][k]), k


def assert_update_iterations_exact(states: list[dict]) -> None:
    """Every rank saw mask updates, and in each the grown connections ended at 0 with zeroed momentum
    (RigL: nothing else moved in its update iteration)."""
    for r, s in enumerate(states):
        assert s["updates"] > 0, r
        assert s["violations"] == 0, (r, s["violations"])
