"""N:M fine-grained structured sparsity and SR-STE (Zhou et al. 2021, arXiv 2102.04010).

Within every group of ``m`` consecutive weights along the grouping axis, the ``n`` weights with the
largest ``|w|`` are kept and the rest are zeroed (ties go to the lower index, so the mask is
deterministic and has exactly ``n`` kept weights per group). The dense weights ``W`` are trained; the
forward uses ``W̃ = W ⊙ M(W)`` with ``M(W)`` recomputed from the current weights, and the backward is

    ∂L/∂W = ∂L/∂W̃ + λ_W · (1 − M(W)) ⊙ W        (SR-STE; λ_W = 0 is the vanilla straight-through estimator)

Layouts (where the groups of ``m`` lie):

- ``"input_channels"`` (default, what sparse tensor cores use): Linear ``(out, in)`` (and any matmul
  weight such as ``nn.MultiheadAttention.in_proj_weight``) is grouped along ``in``; Conv2d
  ``(C_out, C_in, k_h, k_w)`` along ``C_in``, separately for every ``(C_out, k_h, k_w)`` (as if permuted
  to ``(C_out, k_h, k_w, C_in)``); Conv1d/Conv3d likewise for every kernel position.
- ``"flattened"`` (ablation): groups over the flattened ``C_in·k_h·k_w`` row of each output channel.

A weight is eligible when its grouping dim is divisible by ``m`` and it has more than one input channel
per group (depthwise convs are never N:M sparsified). Any ``m >= 2`` is supported; 2:4 is the pattern
NVIDIA's sparse tensor cores accelerate.

Speed: the mask is built without sort/topk. Each element's rank inside its group is counted from the
``m(m-1)/2`` pairwise comparisons of strided views (lower index wins ties), and rank ``< n`` is kept.
For ``m > 16`` a stable sort is used instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
from torch import nn
from typing_extensions import override

from lightning_sparse.checks import check_choice
from lightning_sparse.sparsity.targets import candidate_weights

__all__ = [
    "Layout",
    "LAYOUTS",
    "nm_mask",
    "srste",
    "srste_masked",
    "srste_gradient",
    "nm_violations",
    "nm_skip_reason",
    "is_nm_eligible",
    "grouping_dim",
    "bake_nm",
    "SRSTE",
]

Layout = Literal["input_channels", "flattened"]
LAYOUTS = ("input_channels", "flattened")
_PAIRWISE_MAX_M = 16


def check_nm(n: int, m: int) -> None:
    """Raise ValueError unless ``1 <= n < m`` (integers)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an integer >= 1 for N:M sparsity, got n={n!r}.")
    if isinstance(m, bool) or not isinstance(m, int) or m <= n:
        raise ValueError(f"`n` must be < `m` for N:M sparsity, got n={n!r}, m={m!r}.")


def check_layout(layout: str) -> None:
    """Raise ValueError for an unknown layout."""
    check_choice("layout", layout, LAYOUTS)


def grouping_dim(shape: torch.Size | tuple[int, ...], layout: Layout = "input_channels") -> int:
    """Length of the axis the groups of ``m`` run along (``in`` / ``C_in`` / ``C_in·k_h·k_w``)."""
    check_layout(layout)
    if len(shape) < 2:
        raise ValueError(f"N:M needs a weight with >= 2 dims (Linear or Conv), got shape {tuple(shape)}.")
    if layout == "input_channels":
        return int(shape[1])
    return int(torch.Size(shape)[1:].numel())


def nm_skip_reason(weight: torch.Tensor, m: int, layout: Layout = "input_channels") -> str | None:
    """Why ``weight`` cannot be N:M sparsified with group size ``m`` (``None`` if it can).

    Example:
        >>> nm_skip_reason(torch.zeros(8, 6, 3, 3), 4)
        'grouping dim C_in=6 is not divisible by m=4'
        >>> nm_skip_reason(torch.zeros(8, 8), 4) is None
        True
    """
    check_layout(layout)
    if not 2 <= weight.ndim <= 5:
        return f"weight has {weight.ndim} dims; only matmul (2-D) and Conv1d/2d/3d (3-D to 5-D) weights are supported"
    if weight.ndim > 2 and weight.shape[1] == 1:
        return "one input channel per group (depthwise conv or 1-channel input)"
    size = grouping_dim(weight.shape, layout)
    name = "in" if weight.ndim == 2 else ("C_in" if layout == "input_channels" else "C_in*k_h*k_w")
    if size % m:
        return f"grouping dim {name}={size} is not divisible by m={m}"
    return None


