"""What a run's deployable network costs: nonzeros, params and FLOPs, next to the dense model of its architecture.

Params and FLOPs count N:M layers at N/M of their dense size (what a sparse tensor-core kernel stores and
computes); unstructured zeros are counted in ``nonzero_params`` and ``flops_nonzero`` (FLOPs of every
Conv/Linear scaled by its fraction of nonzero weights), not in ``params``/``flops``. FLOPs come from
:func:`lightning_sparse.slim.count_flops` (``torch.utils.flop_counter``), per image (batch 1).
``sparsity_vs_original`` is the fraction of the original model's Conv/Linear/attention weights that are zero
in the deployable network or were removed by slimming (:func:`~lightning_sparse.sparsity.counting.count_weights`:
a 2:4 layer counts 0.50, a slimmed network is counted against the dense architecture it was built as).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_sparse.run.model import RunModel
from lightning_sparse.slim import count_flops
from lightning_sparse.sparsity.counting import count_weights
from lightning_sparse.utils.inputs import example_inputs

__all__ = ["layer_flops", "measure_costs"]


def layer_flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FLOPs of every Conv2d/Linear with a weight, each counted by ``count_flops`` on its own input."""
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            inputs.setdefault(name, args[0].detach())
        return hook

    hooks = [mod.register_forward_hook(keep(name)) for name, mod in model.named_modules()
             if isinstance(mod, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    modules = dict(model.named_modules())
    return {name: count_flops(modules[name], inp) for name, inp in inputs.items()}


def measure_costs(run: RunModel, dense: nn.Module) -> dict[str, float]:
    """Params, nonzeros and FLOPs (batch 1) of ``run.model``, and of ``dense`` (the dense model of its architecture)."""
    x = example_inputs(run.input_shape, seed=0)
    params = dict(run.model.named_parameters())
    total = sum(p.numel() for p in params.values())
    nonzero = sum(int(torch.count_nonzero(p)) for p in params.values())
    nm_saved = sum(params[k].numel() * (1 - p.fraction) for k, p in run.nm.items())
    flops = count_flops(run.model, x)
    per_layer = layer_flops(run.model, x)
    nm_flops_saved = sum(per_layer[k.removesuffix(".weight")] * (1 - p.fraction) for k, p in run.nm.items())
    zero_flops = 0.0
    for name, f in per_layer.items():
        w = params.get(f"{name}.weight")
        if w is not None:
            zero_flops += f * (1 - int(torch.count_nonzero(w)) / w.numel())
    dense_params = sum(p.numel() for p in dense.parameters())
    weights = count_weights(run.model, original_total=count_weights(dense).total)
    return {
        "nonzero_params": nonzero,
        "density_measured": nonzero / dense_params,
        "sparsity_vs_original": weights.sparsity_vs_original,
        "params": round(total - nm_saved),
        "dense_params": dense_params,
        "flops": round(flops - nm_flops_saved),
        "flops_nonzero": round(flops - zero_flops),
        "dense_flops": count_flops(dense, x),
    }
