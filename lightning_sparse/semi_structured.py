"""2:4 semi-structured sparse inference with ``torch.sparse.to_sparse_semi_structured`` (plain torch).

Pipeline (no Lightning needed): deep-copy a model, cast it to fp16/bf16 on the GPU, write 2:4 masks into
every eligible ``nn.Linear`` weight (:func:`lightning_sparse.sparsity.nm.bake_nm`, groups of 4 along
``in_features`` — the layout sparse tensor cores use), keep that copy as the *dense masked* reference,
and in a second copy replace those weights by ``SparseSemiStructuredTensor`` s. ``F.linear`` then
dispatches to cuSPARSELt (default) or CUTLASS (``SparseSemiStructuredTensor._FORCE_CUTLASS``).

Requirements (read from ``torch/sparse/semi_structured.py``, encoded in :data:`SHAPE_CONSTRAINTS`):

- a CUDA device with compute capability >= 8.0 (Ampere, Ada, Hopper);
- dtype float16 or bfloat16 (int8 / fp8 exist in torch but are out of scope here; float32 only has a
  CUTLASS table entry and no speed-up, so it is refused);
- a 2-D contiguous weight (``nn.Linear``; the copy is made contiguous before conversion);
- weight shape ``(out, in)``: ``out`` a positive multiple of ``sparse_min_rows`` and ``in`` a positive
  multiple of ``sparse_min_cols`` — cuSPARSELt: 16 x 16, CUTLASS: 32 x 64 (fp16 and bf16). Dense inputs
  are padded by torch to multiples of ``dense_min_rows/cols`` (8 x 8), so any batch size works.

Convolutions are **not** handled, 1x1 included (``F.conv2d`` has no semi-structured kernel; a 1x1 conv
would have to be rewritten as a channels-last linear, which changes the model). They are reported as
ineligible with that reason and stay dense.

Timing uses CUDA events after warm-up; dense and sparse runs are interleaved and the median of ``runs``
(>= 50) is reported. Outputs of the sparse model are checked against the dense masked model.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.sparsity.nm import bake_nm, nm_violations

__all__ = [
    "BACKENDS",
    "DTYPES",
    "MIN_CUDA_CAPABILITY",
    "MIN_RUNS",
    "PARITY_TOLERANCE",
    "SHAPE_CONSTRAINTS",
    "Backend",
    "LayerEligibility",
    "LayerTiming",
    "SemiStructuredReport",
    "ShapeConstraint",
    "backend_context",
    "benchmark_linear",
    "benchmark_semi_structured",
    "check_backend",
    "format_report",
    "interleaved_cuda_times",
    "resolve_dtype",
    "semi_structured_eligibility",
    "skip_reason",
    "sparsify_model",
    "torch_shape_constraint",
]

Backend = Literal["cusparselt", "cutlass"]
BACKENDS = ("cusparselt", "cutlass")
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_CUDA_CAPABILITY = (8, 0)
MIN_RUNS = 50
# max |sparse - dense| / max |dense| over the model output (both run in the same low precision; the only
# difference is the GEMM kernel, so this is accumulation-order noise)
PARITY_TOLERANCE: dict[torch.dtype, float] = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


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


@dataclass
class LayerTiming:
    """Per-layer timing at the layer's real input shape (ms are medians)."""

    name: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    dense_ms: float
    sparse_ms: float

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("nan")


