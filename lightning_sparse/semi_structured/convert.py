"""Copies of a model with 2:4 masks baked in, and with ``SparseSemiStructuredTensor`` weights.

The backend (cuSPARSELt or CUTLASS) is fixed when a weight is converted: the tensor subclass carries it.
cuSPARSELt weights also carry an algorithm id; :func:`search_cusparselt_algorithms` asks cuSPARSELt for
the fastest one at each layer's real input shape (``torch._cslt_sparse_mm_search``, where torch has it).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_sparse.semi_structured.eligibility import (
    Backend,
    LayerEligibility,
    check_backend,
    resolve_device,
    resolve_dtype,
    semi_structured_eligibility,
    skip_reason,
)
from lightning_sparse.sparsity.nm import bake_nm, nm_violations

__all__ = [
    "NothingConverted",
    "backend_context",
    "capture_linear_inputs",
    "search_cusparselt_algorithms",
    "sparsify_model",
]


class NothingConverted(RuntimeError):
    """No layer of the model could be converted: there is nothing to time (a skip, not a speed-up of 1)."""


@contextlib.contextmanager
def backend_context(backend: Backend) -> Iterator[None]:
    """Select the backend ``to_sparse_semi_structured`` builds (restores the previous setting on exit)."""
    check_backend(backend)
    from torch.sparse import SparseSemiStructuredTensor

    previous = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        yield
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = previous


def _plain_copy(model: nn.Module) -> nn.Module:
    """Deep copy that runs each Linear/Conv's class forward on a plain weight tensor.

    Instance-level ``forward`` overrides are dropped and parametrizations are removed with their current
    value left in place, so whatever a training callback wrapped around the weight becomes a plain
    Parameter before masks are baked.
    """
    clone = copy.deepcopy(model)
    for mod in clone.modules():
        if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            mod.__dict__.pop("forward", None)
            if parametrize.is_parametrized(mod):
                for name in list(mod.parametrizations):
                    parametrize.remove_parametrizations(mod, name, leave_parametrized=True)
    return clone


def _contiguous_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of a converted Linear: torch's semi-structured ``linear`` views the input as 2-D,
    which a non-contiguous input (a transposed activation, or torch 2.11's transposed matmul outputs) cannot
    take (``aten.expand``/``view`` is not implemented for the sparse subclass)."""
    x = args[0]
    if isinstance(x, torch.Tensor) and not x.is_contiguous():
        return (x.contiguous(), *args[1:])
    return None


def _contiguous_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a converted Linear: a row-major output, whatever layout the kernel returned.

    torch 2.11's cuSPARSELt path returns the transpose of an ``(out, batch)`` result: a strided activation
    that makes every following op strided. Measured on an H100 (ViT-B, batch 256, CUDA graph): end to end
    0.27x of dense without this copy, 0.43x with it; asking cuSPARSELt for the transposed result instead
    (``_FUSE_TRANSPOSE``) took ~200 ms per call there. torch 2.14 returns a row-major result by itself,
    and the hook is a no-op.
    """
    if isinstance(out, torch.Tensor) and not out.is_contiguous():
        return out.contiguous()
    return None


def _select(names: Sequence[str], include: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(names matching any pattern, the others)``; a pattern matching none of ``names`` is an error."""
    if isinstance(include, str) or not include:
        raise ValueError(f"`include` must be a non-empty list of fnmatch patterns, got include={include!r}.")
    unmatched = [p for p in include if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"`include` pattern(s) {unmatched} match no 2:4-eligible layer; eligible layers: "
                         f"{list(names)[:8]}{' ...' if len(names) > 8 else ''}")
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    return chosen, [n for n in names if n not in chosen]