def is_nm_eligible(weight: torch.Tensor, m: int, layout: Layout = "input_channels") -> bool:
    """True if ``weight`` can carry an N:M pattern with group size ``m`` in this layout."""
    return nm_skip_reason(weight, m, layout) is None


def _grouped_view(weight: torch.Tensor, m: int, layout: Layout) -> torch.Tensor:
    """View of ``weight`` (no copy) as ``(P, m, Q)``: dim 1 runs along each group of ``m``."""
    reason = nm_skip_reason(weight, m, layout)
    if reason is not None:
        raise ValueError(f"weight of shape {tuple(weight.shape)} cannot be grouped by m={m}: {reason}.")
    w = weight if weight.is_contiguous() else weight.contiguous()
    if layout == "flattened" or w.ndim == 2:
        return w.reshape(w.shape[0] * (w[0].numel() // m), m, 1)
    c_out, c_in = w.shape[:2]
    return w.view(c_out * (c_in // m), m, w[0, 0].numel())


def _keep_pairwise(a: torch.Tensor, n: int) -> torch.Tensor:
    """``a``: ``(P, m, Q)`` magnitudes. rank_j = #{i<j: a_i >= a_j} + #{i>j: a_i > a_j}; keep rank < n."""
    p, m, q = a.shape
    planes = a.unbind(1)  # strided views, no copy
    ge = {(i, j): torch.ge(planes[i], planes[j]) for i in range(m) for j in range(i + 1, m)}
    out = torch.empty((p, m, q), dtype=torch.bool, device=a.device)
    for j in range(m):
        # count of elements that beat j: i<j beats on >=, i>j beats on > (= not(a_j >= a_i))
        rank = torch.full((p, q), m - 1 - j, dtype=torch.int8, device=a.device)
        for i in range(m):
            if i < j:
                rank.add_(ge[(i, j)].view(torch.int8))
            elif i > j:
                rank.sub_(ge[(j, i)].view(torch.int8))
        torch.lt(rank, n, out=out[:, j])
    return out


def _keep_sort(a: torch.Tensor, n: int) -> torch.Tensor:
    """Stable descending sort along the group dim (ties: lower index first); the first ``n`` are kept."""
    order = torch.sort(a, dim=1, descending=True, stable=True).indices
    return torch.zeros(a.shape, dtype=torch.bool, device=a.device).scatter_(1, order[:, :n], True)


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int, m: int, layout: Layout = "input_channels") -> torch.Tensor:
    """N:M mask of ``weight``: in each group of ``m`` along the grouping axis keep the ``n`` largest ``|w|``.

    Args:
        weight: Linear ``(out, in)`` or Conv2d ``(C_out, C_in, k_h, k_w)`` weight.
        n: weights kept per group (``1 <= n < m``).
        m: group size; must divide the grouping dim.
        layout: ``"input_channels"`` (tensor-core layout) or ``"flattened"``.

    Returns:
        Bool tensor of ``weight``'s shape with exactly ``n`` True per group (ties: lower index wins).

    Raises:
        ValueError: bad ``n``/``m``/``layout``, or a weight whose grouping dim is not divisible by ``m``.

    Example:
        >>> w = torch.tensor([[0.1, -0.5, 0.3, 0.2, 1.0, 0.0, -2.0, 0.5]])
        >>> nm_mask(w, 2, 4).int().tolist()
        [[0, 1, 1, 0, 1, 0, 1, 0]]
    """
    check_nm(n, m)
    a = _grouped_view(weight, m, layout).abs()
    keep = _keep_pairwise(a, n) if m <= _PAIRWISE_MAX_M else _keep_sort(a, n)
    return keep.view(weight.shape)


def srste_masked(weight: torch.Tensor, n: int, m: int, layout: Layout = "input_channels") -> torch.Tensor:
    """SR-STE's forward weight ``W̃ = W ⊙ M(W)`` (not differentiable through the mask).

    The one implementation of the forward: :func:`srste` and the ``NMSparsity`` callback (through
    :meth:`~lightning_sparse.sparsity.engine.MaskEngine.write_masked`) both call it.

    Example:
        >>> srste_masked(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), 2, 4).tolist()
        [[0.0, -3.0, 2.0, 0.0]]
    """
    return weight * nm_mask(weight, n, m, layout)


def srste_gradient(
    grad: torch.Tensor, weight: torch.Tensor, masked: torch.Tensor, decay: float, inplace: bool = False
) -> torch.Tensor:
    """SR-STE's gradient of the dense weight: ``grad + decay · (1 − M) ⊙ W``, from ``grad`` = ∂L/∂W̃.

    ``(1 − M) ⊙ W`` is computed as ``W − W̃`` (``masked`` from :func:`srste_masked`), which is exact: kept
    entries give ``w − w = 0``, pruned ones ``w − 0 = w``. ``inplace`` adds into ``grad`` (the callback's path,
    on ``Parameter.grad``); otherwise a new tensor is returned (the autograd path of :func:`srste`).

    Example:
        >>> w = torch.tensor([[1.0, -3.0, 2.0, 0.5]])
        >>> srste_gradient(torch.ones(1, 4), w, srste_masked(w, 2, 4), 0.1).tolist()
        [[1.100000023841858, 1.0, 1.0, 1.0499999523162842]]
    """
    term = weight - masked
    return grad.add_(term, alpha=decay) if inplace else torch.add(grad, term, alpha=decay)


class SRSTE(torch.autograd.Function):
    """``W ↦ W ⊙ M(W)``; backward ``g ↦ g + decay · (1 − M(W)) ⊙ W`` (decay 0: straight-through).

    Forward and backward are :func:`srste_masked` and :func:`srste_gradient`, the functions the
    ``NMSparsity`` callback runs on its Parameters.
    """

    @staticmethod
    @override
    def forward(ctx, weight: torch.Tensor, n: int, m: int, decay: float, layout: Layout) -> torch.Tensor:
        masked = srste_masked(weight, n, m, layout)
        ctx.decay = float(decay)
        if ctx.decay:
            ctx.save_for_backward(weight, masked)
        return masked

    @staticmethod
    @override
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.decay:
            return grad, None, None, None, None
        weight, masked = ctx.saved_tensors
        return srste_gradient(grad, weight, masked, ctx.decay), None, None, None, None


def srste(
    weight: torch.Tensor, n: int, m: int, decay: float = 2e-4, layout: Layout = "input_channels"
) -> torch.Tensor:
    """Masked weight ``W ⊙ M(W)`` with the SR-STE backward ``grad + decay · (1 − M(W)) ⊙ W``.

    Args:
        weight: dense weight (the trained parameter).
        n: kept weights per group.
        m: group size.
        decay: λ_W, the sparse-refined decay of pruned weights (2e-4 in the paper; 0 = vanilla STE).
        layout: ``"input_channels"`` or ``"flattened"``.

    Example:
        >>> w = torch.tensor([[1.0, -3.0, 2.0, 0.5]], requires_grad=True)
        >>> y = srste(w, 2, 4, decay=0.1)
        >>> y.tolist()
        [[0.0, -3.0, 2.0, 0.0]]
        >>> y.sum().backward()
        >>> w.grad.tolist()
        [[1.100000023841858, 1.0, 1.0, 1.0499999523162842]]
    """
    if decay < 0:
        raise ValueError(f"`decay` must be >= 0, got decay={decay!r}.")
    return SRSTE.apply(weight, n, m, decay, layout)


@torch.no_grad()
def nm_violations(weight: torch.Tensor, n: int, m: int, layout: Layout = "input_channels") -> int:
    """Number of groups of ``m`` (along the grouping axis) holding more than ``n`` nonzeros.

    Example:
        >>> nm_violations(torch.tensor([[1.0, 2.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]]), 2, 4)
        1
    """
    check_nm(n, m)
    nonzeros = _grouped_view(weight, m, layout).ne(0).sum(dim=1, dtype=torch.int32)
    return int(nonzeros.gt(n).sum())


@torch.no_grad()
def bake_nm(
    module: nn.Module,
    n: int,
    m: int,
    layout: Layout = "input_channels",
    names: Iterable[str] | None = None,
) -> list[str]:
    """Write ``W ⊙ M(W)`` into the weights (exact zeros) of a plain ``nn.Module`` — no Lightning needed.

    Args:
        module: any module; its matmul/conv weights (:func:`~lightning_sparse.sparsity.targets.candidate_weights`)
            are baked.
        n: kept weights per group.
        m: group size.
        layout: grouping layout.
        names: parameter names (from ``named_parameters()``) to bake; default every eligible
            candidate weight (ineligible ones are left dense).

    Returns:
        The names of the baked parameters. Afterwards ``nm_violations`` is 0 for each of them.

    Example:
        >>> net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
        >>> bake_nm(net, 2, 4)
        ['0.weight', '2.weight']
        >>> nm_violations(net[0].weight, 2, 4)
        0
    """
    check_nm(n, m)
    check_layout(layout)
    params = dict(module.named_parameters())
    if names is None:
        names = [n for n in candidate_weights(module) if is_nm_eligible(params[n], m, layout)]
    baked = []
    for name in names:
        if name not in params:
            raise ValueError(f"bake_nm: no parameter named {name!r} in the module.")
        p = params[name]
        p.mul_(nm_mask(p, n, m, layout))
        baked.append(name)
    return baked