@dataclass
class SemiStructuredReport:
    """Result of :func:`benchmark_semi_structured`."""

    dtype: str
    backend: str
    batch_size: int
    input_shape: tuple[int, ...]
    device_name: str
    runs: int
    dense_ms: float  # end-to-end median, dense masked model
    sparse_ms: float  # end-to-end median, semi-structured model
    parity_max_rel_err: float
    parity_tolerance: float
    converted: list[str] = field(default_factory=list)  # module names with a semi-structured weight
    skipped: list[LayerEligibility] = field(default_factory=list)
    layers: list[LayerTiming] = field(default_factory=list)

    @property
    def speedup_e2e(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else float("nan")

    @property
    def dense_images_per_s(self) -> float:
        return self.batch_size / (self.dense_ms / 1e3) if self.dense_ms > 0 else float("nan")

    @property
    def sparse_images_per_s(self) -> float:
        return self.batch_size / (self.sparse_ms / 1e3) if self.sparse_ms > 0 else float("nan")

    @property
    def parity_ok(self) -> bool:
        return self.parity_max_rel_err <= self.parity_tolerance

    def metrics(self, prefix: str = "semi/") -> dict[str, float]:
        """Scalars for a logger: ``semi/speedup_e2e``, ``semi/dense_img_s``, ``semi/sparse_img_s`` ..."""
        return {
            f"{prefix}speedup_e2e": self.speedup_e2e,
            f"{prefix}dense_img_s": self.dense_images_per_s,
            f"{prefix}sparse_img_s": self.sparse_images_per_s,
            f"{prefix}dense_ms": self.dense_ms,
            f"{prefix}sparse_ms": self.sparse_ms,
            f"{prefix}parity_max_rel_err": self.parity_max_rel_err,
            f"{prefix}converted_layers": float(len(self.converted)),
        }

    def layer_rows(self) -> list[list[object]]:
        """Rows ``[name, weight shape, input shape, dense ms, sparse ms, speedup]`` of the per-layer table."""
        return [
            [t.name, "x".join(map(str, t.weight_shape)), "x".join(map(str, t.input_shape)),
             round(t.dense_ms, 5), round(t.sparse_ms, 5), round(t.speedup, 3)]
            for t in self.layers
        ]


LAYER_COLUMNS = ["layer", "weight", "input", "dense_ms", "sparse_ms", "speedup"]


# ---------------------------------------------------------------------------------------------- checks
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
    if not isinstance(module, nn.Linear):
        return f"{type(module).__name__} is not nn.Linear"
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


def skip_reason(
    model: nn.Module | None = None,
    dtype: str | torch.dtype = "float16",
    backend: Backend = "cusparselt",
    device: torch.device | str | None = None,
) -> str | None:
    """Why the 2:4 semi-structured benchmark cannot run here (``None`` if it can).

    Checks, in order: CUDA present, compute capability >= 8.0, dtype fp16/bf16, cuSPARSELt built into
    torch (for ``backend="cusparselt"``), and, if ``model`` is given, at least one eligible linear.

    Example:
        >>> torch.cuda.is_available() or skip_reason().startswith("no CUDA device")
        True
    """
    check_backend(backend)
    if not torch.cuda.is_available():
        return "no CUDA device: 2:4 semi-structured sparse kernels need an NVIDIA GPU with compute capability >= 8.0"
    dev = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    if dev.type != "cuda":
        return f"device {dev} is not a CUDA device"
    cap = torch.cuda.get_device_capability(dev)
    if cap < MIN_CUDA_CAPABILITY:
        return (
            f"{torch.cuda.get_device_name(dev)} has compute capability {cap[0]}.{cap[1]}; 2:4 sparse tensor "
            f"cores need >= {MIN_CUDA_CAPABILITY[0]}.{MIN_CUDA_CAPABILITY[1]} (A100, RTX 30xx/40xx, H100)"
        )
    if not (isinstance(dtype, str) and dtype in DTYPES) and dtype not in DTYPES.values():
        return f"dtype {_dtype_name(dtype)} is not supported; use float16 or bfloat16"
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt; use backend='cutlass'"
    if model is not None:
        rows = semi_structured_eligibility(model, dtype, backend)
        if not any(r.eligible for r in rows):
            linears = [r for r in rows if r.reason != "ok"][:3]
            detail = "; ".join(f"{r.name} {r.shape}: {r.reason}" for r in linears) or "the model has no nn.Linear"
            return f"no layer is eligible for 2:4 semi-structured sparsity ({detail})"
    return None


# ---------------------------------------------------------------------------------------------- conversion
@contextlib.contextmanager
def backend_context(backend: Backend) -> Iterator[None]:
    """Select the backend ``to_sparse_semi_structured`` builds (restores the previous setting on exit).

    The backend is fixed when a weight is converted (the tensor subclass carries it), so only the
    conversion needs to happen inside this context.
    """
    check_backend(backend)
    from torch.sparse import SparseSemiStructuredTensor

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


def _plain_copy(model: nn.Module) -> nn.Module:
    """Deep copy without instance-level ``forward`` overrides on Linear/Conv (e.g. NMSparsity's masked
    forward): the copy runs the class forward on its (baked) weights."""
    clone = copy.deepcopy(model)
    for mod in clone.modules():
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            mod.__dict__.pop("forward", None)
    return clone


@torch.no_grad()
def sparsify_model(
    model: nn.Module,
    dtype: str | torch.dtype = "float16",
    backend: Backend = "cusparselt",
    device: torch.device | str = "cuda",
) -> tuple[nn.Module, nn.Module, list[str], list[LayerEligibility]]:
    """Two copies of ``model`` on ``device`` in ``dtype``: dense 2:4-masked, and semi-structured sparse.

    ``model`` itself is never modified. Every eligible ``nn.Linear`` gets its 2:4 mask baked (magnitude,
    groups of 4 along ``in_features``) in both copies; in the sparse copy its weight becomes a
    ``SparseSemiStructuredTensor``. A layer whose conversion raises in torch is reported in the skipped
    list with torch's message and stays dense in both copies.

    Returns:
        ``(dense_masked, sparse, converted module names, skipped layers)``.
    """
    torch_dtype = resolve_dtype(dtype)
    reason = skip_reason(model, torch_dtype, backend, device)
    if reason is not None:
        raise RuntimeError(f"2:4 semi-structured conversion is not possible: {reason}")
    from torch.sparse import to_sparse_semi_structured

    rows = semi_structured_eligibility(model, torch_dtype, backend)
    eligible = [r.name for r in rows if r.eligible]
    skipped = [r for r in rows if not r.eligible]
    dense = _plain_copy(model).to(device=device, dtype=torch_dtype).eval()
    bake_nm(dense, 2, 4, "input_channels", names=[f"{n}.weight" if n else "weight" for n in eligible])
    sparse = copy.deepcopy(dense)
    modules = dict(sparse.named_modules())
    converted = []
    with backend_context(backend):
        for name in eligible:
            mod = modules[name]
            weight = mod.weight.detach().contiguous()
            if nm_violations(weight, 2, 4) != 0:  # cannot happen after bake_nm; never convert a non-2:4 weight
                raise RuntimeError(f"layer {name!r} is not 2:4 after baking")
            try:
                mod.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
            except (RuntimeError, NotImplementedError) as err:
                skipped.append(LayerEligibility(name, tuple(weight.shape), False, f"conversion failed: {err}"))
                continue
            converted.append(name)
    return dense, sparse, converted, skipped


# ---------------------------------------------------------------------------------------------- timing
def interleaved_cuda_times(fns: Sequence[Callable[[], object]], warmup: int, runs: int) -> list[list[float]]:
    """Milliseconds per call of each ``fn``, measured with CUDA events, the functions interleaved run by run.

    ``warmup`` untimed rounds first; then ``runs`` rounds, each calling every function once (the order
    rotates every round so none always runs first). Returns one list of ``runs`` timings per function.
    """
    if runs < 1:
        raise ValueError(f"`runs` must be >= 1, got runs={runs!r}.")
    for _ in range(warmup):
        for fn in fns:
            fn()
    torch.cuda.synchronize()
    events: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = [[] for _ in fns]
    k = len(fns)
    for r in range(runs):
        for j in range(k):
            i = (j + r) % k
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[i]()
            end.record()
            events[i].append((start, end))
    torch.cuda.synchronize()
    return [[s.elapsed_time(e) for s, e in ev] for ev in events]


def _capture_linear_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        modules[n].register_forward_hook(lambda mod, args, out, n=n: shapes.setdefault(n, tuple(args[0].shape)))
        for n in names
    ]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _max_rel_err(out: object, ref: object) -> float:
    if isinstance(out, (tuple, list)):
        return max(_max_rel_err(o, r) for o, r in zip(out, ref))
    diff = (out.float() - ref.float()).abs().max()
    return float(diff / ref.float().abs().max().clamp_min(1e-12))


