"""``Chase``: channel-aware dynamic sparse training with physical slimming (CHASE.md).

Chase (Yin et al., NeurIPS 2023, "Dynamic Sparsity Is Channel-Level Sparsity Learner") runs
unstructured DST and, on a cubic schedule, removes the candidate channels with the lowest unmasked
mean magnitude (UMM) across all candidate layers, hands their weight budget to the surviving layers
(ERK re-solved over the remaining shapes, same total budget B) and finally deletes those channels
physically, so the network is smaller and faster on any hardware while staying unstructured-sparse.

The callback is glue: masks live in a :class:`~lightning_sparse.sparsity.engine.MaskEngine`, the
schedule and update rules in :mod:`lightning_sparse.sparsity.chase`, channel scores and selection in
:mod:`lightning_sparse.sparsity.channels`, slimming in :mod:`lightning_sparse.slim`.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_sparse.callbacks._base import MaskSourceInfo, check_strategy, example_input, log_metrics
from lightning_sparse.callbacks._iteration import AfterStep, check_update_iteration
from lightning_sparse.callbacks._schedule import (
    UpdateGuard,
    describe_limits,
    fast_dev_run_step,
    steps_per_epoch,
    total_steps,
)
from lightning_sparse.callbacks._slim_restore import restore_before_weights_load
from lightning_sparse.slim import ChannelGroup, channel_candidates, channel_config, count_flops, slim_model
from lightning_sparse.sparsity.chase import (
    SPANS,
    ChannelBook,
    ChaseSchedule,
    cap_budget,
    check_chase_args,
    plan_channel_removal,
    scheduled_update,
    total_weights_of_old_state,
)
from lightning_sparse.sparsity.dst import initial_masks
from lightning_sparse.sparsity.engine import MaskEngine
from lightning_sparse.sparsity.targets import select_targets

__all__ = ["Chase"]


class Chase(pl.Callback):
    """Chase: unstructured DST that learns channel sparsity, then slims the network physically.

    The unstructured part (CHASE.md §1) updates the masks after every ``update_interval``-th optimizer step
    with that batch's gradient: phase 1 (soft memory bound, ``phase1`` layerwise or global) until
    ``stop_dst`` before the end, then phase 2 (strict per-layer budget). The channel part (CHASE.md §2)
    removes the candidate channels with the lowest UMM on a cubic schedule to ``channel_sparsity`` until
    ``stop_gmp``, every ``channel_interval``, re-solves ERK over the remaining shapes, and ``slim`` deletes them
    physically (``"during"``, ``"end"`` or ``"never"``).

    The three spans ``stop_gmp``, ``stop_dst`` and ``channel_interval`` are each given in epochs
    (``stop_gmp_epochs: 80``, an int) or as a fraction of training (``stop_gmp_fraction: 0.8``, a float: of the
    fit's optimizer steps, ``max_steps`` or ``max_epochs`` × steps per epoch, whichever ends training first),
    never both; with neither, the reference's ratio (ImageNet ResNet-50: 80, 20 and 2 of 100 epochs, so 0.8,
    0.2 and 0.02). Fractions are resolved at each fit start (``floor(fraction × total steps)``, the interval at
    least one step), so ``--trainer.max_epochs=N`` alone scales the schedule; epochs stay fixed and a schedule
    that does not fit the training raises at train start, naming the fraction to set. The resolved schedule,
    in optimizer steps, is :attr:`schedule` (``channel_stop``, ``phase2_start``, ``channel_interval``).

    ``residual_channels=True`` also removes channels of the residual streams ("prune skip"). Every rule, with
    its reference and fidelity rows, is on the Chase page of the documentation (``docs/callbacks/chase.md``).

    Args:
        density: D, kept fraction of the sparse layers' weights (paper: 0.1, 0.2).
        channel_sparsity: S_c, final fraction of candidate channels removed (paper: 0.3–0.6;
            ImageNet reference ``start_layer_rate`` 0.4). 0 disables the channel part.
        minimum_ratio: β, per-layer floor factor (ImageNet 0.2, CIFAR 0.5).
        channel_interval_epochs: epochs between channel removals (``layer_interval``; ImageNet 2), an int >= 1.
        stop_gmp_epochs: epoch at which the channel schedule reaches S_c (ImageNet 80 of 100), an int >= 1.
        stop_dst_epochs: length of phase 2 in epochs, counted from the end (ImageNet 20), an int >= 0.
        channel_interval_fraction: the interval between channel removals as a fraction of training, in (0, 1]
            (default when neither is given: 0.02 = 2 of 100 epochs).
        stop_gmp_fraction: the end of the channel schedule as a fraction of training, in (0, 1] (default: 0.8).
        stop_dst_fraction: the length of phase 2 as a fraction of training, in [0, 1) (default: 0.2).
        update_interval: ΔT, optimizer steps between DST updates (reference: 1000).
        drop_fraction: p0, r_t − D at step 0 of phase 1 (reference ``prune_rate`` 0.05).
        phase2_drop_fraction: (s, e) of the whole-training cosine phase 2 reads (reference 0.5 → 0.005).
        phase1: ``"layerwise"`` (ImageNet reference ``Chase_0.4``: per-layer magnitude prune, per-layer
            proportional gradient growth) or ``"global"`` (CIFAR reference: one global threshold for both).
        growth: ``"gradient"`` (reference) or ``"random"``.
        score: ``"umm"`` (unmasked mean magnitude, reference) or ``"maskwise"`` (ablation).
        residual_channels: also remove channels of the residual streams ("prune skip", see above).
        slim: ``"during"``, ``"end"`` or ``"never"``.
        round_to: keep slimmed channel counts multiples of this (e.g. 8); ``None`` = exact.
        input_shape: ``(C, H, W)`` of one example, used to trace the model; default: the module's
            ``example_input_array``, else the datamodule's ``in_chans``/``image_size``.
        distribution: ``"erk"`` or ``"uniform"`` initial densities.
        include: fnmatch patterns of weights to make sparse (as in ``DynamicSparsity``).
        exclude: fnmatch patterns of weights to keep dense.
        sparse_first_last: also sparsify the first and the last candidate weight.
        seed: seed of the random initial masks and random growth (identical on every rank).
        log_per_layer: log ``sparsity/<param>`` for every layer at each update.
        max_postponed: consecutive non-finite update steps tolerated before giving up.

    Example:
        >>> cb = Chase(density=0.1, channel_sparsity=0.4, minimum_ratio=0.2, stop_gmp_fraction=0.8,
        ...            stop_dst_fraction=0.2)
        >>> cb.state_key
        "Chase{'density': 0.1, 'channel_sparsity': 0.4, 'score': 'umm'}"

    Raises:
        ValueError: an argument outside its range or both forms of one span (``__init__``); at train start, a
            schedule that does not fit the training, or Torch-Pruning finding no candidate channel.
    """

    changes_architecture = True  # the model's shapes change during fit (see ``slim``)

    def __init__(
        self,
        density: float = 0.1,
        channel_sparsity: float = 0.4,
        minimum_ratio: float = 0.2,
        channel_interval_epochs: int | None = None,
        stop_gmp_epochs: int | None = None,
        stop_dst_epochs: int | None = None,
        channel_interval_fraction: float | None = None,
        stop_gmp_fraction: float | None = None,
        stop_dst_fraction: float | None = None,
        update_interval: int = 1000,
        drop_fraction: float = 0.05,
        phase2_drop_fraction: tuple[float, float] = (0.5, 0.005),
        phase1: str = "layerwise",
        growth: str = "gradient",
        score: str = "umm",
        residual_channels: bool = False,
        slim: str = "during",
        round_to: int | None = None,
        input_shape: tuple[int, int, int] | None = None,
        distribution: str = "erk",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        sparse_first_last: bool = False,
        seed: int = 0,
        log_per_layer: bool = True,
        max_postponed: int = 10,
    ) -> None:
        phase2_drop_fraction = tuple(phase2_drop_fraction)  # type: ignore[assignment]
        args = dict(locals())
        args.pop("self")
        check_chase_args(args)
        args.pop("max_postponed")
        vars(self).update(args)  # every argument becomes an attribute of the same name
        self.engine = MaskEngine()
        self.guard = UpdateGuard(max_postponed)
        self._after = AfterStep()  # the DST update runs after the optimizer step, with that batch's gradient
        self._stepping: int | None = None  # the step count this batch's optimizer step makes
        self.channels = ChannelBook()
        self.num_updates = self.budget = self.total_weights = 0
        self.groups: dict[str, ChannelGroup] = {}
        self.arch: dict[str, dict[str, int]] | None = None  # channel config after slimming
        self.schedule: ChaseSchedule | None = None
        self.dense_flops, self.flops_ratio, self.pending_slim = 0, 1.0, False
        self._example: torch.Tensor | None = None

    @property
    @override
    def state_key(self) -> str:
        extra = {"residual_channels": True} if self.residual_channels else {}  # older checkpoints keep their key
        return self._generate_state_key(density=self.density, channel_sparsity=self.channel_sparsity, score=self.score,
                                        **extra)

    # ----------------------------------------------------------------------------------- public API
    masks = property(lambda self: self.engine.masks, doc="Unstructured masks of the sparse layers (True = kept).")
    removed = property(lambda self: self.channels.removed, doc="Candidate layer -> removed channels (original ids).")
    slimmed = property(lambda self: self.channels.slimmed, doc="The removed channels already deleted physically.")
    start_channels = property(lambda self: self.channels.start, doc="Candidate layer -> channels at the start.")

    def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The live masks (``MaskSource`` protocol)."""
        return dict(self.engine.masks)

    def describe(self) -> MaskSourceInfo:
        """``"Chase (density 0.1, channel sparsity 0.4)"``, unstructured masks (MaskSource protocol)."""
        return MaskSourceInfo(method=f"Chase (density {self.density:g}, channel sparsity {self.channel_sparsity:g})",
                              density=self.density)

    def schedule_marks(self, trainer: pl.Trainer) -> dict[str, int]:
        """The end of the channel schedule and the start of phase 2, once training started (MaskSource protocol)."""
        if self.schedule is None:
            return {}
        marks = {"channel schedule end": int(self.schedule.channel_stop)} if self.channel_sparsity > 0 else {}
        return {**marks, "phase 2 (strict budget) start": int(self.schedule.phase2_start)}

    def active_channels(self, pl_module: pl.LightningModule | None = None) -> dict[str, int]:
        """Candidate layer -> channels still active (for logging and SAD plots)."""
        return self.channels.active()

    def example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        """One input for tracing the model with Torch-Pruning (cached, on the module's device)."""
        if self._example is None:
            self._example = example_input(trainer, pl_module, self.input_shape, "Chase")
        return self._example.to(next(pl_module.parameters()).device)

    # ------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        self._hook_checkpoint_loading(trainer, pl_module)
        if stage != "fit":
            return
        if not self.engine.masks:
            self._run_init_masks(pl_module)
        if not self.groups:
            self._run_find_candidates(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_update_iteration(trainer, "Chase", skips_step=False)
        self._after, self._stepping = AfterStep(), None
        if self.slim == "during" and not isinstance(trainer.strategy, SingleDeviceStrategy):
            rank_zero_warn(f"Chase: slim='during' needs a single-device strategy, got {type(trainer.strategy).__name__}; "
                           "removed channels stay zero during training and are slimmed at the end of fit.")
            self.slim = "end"
        smoke = fast_dev_run_step(trainer, "Chase", ChaseSchedule.SMOKE, 1) is not None or bool(trainer.fast_dev_run)
        self.schedule = self._run_resolve_schedule(trainer, smoke)
        self.engine.bind(pl_module)
        self.engine.enforce(trainer.optimizers)
        self._log(trainer, {})
        if not self.groups:  # after a resume: trace the (possibly slimmed) model again
            self._run_find_candidates(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        assert self.schedule is not None, "Chase: on_train_start sets the schedule"
        after = trainer.global_step + 1  # the reference counts steps after the optimizer step
        if self.guard.due(self.schedule.is_update_step(after), self.engine.unusable, after, "Chase"):
            self._after.arm(after, self.engine.params, self.engine.masks)  # the dense gradient, before masking
        self._stepping = after
        self.engine.mask_grads()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the optimizer step, in the reference's order (``Masking.step``): apply the masks, remove
        # channels, then the DST update with the gradient of this batch.
        self.engine.apply_weights()
        step, self._stepping = self._stepping, None
        if step is None:  # no optimizer step in this batch (gradient accumulation)
            return
        assert self.schedule is not None
        if self.schedule.is_channel_step(step):
            self._run_channel_removal(trainer, pl_module, step)
        pending = self._after.take()
        if pending is not None:
            self._run_update(trainer, *pending)
        if self.pending_slim:
            self._run_slim(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.slim == "end" and any(self.removed.values()):
            self._run_slim(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.engine.state_dict(), **self.channels.state_dict(), "num_updates": self.num_updates,
                "budget": self.budget, "total_weights": self.total_weights, "arch": self.arch,
                "dense_flops": self.dense_flops, "guard": self.guard.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
        self.channels.load_state_dict(state_dict)
        self.num_updates = int(state_dict["num_updates"])
        self.budget = int(state_dict["budget"])
        self.total_weights = int(state_dict.get("total_weights") or total_weights_of_old_state(state_dict))
        self.arch = state_dict["arch"]
        self.dense_flops = int(state_dict.get("dense_flops", 0))
        self.guard.load_state_dict(state_dict.get("guard", {}))
        self.groups = {}  # re-traced lazily on the (possibly slimmed) model

    # ----------------------------------------------------------------------------------- internals
    def _run_resolve_schedule(self, trainer: pl.Trainer, smoke: bool) -> ChaseSchedule:
        """The schedule in optimizer steps for this fit (``*_fraction`` spans scale with its length)."""
        args: dict[str, Any] = {f"{span}_{unit}": getattr(self, f"{span}_{unit}") for span in SPANS
                                for unit in ("epochs", "fraction")}
        args.update(channel_sparsity=self.channel_sparsity, density=self.density, update_interval=self.update_interval,
                    drop_fraction=self.drop_fraction, phase2_drop_fraction=self.phase2_drop_fraction)
        total = total_steps(trainer)
        if smoke:
            return ChaseSchedule.for_training(args, total, fast_dev_run=True)
        uses_epochs = any(args[f"{span}_epochs"] is not None for span in SPANS)
        spe = steps_per_epoch(trainer) if uses_epochs else None
        schedule = ChaseSchedule.for_training(args, total, spe, describe_limits(trainer))
        rank_zero_info(f"Chase: schedule in optimizer steps of {total}: channel removals every "
                       f"{schedule.channel_interval} until step {schedule.channel_stop}, phase 2 from step "
                       f"{schedule.phase2_start}, DST updates every {self.update_interval}")
        return schedule

    def _seed(self, step: int) -> int:
        return self.seed * 1_000_003 + step

    def _generator(self, step: int) -> torch.Generator:
        # Same seed on every rank -> identical random choices under DDP without communication.
        return torch.Generator().manual_seed(self._seed(step))

    def _run_init_masks(self, pl_module: pl.LightningModule) -> None:
        selection = select_targets(pl_module, self.include, self.exclude, first_last=not self.sparse_first_last,
                                   owner="Chase")
        params = dict(pl_module.named_parameters())
        self.engine.set_masks(initial_masks({n: params[n] for n in selection.names}, self.density, self.distribution,
                                            self._generator(-1)), pl_module)
        self.engine.apply_weights()
        self.budget = sum(int(m.sum()) for m in self.masks.values())
        self.total_weights = sum(m.numel() for m in self.masks.values())
        rank_zero_info(f"Chase: {selection.describe()} sparse, budget B={self.budget:,} of N={self.total_weights:,} "
                       f"({self.distribution})")

    def _run_find_candidates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            groups = channel_candidates(pl_module, self.example_inputs(trainer, pl_module), self.residual_channels)
        except ValueError as err:
            groups = {}
            if self.channel_sparsity == 0:
                return
            rank_zero_warn(f"Chase: {err}")
        # only groups with a sparse producer take part (the stem conv alone stays out by default)
        self.groups = {k: g for k, g in groups.items() if any(w in self.masks for w in g.producer_weights)}
        if not self.groups and self.channel_sparsity > 0:
            raise ValueError(
                f"Chase found no candidate conv among the sparse layers of {type(pl_module).__name__}: every "
                "conv's output channels feed a residual sum, a grouped conv or the model output "
                f"(Torch-Pruning candidates: {sorted(groups)}; sparse layers: {sorted(self.masks)[:6]}). "
                "Use channel_sparsity=0 for unstructured Chase only, or DynamicSparsity."
            )
        if not self.channels.start:
            self.channels.start = {k: g.channels for k, g in self.groups.items()}
            self.dense_flops = count_flops(pl_module, self.example_inputs(trainer, pl_module))

    def _hook_checkpoint_loading(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-slim the model from a checkpoint's channel config right before its weights load, in every stage,
        through the one compatibility shim :mod:`lightning_sparse.callbacks._slim_restore` (Lightning offers a
        callback no public hook between the two)."""
        restore_before_weights_load(trainer, lambda module: self.example_inputs(trainer, module),
                                    self._run_restore_architecture)

    def _run_restore_architecture(self, pl_module: pl.LightningModule, arch: dict[str, dict[str, int]]) -> None:
        self.arch = arch
        self.groups = {}
        rank_zero_info("Chase: rebuilt the slim architecture from the checkpoint before loading its weights.")

    def _run_channel_removal(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        assert self.schedule is not None
        s_t, named = self.schedule.channel_target(step), dict(pl_module.named_parameters())
        plan = plan_channel_removal({k: g.producer_weights for k, g in self.groups.items()}, named,
                                    self.engine.enforced(), self.channels, {k: g.channels for k, g in self.groups.items()},
                                    s_t, self.channel_sparsity, self.minimum_ratio, self.score)
        if plan.count == 0:
            return
        for layer, idx in plan.chosen.items():
            self.channels.remove(layer, idx.tolist())
            for name, (dim, pos) in self.groups[layer].indices(idx).items():
                self.engine.block(name, named[name], dim, pos)  # never grows again
        self.engine.bind(pl_module)
        # budget redistribution: only the per-layer targets change (reference ``update_erk_dic``); the next
        # DST update moves each layer towards its new count
        self.budget = cap_budget(self.budget, self.engine.params, self.masks, self.engine.allowed)
        self.engine.enforce(trainer.optimizers)
        self.pending_slim = self.slim == "during"
        rank_zero_info(f"Chase: step {step}: channel sparsity target {s_t:.3f}, removed {plan.count} channels")
        self._log_channels(trainer, step - 1)

    def _run_update(self, trainer: pl.Trainer, step: int, grads: dict[str, torch.Tensor | None]) -> None:
        assert self.schedule is not None
        update = scheduled_update(self.schedule, step, self.engine.params, self.masks, grads, self.engine.allowed,
                                  self.budget, self.total_weights, self.growth, self._generator(step), self.phase1)
        self.engine.replace_masks(update.masks)
        self.num_updates += 1
        # a weight pruned and regrown in the same update restarts at 0 (the reference prunes, applies the
        # mask, then grows); dropped weights and their optimizer state go to 0, grown ones are 0 already
        self.engine.reset({n: update.pruned[n] & update.masks[n] for n in update.masks}, trainer.optimizers)
        self.engine.enforce(trainer.optimizers)
        key = "dst/carry_fraction" if update.phase == 1 else "dst/drop_fraction"
        self._log(trainer, {key: update.rate, "dst/regrown": float(update.grown), "dst/phase": float(update.phase),
                            "dst/active_weights": float(sum(int(m.sum()) for m in self.masks.values()))}, step - 1)

    def _run_slim(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pending_slim = False
        todo = self.channels.pending_slim()
        if not todo:
            return
        old_params = dict(pl_module.named_parameters())
        result = slim_model(pl_module, todo, self.example_inputs(trainer, pl_module), round_to=self.round_to,
                            include_residual=self.residual_channels, return_result=True)
        for layer, idx in result.removed.items():
            self.channels.mark_slimmed(layer, list(idx))
        # rounding may keep some removed channels: they stay zero through `allowed`
        self.engine.slice_masks(result.slice, pl_module)
        self.engine.repoint_optimizers(trainer.optimizers, old_params, pl_module, result.slice)
        self.arch = channel_config(pl_module)
        self.groups = {}
        self._run_find_candidates(trainer, pl_module)
        self.engine.enforce(trainer.optimizers)
        flops = count_flops(pl_module, self.example_inputs(trainer, pl_module))
        self.flops_ratio = flops / self.dense_flops if self.dense_flops else 1.0
        log_metrics(trainer, {"channels/params": float(sum(p.numel() for p in pl_module.parameters())),
                              "channels/flops_ratio": self.flops_ratio}, max(0, trainer.global_step - 1))
        rank_zero_info(f"Chase: slimmed the model; FLOPs {self.flops_ratio:.3f}x of dense")

    def _log(self, trainer: pl.Trainer, extra: dict[str, float], step: int | None = None) -> None:
        """Log at ``step``: the iteration (optimizer steps before it) whose update this is; default: now."""
        metrics = {"sparsity/global": 1.0 - self.engine.density(), **extra}
        if self.log_per_layer:
            metrics.update({f"sparsity/{n}": 1.0 - m.float().mean().item() for n, m in self.masks.items()})
        log_metrics(trainer, metrics, step)

    def _log_channels(self, trainer: pl.Trainer, step: int | None = None) -> None:
        active = self.active_channels()
        metrics = {f"channels/{k}": float(v) for k, v in active.items()}
        metrics["channels/global"] = float(sum(active.values()))
        metrics["channels/global_fraction"] = sum(active.values()) / max(1, sum(self.channels.start.values()))
        metrics["sparsity/global"] = 1.0 - self.engine.density()
        log_metrics(trainer, metrics, step)
