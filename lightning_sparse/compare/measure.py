"""The deployable model of a run, and its CPU latency/throughput measured next to the dense model.

The deployable model is the checkpoint's network as a user would ship it (:func:`lightning_sparse.run.load_run_model`):
slimmed where Chase slimmed (its channel counts are read from the checkpoint), dense-shaped otherwise, with N:M
masks baked in (exact zeros). Its costs come from :func:`lightning_sparse.run.measure_costs`.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch
from torch import nn

from lightning_sparse.compare.runs import Run
from lightning_sparse.run import RunModel, config_image_size, load_run_model
from lightning_sparse.utils.errors import InputError
from lightning_sparse.utils.fold import fold_batchnorm
from lightning_sparse.utils.inputs import example_inputs
from lightning_sparse.utils.timing import interleaved_times

__all__ = ["MIN_REPS", "arch_key", "load_deployable", "time_interleaved", "timing_columns"]

MIN_REPS = 5  # a median and a range need a handful of repetitions


def load_deployable(run: Run, image_size: int | None = None) -> RunModel:
    """The run's checkpoint as its deployable network; the input size defaults to the run's ``config.yaml``.

    Channels a Chase run zeroed but did not slim stay in the network (as zeros): compare measures the
    shapes the run trained.
    """
    size = image_size if image_size is not None else config_image_size(run.config)
    return load_run_model(run.checkpoint, size, remove_zeroed_channels=False, any_module=True)


def arch_key(dense: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Same architecture = same module types, parameter shapes and input shape (not the same weights)."""
    return repr(([type(m).__name__ for m in dense.modules()], [tuple(p.shape) for p in dense.parameters()],
                 tuple(input_shape)))


def time_interleaved(models: list[nn.Module], input_shapes: list[tuple[int, ...]], batch_size: int = 64,
                     reps: int = 10, warmup: int = 2) -> list[dict[str, tuple[float, ...]]]:
    """CPU wall time of every model at batch 1 and at ``batch_size``, every repetition measured round-robin.

    Every repetition times each model once at each batch size, one after the other (the order rotates), so
    load on a shared machine hits all of them alike and repetition ``r`` of two models can be paired.
    Every model runs as the export's eager runtime runs it: BatchNorm folded into the convs
    (:func:`~lightning_sparse.utils.fold.fold_batchnorm`, on a copy), weights and inputs in ``channels_last``,
    under ``inference_mode``; so compare and export time the same network the same way. Models of one input
    shape get the same inputs, and subnormal floats are flushed to zero while timing, so values do not count.
    Returns ``[{"latency_ms": (ms per repetition at batch 1), "batch_ms": (... at batch_size)}]`` in the
    order given.
    """
    if reps < 1 or batch_size < 1:
        raise InputError(f"reps and batch_size must be >= 1, got reps={reps}, batch_size={batch_size}.")
    fns = []
    for model, shape in zip(models, input_shapes):  # the same inputs for every model of one input shape
        x1, xb = example_inputs(shape, 1, seed=0), example_inputs(shape, batch_size, seed=1)
        model = fold_batchnorm(model.eval(), x1, strict=False).to(memory_format=torch.channels_last)
        x1, xb = (x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in (x1, xb))
        fns += [lambda m=model, x=x1: m(x), lambda m=model, x=xb: m(x)]
    flush = torch.set_flush_denormal(True)  # subnormal values (trained vs fresh weights) would time differently
    try:
        with torch.inference_mode():
            t = interleaved_times(fns, warmup, reps, "cpu")
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return [{"latency_ms": t[2 * i].host_runs, "batch_ms": t[2 * i + 1].host_runs} for i in range(len(models))]


def _spread(name: str, values: Sequence[float]) -> dict[str, float]:
    return {name: statistics.median(values), f"{name}_min": min(values), f"{name}_max": max(values)}


def timing_columns(model: dict[str, Sequence[float]], dense: dict[str, Sequence[float]], batch_size: int) -> dict[str, float]:
    """Table columns of one model timed next to its dense reference (both from one :func:`time_interleaved`).

    ``latency_ms`` (batch 1) and ``throughput`` (images/s at ``batch_size``): median over the repetitions,
    with ``_min``/``_max`` the range. ``speedup`` (throughput) and ``latency_speedup``: the ratio
    dense time / model time of each repetition (both measured in the same pass), median and range, so a
    model against itself reads 1.0 within its range. ``dense_latency_ms``, ``dense_throughput``: medians.

    Example:
        >>> timing_columns({"latency_ms": (2.0, 2.2, 2.0), "batch_ms": (10.0, 11.0, 12.0)},
        ...                {"latency_ms": (4.0, 4.4, 3.0), "batch_ms": (20.0, 22.0, 12.0)}, 10)["speedup_min"]
        1.0
    """
    throughput = [batch_size * 1e3 / t for t in model["batch_ms"]]
    return {
        **_spread("latency_ms", model["latency_ms"]),
        **_spread("throughput", throughput),
        **_spread("speedup", [d / m for d, m in zip(dense["batch_ms"], model["batch_ms"])]),
        **_spread("latency_speedup", [d / m for d, m in zip(dense["latency_ms"], model["latency_ms"])]),
        "dense_latency_ms": statistics.median(dense["latency_ms"]),
        "dense_throughput": statistics.median(batch_size * 1e3 / t for t in dense["batch_ms"]),
        "timing_reps": len(model["batch_ms"]),
    }