@torch.no_grad()
def sparsify_model(
    model: nn.Module,
    dtype: str | torch.dtype = "float16",
    backend: Backend = "cusparselt",
    device: torch.device | str | None = None,
    row_major_outputs: bool = True,
    include: Sequence[str] | None = None,
) -> tuple[nn.Module, nn.Module, list[str], list[LayerEligibility]]:
    """Two copies of ``model`` on ``device`` in ``dtype``: dense 2:4-masked, and semi-structured sparse.

    ``model`` itself is never modified. Every eligible ``nn.Linear`` gets its 2:4 mask baked (magnitude,
    groups of 4 along ``in_features``) in both copies; in the sparse copy its weight becomes a
    ``SparseSemiStructuredTensor``; its input is made contiguous where it is not (a no-op otherwise), and
    so is its output when ``row_major_outputs`` (what the next layer of a model needs; ``False`` leaves the
    kernel's own layout, to time the kernel alone). ``device`` defaults to the current CUDA device. A layer whose
    conversion raises in torch is reported in the skipped list with torch's message and stays dense (still
    2:4-masked) in both copies. ``include`` (fnmatch patterns of module names, e.g. ``["*.mlp.fc1", "*.mlp.fc2"]``
    for a ViT's MLP layers only) limits conversion to the eligible layers it matches; the other eligible layers
    stay dense and unmasked in both copies and are listed as skipped ("not in include").

    Returns:
        ``(dense_masked, sparse, converted module names, skipped layers)``.

    Raises:
        RuntimeError: if :func:`skip_reason` says conversion is impossible on this device.
        NothingConverted: if every eligible layer failed to convert.
        ValueError: an ``include`` pattern that matches no eligible layer.
    """
    torch_dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    reason = skip_reason(model, torch_dtype, backend, device)
    if reason is not None:
        raise RuntimeError(f"2:4 semi-structured conversion is not possible: {reason}")
    from torch.sparse import to_sparse_semi_structured

    rows = semi_structured_eligibility(model, torch_dtype, backend)
    eligible = [r.name for r in rows if r.eligible]
    skipped = [r for r in rows if not r.eligible]
    if include is not None:
        eligible, left_out = _select(eligible, include)
        skipped += [LayerEligibility(r.name, r.shape, False, f"not in include {list(include)}")
                    for r in rows if r.name in left_out]
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
                with warnings.catch_warnings():  # torch warns once that the subclass is a prototype API
                    warnings.filterwarnings("ignore", message=".*SparseSemiStructuredTensor is in prototype")
                    mod.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
            except (RuntimeError, NotImplementedError) as err:
                skipped.append(LayerEligibility(name, tuple(weight.shape), False, f"conversion failed: {err}"))
                continue
            mod.register_forward_pre_hook(_contiguous_input)
            if row_major_outputs:
                mod.register_forward_hook(_contiguous_output)
            converted.append(name)
    if not converted:
        detail = "; ".join(f"{s.name}: {s.reason}" for s in skipped if s.name in eligible)
        raise NothingConverted(f"no layer converted to 2:4 semi-structured ({detail})")
    return dense, sparse, converted, skipped


@torch.no_grad()
def capture_linear_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Input shape of each named module during one forward of ``x`` (modules never called are absent).

    The hooks return ``None``, so the forward and its outputs are unchanged.
    """
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(mod: nn.Module, args: tuple, out: object) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [modules[n].register_forward_hook(record(n)) for n in names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


@torch.no_grad()
def search_cusparselt_algorithms(
    sparse: nn.Module, shapes: Mapping[str, Sequence[int]], generator: torch.Generator | None = None
) -> dict[str, int]:
    """Ask cuSPARSELt for the fastest algorithm of each converted layer at its input shape; store it.

    For every module in ``shapes`` whose weight is a cuSPARSELt ``SparseSemiStructuredTensor``, runs
    ``torch._cslt_sparse_mm_search`` on a random input of the recorded shape (flattened to 2-D and padded
    as torch pads it) and sets the weight's ``alg_id_cusparselt``. Returns ``{module name: alg id}``; an
    empty dict when this torch has no search (the default algorithm 0 stays). A layer whose search raises
    keeps algorithm 0 and is named in one warning.
    """
    search = getattr(torch, "_cslt_sparse_mm_search", None)
    if search is None:
        return {}
    modules = dict(sparse.named_modules())
    chosen: dict[str, int] = {}
    failed: list[str] = []
    for name, shape in shapes.items():
        weight = modules[name].weight
        if getattr(weight, "BACKEND", None) != "cusparselt" or getattr(weight, "packed", None) is None:
            continue
        rows = 1
        for d in shape[:-1]:
            rows *= int(d)
        min_rows = type(weight)._DTYPE_SHAPE_CONSTRAINTS[weight.dtype].dense_min_rows
        rows += (-rows) % min_rows
        dense = torch.randn(rows, shape[-1], generator=generator, device=weight.packed.device, dtype=weight.dtype)
        bias = modules[name].bias
        try:
            alg = int(search(weight.packed, dense.t(), bias=bias,
                             transpose_result=bool(weight.fuse_transpose_cusparselt)))
        except RuntimeError as err:
            failed.append(f"{name}: {str(err).splitlines()[0][:120]}")
            continue
        weight.alg_id_cusparselt = alg
        chosen[name] = alg
    if failed:
        warnings.warn(f"cuSPARSELt algorithm search failed for {len(failed)} layer(s), which keep algorithm 0: "
                      + "; ".join(failed), RuntimeWarning, stacklevel=2)
    return chosen
