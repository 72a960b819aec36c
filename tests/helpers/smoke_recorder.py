"""A callback for CLI smoke runs: records what the run did, independently of the sparsity callbacks' own flags.

Add it on the command line (``--trainer.callbacks+=tests.helpers.smoke_recorder.SmokeRecorder``) with the
output path in the environment variable ``SMOKE_RECORD``. Under ``fast_dev_run`` Lightning swaps every logger
for a ``DummyLogger``; the recorder puts a logger back that keeps every logged metric with its step. It also
writes what it observes itself:

- ``params_start`` / ``params_end``: parameter count at fit start and after fit (after any slimming);
- ``zero_flips``: conv/linear weights whose zero/non-zero state changed between train start and train end
  (a DST mask update drops trained weights to exactly 0 and grows weights that were exactly 0);
- ``nm_layers``: layers whose weight, as the training forward saw it, has at most ``n`` non-zeros in every
  group of ``m`` along the input channels (``n``, ``m`` read from an ``NMSparsity`` callback's arguments).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from torch import nn


class RecordingLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "smoke"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append({"step": step, **{k: float(v) for k, v in metrics.items()}})


def _nm_ok(weight: torch.Tensor, n: int, m: int) -> bool:
    if weight.dim() < 2 or weight.shape[1] % m or not weight.count_nonzero():
        return False
    w = weight.movedim(1, -1).reshape(-1, m)  # groups of m consecutive input channels
    return bool(((w != 0).sum(dim=1) <= n).all())


class SmokeRecorder(pl.Callback):
    def __init__(self) -> None:
        self.logger = RecordingLogger()
        self.record: dict[str, Any] = {"nm_layers": []}
        self._zeros: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._nm: tuple[int, int] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            trainer.loggers = [self.logger]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.record["params_start"] = sum(p.numel() for p in pl_module.parameters())
        nm = [cb for cb in trainer.callbacks if type(cb).__name__ == "NMSparsity"]
        self._nm = (nm[0].n, nm[0].m) if nm else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._zeros = {n: (p == 0).clone() for n, p in self._weights(pl_module)}
        if self._nm is not None:
            for name, mod in pl_module.named_modules():
                if isinstance(mod, (nn.Conv2d, nn.Linear)):
                    self._hooks.append(mod.register_forward_pre_hook(self._check_nm(name)))

    def _check_nm(self, name: str):
        def hook(mod: nn.Module, args: Any) -> None:
            if mod.training and self._nm is not None and _nm_ok(mod.weight.detach(), *self._nm):
                if name not in self.record["nm_layers"]:
                    self.record["nm_layers"].append(name)
        return hook

    @staticmethod
    def _weights(pl_module: pl.LightningModule) -> list[tuple[str, torch.Tensor]]:
        return [(f"{m}.weight", mod.weight.detach()) for m, mod in pl_module.named_modules()
                if isinstance(mod, (nn.Conv2d, nn.Linear))]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        flips = 0
        for name, w in self._weights(pl_module):
            before = self._zeros.get(name)
            if before is not None and before.shape == w.shape:
                flips += int(((w == 0) ^ before).sum())
        self.record["zero_flips"] = flips
        for h in self._hooks:
            h.remove()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.record["params_end"] = sum(p.numel() for p in pl_module.parameters())
        self.record["metrics"] = self.logger.rows
        with open(os.environ["SMOKE_RECORD"], "w") as fh:
            json.dump(self.record, fh)
