"""Which layers, dtypes, backends and devices can run 2:4 semi-structured kernels, and why not.

Everything here runs on CPU: per-layer eligibility is a property of the module and the dtype/backend
tables; :func:`skip_reason` adds the device checks (CUDA, compute capability per backend, cuSPARSELt
present).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import nn

__all__ = [
    "BACKENDS",
    "BACKEND_CAPABILITY",
    "DTYPES",
    "MIN_CUDA_CAPABILITY",
    "SHAPE_CONSTRAINTS",
    "Backend",
    "LayerEligibility",
    "ShapeConstraint",
    "backend_capability_reason",
    "check_backend",
    "resolve_device",
    "resolve_dtype",
    "semi_structured_eligibility",
    "skip_reason",
    "torch_shape_constraint",
]

Backend = Literal["cusparselt", "cutlass"]
BACKENDS = ("cusparselt", "cutlass")
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_CUDA_CAPABILITY = (8, 0)
# The device type the kernels run on. It is a module attribute (read at call time) so that the CPU tests can
# run torch's real semi-structured dispatch with fake kernels on CPU tensors.
DEVICE_TYPE = "cuda"
# Compute capabilities each backend's kernels run on, as ``(lowest, highest)`` (``None``: no upper bound).
# cuSPARSELt supports Ampere and newer (8.0+). torch's CUTLASS kernels
# (``_sparse_semi_structured_mm``/``addmm``) are built for SM 8.x only: on Hopper (9.0) conversion succeeds
# and the first matmul raises "Supported only on GPUs with compute capability 8.x".
BACKEND_CAPABILITY: dict[str, tuple[tuple[int, int], tuple[int, int] | None]] = {
    "cusparselt": ((8, 0), None),
    "cutlass": ((8, 0), (8, 9)),
}


class ShapeConstraint(NamedTuple):
    """Minimum sizes (and multiples) of the sparse weight ``(rows=out, cols=in)`` and of the dense input."""

    sparse_min_rows: int
    sparse_min_cols: int
    dense_min_rows: int
    dense_min_cols: int


# Same numbers as ``SparseSemiStructuredTensorCUSPARSELT/CUTLASS._DTYPE_SHAPE_CONSTRAINTS`` in torch 2.x
# (tests/test_semi_structured.py checks them against the installed torch).
SHAPE_CONSTRAINTS: dict[tuple[str, torch.dtype], ShapeConstraint] = {
    ("cusparselt", torch.float16): ShapeConstraint(16, 16, 8, 8),
    ("cusparselt", torch.bfloat16): ShapeConstraint(16, 16, 8, 8),
    ("cutlass", torch.float16): ShapeConstraint(32, 64, 8, 8),
    ("cutlass", torch.bfloat16): ShapeConstraint(32, 64, 8, 8),
}


class LayerEligibility(NamedTuple):
    """One row of :func:`semi_structured_eligibility`."""

    name: str
    shape: tuple[int, ...]
    eligible: bool
    reason: str


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float16"``/``"bfloat16"`` (or the torch dtypes) -> torch dtype; anything else is a ValueError.

    Example:
        >>> resolve_dtype("bfloat16")
        torch.bfloat16
    """
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(
        f"`dtype` must be one of {list(DTYPES)} for 2:4 semi-structured sparsity, got dtype={dtype!r}."
    )


def check_backend(backend: str) -> None:
    """Raise ValueError for a backend other than ``"cusparselt"``/``"cutlass"``."""
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got backend={backend!r}.")


def torch_shape_constraint(backend: Backend, dtype: torch.dtype) -> ShapeConstraint | None:
    """The installed torch's own constraint for ``(backend, dtype)`` (``None`` if torch has none)."""
    check_backend(backend)
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    entry = cls._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    return None if entry is None else ShapeConstraint(*entry)


