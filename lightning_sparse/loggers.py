"""Logger defaults: W&B offline unless asked otherwise, plus CSV, both under ``runs/``."""

from __future__ import annotations

import os
from typing import Any, Literal

from pytorch_lightning.loggers import WandbLogger as _PLWandbLogger
from pytorch_lightning.utilities import rank_zero_only
from typing_extensions import override

__all__ = ["WandbLogger", "resolve_wandb_mode"]

WandbMode = Literal["offline", "online", "disabled"]
_MODES = ("offline", "online", "disabled")


def resolve_wandb_mode(mode: str | None) -> str:
    """``mode`` if given, else ``$WANDB_MODE``, else ``"offline"`` (no account or network needed)."""
    resolved = mode if mode is not None else os.environ.get("WANDB_MODE", "offline")
    if resolved == "dryrun":  # wandb's historical alias
        resolved = "offline"
    if resolved not in _MODES:
        raise ValueError(f"W&B mode={resolved!r} is not supported; choose one of {list(_MODES)}.")
    return resolved


class WandbLogger(_PLWandbLogger):
    """Lightning's ``WandbLogger`` that runs **offline by default**.

    Offline runs land in ``<save_dir>/wandb/offline-run-*`` (``train.py``: ``runs/<name>/version_N/wandb``); upload with
    ``wandb sync <save_dir>/wandb/offline-run-*``. Set ``mode: online`` (or ``WANDB_MODE=online``) to
    stream live; ``disabled`` turns W&B off.

    Args:
        mode: ``"offline"`` | ``"online"`` | ``"disabled"``; default: ``$WANDB_MODE`` or ``"offline"``.
        **kwargs: Lightning ``WandbLogger`` arguments (``name``, ``project``, ``save_dir`` ...).
    """

    def __init__(self, mode: WandbMode | None = None, **kwargs: Any) -> None:
        kwargs.pop("offline", None)
        super().__init__(offline=False, mode=resolve_wandb_mode(mode), **kwargs)
        if self._wandb_init.get("anonymous") is None:  # Lightning always passes it; wandb >= 0.19 warns about it
            self._wandb_init.pop("anonymous", None)

    @property
    @override
    def experiment(self) -> Any:
        """The W&B run; its ``save_dir`` is created first (on rank zero, when the run starts, not before)."""
        if self._experiment is None and self._save_dir and rank_zero_only.rank == 0:
            os.makedirs(self._save_dir, exist_ok=True)  # wandb warns "git root ... does not exist" otherwise
        return super().experiment
