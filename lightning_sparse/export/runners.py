"""Zero-argument callables that run one batch of a model in a deployment runtime, for timing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lightning_sparse.export.fold import fold_batchnorm
from lightning_sparse.export.onnx_export import export_onnx, ort_session

__all__ = ["CUDA_RUNTIMES", "RUNTIMES", "Runtime", "cuda_runner", "eager_runner", "make_runner", "onnxruntime_runner"]

Runtime = Literal["eager", "onnxruntime", "cuda"]
RUNTIMES = ("eager", "onnxruntime")  # CPU
CUDA_RUNTIMES = ("cuda",)  # GPU: PyTorch eager (CUDA-graph replay: wrap it in utils.cuda_graph, see cuda_runner)
GPU_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got threads={threads!r}.")


def eager_runner(folded: nn.Module, example_inputs: torch.Tensor, threads: int | None = None) -> Callable[[], Any]:
    """One batch through an already BN-folded eval model in PyTorch eager, channels_last, ``inference_mode``."""
    _check_threads(threads)
    model = folded.eval().to(memory_format=torch.channels_last)
    x = example_inputs.detach().to(memory_format=torch.channels_last)

    def run() -> Any:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            return model(x)

    return run


def cuda_runner(folded: nn.Module, example_inputs: torch.Tensor, dtype: str = "float16") -> Callable[[], Any]:
    """One batch through an already BN-folded eval model on the current CUDA GPU, channels_last, ``dtype``.

    cuDNN's autotuner (``torch.backends.cudnn.benchmark``) is left as the caller set it; a deployment
    turns it on. For CUDA-graph replay wrap the returned function in :func:`lightning_sparse.utils.cuda_graph`
    (``benchmarks/gpu_suite.py`` does): a replay once returned wrong logits after other GPU work because the
    replay did not keep this function, and so the folded copy's weights and the input, alive; it does now.
    At batch 256 a ResNet-50 forward was not host-bound on an H100 (at batch 64 in fp16 it was);
    :class:`~lightning_sparse.utils.timing.Timing` flags it.
    """
    if dtype not in GPU_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported on the GPU; choose one of {list(GPU_DTYPES)}.")
    if not torch.cuda.is_available():
        raise RuntimeError("runtime 'cuda' needs a CUDA GPU; "
                           "torch.cuda.is_available() is False (the CPU runtimes are 'eager' and 'onnxruntime').")
    device = torch.device("cuda", torch.cuda.current_device())
    model = folded.eval().to(device, GPU_DTYPES[dtype]).to(memory_format=torch.channels_last)
    x = example_inputs.detach().to(device, GPU_DTYPES[dtype]).contiguous(memory_format=torch.channels_last)

    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def onnxruntime_runner(onnx_path: str | Path, example_inputs: torch.Tensor, threads: int | None = None) -> Callable[[], Any]:
    """One batch through an ONNX file in an onnxruntime CPU session (``threads`` intra-op threads)."""
    _check_threads(threads)
    session = ort_session(onnx_path, threads)
    feed = {session.get_inputs()[0].name: example_inputs.detach().cpu().float().contiguous().numpy()}

    def run() -> Any:
        return session.run(None, feed)

    return run


def make_runner(
    model: nn.Module,
    example_inputs: torch.Tensor,
    runtime: Runtime,
    workdir: str | Path | None = None,
    threads: int | None = None,
    dtype: str = "float16",
) -> Callable[[], Any]:
    """A zero-argument callable that runs ``model`` on ``example_inputs`` once in ``runtime``.

    Both runtimes run the eval model with BatchNorm folded into the convs (:func:`fold_batchnorm`, with
    ``strict=False``: a BatchNorm that cannot fold stays). ``model`` itself is not changed.

    * ``"eager"``: PyTorch, weights and input in ``channels_last``, under ``torch.inference_mode``;
      ``threads`` sets ``torch.set_num_threads`` before each call.
    * ``"onnxruntime"``: the folded model is exported to ``<workdir>/model.onnx``
      (:func:`export_onnx`, parity-checked against PyTorch) and run in an onnxruntime CPU session with
      ``threads`` intra-op threads (default: onnxruntime's).
    * ``"cuda"``: PyTorch eager on the current CUDA GPU in ``dtype``, channels_last (:func:`cuda_runner`);
      time it with CUDA events.

    Args:
        model: an image model (e.g. a timm model, dense or slim).
        example_inputs: the batch every call runs (its batch size is the one timed).
        runtime: ``"eager"``, ``"onnxruntime"`` or ``"cuda"``.
        workdir: folder for the ONNX file (needed for ``"onnxruntime"``).
        threads: CPU threads for the CPU runtimes.
        dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for the GPU runtimes (CPU runtimes run fp32).

    Returns:
        ``run()`` -> the runtime's outputs (a tensor for eager, a list of arrays for onnxruntime).

    Raises:
        ValueError: an unknown ``runtime`` or ``dtype``, ``"onnxruntime"`` without ``workdir``, or bad ``threads``.
        RuntimeError: a GPU runtime without a CUDA GPU.

    Example:
        >>> import tempfile, timm
        >>> from lightning_sparse.semi_structured import interleaved_times
        >>> net = timm.create_model("resnet10t", num_classes=4, in_chans=1)
        >>> x = torch.randn(8, 1, 32, 32)
        >>> fns = [make_runner(net, x, "eager", threads=1), make_runner(net, x[:1], "eager")]
        >>> batch8, batch1 = interleaved_times(fns, warmup=1, runs=3, device="cpu")  # medians, ms per call
        >>> batch8.host_ms > 0 and batch1.host_ms > 0
        True
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +SKIP
        ...     ort = make_runner(net, x, "onnxruntime", d, threads=1)  # exports <d>/model.onnx
        ...     eager_ms, ort_ms = interleaved_times([fns[0], ort], warmup=1, runs=3, device="cpu")
    """
    if runtime not in RUNTIMES + CUDA_RUNTIMES:
        raise ValueError(f"runtime={runtime!r} is not supported; choose one of {list(RUNTIMES + CUDA_RUNTIMES)}.")
    _check_threads(threads)
    if runtime == "onnxruntime" and workdir is None:
        raise ValueError("runtime='onnxruntime' needs a workdir for the ONNX file, got workdir=None.")
    folded = fold_batchnorm(model, example_inputs[:1], strict=False)
    if runtime == "eager":
        return eager_runner(folded, example_inputs, threads)
    if runtime in CUDA_RUNTIMES:
        return cuda_runner(folded, example_inputs, dtype)
    path = export_onnx(folded, example_inputs, Path(workdir) / "model.onnx")  # type: ignore[arg-type]
    return onnxruntime_runner(path, example_inputs, threads)
