"""The deployable model of a run, and its CPU latency/throughput measured next to the dense model.

The deployable model is the checkpoint's network as a user would ship it (:func:`lightning_sparse.run.load_run_model`):
slimmed where Chase slimmed (its channel counts are read from the checkpoint), dense-shaped otherwise, with N:M
masks baked in (exact zeros). Its costs come from :func:`lightning_sparse.run.measure_costs`.
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_sparse.compare.runs import Run
from lightning_sparse.run import RunModel, config_image_size, load_run_model
from lightning_sparse.utils.errors import InputError
from lightning_sparse.utils.inputs import example_inputs
from lightning_sparse.utils.timing import interleaved_times

__all__ = ["arch_key", "load_deployable", "time_interleaved"]


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
                     reps: int = 10, warmup: int = 2) -> list[dict[str, float]]:
    """CPU latency (batch 1) and throughput (``batch_size``) of every model, measured round-robin in one loop.

    Every repetition times each model once, one after the other, so load on a shared machine hits all of
    them alike; medians over ``reps``. Returns ``[{"latency_ms", "throughput"}]`` in the order given.
    """
    if reps < 1 or batch_size < 1:
        raise InputError(f"reps and batch_size must be >= 1, got reps={reps}, batch_size={batch_size}.")
    fns = []
    for i, (model, shape) in enumerate(zip(models, input_shapes)):
        x1, xb = example_inputs(shape, 1, seed=2 * i), example_inputs(shape, batch_size, seed=2 * i + 1)
        model.eval()
        fns += [lambda m=model, x=x1: m(x), lambda m=model, x=xb: m(x)]
    with torch.inference_mode():
        t = interleaved_times(fns, warmup, reps, "cpu")
    return [{"latency_ms": t[2 * i].host_ms, "throughput": batch_size / (t[2 * i + 1].host_ms / 1e3)}
            for i in range(len(models))]
