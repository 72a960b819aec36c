"""The deployable model of a run and what it costs: nonzeros, params, FLOPs, measured CPU latency/throughput.

The deployable model is the checkpoint's network as a user would ship it: slimmed where Chase slimmed
(its channel counts are read from the checkpoint's weight shapes), dense-shaped otherwise, with N:M masks
baked in (exact zeros). Its params and FLOPs count N:M layers at N/M of their dense size (what a sparse
tensor-core kernel stores and computes); unstructured zeros are counted in ``nonzero_params`` and
``flops_nonzero`` (FLOPs of every Conv/Linear scaled by its fraction of nonzero weights), not in
``params``/``flops``. FLOPs come from :func:`lightning_sparse.slim.count_flops` (``torch.utils.flop_counter``).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_sparse.compare.runs import Run
from lightning_sparse.semi_structured.timing import interleaved_times
from lightning_sparse.slim import apply_channel_config, channel_config, count_flops
from lightning_sparse.sparsity.nm import bake_nm

__all__ = ["Deployable", "load_deployable", "measure_costs", "time_interleaved"]


@dataclass
class Deployable:
    """A run's deployable model, the dense model of the same architecture, and the input shape."""

    model: nn.Module
    dense: nn.Module
    input_shape: tuple[int, int, int]  # (C, H, W)
    nm: dict[str, float]  # N:M parameter name -> N/M
    arch_key: str


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _model_kwargs(run: Run, hparams: dict[str, Any] | None) -> tuple[type, dict[str, Any]]:
    """The LightningModule class and its arguments: the checkpoint's hyper-parameters (the values the model
    was built with, including those the CLI linked from the data), else ``config.yaml``'s init_args."""
    model_cfg = run.config.get("model") or {}
    cls = _import(model_cfg["class_path"])
    params = inspect.signature(cls.__init__).parameters
    kwargs = dict(model_cfg.get("init_args") or {})
    if hparams:
        kwargs.update({k: v for k, v in hparams.items() if k in params})
    data_cls = _import(((run.config.get("data") or {}).get("class_path")) or "builtins.object")
    for key in ("num_classes", "in_chans"):  # linked from the DataModule by the CLI
        if key in params and key not in kwargs and isinstance(getattr(data_cls, key, None), int):
            kwargs[key] = getattr(data_cls, key)
    if "checkpoint_path" in kwargs:
        kwargs["checkpoint_path"] = None  # weights come from the run's own checkpoint
    return cls, kwargs


def _image_size(run: Run, override: int | None) -> int:
    if override:
        return override
    data = run.config.get("data") or {}
    size = (data.get("init_args") or {}).get("image_size")
    if size is None and data.get("class_path"):
        default = inspect.signature(_import(data["class_path"]).__init__).parameters.get("image_size")
        size = default.default if default is not None and default.default is not inspect.Parameter.empty else None
    if not isinstance(size, int):
        raise ValueError(f"cannot tell the input size of run {run.name!r} (no data.init_args.image_size); pass --image_size.")
    return size


def _first_conv_in(model: nn.Module) -> int:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise ValueError(f"{type(model).__name__} has no Conv2d: compare measures image models.")
    return conv.in_channels


def _shapes_from_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    """The channel config (:func:`~lightning_sparse.slim.channel_config` form) that ``state``'s shapes imply."""
    want = {}
    for name, entry in channel_config(model).items():
        w = state.get(f"{name}.weight", state.get(f"{name}.running_mean"))
        if w is None:
            want[name] = entry
        elif "out_channels" in entry:
            depthwise = entry["groups"] > 1 and entry["groups"] == entry["in_channels"]
            groups = int(w.shape[0]) if depthwise else entry["groups"]
            want[name] = {"in_channels": int(w.shape[1]) * groups, "out_channels": int(w.shape[0]), "groups": groups}
        elif "out_features" in entry:
            want[name] = {"in_features": int(w.shape[1]), "out_features": int(w.shape[0])}
        else:
            want[name] = {"num_features": int(w.shape[0])}
    return want


