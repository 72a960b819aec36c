"""Export a run for deployment: the network its forward used (slim, masks baked), BatchNorm folded, ONNX, timed.

    python -m lightning_sparse.export runs/quickstart_chase/version_0/checkpoints/last.ckpt --out deploy

writes ``deploy/model.pt`` (slim export: loads with torch + timm, see :data:`LOAD_SNIPPET`; its ``meta``
records the preprocessing and what was baked), ``deploy/model_sparse.pt`` (the same, sparse tensors as
values + bitmask: :func:`load_compact`), ``deploy/model.onnx`` (BatchNorm folded, checked with
``onnx.checker`` and against PyTorch in onnxruntime) and ``deploy/report.md`` / ``report.json`` (what was
baked, preprocessing, file sizes, params, FLOPs, measured speed of dense vs exported in PyTorch eager and
onnxruntime). See :func:`export_checkpoint`.

One concept per file; every public name is re-exported here:

* :func:`load_source` — :func:`lightning_sparse.run.load_run_model`, the one run loader: the network a
  checkpoint's forward used (slim shapes, N:M baked); :class:`ExportSource` is its
  :class:`~lightning_sparse.run.RunModel`.
* ``fold.py`` — :func:`fold_batchnorm`, :func:`batchnorm_folds`: BatchNorm into the preceding convs.
* ``onnx_export.py`` — :func:`export_onnx` (checker + onnxruntime parity), :func:`onnx_parity`, :func:`ort_session`.
* ``runners.py`` — :func:`make_runner`: a zero-argument callable running one batch in ``"eager"`` or
  ``"onnxruntime"`` (CPU), or ``"cuda"`` (GPU), for
  :func:`lightning_sparse.utils.interleaved_times`.
* ``contents.py`` — :func:`baked_contents`, :func:`describe_baked`: N:M masks, unstructured masks, slimmed
  channels, each only where the model has it.
* ``compact.py`` — :func:`save_compact`, :func:`load_compact`, :func:`pack_tensor`, :func:`unpack_tensor`:
  ``model_sparse.pt``.
* ``report.py`` — :func:`model_costs`, :func:`describe_preprocessing`, :func:`write_report`, :data:`LOAD_SNIPPET`.
* ``exporter.py`` — :func:`export_checkpoint`, the command's function.

``onnx``, ``onnxruntime`` and ``onnxscript`` are imported only when an ONNX file is written or run.
"""

from lightning_sparse.export.compact import COMPACT_FORMAT, load_compact, pack_tensor, save_compact, unpack_tensor
from lightning_sparse.export.contents import baked_contents, describe_baked
from lightning_sparse.export.exporter import export_checkpoint
from lightning_sparse.export.fold import BatchNormFolds, CannotFoldError, batchnorm_folds, fold_batchnorm
from lightning_sparse.export.onnx_export import PARITY_ATOL, ParityError, export_onnx, onnx_parity, ort_session
from lightning_sparse.export.report import LOAD_SNIPPET, describe_preprocessing, model_costs, write_report
from lightning_sparse.export.runners import (
    CUDA_RUNTIMES,
    RUNTIMES,
    Runtime,
    cuda_runner,
    eager_runner,
    make_runner,
    onnxruntime_runner,
)
from lightning_sparse.run import RunModel as ExportSource
from lightning_sparse.run import load_run_model as load_source

__all__ = [
    "BatchNormFolds",
    "CannotFoldError",
    "COMPACT_FORMAT",
    "CUDA_RUNTIMES",
    "ExportSource",
    "LOAD_SNIPPET",
    "PARITY_ATOL",
    "ParityError",
    "RUNTIMES",
    "Runtime",
    "baked_contents",
    "batchnorm_folds",
    "cuda_runner",
    "describe_baked",
    "describe_preprocessing",
    "eager_runner",
    "export_checkpoint",
    "export_onnx",
    "fold_batchnorm",
    "load_compact",
    "load_source",
    "make_runner",
    "model_costs",
    "onnx_parity",
    "onnxruntime_runner",
    "ort_session",
    "pack_tensor",
    "save_compact",
    "unpack_tensor",
    "write_report",
]
