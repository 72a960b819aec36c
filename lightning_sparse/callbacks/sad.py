"""``SADTracker``: how much a sparse architecture moves during training (sparse architecture divergence)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_sparse.callbacks._base import MaskProvider, check_strategy, log_metrics
from lightning_sparse.callbacks._sad_context import EventWatcher, describe_method, layer_kinds, run_label, schedule_marks
from lightning_sparse.callbacks._schedule import fast_dev_run_step
from lightning_sparse.checks import check_range
from lightning_sparse.sparsity.sad import pack_mask, packed_sad_tensor, popcount_tensor

__all__ = ["SADTracker", "MaskFn"]

MaskFn = Callable[[pl.LightningModule], Mapping[str, Tensor]]
# named in the error when none is found
KNOWN_SOURCES = ("DynamicSparsity", "Chase", "NMSparsity", "GradualMagnitudePruning", "OneShotPruning")


def _empty_history() -> dict[str, Any]:
    return {
        "step": [], "sad": [], "sad_norm": [], "sad_vs_init": [], "sad_vs_init_norm": [], "cumulative": [],
        "density": [], "layer_density": {}, "layer_sad": {}, "channels": {}, "resets": [],
        "total": [], "events": {}, "marks": {}, "meta": {}, "layers": {},
    }


def _append_aligned(table: dict[str, list[float]], values: Mapping[str, float], n_before: int) -> None:
    """Append one column to a ``{row: [values]}`` table; rows missing on either side get NaN."""
    for name in values:
        table.setdefault(name, [math.nan] * n_before)
    for name, column in table.items():
        column.append(float(values.get(name, math.nan)))


class SADTracker(pl.Callback):
    """Track sparse architecture divergence (SAD) of the masks every ``interval`` optimizer steps.

    SAD(M_a, M_b) = number of positions where two masks differ (SR-STE, Zhou et al. 2021). After each
    optimizer step ``s`` that is a multiple of ``interval`` the tracker reads the masks and logs at step
    ``s``: ``sad/global``, ``sad/global_norm`` (vs the previous measurement), ``sad/global_vs_init``,
    ``sad/global_vs_init_norm`` (vs the first), ``sad/cumulative``, ``sad/density`` and ``sad/<param>``.
    Masks come from ``mask_fn`` if given, else from every callback that implements
    :class:`~lightning_sparse.callbacks.MaskProvider` (merged with a logical AND); a
    :class:`~lightning_sparse.callbacks.MaskSource` also names itself and marks its schedule in the figures.
    Reference masks are kept bit-packed; they and :attr:`history`
    are in ``state_dict()``, so a resumed run continues its curves. Figures go to
    ``<trainer.log_dir>/figures/`` and to W&B on rank zero. The user guide (what is logged, mask-shape
    changes, the figures) is the SADTracker page of the documentation (``docs/callbacks/sad-tracker.md``).

    Args:
        interval: measure every ``interval`` optimizer steps (int ≥ 1).
        mask_fn: optional ``pl_module -> {parameter name: bool mask}``; overrides callback discovery.
        plot_every_n_epochs: also save/log the figures every this many epochs (int ≥ 1), or ``None``
            for only at the end of fit.
        per_layer: log ``sad/<param>`` for every layer (and, with ``mask_fn``, ``sparsity/<param>``).

    Raises:
        ValueError: for a bad argument; at ``setup`` when there is no ``mask_fn`` and no mask source.

    Example:
        >>> import torch
        >>> tracker = SADTracker(interval=10, mask_fn=lambda m: {
        ...     n: p.abs() > p.abs().median() for n, p in m.named_parameters() if p.dim() > 1})
        >>> tracker.state_key
        "SADTracker{'interval': 10, 'per_layer': True}"
    """

    def __init__(
        self,
        interval: int = 100,
        mask_fn: MaskFn | None = None,
        plot_every_n_epochs: int | None = None,
        per_layer: bool = True,
    ) -> None:
        self._validate(interval, mask_fn, plot_every_n_epochs, per_layer)
        self.interval = interval
        self.mask_fn = mask_fn
        self.plot_every_n_epochs = plot_every_n_epochs
        self.per_layer = per_layer
        self._sources: list[Any] = []
        self._channel_sources: list[Any] = []
        self._init: dict[str, Tensor] = {}
        self._prev: dict[str, Tensor] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._cumulative = 0
        self._last_step = -1
        self._polled_step = -1
        self._every = interval  # `interval`, or 1 under fast_dev_run
        self._events = EventWatcher()
        self.history: dict[str, Any] = _empty_history()

    @staticmethod
    def _validate(interval: Any, mask_fn: Any, plot_every_n_epochs: Any, per_layer: Any) -> None:
        check_range("interval", interval, 1, low_inclusive=True, integer=True, what="optimizer steps")
        if mask_fn is not None and not callable(mask_fn):
            raise ValueError(
                f"`mask_fn` must be None or a callable pl_module -> dict[str, bool Tensor], got {mask_fn!r}."
            )
        if plot_every_n_epochs is not None and (
            isinstance(plot_every_n_epochs, bool) or not isinstance(plot_every_n_epochs, int)
            or plot_every_n_epochs < 1
        ):
            raise ValueError(
                "`plot_every_n_epochs` must be None (plot at the end of fit only) or an int >= 1, "
                f"got plot_every_n_epochs={plot_every_n_epochs!r}."
            )
        if not isinstance(per_layer, bool):
            raise ValueError(f"`per_layer` must be True or False, got per_layer={per_layer!r}.")

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(interval=self.interval, per_layer=self.per_layer)

    # ------------------------------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._run_setup(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._prev:  # fresh run: the initial masks become the references (a resumed run restored them)
            self._run_reference(pl_module)
        self.history["meta"] = {"run": run_label(trainer), "method": describe_method(self._sources, self.mask_fn)}
        self._events.poll(self._sources, self._channel_sources, pl_module)  # baseline
        self._polled_step = trainer.global_step - 1
        smoke = fast_dev_run_step(trainer, "SADTracker", "a SAD measurement after every step")
        self._every = self.interval if smoke is None else 1

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        done = trainer.global_step - 1  # the optimizer step that just ran (and the mask updates made at it)
        if done <= self._polled_step:  # accumulating gradients: no optimizer step in this batch
            return
        self._polled_step = done
        for kind in self._events.poll(self._sources, self._channel_sources, pl_module):
            self.history["events"].setdefault(kind, []).append(done)
        if done % self._every == 0 and done > self._last_step:
            self._run_measure(trainer, pl_module, done)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plot_every_n_epochs and (trainer.current_epoch + 1) % self.plot_every_n_epochs == 0:
            self._run_plots(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_plots(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "init": {k: v.detach().cpu() for k, v in self._init.items()},
            "prev": {k: v.detach().cpu() for k, v in self._prev.items()},
            "shapes": {k: list(v) for k, v in self._shapes.items()},
            "cumulative": self._cumulative,
            "last_step": self._last_step,
            # the run label and method are set again at every start (a resumed run may write elsewhere)
            "history": copy.deepcopy({k: v for k, v in self.history.items() if k != "meta"}),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._init = dict(state_dict["init"])
        self._prev = dict(state_dict["prev"])
        self._shapes = {k: tuple(v) for k, v in state_dict["shapes"].items()}
        self._cumulative = int(state_dict["cumulative"])
        self._last_step = int(state_dict["last_step"])
        self.history = {**_empty_history(), **copy.deepcopy(state_dict["history"])}

    def reference_nbytes(self) -> int:
        """Bytes held by the packed reference masks (initial + previous; shared storage counted once)."""
        seen: dict[int, int] = {}
        for bits in (*self._init.values(), *self._prev.values()):
            seen[bits.untyped_storage().data_ptr()] = bits.untyped_storage().nbytes()
        return sum(seen.values())

    # ------------------------------------------------------------------------------------------- work

    def _run_setup(self, trainer: pl.Trainer) -> None:
        check_strategy(trainer, "SADTracker")
        others = [cb for cb in trainer.callbacks if not isinstance(cb, SADTracker)]
        self._channel_sources = [cb for cb in others if callable(getattr(cb, "active_channels", None))]
        if self.mask_fn is not None:
            self._sources = []
            return
        self._sources = [cb for cb in others if isinstance(cb, MaskProvider)]
        if not self._sources:
            raise ValueError(
                "SADTracker found no mask source on trainer.callbacks "
                f"{[type(cb).__name__ for cb in others]}: add one of {list(KNOWN_SOURCES)} "
                "(lightning_sparse.callbacks) or any callback with a `current_masks(pl_module)` method, "
                "or pass `mask_fn=` (a callable pl_module -> dict[str, bool Tensor])."
            )
        rank_zero_info(f"SADTracker: masks from {[type(cb).__name__ for cb in self._sources]}.")

    def collect_masks(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """The masks the tracker measures: ``mask_fn(pl_module)`` or the merged masks of all sources.

        (Deliberately not named ``current_masks``: the tracker is not itself a mask source.)
        """
        if self.mask_fn is not None:
            return self._checked(self.mask_fn(pl_module), "mask_fn")
        merged: dict[str, Tensor] = {}
        for source in self._sources:
            masks = self._checked(source.current_masks(pl_module), type(source).__name__)
            for name, mask in masks.items():
                if name not in merged:
                    merged[name] = mask
                elif merged[name].shape != mask.shape:
                    raise ValueError(
                        f"Mask sources disagree on the shape of {name!r}: {tuple(merged[name].shape)} vs "
                        f"{tuple(mask.shape)} from {type(source).__name__}."
                    )
                else:
                    merged[name] = merged[name] & mask
        return merged

    @staticmethod
    def _checked(masks: Mapping[str, Tensor], origin: str) -> dict[str, Tensor]:
        if not isinstance(masks, Mapping):
            raise TypeError(f"{origin} must return a dict[str, bool Tensor], got {type(masks).__name__}.")
        for name, mask in masks.items():
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                kind = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
                raise TypeError(f"{origin} returned a mask for {name!r} that is not a torch.bool tensor: {kind}.")
        return dict(masks)

    def _packed(self, pl_module: pl.LightningModule) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]]]:
        with torch.no_grad():
            masks = self.collect_masks(pl_module)
            packed = {n: pack_mask(m.detach()) for n, m in masks.items()}
            shapes = {n: tuple(m.shape) for n, m in masks.items()}
        self.history["layers"] = layer_kinds(pl_module, self._sources, masks)
        return packed, shapes

    def _run_reference(self, pl_module: pl.LightningModule) -> None:
        """Take the current masks as the initial and previous references (nothing recorded or logged)."""
        packed, shapes = self._packed(pl_module)
        self._sync_references(packed, shapes, 0)

    def _run_measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int | None = None) -> None:
        step = trainer.global_step if step is None else step
        packed, shapes = self._packed(pl_module)
        self._sync_references(packed, shapes, step)
        names = list(packed)
        counts = torch.stack(
            [packed_sad_tensor(packed[n], self._prev[n].to(packed[n].device)) for n in names]
            + [packed_sad_tensor(packed[n], self._init[n].to(packed[n].device)) for n in names]
            + [popcount_tensor(packed[n]) for n in names]
        ).tolist() if names else []
        k = len(names)
        layer_sad = dict(zip(names, counts[:k]))
        layer_vs_init = counts[k : 2 * k]
        kept = dict(zip(names, counts[2 * k :]))
        numel = {n: math.prod(shapes[n]) for n in names}
        total = sum(numel.values())

        step_sad = int(sum(layer_sad.values()))
        vs_init = int(sum(layer_vs_init))
        self._cumulative += step_sad
        self._prev = packed
        self._last_step = step
        density = {n: kept[n] / numel[n] if numel[n] else 1.0 for n in names}
        global_density = sum(kept.values()) / total if total else 1.0
        self._record(step, step_sad, vs_init, total, global_density, density, layer_sad, pl_module)
        self._log(trainer, step, step_sad, vs_init, global_density, density, layer_sad)

    def _sync_references(self, packed: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], step: int) -> None:
        """Start references for new layers; reset layers whose shape changed; drop vanished layers."""
        changed = []
        for name, bits in packed.items():
            if name not in self._prev:
                self._init[name], self._prev[name] = bits, bits
            elif self._shapes.get(name) != shapes[name]:
                changed.append(f"{name} {self._shapes.get(name)} -> {shapes[name]}")
                self.history["resets"].append([step, name])
                self._init[name], self._prev[name] = bits, bits
            elif self._init[name].device != bits.device:  # restored from a checkpoint (CPU)
                self._init[name] = self._init[name].to(bits.device)
        for name in [n for n in self._prev if n not in packed]:
            del self._prev[name], self._init[name]
        self._shapes = dict(shapes)
        if changed:  # one line per slimming, however many layers it reshaped
            rank_zero_info(
                f"SADTracker: step {step}: {len(changed)} mask(s) changed shape (channels removed), their "
                f"initial/previous references restart from the new masks: {'; '.join(changed)}."
            )

    def _record(
        self, step: int, step_sad: int, vs_init: int, total: int, global_density: float,
        density: dict[str, float], layer_sad: dict[str, int], pl_module: pl.LightningModule,
    ) -> None:
        h = self.history
        n_before = len(h["step"])
        h["step"].append(step)
        h["sad"].append(step_sad)
        h["sad_norm"].append(step_sad / total if total else 0.0)
        h["sad_vs_init"].append(vs_init)
        h["sad_vs_init_norm"].append(vs_init / total if total else 0.0)
        h["cumulative"].append(self._cumulative)
        h["density"].append(global_density)
        h["total"].append(total)
        _append_aligned(h["layer_density"], density, n_before)
        if self.per_layer:
            _append_aligned(h["layer_sad"], layer_sad, n_before)
        channels: dict[str, int] = {}
        for source in self._channel_sources:
            channels.update({k: int(v) for k, v in source.active_channels(pl_module).items()})
        if channels or h["channels"]:
            _append_aligned(h["channels"], channels, n_before)

    def _log(
        self, trainer: pl.Trainer, step: int, step_sad: int, vs_init: int, global_density: float,
        density: dict[str, float], layer_sad: dict[str, int],
    ) -> None:
        h = self.history
        metrics: dict[str, float] = {
            "sad/global": float(step_sad),
            "sad/global_norm": h["sad_norm"][-1],
            "sad/global_vs_init": float(vs_init),
            "sad/global_vs_init_norm": h["sad_vs_init_norm"][-1],
            "sad/cumulative": float(self._cumulative),
            "sad/density": global_density,
        }
        if self.per_layer:
            metrics.update({f"sad/{n}": float(v) for n, v in layer_sad.items()})
        if self.mask_fn is not None:  # no mask-source callback logs these for us
            metrics["sparsity/global"] = 1.0 - global_density
            if self.per_layer:
                metrics.update({f"sparsity/{n}": 1.0 - d for n, d in density.items()})
        log_metrics(trainer, metrics, step=step)

    def _run_plots(self, trainer: pl.Trainer) -> list[Path]:
        if trainer.fast_dev_run:  # like Lightning's checkpoints and loggers: smoke runs write no files
            return []
        log_dir = trainer.log_dir or trainer.default_root_dir  # collective call: every rank asks
        if not trainer.is_global_zero or not self.history["step"]:
            return []
        self.history["marks"] = schedule_marks(trainer, self._sources)
        from lightning_sparse.plots import save_figures  # matplotlib only when figures are drawn

        paths = save_figures(self.history, Path(log_dir) / "figures")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for path in paths:
                    logger.log_image(key=f"figures/{path.stem}", images=[str(path)], step=trainer.global_step)
        return paths
