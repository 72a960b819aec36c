"""``MaskEngine``: the one object that holds masks and keeps them exact, shared by every sparsity callback.

``DynamicSparsity``, ``Chase`` and ``NMSparsity`` each *hold* an engine (composition); none inherits
another's internals. The engine is plain PyTorch (no Lightning): it takes the optimizers as arguments.

What it does:

- **Targets and masks**: ``masks`` maps a parameter name from ``named_parameters()`` to a bool tensor
  of that parameter's shape (True = kept). ``allowed`` adds zero-slices for any parameter (Chase's
  removed channels, also in biases and BN); :meth:`enforced` is their conjunction. Both are read-only
  views: masks change only through :meth:`set_masks`, :meth:`replace_masks`, :meth:`block` and
  :meth:`slice_masks`, which check the invariants (``torch.bool``, the parameter's shape, known names)
  and raise a ``ValueError`` naming the parameter otherwise.
- **Binding**: :meth:`bind` finds the Parameters by name, checks every mask's shape against its
  Parameter and moves masks to their devices (after a resume, a slimming or a ``.to()``).
- **Slimming**: after channels are removed physically, :meth:`slice_masks` cuts the masks like the
  Parameters and :meth:`repoint_optimizers` points the optimizers at the new Parameters, their state
  sliced alike.
- **Exactness** (DESIGN.md §2): :meth:`mask_grads` before the optimizer step, :meth:`apply_weights`
  after it, and :meth:`enforce` after any mask change also zeroes, at masked positions, every optimizer
  state tensor of the parameter's shape (momentum, Adam moments, ...), so no optimizer revives a weight.
- **Masks however the weight is read** (N:M): :meth:`write_masked` stores ``W ⊙ M(W)`` *in the
  Parameter itself* and keeps the dense ``W`` aside; :meth:`restore_dense` puts ``W`` back. Every
  consumer then sees the masked weight — a parent module reading ``child.weight`` (``nn.MultiheadAttention``
  reads ``out_proj.weight``), fused fast paths (``nn.TransformerEncoderLayer`` in eval), ``F.*`` calls on
  the Parameter — with no change to names, ``state_dict`` keys or the module's code. Swapping
  ``Parameter.data`` keeps the Parameter object (the optimizer, DDP and autograd hooks hold it) and costs
  one multiply, the same as a masked forward. Because the Parameter's value during forward and backward
  *is* ``W̃``, autograd delivers exactly ``∂L/∂W̃`` to ``W`` (the straight-through estimator); the caller
  adds SR-STE's ``λ·(1 − M) ⊙ W`` after restoring, before the optimizer step (:meth:`add_decay`); both
  halves are :func:`~lightning_sparse.sparsity.nm.srste_masked` / :func:`~lightning_sparse.sparsity.nm.srste_gradient`,
  the one SR-STE implementation that :func:`~lightning_sparse.sparsity.nm.srste` also calls.
- **State**: :meth:`state_dict` / :meth:`load_state_dict` hold masks on CPU keyed by name.
- **DDP**: the engine never communicates; callers make decisions from all-reduced gradients, identical
  weights and rank-independent seeds, so every rank holds the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from lightning_sparse.sparsity.masks import Masks, global_density, mask_optimizer_state_
from lightning_sparse.sparsity.nm import srste_gradient

__all__ = ["MaskEngine"]


class MaskEngine:
    """Masks keyed by parameter name, bound to a module's Parameters.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> eng = MaskEngine()
        >>> eng.set_masks({"weight": torch.tensor([[True, False, True, False]] * 2)}, net)
        >>> eng.apply_weights()
        >>> bool((net.weight[:, 1] == 0).all())
        True
    """

    def __init__(self) -> None:
        self._masks: Masks = {}
        self._allowed: Masks = {}
        self._params: dict[str, nn.Parameter] = {}
        self._mult: dict[str, torch.Tensor] | None = None
        self._dense: dict[str, torch.Tensor] | None = None
        self._masked: dict[str, torch.Tensor] = {}  # W ⊙ M of the last write_masked

    # ------------------------------------------------------------------------------------- binding
    @property
    def params(self) -> dict[str, nn.Parameter]:
        """The bound Parameters, by name."""
        return self._params

    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Target masks by parameter name (a read-only view; see :meth:`set_masks`, :meth:`replace_masks`)."""
        return MappingProxyType(self._masks)

    @property
    def allowed(self) -> Mapping[str, torch.Tensor]:
        """Positions still allowed (False = removed for good, see :meth:`block`), by parameter name (read-only)."""
        return MappingProxyType(self._allowed)

    def bind(self, module: nn.Module, names: Iterable[str] | None = None) -> None:
        """Look up the Parameters of ``masks``/``allowed`` (or ``names``), check the masks' shapes against them
        and move the masks to their devices.

        Raises:
            ValueError: a mask names a parameter ``module`` does not have, or its shape is not the parameter's.
        """
        named = dict(module.named_parameters())
        wanted = list(names) if names is not None else [*self._masks, *(k for k in self._allowed if k not in self._masks)]
        missing = [n for n in wanted if n not in named]
        if missing:
            raise ValueError(f"masks name parameters the model does not have: {missing[:6]}.")
        for store in (self._masks, self._allowed):
            _check_masks(store, named, "bind")
            for k, m in store.items():
                if m.device != named[k].device:
                    store[k] = m.to(named[k].device)
        self._params = {n: named[n] for n in wanted}
        self._mult = None

    def set_masks(self, masks: Mapping[str, torch.Tensor], module: nn.Module) -> None:
        """Start from ``masks`` (no removed positions) and bind them to ``module``'s Parameters.

        Raises:
            ValueError: a mask that is not ``torch.bool``, names no parameter of ``module``, or has another shape.

        Example:
            >>> eng = MaskEngine()
            >>> eng.set_masks({"weight": torch.ones(2, 3, dtype=torch.bool)}, nn.Linear(4, 2))
            Traceback (most recent call last):
            ...
            ValueError: MaskEngine.set_masks: the mask of 'weight' has shape (2, 3), its parameter (2, 4).
        """
        named = dict(module.named_parameters())
        missing = [n for n in masks if n not in named]
        if missing:
            raise ValueError(f"MaskEngine.set_masks: masks name parameters the model does not have: {missing[:6]}.")
        _check_masks(masks, named, "set_masks")
        self._masks, self._allowed = dict(masks), {}
        self.bind(module)

    def replace_masks(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace the target masks of some or all bound target parameters (a mask update).

        Raises:
            ValueError: a name the engine holds no mask for, a mask that is not ``torch.bool``, or a shape
                other than the parameter's.
        """
        unknown = [n for n in masks if n not in self._masks or n not in self._params]
        if unknown:
            raise ValueError(f"MaskEngine.replace_masks: no bound target mask for {unknown[:6]}; the engine holds "
                             f"masks for {sorted(self._masks)[:6]}{' ...' if len(self._masks) > 6 else ''}.")
        _check_masks(masks, self._params, "replace_masks")
        for name, mask in masks.items():
            device = self._params[name].device
            self._masks[name] = mask if mask.device == device else mask.to(device)
        self._mult = None

    def slice_masks(self, slice_fn: Callable[[str, torch.Tensor], torch.Tensor], module: nn.Module) -> None:
        """After ``module`` lost channels physically: cut every mask and allowed slice with
        ``slice_fn(name, tensor)`` (e.g. :meth:`~lightning_sparse.slim.SlimResult.slice`), drop allowed
        entries that no longer forbid anything, and bind to ``module``'s new Parameters.

        Raises:
            ValueError: a cut mask is not ``torch.bool`` or does not have its new parameter's shape.
        """
        masks = {k: slice_fn(k, v) for k, v in self._masks.items()}
        allowed = {k: slice_fn(k, v) for k, v in self._allowed.items()}
        named = dict(module.named_parameters())
        for store in (masks, allowed):
            _check_masks(store, named, "slice_masks")
        self._masks, self._allowed = masks, {k: v for k, v in allowed.items() if not bool(v.all())}
        self.bind(module)

    def invalidate(self) -> None:
        """Drop the cached multipliers (the mask-changing methods call it)."""
        self._mult = None

    def enforced(self) -> Masks:
        """Target masks AND the allowed positions (parameters only in ``allowed`` included)."""
        out = dict(self._masks)
        for name, allowed in self._allowed.items():
            out[name] = out[name] & allowed if name in out else allowed
        return out

    def block(self, name: str, param: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        """Forbid the slices ``index`` along ``dim`` of ``param`` for good (in ``allowed`` and its mask)."""
        allowed = self._allowed.get(name)
        if allowed is None:
            allowed = torch.ones_like(param, dtype=torch.bool)
        self._allowed[name] = allowed.index_fill(dim, index.to(param.device), False)
        if name in self._masks:
            self._masks[name] = self._masks[name] & self._allowed[name]
        self._mult = None

    def multipliers(self) -> dict[str, torch.Tensor]:
        """Enforced masks as 0/1 tensors of each parameter's dtype (cached: multiplying by them is ~3x
        faster than by bool masks, and it runs twice per step)."""
        if self._mult is None:
            self._mult = {k: m.to(self._params[k].dtype) for k, m in self.enforced().items()}
        return self._mult

    # ------------------------------------------------------------------------------------ exactness
    @torch.no_grad()
    def apply_weights(self) -> None:
        """Zero every weight outside its enforced mask, in place."""
        for name, mult in self.multipliers().items():
            self._params[name].mul_(mult)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero gradients outside the enforced masks (parameters without a gradient are skipped)."""
        for name, mult in self.multipliers().items():
            grad = self._params[name].grad
            if grad is not None:
                grad.mul_(mult)

    def enforce(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """After any mask change: zero masked weights and every optimizer state tensor there."""
        self.invalidate()
        self.apply_weights()
        mask_optimizer_state_(optimizers, self._params, self.enforced())

    @torch.no_grad()
    def reset(self, positions: Masks, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Set the weights at ``positions`` (True = reset) and every optimizer state tensor there to 0.

        For connections that restart from zero although their mask stays True (Chase regrows a weight it
        has just pruned from 0, as the reference prunes, applies the mask, then grows).
        """
        keep = {n: ~m for n, m in positions.items() if bool(m.any())}
        if not keep:
            return
        for name, k in keep.items():
            self._params[name].mul_(k.to(self._params[name].dtype))
        mask_optimizer_state_(optimizers, self._params, keep)

    def non_finite(self) -> str | None:
        """``"gradient in 'name'"`` (or weight) for the first non-finite tensor among targets, else None."""
        for name in self._masks:
            p = self._params[name]
            for what, t in (("weight", p), ("gradient", p.grad)):
                if t is not None and not bool(torch.isfinite(t).all()):
                    return f"{what} in {name!r}"
        return None

    def unusable(self) -> str | None:
        """Why this step's values cannot drive a mask update, or None: a non-finite weight or gradient among the
        targets, or no gradient in any target (a batch whose ``training_step`` returned None)."""
        problem = self.non_finite()
        if problem is not None:
            return f"non-finite {problem}"
        if self._masks and all(self._params[n].grad is None for n in self._masks):
            return "no gradient in any sparse layer (a skipped batch)"
        return None

    def density(self) -> float:
        """Kept fraction over all target masks."""
        return global_density(self._masks)

    # ------------------------------------------------------------------------- transient masking
    @property
    def is_masked(self) -> bool:
        """True between :meth:`write_masked` and :meth:`restore_dense`."""
        return self._dense is not None

    @property
    def dense(self) -> dict[str, torch.Tensor]:
        """The dense weights kept aside while masked (empty otherwise)."""
        return dict(self._dense or {})

    @torch.no_grad()
    def write_masked(self, masked_fn: Callable[[torch.Tensor], torch.Tensor], names: Iterable[str] | None = None) -> None:
        """Store ``masked_fn(W)`` (``W ⊙ M(W)``, e.g. :func:`~lightning_sparse.sparsity.nm.srste_masked`) in each
        bound Parameter (``names``: a subset), keeping ``W`` aside."""
        if self._dense is not None:
            return
        self._dense, self._masked = {}, {}
        with torch.inference_mode(False):  # evaluation loops run in inference mode
            for name in names if names is not None else self._params:
                p = self._params[name]
                dense = p.data
                self._dense[name] = dense
                p.data = self._masked[name] = masked_fn(dense)

    @torch.no_grad()
    def restore_dense(self) -> bool:
        """Put the dense weights back (no-op when nothing is masked). Returns whether it restored."""
        if self._dense is None:
            return False
        for name, dense in self._dense.items():
            self._params[name].data = dense
        self._dense = None
        return True

    @torch.no_grad()
    def restore_dense_where_unchanged(self, masked_fn: Callable[[torch.Tensor], torch.Tensor]) -> list[str]:
        """Put the dense weights back into every Parameter that still holds ``masked_fn(W)`` of its kept ``W``.

        For masked weights left in the Parameters between uses (``NMSparsity`` after fit): a Parameter whose
        value was replaced since (a checkpoint or ``load_state_dict`` wrote into it) keeps its new value, and
        its kept ``W`` is dropped. Returns the names of those replaced Parameters.
        """
        if self._dense is None:
            return []
        replaced = []
        for name, dense in self._dense.items():
            p = self._params[name]
            dense = dense.to(p.device) if dense.dtype == p.dtype else None
            if dense is not None and torch.equal(p.data, masked_fn(dense)):
                p.data = dense
            else:
                replaced.append(name)
        self._dense, self._masked = None, {}
        return replaced

    def hold_dense(self, dense: Mapping[str, torch.Tensor] | None) -> None:
        """Declare that the bound Parameters hold ``W ⊙ M(W)`` of ``dense`` (restored from a checkpoint), kept
        aside as by :meth:`write_masked`; ``None`` forgets any kept ``W`` and leaves the Parameters as they are.

        Raises:
            ValueError: ``dense`` names a parameter that is not bound, or has another shape than it.
        """
        if dense is None:
            self._dense, self._masked = None, {}
            return
        bad = {k: tuple(v.shape) for k, v in dense.items() if k not in self._params or v.shape != self._params[k].shape}
        if bad:
            raise ValueError(f"MaskEngine.hold_dense: dense weights {bad} fit no bound parameter "
                             f"(bound: {sorted(self._params)[:6]}{' ...' if len(self._params) > 6 else ''}).")
        self._dense = {k: v.to(self._params[k].device) for k, v in dense.items()}
        self._masked = {}

    @torch.no_grad()
    def add_decay(self, decay: float, params: set[int] | None = None) -> None:
        """SR-STE's term: ``grad += decay · (1 − M) ⊙ W`` with the dense ``W`` and the last written
        ``W ⊙ M`` (:func:`~lightning_sparse.sparsity.nm.srste_gradient`, in place).

        ``params``: ids of the Parameters to treat (those of the optimizer about to step); default all.
        """
        if not decay:
            return
        for name, masked in self._masked.items():
            p = self._params[name]
            if p.grad is None or (params is not None and id(p) not in params):
                continue
            srste_gradient(p.grad, p.detach(), masked, decay, inplace=True)

    # ------------------------------------------------------------------------------- optimizers
    def repoint_optimizers(
        self,
        optimizers: Iterable[torch.optim.Optimizer],
        old: Mapping[str, nn.Parameter],
        module: nn.Module,
        slice_fn: Callable[[str, torch.Tensor], torch.Tensor],
    ) -> None:
        """Point every optimizer at ``module``'s replacement Parameters (``old``: the Parameters by name before
        they were replaced), slicing each state tensor of the old shape with ``slice_fn(name, tensor)``.

        Raises:
            ValueError: an optimized Parameter's name is gone from ``module``, or a sliced state tensor does
                not have the new Parameter's shape.
        """
        new = dict(module.named_parameters())
        names = {p: n for n, p in old.items()}  # Parameters hash by identity
        for opt in optimizers:
            for group in opt.param_groups:
                for i, p in enumerate(group["params"]):
                    name = names.get(p)
                    if name is None or new.get(name) is p:
                        continue
                    if name not in new:
                        raise ValueError(f"MaskEngine.repoint_optimizers: the optimizer holds {name!r}, which the "
                                         "model no longer has.")
                    group["params"][i] = new[name]
                    state = opt.state.pop(p, None)
                    if state is not None:
                        opt.state[new[name]] = {k: _sliced_state(name, k, v, p, new[name], slice_fn)
                                                for k, v in state.items()}

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Masks and allowed positions on CPU, keyed by parameter name."""
        return {
            "masks": {k: v.detach().cpu().clone() for k, v in self._masks.items()},
            "allowed": {k: v.detach().cpu().clone() for k, v in self._allowed.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks (to the bound Parameters' devices when bound)."""
        device = {k: p.device for k, p in self._params.items()}
        self._masks = {k: v.to(device.get(k, "cpu")).bool() for k, v in state["masks"].items()}
        self._allowed = {k: v.to(device.get(k, "cpu")).bool() for k, v in state.get("allowed", {}).items()}
        self._mult = None


def _sliced_state(name: str, key: str, value: Any, old: torch.Tensor, new: torch.Tensor,
                  slice_fn: Callable[[str, torch.Tensor], torch.Tensor]) -> Any:
    """One optimizer state entry after its Parameter was replaced: tensors of the old shape cut like it."""
    if not torch.is_tensor(value) or value.shape != old.shape:
        return value
    out = slice_fn(name, value)
    if out.shape != new.shape:
        raise ValueError(f"MaskEngine.repoint_optimizers: state {key!r} of {name!r} was cut to {tuple(out.shape)}, "
                         f"its parameter has {tuple(new.shape)}.")
    return out


def _check_masks(masks: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor], where: str) -> None:
    """The mask invariants: a ``torch.bool`` tensor of its parameter's shape (names in ``params`` only)."""
    for name, mask in masks.items():
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            kind = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
            raise ValueError(f"MaskEngine.{where}: the mask of {name!r} is {kind}; masks must be torch.bool tensors.")
        param = params.get(name)
        if param is not None and mask.shape != param.shape:
            raise ValueError(f"MaskEngine.{where}: the mask of {name!r} has shape {tuple(mask.shape)}, its parameter "
                             f"{tuple(param.shape)}.")
