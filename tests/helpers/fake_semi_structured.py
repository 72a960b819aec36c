"""Run torch's real 2:4 semi-structured dispatch on CPU with only the CUDA pieces replaced by fakes.

What stays real: ``torch.sparse.to_sparse_semi_structured``, the ``SparseSemiStructuredTensor`` subclasses
and their ``__torch_dispatch__`` table (``linear``/``addmm``/``mm``/``t``/``detach`` ...), torch's
``semi_structured::cusparselt_mm``/``cutlass_mm`` custom ops with their padding, and CUTLASS's
Python compression (``sparse_semi_structured_from_dense_cutlass``).

What is faked (nothing else):

- the kernels ``torch._cslt_compress``, ``torch._cslt_sparse_mm``, ``torch._cslt_sparse_mm_search``,
  ``torch._sparse_semi_structured_mm`` / ``_addmm``: they check the 2:4 pattern of the weight they are given
  and compute the product densely, with the real kernels' output layouts (cuSPARSELt: ``(m, n)`` row-major,
  or ``(n, m)`` when ``transpose_result``); CUTLASS raises on a capability other than 8.x, as the real kernel;
- the device: ``torch.cuda.is_available/current_device/get_device_capability/get_device_name/synchronize/
  device/current_stream/Event/empty_cache``, cuSPARSELt availability, the subclass's CUDA-only input
  validation (its other checks are kept), and the benchmark's device type (``cpu``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch.sparse import SparseSemiStructuredTensor
from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

from lightning_sparse.semi_structured import eligibility


def assert_two_four(weight: torch.Tensor) -> None:
    """Every group of 4 consecutive weights along the last dim has at most 2 nonzeros (independent check)."""
    groups = weight.reshape(-1, 4)
    worst = int((groups != 0).sum(dim=1).max())
    if worst > 2:
        raise RuntimeError(f"fake kernel: weight {tuple(weight.shape)} is not 2:4 (a group has {worst} nonzeros)")


@dataclass
class FakeKernels:
    capability: tuple[int, int] = (8, 0)
    name: str = "Fake GPU"
    compressed: list[tuple[int, ...]] = field(default_factory=list)  # weight shapes given to _cslt_compress
    mm_calls: list[dict] = field(default_factory=list)  # (backend, weight shape, alg_id, transpose_result)
    searched: list[tuple[int, ...]] = field(default_factory=list)
    search_result: int = 3
    perturb_out_features: int | None = None  # add 1.0 to the output of layers with this many outputs
    refuse_compress: bool = False
    strided_output: bool = False  # hand back a strided (transposed-view) result, the layout torch 2.11 returned

    # ------------------------------------------------------------------ cuSPARSELt kernels
    def cslt_compress(self, weight: torch.Tensor) -> torch.Tensor:
        if self.refuse_compress:
            raise RuntimeError("fake cuSPARSELt: compression refused")
        assert_two_four(weight)
        self.compressed.append(tuple(weight.shape))
        return weight.detach().clone().reshape(-1)  # the fake's "compressed" form is the dense weight, flat

    def _perturb(self, res: torch.Tensor, m: int) -> torch.Tensor:
        return res + 1.0 if self.perturb_out_features == m else res

    def cslt_sparse_mm(self, compressed_a, dense_b, bias=None, alpha=None, out_dtype=None, transpose_result=False,
                       alg_id=0, split_k=1, split_k_mode=-1):
        k = dense_b.shape[0]
        weight = compressed_a.reshape(-1, k)
        assert_two_four(weight)
        self.mm_calls.append({"backend": "cusparselt", "weight": tuple(weight.shape), "alg_id": int(alg_id),
                              "transpose_result": bool(transpose_result)})
        res = weight.float() @ dense_b.float()
        if bias is not None:
            res = res + bias.float()[:, None]
        res = self._perturb(res, weight.shape[0]).to(out_dtype or dense_b.dtype)
        if transpose_result:
            return res.t() if self.strided_output else res.t().contiguous()
        return res.contiguous()

    def cslt_search(self, compressed_a, dense_b, bias=None, alpha=None, out_dtype=None, transpose_result=False):
        self.searched.append((compressed_a.numel() // dense_b.shape[0], dense_b.shape[0], dense_b.shape[1]))
        return self.search_result

    # ------------------------------------------------------------------ CUTLASS kernels
    def _cutlass(self, bias, packed, meta, dense_b):
        if self.capability[0] != 8:
            raise RuntimeError("sparse_semi_structured_mad_op : Supported only on GPUs with compute capability 8.x")
        weight = sparse_semi_structured_to_dense_cutlass(packed, meta)
        assert_two_four(weight)
        self.mm_calls.append({"backend": "cutlass", "weight": tuple(weight.shape), "alg_id": None,
                              "transpose_result": False})
        res = weight.float() @ dense_b.float()
        if bias is not None:
            res = res + bias.float()[:, None]
        return self._perturb(res, weight.shape[0]).to(dense_b.dtype)

    def cutlass_mm(self, packed, meta, dense_b, *, out_dtype=None):
        return self._cutlass(None, packed, meta, dense_b)

    def cutlass_addmm(self, bias, packed, meta, dense_b, *, alpha=1, beta=1, out_dtype=None):
        return self._cutlass(bias, packed, meta, dense_b)


class FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.t - self.t) * 1e3


def _validate_without_cuda(cls, original_tensor: torch.Tensor) -> None:
    """The subclass's own validation minus its CUDA-device check."""
    if original_tensor.dim() != 2:
        raise RuntimeError(f"Error original_tensor.dim = {original_tensor.dim()} is not supported!")
    if not original_tensor.is_contiguous():
        raise RuntimeError("Error original_tensor is not contiguous!")
    if original_tensor.dtype not in cls._DTYPE_SHAPE_CONSTRAINTS:
        raise RuntimeError(f"Error original_tensor.dtype {original_tensor.dtype} is not a supported dtype for {cls}!")
    m, n = original_tensor.shape
    c = cls._DTYPE_SHAPE_CONSTRAINTS[original_tensor.dtype]
    if m < c.sparse_min_rows or m % c.sparse_min_rows or n < c.sparse_min_cols or n % c.sparse_min_cols:
        raise RuntimeError(f"Error original_tensor.shape {original_tensor.shape} is not supported!")


def install(monkeypatch, capability: tuple[int, int] = (8, 0), name: str = "Fake GPU") -> FakeKernels:
    """Install the fakes with ``monkeypatch``; returns the recorder/knobs object."""
    fake = FakeKernels(capability=capability, name=name)
    monkeypatch.setattr(eligibility, "DEVICE_TYPE", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: fake.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: fake.name)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    monkeypatch.setattr(SparseSemiStructuredTensor, "_validate_device_dim_dtype_shape",
                        classmethod(_validate_without_cuda))
    monkeypatch.setattr(torch, "_cslt_compress", fake.cslt_compress)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", fake.cslt_sparse_mm)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", fake.cslt_search)
    monkeypatch.setattr(torch, "_sparse_semi_structured_mm", fake.cutlass_mm)
    monkeypatch.setattr(torch, "_sparse_semi_structured_addmm", fake.cutlass_addmm)
    return fake
