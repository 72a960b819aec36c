"""The LightningCLI of ``train.py``: :class:`SparseCLI` and its entry point :func:`main`."""

from lightning_sparse.cli.app import SparseCLI, default_loggers, main

__all__ = ["SparseCLI", "default_loggers", "main"]
