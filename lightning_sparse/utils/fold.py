"""Fold eval-mode BatchNorm into the preceding convolution, keeping the model's own module tree.

Which BatchNorm follows which conv is read from one forward pass, not from a symbolic trace, so any
Python control flow in the model is fine: forward hooks record every ``nn.Conv2d`` output and every
``nn.BatchNorm2d`` input, and a ``TorchFunctionMode`` counts the tensor-producing operations that read each
conv output. A BatchNorm folds into a conv when its input *is* that conv's output, nothing else reads it,
and both modules run once per forward. The conv's weight and bias absorb the normalisation
(``torch.nn.utils.fusion.fuse_conv_bn_eval``) and the BatchNorm becomes ``nn.Identity`` (or its own
activation, for timm's ``BatchNormAct2d``); every module keeps its name, so the result still is, e.g.,
a timm ``ResNet`` and exports to ONNX like the original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from lightning_sparse.utils.inputs import default_inputs
from lightning_sparse.utils.modules import eval_mode

__all__ = ["BatchNormFolds", "CannotFoldError", "batchnorm_folds", "fold_batchnorm"]

# max |folded - unfolded| allowed on the example inputs, relative to max |unfolded| (float32 rounding)
_FOLD_RTOL = 1e-4


class CannotFoldError(ValueError):
    """A BatchNorm cannot be folded into a conv (its reason is in the message)."""


@dataclass
class BatchNormFolds:
    """Result of the analysis: BatchNorm name -> conv name it folds into, and BatchNorm name -> why not."""

    folds: dict[str, str] = field(default_factory=dict)
    unfoldable: dict[str, str] = field(default_factory=dict)


class _Uses(TorchFunctionMode):
    """Counts, per tracked tensor, the torch functions that read it and return a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.tracked: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive so ids stay unique)
        self.uses: dict[int, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.tracked and any(torch.is_tensor(o) for o in tree_flatten(out)[0]):
            for a in tree_flatten((args, kwargs or {}))[0]:
                if torch.is_tensor(a) and id(a) in self.tracked:
                    self.uses[id(a)] = self.uses.get(id(a), 0) + 1
        return out


def _as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def batchnorm_folds(model: nn.Module, example_inputs: Any = None) -> BatchNormFolds:
    """Which ``BatchNorm2d`` of ``model`` fold into which ``Conv2d`` (one eval forward on ``example_inputs``).

    Args:
        model: any module (not modified; the analysis forward runs in eval mode, flags restored after).
        example_inputs: a batch (or tuple of positional inputs); default ``randn(1, in_chans, 64, 64)``.

    Returns:
        :class:`BatchNormFolds`: ``folds`` (BatchNorm name -> conv name) and ``unfoldable`` (BatchNorm name
        -> reason, e.g. a pre-activation BatchNorm that reads a sum rather than a conv output).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
        >>> r = batchnorm_folds(net, torch.randn(1, 3, 8, 8))
        >>> r.folds, r.unfoldable
        ({'1': '0'}, {'3': 'its input is not the output of a Conv2d'})
    """
    inputs = _as_inputs(default_inputs(model) if example_inputs is None else example_inputs)
    names = {m: n for n, m in model.named_modules()}
    conv_out: dict[int, str] = {}  # id(output tensor) -> conv name
    calls: dict[str, int] = {}
    bn_input: dict[str, int] = {}  # BatchNorm name -> id of its input, when that is a conv output
    mode = _Uses()

    def after_conv(module: nn.Module, args: Any, out: Any) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if torch.is_tensor(out):
            conv_out[id(out)] = name
            mode.tracked[id(out)] = out

    def before_bn(module: nn.Module, args: Any) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        if args and torch.is_tensor(args[0]) and id(args[0]) in conv_out:  # resolved now: ids get reused later
            bn_input[name] = id(args[0])

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(after_conv))
        elif isinstance(m, nn.BatchNorm2d):
            hooks.append(m.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad(), eval_mode(model), mode:
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    result = BatchNormFolds()
    claimed: set[str] = set()
    for name, m in modules.items():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        conv_name = conv_out.get(bn_input[name]) if name in bn_input else None
        conv = modules.get(conv_name) if conv_name else None
        if name not in calls:
            reason = "it does not run in the forward"
        elif not m.track_running_stats or m.running_mean is None:
            reason = "it has no running statistics (track_running_stats=False)"
        elif calls[name] > 1:
            reason = f"it runs {calls[name]} times per forward"
        elif conv is None:
            reason = "its input is not the output of a Conv2d"
        elif calls[conv_name] > 1 or conv_name in claimed:
            reason = f"its conv {conv_name!r} runs {calls[conv_name]} times per forward"
        elif mode.uses.get(bn_input[name], 0) != 1:
            reason = f"the output of {conv_name!r} is also read by another operation"
        elif conv.out_channels != m.num_features:
            reason = f"{conv_name!r} has {conv.out_channels} output channels, the BatchNorm {m.num_features}"
        else:
            result.folds[name] = conv_name
            claimed.add(conv_name)
            continue
        result.unfoldable[name] = reason
    return result


def _replacement(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of a folded BatchNorm: nothing, or the drop/activation of timm's ``BatchNormAct2d``."""
    rest = [getattr(bn, k) for k in ("drop", "act") if isinstance(getattr(bn, k, None), nn.Module)]
    rest = [r for r in rest if not isinstance(r, nn.Identity)]
    if not rest:
        return nn.Identity()
    return rest[0] if len(rest) == 1 else nn.Sequential(*rest)


def fold_batchnorm(model: nn.Module, example_inputs: Any = None, strict: bool = True) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable ``BatchNorm2d`` folded into the conv before it.

    ``conv(x) -> bn`` becomes one conv with ``W' = W * γ / sqrt(σ² + ε)`` (per output channel) and
    ``b' = (b - μ) * γ / sqrt(σ² + ε) + β``; the BatchNorm module is replaced by ``nn.Identity`` (or by the
    activation of a timm ``BatchNormAct2d``). Module names and the model's class stay as they were. Zeros
    of the conv weight stay exact zeros (N:M patterns survive). The copy's outputs are checked against
    the original's on ``example_inputs``.

    Args:
        model: the model (not modified).
        example_inputs: a batch for the analysis forward (see :func:`batchnorm_folds`); default
            ``randn(1, in_chans, 64, 64)``.
        strict: raise when a BatchNorm cannot be folded; with ``False`` it stays in the copy, as is.

    Returns:
        The folded copy, in eval mode. ``copy.folded_batchnorm`` holds the :class:`BatchNormFolds`.

    Raises:
        CannotFoldError: ``strict`` and some BatchNorm cannot be folded (each with its reason).
        RuntimeError: the folded copy's outputs differ from the model's (a bug, never expected).

    Example:
        >>> import timm
        >>> model = timm.create_model("resnet10t", num_classes=10).eval()
        >>> x = torch.randn(2, 3, 32, 32)
        >>> folded = fold_batchnorm(model, x)
        >>> type(folded).__name__, type(folded.layer1[0].bn1).__name__, len(folded.folded_batchnorm.folds)
        ('ResNet', 'Identity', 14)
        >>> bool((folded(x) - model(x)).abs().max() < 1e-4)
        True
    """
    inputs = _as_inputs(default_inputs(model) if example_inputs is None else example_inputs)
    plan = batchnorm_folds(model, inputs)
    if strict and plan.unfoldable:
        listed = "; ".join(f"{n} ({r})" for n, r in plan.unfoldable.items())
        raise CannotFoldError(
            f"cannot fold {len(plan.unfoldable)} BatchNorm layer(s) of {type(model).__name__}: {listed}. "
            "Pass strict=False to fold the others and keep these."
        )
    folded = copy.deepcopy(model).eval()
    for bn_name, conv_name in plan.folds.items():
        conv, bn = folded.get_submodule(conv_name), folded.get_submodule(bn_name)
        fused = fuse_conv_bn_eval(conv, bn)
        fused.weight.requires_grad_(conv.weight.requires_grad)
        _set(folded, conv_name, fused)
        _set(folded, bn_name, _replacement(bn))
    folded.folded_batchnorm = plan  # type: ignore[assignment]
    _check(model, folded, inputs)
    return folded


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _check(model: nn.Module, folded: nn.Module, inputs: tuple[Any, ...]) -> None:
    with eval_mode(model), torch.no_grad():
        ref, out = model(*inputs), folded(*inputs)
    if torch.is_tensor(ref) and torch.is_tensor(out):
        diff = (out - ref).abs().max().item()
        if diff > _FOLD_RTOL * max(1.0, ref.abs().max().item()):
            raise RuntimeError(f"folding BatchNorm changed the outputs of {type(model).__name__} by {diff:.3g}.")
