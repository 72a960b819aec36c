"""``Chase``: channel-aware dynamic sparse training with physical slimming (CHASE.md).

Chase (Yin et al., NeurIPS 2023, "Dynamic Sparsity Is Channel-Level Sparsity Learner") runs
unstructured DST and, on a cubic schedule, removes the candidate channels with the lowest unmasked
mean magnitude (UMM) across all candidate layers, hands their weight budget to the surviving layers
(ERK re-solved over the remaining shapes, same total budget B) and finally deletes those channels
physically, so the network is smaller and faster on any hardware while staying unstructured-sparse.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import SingleDeviceStrategy
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_sparse.callbacks._base import check_strategy, log_metrics
from lightning_sparse.callbacks.dst import DynamicSparsity
from lightning_sparse.slim import (
    ChannelGroup,
    channel_candidates,
    channel_config,
    count_flops,
    restore_before_weights_load,
    slim_model,
)
from lightning_sparse.sparsity.channels import (
    channel_floor,
    channel_scores,
    channel_sparsity_schedule,
    n_channels_to_remove,
    redistribute_budget,
    select_channels_to_remove,
)
from lightning_sparse.sparsity.dst import cosine_drop_fraction, drop_grow, global_grow, global_magnitude_prune
from lightning_sparse.sparsity.masks import global_density

__all__ = ["Chase"]

SCORES = ("umm", "maskwise")
SLIM_MODES = ("during", "end", "never")


def _check_chase_args(
    channel_sparsity: float,
    minimum_ratio: float,
    channel_interval_epochs: int,
    stop_gmp_epochs: int,
    stop_dst_epochs: int,
    phase2_drop_fraction: tuple[float, float],
    score: str,
    slim: str,
    round_to: int | None,
) -> None:
    if not 0.0 <= channel_sparsity < 1.0:
        raise ValueError(f"`channel_sparsity` (S_c) must be in [0, 1), got channel_sparsity={channel_sparsity}.")
    if not 0.0 < minimum_ratio <= 1.0:
        raise ValueError(f"`minimum_ratio` (β) must be in (0, 1], got minimum_ratio={minimum_ratio}.")
    if channel_interval_epochs < 1:
        raise ValueError(f"`channel_interval_epochs` must be >= 1, got channel_interval_epochs={channel_interval_epochs}.")
    if stop_gmp_epochs < 1:
        raise ValueError(f"`stop_gmp_epochs` must be >= 1, got stop_gmp_epochs={stop_gmp_epochs}.")
    if channel_interval_epochs > stop_gmp_epochs:
        raise ValueError(
            "Conflicting channel schedule: the first removal (epoch `channel_interval_epochs`="
            f"{channel_interval_epochs}) comes after the schedule ends (`stop_gmp_epochs`={stop_gmp_epochs})."
        )
    if stop_dst_epochs < 0:
        raise ValueError(f"`stop_dst_epochs` must be >= 0, got stop_dst_epochs={stop_dst_epochs}.")
    hi, lo = phase2_drop_fraction
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(
            f"`phase2_drop_fraction` must be (start, end) with 0 <= end <= start < 1, got {phase2_drop_fraction}."
        )
    if score not in SCORES:
        raise ValueError(f"`score`={score!r} is not supported; choose one of {list(SCORES)}.")
    if slim not in SLIM_MODES:
        raise ValueError(f"`slim`={slim!r} is not supported; choose one of {list(SLIM_MODES)}.")
    if round_to is not None and round_to < 1:
        raise ValueError(f"`round_to` must be None or >= 1, got round_to={round_to}.")


class Chase(DynamicSparsity):
    """Chase: unstructured DST that learns channel sparsity, then slims the network physically.

    Unstructured part (CHASE.md §1), every ``update_interval`` steps:

    - phase 1 (until ``stop_dst_epochs`` before the end), **soft memory bound**: prune every active
      weight beyond the budget B = ``density`` × (sparse weights) by global magnitude, then grow
      k = p_t·B weights with the largest |gradient| (global); p_t decays with a cosine from
      ``drop_fraction`` to 0 over phase 1. Between updates the net carries B + k weights.
    - phase 2 (the last ``stop_dst_epochs`` epochs), **strict budget**: prune to B once, then per layer
      RigL with p_t decaying from ``phase2_drop_fraction[0]`` to ``[1]``, so training ends with exactly B.

    Channel part (CHASE.md §2): every ``channel_interval_epochs`` epochs until ``stop_gmp_epochs``
    (at the first step of the epoch), the target channel sparsity is s_t = S_c·(1 − (1 − t/T)^3);
    the active candidate channels with the lowest score (UMM: Σ|w ⊙ m| / filter size; or ``maskwise``)
    over all candidate layers are removed, each layer keeping at least floor(C_l·(1 − S_c)·β) channels.
    A removed channel's filter, the consumer's input slice and its BN scale/shift are zeroed and never
    grow again; ERK is re-solved over the remaining shapes with the same total B, and each layer is
    brought to its new count at once (grow by |gradient|, or drop by magnitude).

    Candidates ("active" layers) come from Torch-Pruning's dependency graph
    (:func:`lightning_sparse.slim.channel_candidates`): convs whose output channels feed no residual
    sum (ResNet bottleneck ``conv1``/``conv2``, basic-block ``conv1``, every VGG conv ...).

    Slimming (``slim``): ``"during"`` deletes removed channels physically right after each removal
    (training gets cheaper; optimizer state and masks are sliced the same way; single-device only —
    under DDP it falls back to ``"end"``), ``"end"`` at the end of fit, ``"never"`` keeps them as zeros.
    The slim channel configuration is stored in the checkpoint and re-applied in ``setup`` before the
    weights load, so resuming a slimmed run needs nothing from the LightningModule.

    Args:
        density: D, kept fraction of the sparse layers' weights (paper: 0.1, 0.2).
        channel_sparsity: S_c, final fraction of candidate channels removed (paper: 0.3–0.6;
            ImageNet reference ``start_layer_rate`` 0.4). 0 disables the channel part.
        minimum_ratio: β, per-layer floor factor (ImageNet 0.2, CIFAR 0.5).
        channel_interval_epochs: epochs between channel removals (``layer_interval``; ImageNet 2).
        stop_gmp_epochs: epoch at which the channel schedule reaches S_c (ImageNet 80 of 100).
        stop_dst_epochs: length of phase 2 in epochs, counted from the end (ImageNet 20).
        update_interval: ΔT, steps between DST updates (reference: 1000).
        drop_fraction: p at the start of phase 1 (reference death rate 0.05).
        phase2_drop_fraction: (start, end) of p in phase 2 (reference 0.5 → 0.005).
        growth: ``"gradient"`` (reference) or ``"random"``.
        score: ``"umm"`` (unmasked mean magnitude, reference) or ``"maskwise"`` (ablation).
        slim: ``"during"``, ``"end"`` or ``"never"``.
        round_to: keep slimmed channel counts multiples of this (e.g. 8); ``None`` = exact.
        input_shape: ``(C, H, W)`` of one example, used to trace the model; default: the module's
            ``example_input_array``, else the datamodule's ``in_chans``/``image_size``.
        **kwargs: passed to :class:`DynamicSparsity` (``distribution``, ``include``, ``exclude``,
            ``sparse_first_last``, ``seed``, ``log_per_layer``).

    Example:
        >>> cb = Chase(density=0.1, channel_sparsity=0.4, minimum_ratio=0.2, stop_gmp_epochs=80, stop_dst_epochs=20)
        >>> cb.state_key
        "Chase{'density': 0.1, 'channel_sparsity': 0.4, 'score': 'umm'}"
    """

    changes_architecture = True  # the model's shapes change during fit (see ``slim``)

    def __init__(
        self,
        density: float = 0.1,
        channel_sparsity: float = 0.4,
        minimum_ratio: float = 0.2,
        channel_interval_epochs: int = 2,
        stop_gmp_epochs: int = 80,
        stop_dst_epochs: int = 20,
        update_interval: int = 1000,
        drop_fraction: float = 0.05,
        phase2_drop_fraction: tuple[float, float] = (0.5, 0.005),
        growth: str = "gradient",
        score: str = "umm",
        slim: str = "during",
        round_to: int | None = None,
        input_shape: tuple[int, int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(density=density, growth=growth, drop_fraction=drop_fraction,
                         update_interval=update_interval, stop_step=10**12, **kwargs)
        phase2_drop_fraction = tuple(phase2_drop_fraction)  # type: ignore[assignment]
        _check_chase_args(channel_sparsity, minimum_ratio, channel_interval_epochs, stop_gmp_epochs,
                          stop_dst_epochs, phase2_drop_fraction, score, slim, round_to)
        self.channel_sparsity, self.minimum_ratio = channel_sparsity, minimum_ratio
        self.channel_interval_epochs, self.stop_gmp_epochs = channel_interval_epochs, stop_gmp_epochs
        self.stop_dst_epochs, self.phase2_drop_fraction = stop_dst_epochs, phase2_drop_fraction
        self.score, self.slim, self.round_to, self.input_shape = score, slim, round_to, input_shape
        self.budget = 0
        self.groups: dict[str, ChannelGroup] = {}
        self.start_channels: dict[str, int] = {}
        self.removed: dict[str, list[int]] = {}  # candidate conv -> removed channels, original indexing
        self.slimmed: dict[str, list[int]] = {}  # the subset already deleted physically
        self.allowed: dict[str, torch.Tensor] = {}  # param -> positions that may be nonzero (False: removed)
        self.arch: dict[str, dict[str, int]] | None = None  # channel config after slimming
        self._phase2_started = False
        self._pending_slim = False
        self._example: torch.Tensor | None = None
        self.dense_flops = 0
        self.flops_ratio = 1.0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(density=self.density, channel_sparsity=self.channel_sparsity, score=self.score)

    # ----------------------------------------------------------------------------------- public API
    def active_channels(self, pl_module: pl.LightningModule | None = None) -> dict[str, int]:
        """Candidate layer -> channels still active (for logging and SAD plots)."""
        return {k: self.start_channels[k] - len(self.removed.get(k, [])) for k in self.start_channels}

    def example_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        """One input for tracing the model with Torch-Pruning."""
        if self._example is None:
            example = getattr(pl_module, "example_input_array", None)
            if not torch.is_tensor(example):
                shape = self.input_shape
                dm = getattr(trainer, "datamodule", None)
                if shape is None and dm is not None and hasattr(dm, "in_chans") and hasattr(dm, "image_size"):
                    shape = (int(dm.in_chans), int(dm.image_size), int(dm.image_size))
                if shape is None:
                    raise ValueError(
                        "Chase needs an example input to trace the model: set `input_shape=(C, H, W)`, or "
                        "`example_input_array` on the LightningModule, or use a datamodule with `in_chans` and `image_size`."
                    )
                example = torch.randn(1, *shape)
            self._example = example[:1].detach()
        device = next(pl_module.parameters()).device
        return self._example.to(device)

    # ------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        self._hook_checkpoint_loading(trainer, pl_module)
        if stage != "fit":
            return
        if not self.masks:
            self._run_init_masks(pl_module)
            self.budget = sum(int(m.sum()) for m in self.masks.values())
        if not self.groups:
            self._run_find_candidates(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.slim == "during" and not isinstance(trainer.strategy, SingleDeviceStrategy):
            rank_zero_warn(f"Chase: slim='during' needs a single-device strategy, got {type(trainer.strategy).__name__}; "
                           "removed channels stay zero during training and are slimmed at the end of fit.")
            self.slim = "end"
        super().on_train_start(trainer, pl_module)
        if not self.groups:  # after a resume: trace the (possibly slimmed) model again
            self._run_find_candidates(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._is_channel_step(trainer, trainer.global_step):
            self._run_channel_removal(trainer, pl_module, trainer.global_step)
        super().on_before_optimizer_step(trainer, pl_module, optimizer)  # DST update + gradient masking

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._pending_slim:
            self._run_slim(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.slim == "end" and any(self.removed.values()):
            self._run_slim(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            budget=self.budget,
            start_channels=dict(self.start_channels),
            removed={k: list(v) for k, v in self.removed.items()},
            slimmed={k: list(v) for k, v in self.slimmed.items()},
            allowed={k: v.detach().cpu().clone() for k, v in self.allowed.items()},
            arch=self.arch,
            dense_flops=self.dense_flops,
            phase2_started=self._phase2_started,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.budget = int(state_dict["budget"])
        self.start_channels = dict(state_dict["start_channels"])
        self.removed = {k: list(v) for k, v in state_dict["removed"].items()}
        self.slimmed = {k: list(v) for k, v in state_dict["slimmed"].items()}
        device = {k: p.device for k, p in self._params.items()}
        self.allowed = {k: v.to(device.get(k, "cpu")) for k, v in state_dict["allowed"].items()}
        self.arch = state_dict["arch"]
        self.dense_flops = int(state_dict.get("dense_flops", 0))
        self._phase2_started = bool(state_dict["phase2_started"])
        self.groups = {}  # re-traced lazily on the (possibly slimmed) model

    # ----------------------------------------------------------------------------------- schedule
    def _steps_per_epoch(self, trainer: pl.Trainer) -> int:
        return max(1, int(trainer.estimated_stepping_batches) // max(1, trainer.max_epochs or 1))

    @override
    def resolved_stop_step(self, trainer: pl.Trainer) -> int:
        return int(trainer.estimated_stepping_batches)

    def _phase2_start(self, trainer: pl.Trainer) -> int:
        return int(trainer.estimated_stepping_batches) - self.stop_dst_epochs * self._steps_per_epoch(trainer)

    def _is_channel_step(self, trainer: pl.Trainer, step: int) -> bool:
        if self.channel_sparsity == 0 or step == 0:
            return False
        spe = self._steps_per_epoch(trainer)
        interval = self.channel_interval_epochs * spe
        return step % interval == 0 and step <= self.stop_gmp_epochs * spe

    def _check_stop(self, trainer: pl.Trainer) -> None:
        epochs = trainer.max_epochs or 0
        if epochs > 0 and (self.stop_gmp_epochs > epochs or self.stop_dst_epochs >= epochs):
            raise ValueError(
                f"Chase schedule does not fit max_epochs={epochs}: stop_gmp_epochs={self.stop_gmp_epochs} "
                f"must be <= max_epochs and stop_dst_epochs={self.stop_dst_epochs} < max_epochs."
            )

    # ----------------------------------------------------------------------------------- internals
    @override
    def _enforced_masks(self) -> dict[str, torch.Tensor]:
        """Masks of the sparse layers plus the zero-slices of removed channels in other parameters."""
        out = dict(self.masks)
        for name, allowed in self.allowed.items():
            out[name] = out[name] & allowed if name in out else allowed
        return out

    @override
    def _refresh_params(self, pl_module: pl.LightningModule) -> None:
        self._mult = None
        named = dict(pl_module.named_parameters())
        self._params = {k: named[k] for k in {*self.masks, *self.allowed}}
        for store in (self.masks, self.allowed):
            for k, m in store.items():
                if m.device != named[k].device:
                    store[k] = m.to(named[k].device)

    def _run_find_candidates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            groups = channel_candidates(pl_module, self.example_inputs(trainer, pl_module))
        except ValueError as err:
            groups = {}
            if self.channel_sparsity == 0:
                return
            rank_zero_warn(f"Chase: {err}")
        # only convs whose weight is sparse take part (the stem conv stays out by default)
        self.groups = {k: g for k, g in groups.items() if f"{k}.weight" in self.masks}
        if not self.groups and self.channel_sparsity > 0:
            raise ValueError(
                f"Chase found no candidate conv among the sparse layers of {type(pl_module).__name__}: every "
                "conv's output channels feed a residual sum, a grouped conv or the model output "
                f"(Torch-Pruning candidates: {sorted(groups)}; sparse layers: {sorted(self.masks)[:6]}). "
                "Use channel_sparsity=0 for unstructured Chase only, or DynamicSparsity."
            )
        if not self.start_channels:
            self.start_channels = {k: g.channels for k, g in self.groups.items()}
            self.dense_flops = count_flops(pl_module, self.example_inputs(trainer, pl_module))

    def _hook_checkpoint_loading(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Re-slim the model from a checkpoint's channel config right before its weights load, in every stage.

        Lightning restores the model weights (strictly) before any callback state, and offers a callback
        no public hook in between, so :func:`~lightning_sparse.slim.restore_before_weights_load` (the one
        compatibility shim, see :mod:`lightning_sparse.slim.checkpoint`) rebuilds the architecture for
        ``fit``, ``validate``, ``test`` and ``predict`` alike, without anything from the LightningModule.
        """
        restore_before_weights_load(trainer, lambda module: self.example_inputs(trainer, module),
                                    self._run_restore_architecture)

    def _run_restore_architecture(self, pl_module: pl.LightningModule, arch: dict[str, dict[str, int]]) -> None:
        self.arch = arch
        self.groups = {}
        rank_zero_info("Chase: rebuilt the slim architecture from the checkpoint before loading its weights.")

    def _layer_scores(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """UMM scores and active flags of every candidate layer, in the current (maybe slimmed) indexing."""
        scores, active = {}, {}
        masks = self._enforced_masks()
        for layer, group in self.groups.items():
            name = f"{layer}.weight"
            scores[layer] = channel_scores(self._params[name], masks[name], self.score).cpu()
            act = torch.ones(group.channels, dtype=torch.bool)
            gone = self._current_index(layer, self.removed.get(layer, []))
            act[gone] = False
            active[layer] = act
        return scores, active

    def _original_channels(self, layer: str) -> list[int]:
        """Original channel ids of the current channels of ``layer`` (identity before slimming)."""
        slimmed = set(self.slimmed.get(layer, []))
        return [c for c in range(self.start_channels[layer]) if c not in slimmed]

    def _current_index(self, layer: str, original: list[int]) -> list[int]:
        pos = {c: i for i, c in enumerate(self._original_channels(layer))}
        return [pos[c] for c in original if c in pos]

    def _run_channel_removal(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        spe = self._steps_per_epoch(trainer)
        s_t = channel_sparsity_schedule(step, self.stop_gmp_epochs * spe, self.channel_sparsity)
        scores, active = self._layer_scores()
        total_start = sum(self.start_channels.values())
        n_active = sum(int(a.sum()) for a in active.values())
        n_remove = n_channels_to_remove(n_active, total_start, s_t)
        if n_remove == 0:
            return
        floors = {k: channel_floor(self.start_channels[k], self.channel_sparsity, self.minimum_ratio) for k in self.groups}
        # floors are in original channels; slimmed channels are already gone from `active`
        chosen = select_channels_to_remove(scores, active, floors, n_remove)
        named = dict(pl_module.named_parameters())
        for layer, idx in chosen.items():
            if idx.numel() == 0:
                continue
            original = self._original_channels(layer)
            self.removed.setdefault(layer, []).extend(original[i] for i in idx.tolist())
            for name, (dim, pos) in self.groups[layer].indices(idx).items():
                p = named[name]
                allowed = self.allowed.get(name)
                if allowed is None:
                    allowed = torch.ones_like(p, dtype=torch.bool)
                self.allowed[name] = allowed.index_fill(dim, pos.to(p.device), False)
        for name, allowed in self.allowed.items():  # removed channels leave the masks for good
            if name in self.masks:
                self.masks[name] = self.masks[name] & allowed
        self._refresh_params(pl_module)
        self._enforce(trainer)
        self._run_redistribute(trainer)
        self._enforce(trainer)
        if self.slim == "during":
            self._pending_slim = True
        rank_zero_info(f"Chase: step {step}: channel sparsity target {s_t:.3f}, removed {n_remove} channels")
        self._log_channels(trainer)

    def _effective_shape(self, name: str) -> tuple[int, ...]:
        p = self._params[name]
        allowed = self.allowed.get(name)
        if allowed is None:
            return tuple(p.shape)
        dims = list(p.shape)
        for d in range(min(2, p.ndim)):
            other = tuple(i for i in range(p.ndim) if i != d)
            dims[d] = int(allowed.any(dim=other).sum()) if other else int(allowed.sum())
        return tuple(dims)

    def _run_redistribute(self, trainer: pl.Trainer) -> None:
        """ERK over the remaining shapes with the same budget B; bring every layer to its count now."""
        shapes = {n: self._effective_shape(n) for n in self.masks}
        targets = redistribute_budget(shapes, self.budget)
        for name, mask in self.masks.items():
            p = self._params[name]
            have, want = int(mask.sum()), targets[name]
            if want > have:
                grown = global_grow({name: mask}, want - have, self.growth, {name: p.grad},
                                    self._generator(trainer.global_step), {name: self.allowed[name]} if name in self.allowed else None)
                self.masks[name] = grown[name]
            elif want < have:
                self.masks[name] = global_magnitude_prune({name: p}, {name: mask}, want)[name]

    @override
    def _run_update(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        self._check_finite(step)
        gen = self._generator(step)
        allowed = self.allowed or None
        grads = {n: self._params[n].grad for n in self.masks}
        p2 = self._phase2_start(trainer)
        if step < p2:  # phase 1: soft memory bound, global decisions
            p_t = cosine_drop_fraction(step, max(1, p2), self.drop_fraction)
            masks = global_magnitude_prune(self._params, self.masks, self.budget)
            k = int(round(p_t * self.budget))
            self.masks = global_grow(masks, k, self.growth, grads, gen, allowed)
            phase, grown = 1, k
        else:  # phase 2: strict budget, per-layer RigL
            if not self._phase2_started:
                self.masks = global_magnitude_prune(self._params, self.masks, self.budget)
                self._phase2_started = True
            total = max(1, self.resolved_stop_step(trainer) - p2)
            hi, lo = self.phase2_drop_fraction
            p_t = cosine_drop_fraction(step - p2, total, hi, lo)
            grown = 0
            for name, mask in self.masks.items():
                n_swap = int(round(p_t * int(mask.sum())))
                new = drop_grow(self._params[name], mask, n_swap, self.growth, grads[name], gen,
                                self.allowed.get(name))
                grown += int((new & ~mask).sum())
                self.masks[name] = new
            phase = 2
        self.num_updates += 1
        self._enforce(trainer)
        self._log(trainer, {"dst/drop_fraction": p_t, "dst/regrown": float(grown), "dst/phase": float(phase),
                            "dst/active_weights": float(sum(int(m.sum()) for m in self.masks.values()))})

    def _run_slim(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending_slim = False
        todo = {}
        for layer, removed in self.removed.items():
            done = set(self.slimmed.get(layer, []))
            pending = [c for c in removed if c not in done]
            if pending:
                todo[layer] = self._current_index(layer, pending)
        if not todo:
            return
        old_params = dict(pl_module.named_parameters())
        result = slim_model(pl_module, todo, self.example_inputs(trainer, pl_module), round_to=self.round_to,
                            return_result=True)
        new_params = dict(pl_module.named_parameters())
        for layer, idx in result.removed.items():
            original = self._original_channels(layer)
            self.slimmed.setdefault(layer, []).extend(original[i] for i in idx)
        # rounding may keep some removed channels: they stay zero through `allowed`
        for store in (self.masks, self.allowed):
            for name in list(store):
                store[name] = result.slice(name, store[name])
        self._swap_optimizer_params(trainer, old_params, new_params, result)
        self.allowed = {k: v for k, v in self.allowed.items() if not bool(v.all())}
        self.arch = channel_config(pl_module)
        self.groups = {}
        self._run_find_candidates(trainer, pl_module)
        self._refresh_params(pl_module)
        self._enforce(trainer)
        flops = count_flops(pl_module, self.example_inputs(trainer, pl_module))
        self.flops_ratio = flops / self.dense_flops if self.dense_flops else 1.0
        log_metrics(trainer, {"channels/params": float(sum(p.numel() for p in pl_module.parameters())),
                              "channels/flops_ratio": self.flops_ratio})
        rank_zero_info(f"Chase: slimmed the model; FLOPs {self.flops_ratio:.3f}x of dense")

    @staticmethod
    def _swap_optimizer_params(trainer: pl.Trainer, old: dict, new: dict, result: Any) -> None:
        """Point every optimizer at the new Parameter objects, slicing their state like the weights."""
        names = {p: n for n, p in old.items()}  # Parameters hash by identity
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                for i, p in enumerate(group["params"]):
                    name = names.get(p)
                    if name is None or new[name] is p:
                        continue
                    group["params"][i] = new[name]
                    state = opt.state.pop(p, None)
                    if state is not None:
                        opt.state[new[name]] = {
                            k: result.slice(name, v) if torch.is_tensor(v) and v.shape == p.shape else v
                            for k, v in state.items()
                        }

    def _log_channels(self, trainer: pl.Trainer) -> None:
        active = self.active_channels()
        metrics = {f"channels/{k}": float(v) for k, v in active.items()}
        metrics["channels/global"] = float(sum(active.values()))
        metrics["channels/global_fraction"] = sum(active.values()) / max(1, sum(self.start_channels.values()))
        metrics["sparsity/global"] = 1.0 - global_density(self.masks)
        log_metrics(trainer, metrics)
