"""What :class:`~lightning_sparse.callbacks.SADTracker` records next to the SAD numbers so its figures explain
themselves: the run and the method, the steps of mask updates and channel removals, the schedule's stop
steps, and every conv/linear layer of the model (masked or dense) with the kind of sparsity it carries.

Everything is read from public attributes of the mask sources (duck typing, no imports of their classes):
``num_updates`` (a counter of mask updates), ``active_channels()``, ``resolved_stop_step(trainer)``,
``schedule`` (Chase's :class:`~lightning_sparse.sparsity.chase.ChaseSchedule`), ``n``/``m``.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from lightning_sparse.sparsity.targets import candidate_weights

__all__ = ["describe_method", "run_label", "layer_kinds", "schedule_marks", "EventWatcher"]

MASK_UPDATE, CHANNEL_REMOVAL = "mask update", "channel removal"


def _describe(source: Any) -> str:
    kind = type(source).__name__
    if kind == "DynamicSparsity":
        growth = "RigL" if source.growth == "gradient" else "SET"
        return f"{growth} ({source.distribution.upper()}, density {source.density:g})"
    if kind == "Chase":
        return f"Chase (density {source.density:g}, channel sparsity {source.channel_sparsity:g})"
    if kind in ("GradualMagnitudePruning", "OneShotPruning"):
        label = "GMP" if kind == "GradualMagnitudePruning" else "one-shot"
        return f"{label} ({source.n}:{source.m})" if getattr(source, "pattern", "") == "nm" else f"{label} (density {source.density:g})"
    if kind == "NMSparsity":
        return f"{source.n}:{source.m} {'SR-STE' if source.mode == 'srste' else 'STE'}"
    return kind


def describe_method(sources: list[Any], mask_fn: Any) -> str:
    """One short method label, e.g. ``"RigL (ERK, density 0.1)"`` or ``"2:4 SR-STE"``."""
    if mask_fn is not None:
        return f"masks from mask_fn {getattr(mask_fn, '__name__', type(mask_fn).__name__)}"
    return " + ".join(_describe(s) for s in sources) or "no mask source"


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
        nm = type(source).__name__ == "NMSparsity" or getattr(source, "pattern", None) == "nm"
        kind = f"{source.n}:{source.m}" if nm else "unstructured"
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
    """Stop/start steps of the sources' schedules that fall inside training."""
    marks: dict[str, int] = {}
    for source in sources:
        kind = type(source).__name__
        try:
            if kind == "DynamicSparsity":
                marks["DST stop"] = int(source.resolved_stop_step(trainer))
            elif kind == "Chase" and getattr(source, "schedule", None) is not None:
                sched = source.schedule
                if source.channel_sparsity > 0:
                    marks["channel schedule end"] = int(sched.channel_stop)
                marks["phase 2 (strict budget) start"] = int(sched.phase2_start)
        except ValueError:  # e.g. an iterable dataset without a length: no stop step to mark
            continue
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
