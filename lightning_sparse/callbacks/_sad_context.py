"""What :class:`~lightning_sparse.callbacks.SADTracker` records next to the SAD numbers so its figures explain
themselves: the run and the method, the steps of mask updates and channel removals, the schedule's stop
steps, and every conv/linear layer of the model (masked or dense) with the kind of sparsity it carries.

Everything is read through the :class:`~lightning_sparse.callbacks.MaskSource` protocol (``describe()``,
``schedule_marks(trainer)``) and its optional ``num_updates`` / ``active_channels(pl_module)``, never from
the sources' classes. A provider with only ``current_masks`` is named by its class and marks nothing.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from lightning_sparse.callbacks._base import MaskSource, MaskSourceInfo
from lightning_sparse.sparsity.targets import candidate_weights

__all__ = ["describe_source", "describe_method", "run_label", "layer_kinds", "schedule_marks", "EventWatcher"]

MASK_UPDATE, CHANNEL_REMOVAL = "mask update", "channel removal"


def describe_source(source: Any) -> MaskSourceInfo:
    """``source.describe()`` for a :class:`~lightning_sparse.callbacks.MaskSource`; a provider with only
    ``current_masks`` is described by its class name, with unstructured masks."""
    if isinstance(source, MaskSource):
        info = source.describe()
        if not isinstance(info, MaskSourceInfo):
            raise TypeError(f"{type(source).__name__}.describe() must return a MaskSourceInfo, got {type(info).__name__}.")
        return info
    return MaskSourceInfo(method=type(source).__name__)


def describe_method(sources: list[Any], mask_fn: Any) -> str:
    """One short method label, e.g. ``"RigL (ERK, density 0.1)"`` or ``"2:4 SR-STE"``."""
    if mask_fn is not None:
        return f"masks from mask_fn {getattr(mask_fn, '__name__', type(mask_fn).__name__)}"
    return " + ".join(describe_source(s).method for s in sources) or "no mask source"


def run_label(trainer: pl.Trainer) -> str:
    """``<logger name>/version_<N>`` of the first logger, else the run directory's name."""
    logger = trainer.loggers[0] if getattr(trainer, "loggers", None) else None
    if logger is not None and getattr(logger, "name", None):
        version = logger.version
        return f"{logger.name}/" + (f"version_{version}" if isinstance(version, int) else str(version))
    root = str(getattr(trainer, "default_root_dir", "") or "run").rstrip("/")
    return root.rsplit("/", 1)[-1]


def layer_kinds(pl_module: pl.LightningModule | None, sources: list[Any], masks: dict[str, Any]) -> dict[str, dict]:
    """Every conv/linear weight: ``{"numel", "kind"}``; kind is ``"N:M"``, ``"unstructured"`` or ``"dense"``."""
    owner: dict[str, str] = {}
    for source in sources:
        kind = describe_source(source).kind
        for name in source.current_masks(pl_module):
            owner.setdefault(name, kind)
    names = candidate_weights(pl_module) if pl_module is not None else []
    params = dict(pl_module.named_parameters()) if pl_module is not None else {}
    table = {n: {"numel": int(params[n].numel()), "kind": owner.get(n, "masked" if n in masks else "dense")}
             for n in names}
    for name, mask in masks.items():  # masked weights outside conv/linear (a mask_fn may pick any)
        table.setdefault(name, {"numel": int(mask.numel()), "kind": owner.get(name, "masked")})
    return table


def schedule_marks(trainer: pl.Trainer, sources: list[Any]) -> dict[str, int]:
    """Stop/start steps of the sources' schedules (``MaskSource.schedule_marks``), merged in source order."""
    marks: dict[str, int] = {}
    for source in sources:
        if isinstance(source, MaskSource):
            marks.update({str(k): int(v) for k, v in source.schedule_marks(trainer).items()})
    return marks


class EventWatcher:
    """Notices mask updates (a source's ``num_updates`` grew) and channel removals (active channels fell)."""

    def __init__(self) -> None:
        self._updates: dict[int, int] = {}
        self._channels: dict[int, int] = {}

    def poll(self, sources: list[Any], channel_sources: list[Any], pl_module: Any) -> list[str]:
        """Event kinds that happened since the previous poll (the first poll only takes the baseline)."""
        happened = []
        for source in sources:
            count = getattr(source, "num_updates", None)
            if isinstance(count, int):
                before = self._updates.get(id(source))
                self._updates[id(source)] = count
                if before is not None and count > before and MASK_UPDATE not in happened:
                    happened.append(MASK_UPDATE)
        for source in channel_sources:
            total = sum(int(v) for v in source.active_channels(pl_module).values())
            before = self._channels.get(id(source))
            self._channels[id(source)] = total
            if before is not None and total < before and CHANNEL_REMOVAL not in happened:
                happened.append(CHANNEL_REMOVAL)
        return happened
