"""Tracing helpers shared by the slim modules: Torch-Pruning's dependency graph, eval-mode tracing,
the tensors each supported layer type loses for an input/output channel prune."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

ADD_OPS = ("AddBackward", "SubBackward")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Trace in eval mode (BN running stats must not move) and restore every module's flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, f in flags.items():
            m.training = f


def device_inputs(model: nn.Module, example_inputs: torch.Tensor) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    return example_inputs.to(p.device) if p is not None else example_inputs


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    with eval_mode(model), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, device_inputs(model, example_inputs), verbose=False)


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def local_entries(module: nn.Module, is_out: bool) -> list[tuple[str, int, bool]]:
    """(local tensor name, dim, is_buffer) a supported module loses for an out/in channel prune."""
    if isinstance(module, nn.Conv2d):
        if is_depthwise(module) or is_out:
            return [("weight", 0, False)] + ([("bias", 0, False)] if module.bias is not None else [])
        return [("weight", 1, False)]
    if isinstance(module, nn.Linear):
        if is_out:
            return [("weight", 0, False)] + ([("bias", 0, False)] if module.bias is not None else [])
        return [("weight", 1, False)]
    if isinstance(module, _BatchNorm):
        out = [("weight", 0, False), ("bias", 0, False)] if module.affine else []
        if module.track_running_stats:
            out += [("running_mean", 0, True), ("running_var", 0, True)]
        return out
    raise ValueError(f"unsupported layer type {type(module).__name__}")


def first_conv(model: nn.Module) -> nn.Conv2d:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d; channel slimming needs a conv net.")


def default_inputs(model: nn.Module, size: int = 64) -> torch.Tensor:
    return torch.randn(1, first_conv(model).in_channels, size, size)

