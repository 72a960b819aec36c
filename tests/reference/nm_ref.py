"""Independent PyTorch transcription of aojunzz/NM-sparsity's N:M mask and SR-STE backward.

Source: aojunzz/NM-sparsity @ a557d6b2356a0138a7df67791bd66ba8d59f69df
  devkit/sparse_ops/sparse_ops.py   Sparse (linear / natural layout), Sparse_NHWC (SparseConv)
  classification/train_imagenet.py  train(): loss = criterion(...) / world_size; backward; average_gradients
  devkit/core/dist_utils.py         average_gradients: dist.all_reduce(grad) (default op = SUM)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["nm_mask_ref", "srste_backward_ref", "effective_decay", "allreduced_grad_ref", "REFERENCE_DECAY"]

REFERENCE_DECAY: float = 0.0002
"""Sparse.forward's default decay. SparseConv/SparseLinear never pass one (SparseLinear's ``decay``
argument is ignored), so the reference always trains with 2e-4."""


def nm_mask_ref(weight: Tensor, N: int, M: int, layout: str = "auto") -> Tensor:
    """Mask built by Sparse.forward / Sparse_NHWC.forward (1 = kept), same shape as weight, float32.

    layout 'nhwc' (SparseConv, the 'auto' choice for 4-D weights): |w|.permute(0,2,3,1).reshape(-1, M)
    -- groups are M consecutive INPUT channels at a fixed (out, kh, kw); if C_in % M != 0 groups run on
    across kernel positions (e.g. the 3-channel stem). layout 'natural' (Sparse, 'auto' for other
    ranks): |w|.reshape(-1, M) in row-major order. In each group the M-N smallest (argsort ascending)
    are zeroed, i.e. the N largest kept. The reference's argsort is not stable; ties are broken here
    by the LOWER index being pruned first (stable argsort).
    """
    if layout == "auto":
        layout = "nhwc" if weight.dim() == 4 else "natural"
    w = weight.detach().abs()
    if layout == "nhwc":
        w = w.permute(0, 2, 3, 1)
    group = int(weight.numel() / M)
    wt = w.reshape(group, M)
    index = torch.argsort(wt, dim=1, stable=True)[:, : int(M - N)]
    w_b = torch.ones(wt.shape, dtype=torch.float32).scatter_(dim=1, index=index, value=0)
    if layout == "nhwc":
        return w_b.reshape(w.shape).permute(0, 3, 1, 2).contiguous()
    return w_b.reshape(weight.shape)


def srste_backward_ref(grad_output_wrt_masked: Tensor, weight: Tensor, mask: Tensor,
                       decay: float = REFERENCE_DECAY) -> Tensor:
    """Sparse.backward / Sparse_NHWC.backward: grad_w = grad_output + decay * (1 - mask) * weight.

    grad_output is the gradient w.r.t. the masked weight (weight * mask) and is passed through
    DENSE (straight-through); the decay pulls the pruned weights towards 0."""
    return grad_output_wrt_masked + decay * (1 - mask) * weight


def effective_decay(world_size: int, decay: float = REFERENCE_DECAY) -> float:
    """The SR-STE decay relative to the rank-averaged loss gradient after train_imagenet.py's update.

    Per rank r: loss_r = CE_r / W, so the autograd gradient w.r.t. the masked weight is g_r / W;
    Sparse.backward adds decay*(1-m)*w on EVERY rank (it does not see the 1/W); average_gradients
    all-reduces with SUM: sum_r (g_r / W + decay*(1-m)*w) = mean_r g_r + W*decay*(1-m)*w.
    Hence effective decay = world_size * decay (SGD's own weight_decay is separate and unscaled)."""
    return world_size * decay


def allreduced_grad_ref(per_rank_grads: Sequence[Tensor], weight: Tensor, mask: Tensor,
                        decay: float = REFERENCE_DECAY) -> Tensor:
    """Simulates the reference's final .grad: per_rank_grads are d CE_r / d(masked weight) (the
    UNSCALED per-rank mean-loss gradients); each rank backprops CE_r/W through Sparse.backward and the
    results are SUM-all-reduced."""
    W = len(per_rank_grads)
    total = torch.zeros_like(weight)
    for g in per_rank_grads:
        total = total + srste_backward_ref(g / W, weight, mask, decay)
    return total
