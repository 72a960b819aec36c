"""Dense 2:4-masked vs semi-structured sparse: end-to-end and per-layer timing, parity per layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from lightning_sparse.semi_structured.convert import (
    capture_linear_inputs,
    search_cusparselt_algorithms,
    sparsify_model,
)
from lightning_sparse.semi_structured.eligibility import (
    Backend,
    _dtype_name,
    check_backend,
    resolve_device,
    resolve_dtype,
)
from lightning_sparse.semi_structured.report import LayerTiming, SemiStructuredReport
from lightning_sparse.utils.timing import cuda_graph, interleaved_times

__all__ = ["MIN_RUNS", "PARITY_TOLERANCE", "RUNNERS", "benchmark_semi_structured"]

MIN_RUNS = 50
# max |sparse - dense| / max |dense| (both run in the same low precision; the only difference is the GEMM
# kernel, so this is accumulation-order noise)
PARITY_TOLERANCE: dict[torch.dtype, float] = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
Runner = Literal["eager", "cuda-graph", "compile"]
# eager: Python dispatch per call (host overhead included); cuda-graph: one graph replay per call (kernel
# time); compile: torch.compile(mode="max-autotune") of both models, as published end-to-end 2:4 figures do
RUNNERS = ("eager", "cuda-graph", "compile")


def _max_rel_err(out: object, ref: object) -> float:
    if isinstance(out, (tuple, list)):
        return max(_max_rel_err(o, r) for o, r in zip(out, ref))
    diff = (out.float() - ref.float()).abs().max()
    return float(diff / ref.float().abs().max().clamp_min(1e-12))


def _runnable(fn: Callable[[], object], runner: Runner, device: torch.device) -> Callable[[], object]:
    return cuda_graph(fn, device) if runner == "cuda-graph" else fn


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {name}={value!r}.")


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
    device: torch.device | str | None = None,
    seed: int = 0,
    runner: Runner = "eager",
    search: bool = False,
    row_major_outputs: bool = True,
    include: Sequence[str] | None = None,
) -> SemiStructuredReport:
    """Dense 2:4-masked vs semi-structured sparse: end-to-end and per-layer medians, plus parity.

    Args:
        model: any ``nn.Module``; it is deep-copied, never modified.
        input_shape: one sample's shape, e.g. ``(3, 224, 224)`` (the batch dimension is added).
        dtype: ``"float16"`` or ``"bfloat16"``.
        backend: ``"cusparselt"`` or ``"cutlass"``.
        batch_size: samples per forward.
        warmup: untimed rounds before timing.
        runs: timed rounds (>= 50); medians are reported.
        layers: also time every converted linear alone at its real input shape (captured with hooks).
            Parity is checked per layer either way.
        device: CUDA device (default: the current one). Events are recorded on its current stream.
        seed: seed of the random inputs.
        runner: ``"eager"``, ``"cuda-graph"`` (replay a captured graph: kernel time without Python
            dispatch) or ``"compile"`` (``torch.compile(mode="max-autotune")`` end to end; the per-layer
            rows then run eager).
        search: ask cuSPARSELt for the fastest algorithm per layer (``backend="cusparselt"``).
        row_major_outputs: converted linears hand on row-major outputs (what a model needs). ``False`` keeps
            the layout the kernel returned, which times the kernel alone (see ``sparsify_model``).
        include: fnmatch patterns of the layers to convert (default: every eligible ``nn.Linear``), e.g.
            ``["*.mlp.fc1", "*.mlp.fc2"]`` for a ViT's MLP layers only, as torchao's published figures do.

    Raises:
        RuntimeError: if :func:`~lightning_sparse.semi_structured.skip_reason` says it cannot run here.
        NothingConverted: no layer converted (nothing to compare).
        ValueError: bad ``dtype``/``backend``/``batch_size``/``runs``/``runner``.
    """
    torch_dtype = resolve_dtype(dtype)
    check_backend(backend)
    _check_int("batch_size", batch_size, 1)
    _check_int("warmup", warmup, 0)
    _check_int("runs", runs, MIN_RUNS)
    if runner not in RUNNERS:
        raise ValueError(f"`runner` must be one of {list(RUNNERS)}, got runner={runner!r}.")
    if search and backend != "cusparselt":
        raise ValueError(f"`search=True` needs backend='cusparselt' (algorithm search), got backend={backend!r}.")
    device = resolve_device(device)
    dense, sparse, converted, skipped = sparsify_model(model, torch_dtype, backend, device, row_major_outputs, include)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((batch_size, *input_shape), generator=gen, device=device, dtype=torch_dtype)

    shapes = capture_linear_inputs(dense, converted, x)
    algorithms = search_cusparselt_algorithms(sparse, shapes, gen) if search else {}
    err = _max_rel_err(sparse(x), dense(x))
    dmods, smods = dict(dense.named_modules()), dict(sparse.named_modules())
    layer_inputs = {n: torch.randn(s, generator=gen, device=device, dtype=torch_dtype) for n, s in shapes.items()}
    layer_errors = {
        n: _max_rel_err(smods[n](xi), dmods[n](xi)) for n, xi in layer_inputs.items()
    }

    if runner == "compile":
        run_dense, run_sparse = torch.compile(dense, mode="max-autotune"), torch.compile(sparse, mode="max-autotune")
    else:
        run_dense, run_sparse = dense, sparse
    fns = [_runnable(lambda: run_dense(x), runner, device), _runnable(lambda: run_sparse(x), runner, device)]
    dense_t, sparse_t = interleaved_times(fns, warmup, runs, device)

    timings = []
    if layers:
        for name, xi in layer_inputs.items():
            dm, sm = dmods[name], smods[name]
            layer_runner = "cuda-graph" if runner == "cuda-graph" else "eager"
            pair = [_runnable(lambda dm=dm, xi=xi: dm(xi), layer_runner, device),
                    _runnable(lambda sm=sm, xi=xi: sm(xi), layer_runner, device)]
            d_t, s_t = interleaved_times(pair, warmup, runs, device)
            timings.append(LayerTiming(name, tuple(dm.weight.shape), tuple(xi.shape), d_t.event_ms, s_t.event_ms,
                                       d_t.host_ms, s_t.host_ms, layer_errors[name]))
    return SemiStructuredReport(
        dtype=_dtype_name(torch_dtype),
        backend=backend,
        batch_size=batch_size,
        input_shape=tuple(input_shape),
        device_name=torch.cuda.get_device_name(device),
        runs=runs,
        dense_ms=dense_t.event_ms,
        sparse_ms=sparse_t.event_ms,
        parity_max_rel_err=err,
        parity_tolerance=PARITY_TOLERANCE[torch_dtype],
        converted=converted,
        skipped=skipped,
        layers=timings,
        dense_host_ms=dense_t.host_ms,
        sparse_host_ms=sparse_t.host_ms,
        runner=runner if row_major_outputs else f"{runner}, kernel layout",
        torch_version=torch.__version__,
        algorithms=algorithms,
        layer_errors=layer_errors,
    )