def load_deployable(run: Run, image_size: int | None = None) -> Deployable:
    """Build the run's model from its config, fit it to the checkpoint's shapes, load the weights, bake N:M."""
    try:
        ckpt = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{str(run.checkpoint)!r} is not a readable Lightning checkpoint: {err}") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{str(run.checkpoint)!r} is not a Lightning checkpoint (no 'state_dict').")
    cls, kwargs = _model_kwargs(run, ckpt.get("hyper_parameters"))
    dense, model = cls(**kwargs).eval(), cls(**kwargs)
    size = _image_size(run, image_size)
    shape = (_first_conv_in(dense), size, size)
    state = ckpt["state_dict"]
    want = _shapes_from_state(model, state)
    if want != channel_config(model):  # slimmed during fit (Chase), or started from a slim checkpoint
        apply_channel_config(model, want, torch.randn(1, *shape))
    model.load_state_dict(state, strict=True)
    nm: dict[str, float] = {}
    for key, cb_state in (ckpt.get("callbacks") or {}).items():
        if key.startswith("NMSparsity") and cb_state.get("targets"):
            n, m = int(cb_state["n"]), int(cb_state["m"])
            for name in bake_nm(model, n, m, cb_state.get("layout", "input_channels"), names=cb_state["targets"]):
                nm[name] = n / m
    # same architecture = same module types and parameter shapes (not the same optimizer settings)
    arch_key = repr(([type(m).__name__ for m in dense.modules()], [tuple(p.shape) for p in dense.parameters()], shape))
    return Deployable(model.eval(), dense, shape, nm, arch_key)


def _layer_flops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
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


def measure_costs(dep: Deployable) -> dict[str, float]:
    """Params, nonzeros and FLOPs (batch 1) of the deployable model, and of the dense model of its architecture."""
    x = torch.zeros(1, *dep.input_shape)
    params = dict(dep.model.named_parameters())
    total = sum(p.numel() for p in params.values())
    nonzero = sum(int(torch.count_nonzero(p)) for p in params.values())
    nm_saved = sum(params[k].numel() * (1 - frac) for k, frac in dep.nm.items())
    flops = count_flops(dep.model, x)
    per_layer = _layer_flops(dep.model, x)
    nm_flops_saved = sum(per_layer[k.removesuffix(".weight")] * (1 - frac) for k, frac in dep.nm.items())
    zero_flops = 0.0
    for name, f in per_layer.items():
        w = params.get(f"{name}.weight")
        if w is not None:
            zero_flops += f * (1 - int(torch.count_nonzero(w)) / w.numel())
    dense_params = sum(p.numel() for p in dep.dense.parameters())
    return {
        "nonzero_params": nonzero,
        "density_measured": nonzero / dense_params,
        "params": round(total - nm_saved),
        "dense_params": dense_params,
        "flops": round(flops - nm_flops_saved),
        "flops_nonzero": round(flops - zero_flops),
        "dense_flops": count_flops(dep.dense, x),
    }


def time_interleaved(models: list[nn.Module], input_shapes: list[tuple[int, ...]], batch_size: int = 64,
                     reps: int = 10, warmup: int = 2) -> list[dict[str, float]]:
    """CPU latency (batch 1) and throughput (``batch_size``) of every model, measured round-robin in one loop.

    Every repetition times each model once, one after the other, so load on a shared machine hits all of
    them alike; medians over ``reps``. Returns ``[{"latency_ms", "throughput"}]`` in the order given.
    """
    if reps < 1 or batch_size < 1:
        raise ValueError(f"reps and batch_size must be >= 1, got reps={reps}, batch_size={batch_size}.")
    g = torch.Generator().manual_seed(0)
    fns = []
    for model, shape in zip(models, input_shapes):
        x1, xb = torch.randn(1, *shape, generator=g), torch.randn(batch_size, *shape, generator=g)
        model.eval()
        fns += [lambda m=model, x=x1: m(x), lambda m=model, x=xb: m(x)]
    with torch.inference_mode():
        t = interleaved_times(fns, warmup, reps, "cpu")
    return [{"latency_ms": t[2 * i].host_ms, "throughput": batch_size / (t[2 * i + 1].host_ms / 1e3)}
            for i in range(len(models))]
