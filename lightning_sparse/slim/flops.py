"""FLOPs (``torch.utils.flop_counter``), parameters and channels of a dense vs a slim model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lightning_sparse.utils.modules import eval_mode

__all__ = ["count_flops", "slim_report"]


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs of ``model`` on ``x`` (``torch.utils.flop_counter``; eval mode, no grad)."""
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def slim_report(dense_model: nn.Module, slim_model: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
    """Params, FLOPs (``torch.utils.flop_counter``, 2 per multiply-add) and conv channels, dense vs slim.

    Args:
        dense_model: the reference model.
        slim_model: the slimmed model.
        input_shape: full input shape including the batch, e.g. ``(1, 3, 224, 224)``.

    Returns:
        ``{"params": {"dense", "slim", "ratio"}, "flops": {"dense", "slim", "ratio"},
        "channels": {conv name: (dense out_channels, slim out_channels)}}`` (ratios are slim / dense).

    Example:
        >>> import copy
        >>> from lightning_sparse.slim import slim_model
        >>> dense = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        >>> slim = copy.deepcopy(dense)
        >>> _ = slim_model(slim, {"0": [0, 1, 2, 3]}, torch.randn(1, 3, 8, 8))
        >>> r = slim_report(dense, slim, (1, 3, 8, 8))
        >>> r["channels"]["0"], r["params"]["slim"] < r["params"]["dense"]
        ((8, 4), True)
    """
    def device(m: nn.Module) -> torch.device:
        p = next(iter(m.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    x = torch.zeros(tuple(int(s) for s in input_shape))
    params = [sum(p.numel() for p in m.parameters()) for m in (dense_model, slim_model)]
    flops = [count_flops(m, x.to(device(m))) for m in (dense_model, slim_model)]
    dense_c = {n: m.out_channels for n, m in dense_model.named_modules() if isinstance(m, nn.Conv2d)}
    slim_c = {n: m.out_channels for n, m in slim_model.named_modules() if isinstance(m, nn.Conv2d)}
    return {
        "params": {"dense": params[0], "slim": params[1], "ratio": params[1] / max(1, params[0])},
        "flops": {"dense": flops[0], "slim": flops[1], "ratio": flops[1] / max(1, flops[0])},
        "channels": {n: (c, slim_c.get(n, 0)) for n, c in dense_c.items()},
    }
