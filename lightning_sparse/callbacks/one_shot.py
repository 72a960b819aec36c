"""``OneShotPruning``: prune a loaded dense model once at fit start, then fine-tune with the masks fixed."""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_sparse.callbacks._base import KeepMasked, MaskSourceInfo, check_strategy, log_metrics
from lightning_sparse.checks import check_choice, check_patterns, check_range
from lightning_sparse.sparsity.engine import MaskEngine
from lightning_sparse.sparsity.gmp import SCOPES, final_counts, prune_global, prune_layers
from lightning_sparse.sparsity.masks import Masks
from lightning_sparse.sparsity.nm import LAYOUTS, Layout, check_nm, nm_mask, nm_skip_reason
from lightning_sparse.sparsity.targets import select_targets

__all__ = ["OneShotPruning"]

Pattern = Literal["unstructured", "nm"]
PATTERNS = ("unstructured", "nm")


class OneShotPruning(KeepMasked):
    """One-shot magnitude pruning of the model's loaded weights at fit start, then fine-tuning with fixed masks.

    The recipe of NVIDIA ASP's ``prune_trained_model``: build the model from a trained dense checkpoint (e.g.
    ``ImageClassifier(checkpoint_path=...)``), prune once in ``setup``, and fine-tune; the masks never change
    and every pruned weight, its gradient and its optimizer state stay exactly 0.

    - ``pattern="unstructured"``: keep the ``density`` fraction of largest ``|w|``, with one global threshold
      (``distribution="global"``) or per layer (``"uniform"``/``"erk"``, an exact global budget), which is
      :class:`~lightning_sparse.callbacks.GradualMagnitudePruning` with a single update.
      Targets as in ``DynamicSparsity`` (first and last candidate dense unless ``sparse_first_last``/``include``).
    - ``pattern="nm"``: ``n`` of every ``m`` (the mask of :func:`~lightning_sparse.sparsity.nm.nm_mask`, same
      ``layout``) on every eligible Conv/Linear/attention weight; layers ``m`` does not divide stay dense (one
      warning lists them). For SR-STE fine-tuning instead of fixed masks, use
      :class:`~lightning_sparse.callbacks.NMSparsity` alone on the loaded model: its first masks are this
      one-shot N:M mask of the loaded weights, and SR-STE then re-chooses them.

    Masks live in the callback's ``state_dict``, so a resumed run keeps them; every rank loads the same
    weights, so every rank computes the same masks.

    Args:
        pattern: ``"unstructured"`` or ``"nm"``.
        density: kept fraction for ``"unstructured"``, in (0, 1].
        distribution: ``"global"``, ``"uniform"`` or ``"erk"`` (``"unstructured"`` only).
        n: weights kept per group (``"nm"``).
        m: group size (``"nm"``).
        layout: N:M grouping, ``"input_channels"`` or ``"flattened"``.
        include: fnmatch patterns of parameter names to prune.
        exclude: fnmatch patterns of parameter names to keep dense.
        sparse_first_last: ``"unstructured"``: also prune the first and the last candidate weight.

    Raises:
        ValueError: an argument outside its range (named, with its value), or in ``setup`` a pattern that
            matches no parameter or an ``m`` that fits no layer.

    Example:
        >>> OneShotPruning(pattern="nm", n=2, m=4).state_key
        "OneShotPruning{'pattern': 'nm', 'density': 0.5, 'n': 2, 'm': 4}"
    """

    def __init__(
        self,
        pattern: Pattern = "unstructured",
        density: float = 0.1,
        distribution: str = "global",
        n: int = 2,
        m: int = 4,
        layout: Layout = "input_channels",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        sparse_first_last: bool = False,
    ) -> None:
        check_choice("pattern", pattern, PATTERNS)
        check_range("density", density, 0, 1, high_inclusive=True, what="fraction of kept weights")
        check_choice("distribution", distribution, SCOPES, "'global' = one threshold over all layers")
        check_nm(n, m)
        check_choice("layout", layout, LAYOUTS)
        check_patterns("include", include)
        check_patterns("exclude", exclude)
        self.pattern, self.distribution, self.n, self.m, self.layout = pattern, distribution, n, m, layout
        self.density = n / m if pattern == "nm" else density
        self.include, self.exclude, self.sparse_first_last = include, exclude, sparse_first_last
        self.engine = MaskEngine()
        self.skipped: dict[str, str] = {}
        self.num_updates = 0
        self._pruned_at_setup = False  # masks computed in this process's setup, not restored from a checkpoint

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(pattern=self.pattern, density=self.density, n=self.n, m=self.m)

    @property
    def masks(self) -> Masks:
        """``{parameter name: bool mask}`` (True = kept): a new dict of the live mask tensors; masks change
        only through the callback's updates (the engine's methods)."""
        return dict(self.engine.masks)

    def current_masks(self, pl_module: pl.LightningModule) -> Masks:
        """The fixed masks (``MaskSource`` protocol)."""
        return dict(self.engine.masks)

    def describe(self) -> MaskSourceInfo:
        """``"one-shot (2:4)"`` with N:M masks, or ``"one-shot (density 0.1)"`` (MaskSource protocol)."""
        if self.pattern == "nm":
            return MaskSourceInfo(method=f"one-shot ({self.n}:{self.m})", kind=f"{self.n}:{self.m}",
                                  density=self.n / self.m, n=self.n, m=self.m)
        return MaskSourceInfo(method=f"one-shot (density {self.density:g})", density=self.density)

    def schedule_marks(self, trainer: pl.Trainer) -> dict[str, int]:
        """``{}``: the masks are fixed from the first step (MaskSource protocol)."""
        return {}

    # ------------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__)
        if stage == "fit" and not self.engine.masks:
            self._run_prune(pl_module)
            self._pruned_at_setup = True

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pruned_at_setup and trainer.ckpt_path is not None:
            raise ValueError(
                f"{type(self).__name__}: fit started from ckpt_path={trainer.ckpt_path!r}, which holds no "
                f"{type(self).__name__} masks, so they were computed from the weights before that checkpoint "
                "replaced them. Give the dense weights to the model instead (ImageClassifier: "
                "`model.init_args.checkpoint_path`); `ckpt_path` resumes a run that already has its masks."
            )
        self.engine.bind(pl_module)
        self.engine.enforce(trainer.optimizers)
        log_metrics(trainer, {"sparsity/global": 1.0 - self.engine.density()})

    @override
    def state_dict(self) -> dict[str, Any]:
        # the pattern travels with the masks, so a loader of the run (compare, export) can count N:M as N/M
        return {**self.engine.state_dict(), "num_updates": self.num_updates, "pattern": self.pattern,
                "n": self.n, "m": self.m, "layout": self.layout}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)
        self.num_updates = int(state_dict.get("num_updates", 1))
        self._pruned_at_setup = False

    # ----------------------------------------------------------------------------------- internals
    def _targets(self, pl_module: pl.LightningModule) -> list[str]:
        first_last = self.pattern == "unstructured" and not self.sparse_first_last
        selection = select_targets(pl_module, self.include, self.exclude, first_last=first_last,
                                   owner=type(self).__name__)
        for note in selection.notes:
            rank_zero_info(note)
        names = selection.names
        if self.pattern == "unstructured":
            return names
        params = dict(pl_module.named_parameters())
        self.skipped = {k: r for k in names if (r := nm_skip_reason(params[k], self.m, self.layout)) is not None}
        targets = [k for k in names if k not in self.skipped]
        if not targets:
            raise ValueError(f"OneShotPruning: m={self.m} fits none of the {len(names)} target weights for "
                             f"layout={self.layout!r} ({list(self.skipped.values())[:3]}); choose an m that divides C_in.")
        if self.skipped:
            rank_zero_warn(f"OneShotPruning {self.n}:{self.m} leaves {len(self.skipped)} layer(s) dense: "
                           + "; ".join(f"{k}: {r}" for k, r in self.skipped.items()))
        return targets

    @torch.no_grad()
    def _run_prune(self, pl_module: pl.LightningModule) -> None:
        """Compute the masks from the current (loaded) weights and zero everything they drop."""
        names = self._targets(pl_module)
        params = {k: p for k, p in pl_module.named_parameters() if k in set(names)}
        params = {k: params[k] for k in names}
        if self.pattern == "nm":
            masks = {k: nm_mask(p.detach(), self.n, self.m, self.layout) for k, p in params.items()}
        else:
            full = {k: torch.ones_like(p, dtype=torch.bool) for k, p in params.items()}
            if self.distribution == "global":
                masks = prune_global(params, full, self.density, 0, 0, 0)
            else:
                finals = final_counts({k: tuple(p.shape) for k, p in params.items()}, self.density, self.distribution)
                masks = prune_layers(params, full, finals, 0, 0, 0)
        self.engine.set_masks(masks, pl_module)
        self.engine.apply_weights()
        self.num_updates = 1
        what = f"{self.n}:{self.m} ({self.layout})" if self.pattern == "nm" else f"density {self.density:g} ({self.distribution})"
        rank_zero_info(f"OneShotPruning: pruned {len(masks)} weights to {what}; kept {self.engine.density():.4f} of them.")