def _dtype_name(dtype: str | torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer_reason(module: nn.Module, dtype: str | torch.dtype, backend: Backend) -> str | None:
    if isinstance(module, nn.Conv2d):
        kind = "1x1 Conv2d" if tuple(module.kernel_size) == (1, 1) else "Conv2d"
        return f"{kind} is not handled: semi-structured kernels exist for nn.Linear (F.linear) only"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{type(module).__name__} is not handled: semi-structured kernels exist for nn.Linear only"
    weight = module.weight
    if weight.ndim != 2:
        return f"weight has {weight.ndim} dims, needs 2"
    torch_dtype = DTYPES.get(dtype) if isinstance(dtype, str) else dtype
    if torch_dtype not in DTYPES.values():
        return f"dtype {_dtype_name(dtype)} is not supported; 2:4 semi-structured kernels need float16 or bfloat16"
    c = SHAPE_CONSTRAINTS[(backend, torch_dtype)]
    rows, cols = weight.shape
    problems = []
    if rows < c.sparse_min_rows or rows % c.sparse_min_rows:
        problems.append(f"out_features={rows} is not a positive multiple of {c.sparse_min_rows}")
    if cols < c.sparse_min_cols or cols % c.sparse_min_cols:
        problems.append(f"in_features={cols} is not a positive multiple of {c.sparse_min_cols}")
    if problems:
        return f"{' and '.join(problems)} ({backend}, {_dtype_name(torch_dtype)})"
    return None


def semi_structured_eligibility(
    model: nn.Module, dtype: str | torch.dtype = "float16", backend: Backend = "cusparselt"
) -> list[LayerEligibility]:
    """Which ``nn.Linear`` layers can hold a 2:4 semi-structured weight, and why the others cannot.

    Lists every ``nn.Linear`` and every convolution (convs are always ineligible, 1x1 included). Device
    requirements (CUDA, capability) are not part of this per-layer check: see :func:`skip_reason`.

    Args:
        model: any ``nn.Module`` (a LightningModule works too).
        dtype: ``"float16"``/``"bfloat16"`` (any other dtype makes every linear ineligible, with the reason).
        backend: ``"cusparselt"`` or ``"cutlass"`` (their shape constraints differ).

    Returns:
        ``[(module name, weight shape, eligible, reason)]`` in ``named_modules()`` order; ``reason`` is
        ``"ok"`` for eligible layers.

    Example:
        >>> net = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10))
        >>> [(r.name, r.eligible) for r in semi_structured_eligibility(net)]
        [('0', True), ('1', False)]
        >>> semi_structured_eligibility(net)[1].reason
        'out_features=10 is not a positive multiple of 16 (cusparselt, float16)'
    """
    check_backend(backend)
    rows = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        reason = _layer_reason(mod, dtype, backend)
        rows.append(LayerEligibility(name, tuple(mod.weight.shape), reason is None, reason or "ok"))
    return rows


def backend_capability_reason(backend: Backend, capability: tuple[int, int], device_name: str) -> str | None:
    """Why ``backend`` cannot run on a GPU of this compute capability (``None`` if it can).

    Example:
        >>> backend_capability_reason("cutlass", (9, 0), "H100")
        "H100 has compute capability 9.0; torch's CUTLASS 2:4 kernels run only on 8.x (A100, RTX 30xx/40xx);
        use backend='cusparselt'"
        >>> backend_capability_reason("cusparselt", (9, 0), "H100") is None
        True
    """
    check_backend(backend)
    low, high = BACKEND_CAPABILITY[backend]
    cap = f"{capability[0]}.{capability[1]}"
    if tuple(capability) < low:
        return (
            f"{device_name} has compute capability {cap}; 2:4 sparse tensor cores need >= {low[0]}.{low[1]} "
            "(A100, RTX 30xx/40xx, H100)"
        )
    if high is not None and tuple(capability) > high:
        return (
            f"{device_name} has compute capability {cap}; torch's CUTLASS 2:4 kernels run only on "
            f"{low[0]}.x (A100, RTX 30xx/40xx); use backend='cusparselt'"
        )
    return None


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` means the current CUDA device (``cuda:N``, not bare ``cuda``)."""
    if device is not None:
        return torch.device(device)
    return torch.device(DEVICE_TYPE, torch.cuda.current_device())


def skip_reason(
    model: nn.Module | None = None,
    dtype: str | torch.dtype = "float16",
    backend: Backend = "cusparselt",
    device: torch.device | str | None = None,
) -> str | None:
    """Why the 2:4 semi-structured benchmark cannot run here (``None`` if it can).

    Checks, in order: CUDA present, the backend's compute-capability range (cuSPARSELt >= 8.0, CUTLASS
    8.x), dtype fp16/bf16, cuSPARSELt built into torch (for ``backend="cusparselt"``), and, if ``model`` is
    given, at least one eligible linear.

    Example:
        >>> torch.cuda.is_available() or skip_reason().startswith("no CUDA device")
        True
    """
    check_backend(backend)
    if not torch.cuda.is_available():
        return "no CUDA device: 2:4 semi-structured sparse kernels need an NVIDIA GPU with compute capability >= 8.0"
    dev = resolve_device(device)
    if dev.type != DEVICE_TYPE:
        return f"device {dev} is not a CUDA device"
    reason = backend_capability_reason(
        backend, torch.cuda.get_device_capability(dev), torch.cuda.get_device_name(dev)
    )
    if reason is not None:
        return reason
    if not (isinstance(dtype, str) and dtype in DTYPES) and dtype not in DTYPES.values():
        return f"dtype {_dtype_name(dtype)} is not supported; use float16 or bfloat16"
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt; use backend='cutlass' (compute capability 8.x only)"
    if model is not None:
        rows = semi_structured_eligibility(model, dtype, backend)
        if not any(r.eligible for r in rows):
            linears = [r for r in rows if r.reason != "ok"][:3]
            detail = "; ".join(f"{r.name} {r.shape}: {r.reason}" for r in linears) or "the model has no nn.Linear"
            return f"no layer is eligible for 2:4 semi-structured sparsity ({detail})"
    return None
