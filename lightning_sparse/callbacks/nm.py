"""SR-STE N:M sparsity as a Callback that attaches to any LightningModule."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks._base import check_strategy
from lightning_sparse.sparsity.nm import Layout, bake_nm, check_layout, check_nm, nm_mask, nm_skip_reason, srste

__all__ = ["NMSparsity"]

Mode = Literal["srste", "ste"]
MODES = ("srste", "ste")


class _MaskedForward:
    """Replacement ``forward`` of one Conv2d/Linear instance: runs the layer with ``srste(weight)``."""

    def __init__(self, module: nn.Conv2d | nn.Linear, callback: NMSparsity) -> None:
        self.module, self.callback = module, callback

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mod, cb = self.module, self.callback
        w = cb._forward_weight(mod.weight)
        if isinstance(mod, nn.Conv2d):
            return mod._conv_forward(x, w, mod.bias)
        return F.linear(x, w, mod.bias)


class NMSparsity(pl.Callback):
    """N:M fine-grained sparsity trained with SR-STE (Zhou et al. 2021) or the vanilla STE.

    In ``setup`` the forward of every target Conv2d/Linear instance is replaced by one that uses
    ``srste(weight, n, m, decay, layout)``: the dense weights stay the trained parameters, the forward
    (training *and* evaluation) sees ``W ⊙ M(W)`` with the mask recomputed from the current weights, and the
    backward adds ``decay · (1 − M(W)) ⊙ W``. Parameter names are untouched (no parametrization, no
    ``weight_orig``), so the model's ``state_dict`` keeps its plain keys; ``teardown``/``detach`` restore the
    original forwards. Call :meth:`bake` before exporting to write the masked weights as exact zeros.

    Masks are a function of the weights, so they need no storage: resuming from a checkpoint restores the
    weights and therefore the masks; on DDP every rank holds the same weights and thus the same masks.

    Args:
        n: weights kept per group (``1 <= n < m``).
        m: group size. Any ``m >= 2`` that divides the grouping dim of a layer; layers it does not divide
            are skipped (one warning lists them) and a config where it divides none is an error. 2:4 is
            the pattern sparse tensor cores accelerate.
        layout: ``"input_channels"`` (groups along C_in / ``in``, the tensor-core layout) or
            ``"flattened"`` (groups over C_in·k_h·k_w, an ablation).
        decay: λ_W of SR-STE (2e-4 in the paper), a float or a ``Callable[[int], float]`` of the global step.
        mode: ``"srste"`` or ``"ste"`` (vanilla straight-through estimator: decay forced to 0).
        include: fnmatch patterns on parameter names selecting the Conv2d/Linear weights to sparsify;
            default every Conv2d/Linear weight. A pattern matching none of them is an error.
        exclude: fnmatch patterns removing weights from the selection (each must match one).
        dense_warmup_steps: train dense for this many optimizer steps before masking starts
            (masking is off in every stage until then).

    Under fp16 mixed precision the decay is multiplied by the GradScaler's current scale before the
    backward, and divided by ``accumulate_grad_batches``, so the gradient the optimizer sees is exactly
    ``∂L/∂W̃ + decay · (1 − M) ⊙ W`` per optimizer step.

    Raises:
        ValueError: invalid arguments (in ``__init__``) or patterns/``m`` that fit no layer (in ``setup``).

    Example:
        >>> cb = NMSparsity(n=2, m=4)
        >>> cb.state_key
        "NMSparsity{'n': 2, 'm': 4, 'layout': 'input_channels', 'mode': 'srste'}"
    """

    def __init__(
        self,
        n: int = 2,
        m: int = 4,
        layout: Layout = "input_channels",
        decay: float | Callable[[int], float] = 2e-4,
        mode: Mode = "srste",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        dense_warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self._validate(n, m, layout, decay, mode, include, exclude, dense_warmup_steps)
        self.n, self.m, self.layout, self.mode = n, m, layout, mode
        self.decay = 0.0 if mode == "ste" else decay
        self.include, self.exclude = include, exclude
        self.dense_warmup_steps = dense_warmup_steps
        self.targets: list[str] = []  # parameter names under N:M
        self.skipped: dict[str, str] = {}  # parameter name -> reason
        self.global_step = 0
        self._decay_now = 0.0 if callable(self.decay) else float(self.decay)
        self._decay_applied = self._decay_now
        self._patched: dict[str, tuple[nn.Module, Any]] = {}  # module name -> (module, its own instance forward)
        self._coverage = 0.0

    @staticmethod
    def _validate(
        n: Any, m: Any, layout: Any, decay: Any, mode: Any, include: Any, exclude: Any, dense_warmup_steps: Any
    ) -> None:
        check_nm(n, m)
        check_layout(layout)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not supported; choose one of {list(MODES)}.")
        if not callable(decay) and (isinstance(decay, bool) or not isinstance(decay, (int, float)) or decay < 0):
            raise ValueError(f"`decay` must be a float >= 0 or a Callable[[int], float], got decay={decay!r}.")
        for arg, pats in (("include", include), ("exclude", exclude)):
            if pats is not None and (isinstance(pats, str) or not all(isinstance(p, str) for p in pats)):
                raise ValueError(f"`{arg}` must be a list of fnmatch patterns (str) or None, got {arg}={pats!r}.")
        if isinstance(dense_warmup_steps, bool) or not isinstance(dense_warmup_steps, int) or dense_warmup_steps < 0:
            raise ValueError(f"`dense_warmup_steps` must be an int >= 0, got dense_warmup_steps={dense_warmup_steps!r}.")

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(n=self.n, m=self.m, layout=self.layout, mode=self.mode)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if not self._patched:
            self._run_attach(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._run_step(trainer.global_step, self._loss_scale(trainer) / max(1, trainer.accumulate_grad_batches))

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_step(trainer.global_step)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_step(trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._run_log(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "m": self.m,
            "layout": self.layout,
            "mode": self.mode,
            "dense_warmup_steps": self.dense_warmup_steps,
            "targets": list(self.targets),
            "global_step": self.global_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict[k] for k in ("n", "m", "layout", "mode")}
        ours = {"n": self.n, "m": self.m, "layout": self.layout, "mode": self.mode}
        if saved != ours:
            raise ValueError(f"NMSparsity checkpoint was saved with {saved}, this callback has {ours}.")
        self.global_step = int(state_dict["global_step"])
        self._run_step(self.global_step)

    # ------------------------------------------------------------------ public
    def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """``{parameter name: M(W)}`` for every N:M layer, from the current weights (MaskSource protocol)."""
        targets = self.targets or self._resolve_targets(pl_module)[0]
        params = dict(pl_module.named_parameters())
        return {name: nm_mask(params[name].detach(), self.n, self.m, self.layout) for name in targets}

    def bake(self, pl_module: nn.Module) -> list[str]:
        """Write ``W ⊙ M(W)`` into every N:M weight (exact zeros). Returns the baked parameter names."""
        targets = self.targets or self._resolve_targets(pl_module)[0]
        return bake_nm(pl_module, self.n, self.m, self.layout, names=targets)

    def detach(self) -> None:
        """Restore the original forward of every patched module (the weights stay as they are)."""
        for module, own_forward in self._patched.values():
            if own_forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own_forward
        self._patched = {}

    @property
    def masking(self) -> bool:
        """Whether the forward currently applies the masks (False during ``dense_warmup_steps``)."""
        return self.global_step >= self.dense_warmup_steps

    # ------------------------------------------------------------------ internals
    def _forward_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.masking:
            return weight
        return srste(weight, self.n, self.m, self._decay_applied, self.layout)

    def _candidates(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        """``{weight parameter name: module}`` for every Conv2d/Linear with a weight."""
        out = {}
        for name, mod in pl_module.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and isinstance(getattr(mod, "weight", None), nn.Parameter):
                out[f"{name}.weight" if name else "weight"] = mod
        return out

    def _resolve_targets(self, pl_module: nn.Module) -> tuple[list[str], dict[str, str], dict[str, nn.Module]]:
        candidates = self._candidates(pl_module)
        names = list(candidates)
        for arg, pats in (("include", self.include), ("exclude", self.exclude)):
            missing = [p for p in pats or [] if not fnmatch.filter(names, p)]
            if missing:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise ValueError(
                    f"`{arg}` patterns {missing} match no Conv2d/Linear weight. Available: [{shown}]"
                    f" ({len(names)} in total)."
                )
        if self.include is not None:
            names = [k for k in names if any(fnmatch.fnmatchcase(k, p) for p in self.include)]
        if self.exclude is not None:
            names = [k for k in names if not any(fnmatch.fnmatchcase(k, p) for p in self.exclude)]
        skipped = {}
        for k in names:
            mod = candidates[k]
            reason = nm_skip_reason(mod.weight, self.m, self.layout)
            if reason is None and isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels:
                reason = "depthwise conv"
            if reason is not None:
                skipped[k] = reason
        targets = [k for k in names if k not in skipped]
        if names and not targets:
            dims = {k: tuple(candidates[k].weight.shape) for k in names[:8]}
            raise ValueError(
                f"m={self.m} is not supported for layout={self.layout!r} on this model: it divides the grouping "
                f"dim of none of the {len(names)} target weights (shapes {dims}). Choose an m that divides "
                f"{'C_in' if self.layout == 'input_channels' else 'C_in*k_h*k_w'} (e.g. m=4 for 2:4)."
            )
        return targets, skipped, {k: candidates[k] for k in targets}

    def _run_attach(self, pl_module: pl.LightningModule) -> None:
        targets, skipped, modules = self._resolve_targets(pl_module)
        self.targets, self.skipped = targets, skipped
        for pname, module in modules.items():
            self._patched[pname] = (module, module.__dict__.get("forward"))
            module.forward = _MaskedForward(module, self)
        params = dict(pl_module.named_parameters())
        total = sum(params[k].numel() for k in targets) + sum(params[k].numel() for k in skipped)
        self._coverage = sum(params[k].numel() for k in targets) / max(1, total)
        if skipped:
            listed = "; ".join(f"{k} {tuple(params[k].shape)}: {r}" for k, r in skipped.items())
            rank_zero_warn(f"NMSparsity {self.n}:{self.m} skips {len(skipped)} layer(s), left dense: {listed}")
        rank_zero_info(
            f"NMSparsity {self.n}:{self.m} ({self.mode}, layout={self.layout}) on {len(targets)} weights, "
            f"coverage {self._coverage:.4f} of sparse-layer params."
        )

    def _run_step(self, global_step: int, grad_factor: float = 1.0) -> None:
        self.global_step = int(global_step)
        self._decay_now = float(self.decay(self.global_step)) if callable(self.decay) else float(self.decay)
        if self._decay_now < 0:
            raise ValueError(f"`decay` callable returned {self._decay_now} at step {self.global_step}; must be >= 0.")
        # the decay term is added inside backward, i.e. to the gradient of the loss as Lightning scales it
        # (÷ accumulate_grad_batches, × the fp16 GradScaler scale): apply the same factor to it
        self._decay_applied = self._decay_now * grad_factor

    @staticmethod
    def _loss_scale(trainer: pl.Trainer) -> float:
        """Current GradScaler scale under fp16 mixed precision, else 1."""
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def _run_log(self, pl_module: pl.LightningModule) -> None:
        sparsity = self._coverage * (1.0 - self.n / self.m) if self.masking else 0.0
        pl_module.log_dict({"nm/coverage": self._coverage, "sparsity/global": sparsity, "nm/decay": self._decay_now})
