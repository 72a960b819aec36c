"""SR-STE N:M sparsity as a Callback that attaches to any LightningModule.

How the masked weight reaches every consumer: during each training batch and each evaluation loop the
Parameter itself holds ``W̃ = W ⊙ M(W)`` (:meth:`MaskEngine.write_masked`), and the dense ``W`` is put
back before the optimizer step and at the end of the batch/loop. This was chosen over replacing a
module's ``forward`` (blind to a parent reading ``child.weight`` — ``nn.MultiheadAttention`` reads
``out_proj.weight`` — to fused fast paths such as ``nn.TransformerEncoderLayer`` in eval, and to ``F.*``
calls on the Parameter) and over ``torch.nn.utils.parametrize`` (renames parameters and ``state_dict``
keys to ``*.parametrizations.weight.original``, recomputes the mask at every attribute read, and needs
state-dict hooks to look plain). With the value swap, names, keys, the optimizer's Parameter objects and
DDP's hooks stay untouched, and the checkpoints written during fit hold the dense ``W`` (they are written
between batches).

At the end of every Trainer run (``teardown``) the Parameters are left holding ``W ⊙ M(W)``, so ``model(x)``,
``state_dict()`` and anything else outside the Trainer see the sparse model that was trained and evaluated;
the dense ``W`` stays in the callback (and in its ``state_dict``, so a checkpoint saved then resumes
bitwise). The next Trainer run puts ``W`` back before its first forward, in every Parameter that still
holds ``W ⊙ M(W)``; one that a checkpoint or ``load_state_dict`` overwrote in between keeps its new value.

Gradient: the forward and backward run on ``W̃``, so autograd delivers exactly ``∂L/∂W̃`` to the
Parameter (the straight-through estimator). In ``on_before_optimizer_step`` — after the GradScaler has
unscaled the gradients and after all accumulated micro-batches — the dense ``W`` is restored and
``λ_W · (1 − M(W)) ⊙ W`` is added once, so the optimizer sees exactly the SR-STE gradient of DESIGN.md §4
and its own weight decay acts on the dense ``W``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_sparse.callbacks._base import MaskSourceInfo, check_strategy
from lightning_sparse.callbacks._schedule import fast_dev_run_step
from lightning_sparse.checks import check_choice, check_patterns, check_range
from lightning_sparse.sparsity.engine import MaskEngine
from lightning_sparse.sparsity.nm import LAYOUTS, Layout, bake_nm, check_nm, nm_mask, nm_skip_reason, srste_masked
from lightning_sparse.sparsity.targets import select_targets

__all__ = ["NMSparsity"]

Mode = Literal["srste", "ste"]
MODES = ("srste", "ste")


class NMSparsity(pl.Callback):
    """N:M fine-grained sparsity trained with SR-STE (Zhou et al. 2021) or the vanilla STE.

    Targets are the matmul/conv weights of the module (:mod:`lightning_sparse.sparsity.targets`: Linear,
    Conv1d/2d/3d, ``nn.MultiheadAttention.in_proj_weight``, timm ViT ``qkv``/``proj``/``fc1``/``fc2``). The
    dense weights stay the trained parameters; every forward in training *and* evaluation sees
    ``W ⊙ M(W)`` with the mask recomputed from the current weights, however the module reads its weight
    (see the module docstring), and the optimizer receives ``∂L/∂W̃ + decay · (1 − M(W)) ⊙ W``.
    Parameter names and ``state_dict`` keys are untouched; between batches (checkpoints, other callbacks)
    the Parameters hold the dense ``W``. When ``fit`` (or ``validate``/``test``/``predict``) ends, the module
    holds ``W ⊙ M(W)``: ``model(x)`` is the sparse model's forward, and ``model.state_dict()`` is the sparse
    model (exact zeros) that loads into a plain timm model; the dense ``W`` SR-STE trains stays in this
    callback and its ``state_dict``, and the next ``fit`` continues from it. ``with nm.masked(module): ...``
    runs code on the masked weights of a module the callback has not left masked (before any run, or
    after loading dense weights into it); :meth:`bake` makes the masked weights permanent.

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
        include: fnmatch patterns on parameter names selecting the weights to sparsify (any weight with
            >= 2 dims); default every candidate weight. A pattern matching nothing is an error.
        exclude: fnmatch patterns removing weights from the selection (each must match one).
        dense_warmup_steps: train dense for this many optimizer steps before masking starts
            (masking is off in every stage until then).

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
        check_nm(n, m)
        check_choice("layout", layout, LAYOUTS)
        check_choice("mode", mode, MODES)
        if not callable(decay):
            check_range("decay", decay, 0, low_inclusive=True, what="λ_W, a float or a Callable[[int], float]")
        check_patterns("include", include)
        check_patterns("exclude", exclude)
        check_range("dense_warmup_steps", dense_warmup_steps, 0, low_inclusive=True, integer=True)
        self.n, self.m, self.layout, self.mode = n, m, layout, mode
        self.decay = 0.0 if mode == "ste" else decay
        self.include, self.exclude = include, exclude
        self.dense_warmup_steps = dense_warmup_steps
        self.targets: list[str] = []  # parameter names under N:M
        self.skipped: dict[str, str] = {}  # parameter name -> reason
        self.global_step = 0
        self.coverage = 0.0
        self.engine = MaskEngine()
        self._decay_now = 0.0 if callable(self.decay) else float(self.decay)
        self._hooks: list[Any] = []
        self._window = False  # inside a training batch or an evaluation loop

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(n=self.n, m=self.m, layout=self.layout, mode=self.mode)

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if not self._hooks:
            self.attach(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wake()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wake()  # again: a strategy may restore the checkpoint after on_fit_start
        if self.dense_warmup_steps > 0:  # a smoke run masks at its last step at the latest
            last = fast_dev_run_step(trainer, type(self).__name__, "N:M masking from the last step on, at the latest")
            self.dense_warmup_steps = self.dense_warmup_steps if last is None else min(self.dense_warmup_steps, last)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.detach()
        self._rest()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._run_step(trainer.global_step)
        self._open()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.engine.restore_dense():
            ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
            self.engine.add_decay(self._decay_now, ids)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close()
        sparsity = self.coverage * (1.0 - self.n / self.m) if self.masking else 0.0
        pl_module.log_dict({"nm/coverage": self.coverage, "sparsity/global": sparsity, "nm/decay": self._decay_now})

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run_step(trainer.global_step)
        self._open()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_validation_start(trainer, pl_module)

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_validation_start(trainer, pl_module)

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()  # never leave masked values in the trained Parameters

    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"n": self.n, "m": self.m, "layout": self.layout, "mode": self.mode,
                 "dense_warmup_steps": self.dense_warmup_steps, "targets": list(self.targets),
                 "global_step": self.global_step}
        if self.at_rest:  # the module holds W ⊙ M(W): the dense W travels here (checkpoints saved after a run)
            state["dense"] = {k: v.detach().cpu().clone() for k, v in self.engine.dense.items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict[k] for k in ("n", "m", "layout", "mode")}
        ours = {"n": self.n, "m": self.m, "layout": self.layout, "mode": self.mode}
        if saved != ours:
            raise ValueError(f"NMSparsity checkpoint was saved with {saved}, this callback has {ours}.")
        self._run_step(int(state_dict["global_step"]))
        # a checkpoint saved after a run: its model weights are W ⊙ M(W), its dense W is here (the next run
        # puts it back); one saved during fit holds the dense W in the model weights and none here
        self.engine.hold_dense(state_dict.get("dense"))

    # ------------------------------------------------------------------ public
    def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """``{parameter name: M(W)}`` for every N:M layer, from the dense weights (MaskSource protocol)."""
        targets = self.targets or self._resolve(pl_module)[0]
        params = dict(pl_module.named_parameters())
        dense = self.engine.dense if self.engine.is_masked else {}
        return {k: nm_mask(dense.get(k, params[k]).detach(), self.n, self.m, self.layout) for k in targets}

    def describe(self) -> MaskSourceInfo:
        """``"2:4 SR-STE"`` (or ``STE``), N:M masks (MaskSource protocol)."""
        return MaskSourceInfo(method=f"{self.n}:{self.m} {'SR-STE' if self.mode == 'srste' else 'STE'}",
                              kind=f"{self.n}:{self.m}", density=self.n / self.m, n=self.n, m=self.m)

    def schedule_marks(self, trainer: pl.Trainer) -> dict[str, int]:
        """The end of the dense warm-up, when there is one (MaskSource protocol)."""
        return {"N:M masking start": int(self.dense_warmup_steps)} if self.dense_warmup_steps > 0 else {}

    def bake(self, pl_module: nn.Module) -> list[str]:
        """Write ``W ⊙ M(W)`` into every N:M weight for good (exact zeros); the dense ``W`` the callback kept
        after a run is dropped, so a later run continues from the baked weights. Returns the baked names."""
        self._wake()
        self.engine.restore_dense()
        targets = self.targets or self._resolve(pl_module)[0]
        return bake_nm(pl_module, self.n, self.m, self.layout, names=targets)

    def attach(self, module: nn.Module) -> None:
        """Resolve the targets of ``module`` and install the forward pre-hooks that (re)write the masked
        weights whenever a forward runs inside a training batch or an evaluation loop (e.g. a second
        forward after a manual ``optimizer.step()``). ``setup`` calls it."""
        self.detach()
        self.targets, self.skipped = self._resolve(module)
        self.engine.bind(module, self.targets)
        owners = {t.rpartition(".")[0] for t in self.targets}
        ancestors = {".".join(o.split(".")[:i]) for o in owners for i in range(len(o.split(".")) + 1)}
        for name, mod in module.named_modules():
            if name in ancestors:
                self._hooks.append(mod.register_forward_pre_hook(self._pre_forward))
        params = dict(module.named_parameters())
        covered = sum(params[k].numel() for k in self.targets)
        self.coverage = covered / max(1, covered + sum(params[k].numel() for k in self.skipped))
        if self.skipped:
            listed = "; ".join(f"{k} {tuple(params[k].shape)}: {r}" for k, r in self.skipped.items())
            rank_zero_warn(f"NMSparsity {self.n}:{self.m} skips {len(self.skipped)} layer(s), left dense: {listed}")
        rank_zero_info(
            f"NMSparsity {self.n}:{self.m} ({self.mode}, layout={self.layout}) on {len(self.targets)} weights, "
            f"coverage {self.coverage:.4f} of the selected weights' params."
        )

    def detach(self) -> None:
        """Remove the hooks; inside a training batch or an evaluation loop, put the dense weights back first
        (a module the callback left masked after a run stays so)."""
        self._close()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @contextmanager
    def masked(self, module: nn.Module) -> Iterator[nn.Module]:
        """Run code on the masked weights outside a Trainer: ``with nm.masked(model): model(x)``.

        After a Trainer run the module already holds them (this recomputes them from the dense ``W`` and leaves
        the module as it found it); before one, or after dense weights were loaded into it, this masks them.
        """
        if not self._hooks:
            self.attach(module)
        inside = self._window  # already in a training batch or an evaluation loop: leave it as it is
        resting = self.at_rest
        if not inside:
            self._open()
        try:
            yield module
        finally:
            if not inside:
                self._close()
                if resting:
                    self._rest()

    @property
    def masking(self) -> bool:
        """Whether the forward currently applies the masks (False during ``dense_warmup_steps``)."""
        return self.global_step >= self.dense_warmup_steps

    @property
    def at_rest(self) -> bool:
        """Whether the module holds ``W ⊙ M(W)`` outside a Trainer run, with the dense ``W`` kept here."""
        return not self._window and self.engine.is_masked

    # ------------------------------------------------------------------ internals
    def _resolve(self, module: nn.Module) -> tuple[list[str], dict[str, str]]:
        names = select_targets(module, self.include, self.exclude, first_last=False, owner="NMSparsity").names
        params = dict(module.named_parameters())
        skipped = {k: r for k in names if (r := nm_skip_reason(params[k], self.m, self.layout)) is not None}
        targets = [k for k in names if k not in skipped]
        if names and not targets:
            dims = {k: tuple(params[k].shape) for k in names[:8]}
            raise ValueError(
                f"m={self.m} is not supported for layout={self.layout!r} on this model: it divides the grouping "
                f"dim of none of the {len(names)} target weights (shapes {dims}). Choose an m that divides "
                f"{'C_in' if self.layout == 'input_channels' else 'C_in*k_h*k_w'} (e.g. m=4 for 2:4)."
            )
        return targets, skipped

    def _masked_fn(self, weight: torch.Tensor) -> torch.Tensor:
        return srste_masked(weight, self.n, self.m, self.layout)

    def _open(self) -> None:
        self._wake()
        self._window = True
        if self.masking and self.engine.params:
            self.engine.write_masked(self._masked_fn)

    def _close(self) -> None:
        if self._window:
            self._window = False
            self.engine.restore_dense()

    def _rest(self) -> None:
        """End of a run: leave ``W ⊙ M(W)`` in the Parameters, the dense ``W`` kept in the engine."""
        self._close()
        if self.masking and self.engine.params and not self.engine.is_masked:
            self.engine.write_masked(self._masked_fn)

    def _wake(self) -> None:
        """Start of a run (or of ``masked``/``bake``): put the kept dense ``W`` back where the Parameter still
        holds ``W ⊙ M(W)``; a Parameter overwritten since (checkpoint, ``load_state_dict``) keeps its value."""
        if not self.at_rest:
            return
        replaced = self.engine.restore_dense_where_unchanged(self._masked_fn)
        if replaced:
            rank_zero_debug(f"NMSparsity: {len(replaced)} weight(s) were overwritten since the last run ended; "
                            f"continuing from their new values: {replaced[:4]}")

    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if self._window and self.masking and not self.engine.is_masked:
            self.engine.write_masked(self._masked_fn)

    def _run_step(self, global_step: int) -> None:
        self.global_step = int(global_step)
        self._decay_now = float(self.decay(self.global_step)) if callable(self.decay) else float(self.decay)
        if self._decay_now < 0:
            raise ValueError(f"`decay` callable returned {self._decay_now} at step {self.global_step}; must be >= 0.")