@torch.no_grad()
def benchmark_semi_structured(
    model: nn.Module,
    input_shape: Sequence[int],
    dtype: str | torch.dtype = "float16",
    backend: Backend = "cusparselt",
    batch_size: int = 64,
    warmup: int = 10,
    runs: int = MIN_RUNS,
    layers: bool = True,
    device: torch.device | str = "cuda",
    seed: int = 0,
) -> SemiStructuredReport:
    """Dense 2:4-masked vs semi-structured sparse: end-to-end and per-layer CUDA-event medians, plus parity.

    Args:
        model: any ``nn.Module``; it is deep-copied, never modified.
        input_shape: one sample's shape, e.g. ``(3, 224, 224)`` (the batch dimension is added).
        dtype: ``"float16"`` or ``"bfloat16"``.
        backend: ``"cusparselt"`` or ``"cutlass"``.
        batch_size: images per forward.
        warmup: untimed rounds before timing.
        runs: timed rounds (>= 50); medians are reported.
        layers: also time every converted linear alone at its real input shape (captured with hooks).
        device: CUDA device.
        seed: seed of the random input.

    Raises:
        RuntimeError: if :func:`skip_reason` says the benchmark cannot run here.
        ValueError: bad ``dtype``/``backend``/``batch_size``/``runs``.
    """
    torch_dtype = resolve_dtype(dtype)
    check_backend(backend)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got batch_size={batch_size!r}.")
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < MIN_RUNS:
        raise ValueError(f"`runs` must be an int >= {MIN_RUNS}, got runs={runs!r}.")
    dense, sparse, converted, skipped = sparsify_model(model, torch_dtype, backend, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=gen, device=device, dtype=torch_dtype)

    ref, out = dense(x), sparse(x)
    err = _max_rel_err(out, ref)
    dense_t, sparse_t = interleaved_cuda_times([lambda: dense(x), lambda: sparse(x)], warmup, runs)

    timings = []
    if layers and converted:
        shapes = _capture_linear_inputs(dense, converted, x)
        dmods, smods = dict(dense.named_modules()), dict(sparse.named_modules())
        for name in converted:
            if name not in shapes:  # converted but not called in forward (e.g. an unused head)
                continue
            xi = torch.randn(shapes[name], generator=gen, device=device, dtype=torch_dtype)
            dm, sm = dmods[name], smods[name]
            d_t, s_t = interleaved_cuda_times(
                [lambda: F.linear(xi, dm.weight, dm.bias), lambda: F.linear(xi, sm.weight, sm.bias)], warmup, runs
            )
            timings.append(LayerTiming(name, tuple(dm.weight.shape), shapes[name],
                                       statistics.median(d_t), statistics.median(s_t)))
    return SemiStructuredReport(
        dtype=_dtype_name(torch_dtype),
        backend=backend,
        batch_size=batch_size,
        input_shape=tuple(input_shape),
        device_name=torch.cuda.get_device_name(torch.device(device)),
        runs=runs,
        dense_ms=statistics.median(dense_t),
        sparse_ms=statistics.median(sparse_t),
        parity_max_rel_err=err,
        parity_tolerance=PARITY_TOLERANCE[torch_dtype],
        converted=converted,
        skipped=skipped,
        layers=timings,
    )


