"""The LightningCLI of ``train.py`` (:class:`SparseCLI`, its entry point :func:`main`) and the front the module
commands share (:mod:`lightning_sparse.cli.commands`).

The names below are imported on first use, so that ``python -m lightning_sparse.export|compare|benchmark``
load only the parsing and error modules they need, not the training CLI and its loggers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["SparseCLI", "default_loggers", "main"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from lightning_sparse.cli import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
