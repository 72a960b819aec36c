"""ONNX export (``torch.onnx.export``, dynamo exporter) with a checker pass and an onnxruntime parity check.

``onnx``, ``onnxruntime`` and ``onnxscript`` are imported inside the functions, so importing
:mod:`lightning_sparse` (or its benchmark modules) never needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sparse.utils.modules import eval_mode

__all__ = ["PARITY_ATOL", "ParityError", "export_onnx", "onnx_parity", "ort_session"]

PARITY_ATOL = 1e-3  # max |Δlogits| allowed between onnxruntime (CPU) and PyTorch
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ParityError(RuntimeError):
    """The ONNX model's onnxruntime outputs differ from PyTorch's by more than the tolerance."""


def _requires(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs {module!r} ({err}); install the pinned versions: pip install -r requirements.txt"
        ) from None


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU ``InferenceSession`` for ``path`` (``threads`` intra-op threads; default ORT's)."""
    ort = _requires("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got threads={threads}.")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # no busy-waiting between runs: timed side by side with PyTorch, spinning threads would steal its cores
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_parity(path: str | Path, model: nn.Module, example_inputs: torch.Tensor) -> float:
    """Max |onnxruntime(CPU) - PyTorch eval| over the outputs for ``example_inputs`` (float32)."""
    session = ort_session(path)
    out = session.run(None, {session.get_inputs()[0].name: example_inputs.detach().cpu().float().numpy()})[0]
    with eval_mode(model), torch.no_grad():
        ref = model(example_inputs)
    return float((torch.from_numpy(out) - ref.detach().cpu().float()).abs().max())


def export_onnx(
    model: nn.Module,
    example_inputs: torch.Tensor,
    path: str | Path,
    atol: float | None = PARITY_ATOL,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    reference: nn.Module | None = None,
) -> Path:
    """Export ``model`` to one ONNX file, check it with ``onnx.checker`` and against PyTorch in onnxruntime.

    The dynamo exporter (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``) writes a single
    file (weights embedded), input ``"input"`` (batch dim dynamic unless ``dynamic_batch=False``) and
    output ``"logits"``. Initializers keep the PyTorch parameter names (``layer1.0.conv1.weight``). The
    export itself is traced in eval mode; ``model`` is left in the mode it was in.

    Args:
        model: the model to export (fold BatchNorm first with :func:`fold_batchnorm` for deployment).
        example_inputs: a batch of inputs (float32 NCHW); also the parity-check batch.
        path: the ``.onnx`` file to write (its folder is created).
        atol: the largest allowed max |onnxruntime - PyTorch| on ``example_inputs``; ``None`` skips it.
        dynamic_batch: make the batch dimension dynamic.
        opset_version: ONNX opset (default: the exporter's).
        reference: the PyTorch model the parity check compares with (default ``model``; e.g. the model
            before :func:`fold_batchnorm`).

    Returns:
        ``path``.

    Raises:
        ParityError: onnxruntime's outputs differ from PyTorch's by more than ``atol``.
        onnx.checker.ValidationError: the written model is not valid ONNX.
        ImportError: ``onnx``/``onnxscript``/``onnxruntime`` are not installed.

    Example:
        >>> import tempfile, timm
        >>> from lightning_sparse.export import fold_batchnorm
        >>> net = fold_batchnorm(timm.create_model("resnet10t", num_classes=4, in_chans=1), torch.randn(1, 1, 32, 32))
        >>> with tempfile.TemporaryDirectory() as d:  # doctest: +SKIP
        ...     p = export_onnx(net, torch.randn(2, 1, 32, 32), f"{d}/net.onnx")
        ...     p.name, onnx_parity(p, net, torch.randn(5, 1, 32, 32)) <= 1e-3   # any batch size
        ('net.onnx', True)
    """
    onnx = _requires("onnx")
    _requires("onnxscript")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},) if dynamic_batch else None
    with eval_mode(model):
        torch.onnx.export(
            model, (example_inputs,), str(path), dynamo=True, external_data=False, verbose=False,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_shapes=dynamic, opset_version=opset_version,
        )
    onnx.checker.check_model(str(path), full_check=True)
    if atol is not None:
        diff = onnx_parity(path, model if reference is None else reference, example_inputs)
        if not diff <= atol:
            raise ParityError(
                f"{path}: onnxruntime logits differ from PyTorch by max |Δ| = {diff:.3g} > atol={atol:g} "
                f"on a batch of shape {tuple(example_inputs.shape)}."
            )
    return path

