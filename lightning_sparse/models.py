"""LightningModules. The network always comes from ``timm.create_model``; no sparsity code lives here.

Sparsity is added from the outside by the Callbacks in :mod:`lightning_sparse.callbacks`, which work on
any LightningModule through ``named_parameters()``.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_sparse.utils.checkpoints import load_checkpoint
from lightning_sparse.utils.errors import InputError
from lightning_sparse.utils.inputs import example_inputs

__all__ = ["ImageClassifier", "create_backbone", "warmup_cosine"]

OptimizerName = Literal["sgd", "adamw"]
_OPTIMIZERS = ("sgd", "adamw")


def create_backbone(
    model_name: str,
    num_classes: int,
    in_chans: int = 3,
    checkpoint_path: str | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build a timm model without touching the network.

    Args:
        model_name: a timm model name, e.g. ``"resnet18"``.
        num_classes: size of the classifier output.
        in_chans: input channels (1 for digits).
        checkpoint_path: optional local file with weights (a timm/torch ``state_dict``, or a Lightning
            checkpoint of :class:`ImageClassifier`). Nothing is ever downloaded.
        **model_kwargs: passed to ``timm.create_model``.

    Raises:
        ValueError: unknown model name (the message suggests close timm names), or a missing checkpoint.
    """
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean one of: {', '.join(close)}?" if close else " See `timm.list_models()`."
        raise ValueError(f"Unknown timm model_name={model_name!r}.{hint}")
    model = timm.create_model(
        model_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **model_kwargs
    )
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_file():
            raise ValueError(f"checkpoint_path={str(path)!r} does not exist or is not a file.")
        state, prefix = _read_weights(path)
        from lightning_sparse.slim import restore_channel_config

        # a slimmed model (Chase checkpoint or slim export): rebuild its channel counts first
        restore_channel_config(model, state, example_inputs((in_chans, 64, 64)), prefix=prefix)
        weights = {k[len(prefix):]: v for k, v in state.get("state_dict", state).items() if k.startswith(prefix)}
        try:
            missing, unexpected = model.load_state_dict(weights, strict=False)
        except RuntimeError as err:  # shape mismatch
            raise ValueError(f"checkpoint_path={str(path)!r} does not fit {model_name!r}: {err}") from None
        if unexpected or missing:
            raise ValueError(
                f"checkpoint_path={str(path)!r} does not fit {model_name!r}: "
                f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}."
            )
    return model


def _read_weights(path: Path) -> tuple[dict[str, Any], str]:
    """A local weights file and the prefix of the backbone's keys in it.

    Accepts a plain timm/torch ``state_dict`` (prefix ``""``), a Lightning checkpoint of
    :class:`ImageClassifier` (weights under ``state_dict``, prefix ``"model."``), or a file written by
    :func:`lightning_sparse.slim.export_slim` (prefix ``""``). The channel configuration of a slimmed model
    is read from it by :func:`lightning_sparse.slim.find_channel_config`.
    """
    try:
        state = load_checkpoint(path)
    except InputError as err:  # missing, unreadable, or holding objects that are never unpickled
        raise ValueError(f"checkpoint_path={str(path)!r}: {err}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint_path={str(path)!r} holds a {type(state).__name__}, not a state_dict.")
    is_lightning = "state_dict" in state and not str(state.get("format", "")).startswith("lightning_sparse.slim")
    return state, "model." if is_lightning else ""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_factor: float = 0.0) -> float:
    """LR factor: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine down to ``min_factor``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ImageClassifier(pl.LightningModule):
    """Image classification with a timm backbone, SGD/AdamW, step-wise warm-up + cosine LR.

    The backbone is stored as ``self.model``; checkpoint keys are therefore ``model.<timm key>`` and
    load into a plain timm model after removing the ``model.`` prefix (see :func:`create_backbone`).

    Args:
        model_name: timm model name.
        num_classes: number of classes (linked from the DataModule by the CLI).
        in_chans: input channels (linked from the DataModule by the CLI).
        checkpoint_path: optional local weights to start from (no hub downloads).
        optimizer: ``"sgd"`` (momentum, optionally Nesterov) or ``"adamw"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: SGD Nesterov momentum.
        weight_decay: weight decay.
        no_decay_norm_bias: if true, biases and normalisation parameters get no weight decay.
        warmup_epochs: linear warm-up length in epochs (converted to steps).
        min_lr_factor: final LR as a fraction of ``lr``.
        label_smoothing: cross-entropy label smoothing.
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``drop_rate``).

    Example:
        >>> import torch
        >>> m = ImageClassifier("resnet18", num_classes=10, in_chans=1)
        >>> m(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        in_chans: int = 3,
        checkpoint_path: str | None = None,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        no_decay_norm_bias: bool = False,
        warmup_epochs: float = 0.0,
        min_lr_factor: float = 0.0,
        label_smoothing: float = 0.0,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not supported; choose one of {list(_OPTIMIZERS)}.")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got lr={lr}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got label_smoothing={label_smoothing}.")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got warmup_epochs={warmup_epochs}.")
        self.save_hyperparameters()
        self.model = create_backbone(
            model_name, num_classes, in_chans, checkpoint_path, **(model_kwargs or {})
        )
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.top5 = num_classes >= 5
        if self.top5:
            self.val_acc5 = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
            self.test_acc5 = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the channel counts, so a slimmed model's checkpoint says which shapes its weights have."""
        from lightning_sparse.slim import CHANNEL_CONFIG_KEY, channel_config

        checkpoint[CHANNEL_CONFIG_KEY] = channel_config(self)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild a slimmed checkpoint's channel counts before its weights load.

        Lightning calls this hook before loading the weights, in ``load_from_checkpoint`` and in every
        ``Trainer`` stage given a ``ckpt_path``, so a checkpoint written after Chase slimmed the network
        loads into the dense model this class builds.
        """
        from lightning_sparse.slim import restore_channel_config

        restore_channel_config(self, checkpoint, lambda: example_inputs((self.hparams.in_chans, 64, 64)))

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Logits of a batch of images, or of the images of an ``(images, labels)`` batch."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def _loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], prog_bar=False)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=stage == "val")
        acc = getattr(self, f"{stage}_acc")
        acc(logits, y)
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        if self.top5:
            acc5 = getattr(self, f"{stage}_acc5")
            acc5(logits, y)
            self.log(f"{stage}/acc5", acc5)

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _param_groups(self) -> list[dict[str, Any]]:
        wd = self.hparams.weight_decay
        if not self.hparams.no_decay_norm_bias:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": wd}]
        decay, no_decay = [], []
        for p in self.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self._param_groups()
        if hp.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov and hp.momentum > 0
            )
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = total / max(1, self.trainer.max_epochs or 1)
        warmup = int(round(hp.warmup_epochs * steps_per_epoch))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, warmup, total, hp.min_lr_factor)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
