"""2:4 semi-structured sparse inference with ``torch.sparse.to_sparse_semi_structured`` (plain torch).

Pipeline (no Lightning needed): deep-copy a model, cast it to fp16/bf16 on the GPU, write 2:4 masks into
every eligible ``nn.Linear`` weight (:func:`lightning_sparse.sparsity.nm.bake_nm`, groups of 4 along
``in_features``, the layout sparse tensor cores use), keep that copy as the *dense masked* reference,
and in a second copy replace those weights by ``SparseSemiStructuredTensor`` s. ``F.linear`` then
dispatches to cuSPARSELt (default) or CUTLASS.

Requirements (read from ``torch/sparse/semi_structured.py``, encoded in :data:`SHAPE_CONSTRAINTS` and
:data:`BACKEND_CAPABILITY`):

- a CUDA device: cuSPARSELt needs compute capability >= 8.0 (Ampere, Ada, Hopper); torch's CUTLASS
  kernels run on 8.x only (they raise on Hopper);
- dtype float16 or bfloat16 (int8 / fp8 exist in torch but are out of scope here);
- a 2-D contiguous weight ``(out, in)``: ``out`` a positive multiple of ``sparse_min_rows`` and ``in`` of
  ``sparse_min_cols`` (cuSPARSELt 16 x 16, CUTLASS 32 x 64); inputs are padded by torch, so any batch works.

Convolutions are **not** handled, 1x1 included (``F.conv2d`` has no semi-structured kernel). They are
reported as ineligible with that reason and stay dense.

Timing (:mod:`.timing`) reports CUDA-event time next to host time for every row and flags rows where they
match: the GPU was waiting on Python dispatch, and torch's cuSPARSELt path plans the matmul on every call.
``runner="cuda-graph"`` replays a captured CUDA graph and measures the kernels alone. Outputs of the sparse
model are checked against the dense masked model end to end and layer by layer.

Modules: :mod:`.eligibility` (what can run where), :mod:`.convert` (copies, conversion, algorithm search),
:mod:`.timing` (events, host time, CUDA graphs), :mod:`.bench` (the benchmark), :mod:`.report` (results).
"""

from lightning_sparse.semi_structured.bench import (
    MIN_RUNS,
    PARITY_TOLERANCE,
    RUNNERS,
    benchmark_semi_structured,
)
from lightning_sparse.semi_structured.convert import (
    NothingConverted,
    backend_context,
    capture_linear_inputs,
    search_cusparselt_algorithms,
    sparsify_model,
)
from lightning_sparse.semi_structured.eligibility import (
    BACKEND_CAPABILITY,
    BACKENDS,
    DTYPES,
    MIN_CUDA_CAPABILITY,
    SHAPE_CONSTRAINTS,
    Backend,
    LayerEligibility,
    ShapeConstraint,
    backend_capability_reason,
    check_backend,
    resolve_device,
    resolve_dtype,
    semi_structured_eligibility,
    skip_reason,
    torch_shape_constraint,
)
from lightning_sparse.semi_structured.report import LAYER_COLUMNS, LayerTiming, SemiStructuredReport, format_report
from lightning_sparse.utils.timing import HOST_BOUND_FRACTION, Timing, cuda_graph, interleaved_times

__all__ = [
    "BACKENDS",
    "BACKEND_CAPABILITY",
    "DTYPES",
    "HOST_BOUND_FRACTION",
    "LAYER_COLUMNS",
    "MIN_CUDA_CAPABILITY",
    "MIN_RUNS",
    "PARITY_TOLERANCE",
    "RUNNERS",
    "SHAPE_CONSTRAINTS",
    "Backend",
    "LayerEligibility",
    "LayerTiming",
    "NothingConverted",
    "SemiStructuredReport",
    "ShapeConstraint",
    "Timing",
    "backend_capability_reason",
    "backend_context",
    "benchmark_semi_structured",
    "capture_linear_inputs",
    "check_backend",
    "cuda_graph",
    "format_report",
    "interleaved_times",
    "resolve_device",
    "resolve_dtype",
    "search_cusparselt_algorithms",
    "semi_structured_eligibility",
    "skip_reason",
    "sparsify_model",
    "torch_shape_constraint",
]