def benchmark_linear(
    in_features: int,
    out_features: int,
    batch_size: int,
    dtype: str | torch.dtype = "float16",
    backend: Backend = "cusparselt",
    warmup: int = 10,
    runs: int = MIN_RUNS,
    device: torch.device | str = "cuda",
) -> SemiStructuredReport:
    """One ``nn.Linear(in_features, out_features)`` on a ``(batch_size, in_features)`` input."""
    model = nn.Sequential(nn.Linear(in_features, out_features))
    return benchmark_semi_structured(
        model, (in_features,), dtype, backend, batch_size, warmup, runs, layers=False, device=device
    )


# ---------------------------------------------------------------------------------------------- output
def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: SemiStructuredReport) -> str:
    """Plain-text summary: end-to-end line, parity line, per-layer table, skipped layers.

    Example:
        >>> r = SemiStructuredReport("float16", "cusparselt", 64, (3, 224, 224), "GPU", 50, 2.0, 1.6, 1e-3, 1e-2,
        ...                          ["fc"], [], [LayerTiming("fc", (64, 64), (64, 64), 0.02, 0.015)])
        >>> print(format_report(r).splitlines()[0])
        2:4 semi-structured (float16, cusparselt) on GPU, batch 64: dense masked 2.000 ms (32000 img/s), sparse 1.600 ms (40000 img/s), speed-up x1.250
    """
    r = report
    lines = [
        f"2:4 semi-structured ({r.dtype}, {r.backend}) on {r.device_name}, batch {r.batch_size}: "
        f"dense masked {r.dense_ms:.3f} ms ({r.dense_images_per_s:.0f} img/s), "
        f"sparse {r.sparse_ms:.3f} ms ({r.sparse_images_per_s:.0f} img/s), speed-up x{r.speedup_e2e:.3f}",
        f"parity vs dense masked: max rel err {r.parity_max_rel_err:.2e} "
        f"({'ok' if r.parity_ok else 'FAILED'}, tolerance {r.parity_tolerance:.0e}); "
        f"{len(r.converted)} linear(s) converted, {len(r.skipped)} layer(s) left dense; median of {r.runs} runs",
    ]
    if r.layers:
        lines += ["", _table(LAYER_COLUMNS, r.layer_rows())]
    if r.skipped:
        lines += ["", "left dense:"] + [f"  {s.name} {s.shape}: {s.reason}" for s in r.skipped]
    return "\n".join(lines)
