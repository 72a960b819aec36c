"""Conversion and timing through torch's real 2:4 dispatch on CPU, with only the CUDA kernels faked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.benchmark import main as benchmark_main
from lightning_sparse.semi_structured import (
    NothingConverted,
    benchmark_semi_structured,
    capture_linear_inputs,
    resolve_dtype,
    sparsify_model,
)
from tests.helpers import fake_semi_structured
from tests.helpers.semi_structured import Mixed


# ------------------------------------------------------------------------------------- the whole path on CPU
def test_capture_hooks_leave_the_forward_unchanged():
    torch.manual_seed(0)
    model = Mixed()
    x = torch.randn(5, 64)
    ref = model(x)
    shapes = capture_linear_inputs(model, ["fc_ok", "fc_small_in", "head", "fc_odd_in"], x)
    assert shapes == {"fc_ok": (5, 64), "fc_small_in": (5, 32), "head": (5, 64)}  # fc_odd_in is never called
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sparsify_real_dispatch_matches_independent_bake(monkeypatch, backend, dtype):
    from torch.sparse import SparseSemiStructuredTensor

    fake = fake_semi_structured.install(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    model[0].forward = lambda x: x  # an instance forward (as a training callback may install) must not reach the copies
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense, sparse, converted, skipped = sparsify_model(model, dtype, backend)

    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original is untouched
    assert converted == ["0", "2"] and [s.name for s in skipped] == ["4"]
    assert SparseSemiStructuredTensor._FORCE_CUTLASS is False  # restored after conversion
    for name in converted:
        w = sparse.get_submodule(name).weight
        assert isinstance(w, SparseSemiStructuredTensor) and w.BACKEND == backend
    tdtype = resolve_dtype(dtype)
    ref = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    ref.load_state_dict(before)
    ref = ref.to(tdtype)
    for i in (0, 2):  # the dense masked copy holds a magnitude 2:4 mask of the original weight (ties either way)
        orig, baked = ref[i].weight.detach(), dense[i].weight.detach()
        kept = baked != 0
        assert torch.equal(baked[kept], orig[kept])
        groups, keep = orig.abs().reshape(-1, 4), kept.reshape(-1, 4)
        assert int(keep.sum(1).max()) <= 2
        dropped_max = groups.masked_fill(keep, 0).amax(1)
        kept_min = groups.masked_fill(~keep, float("inf")).amin(1)
        assert bool((kept_min >= dropped_max).all())
        with torch.no_grad():
            ref[i].weight.copy_(baked)
    x = torch.randn(13, 64, dtype=tdtype)  # batch 13: torch pads the input to a multiple of 8
    with torch.no_grad():
        out = sparse(x)
        torch.testing.assert_close(out.float(), ref(x).float(), rtol=2e-2, atol=2e-2)
    assert out.shape == (13, 10)
    assert [c["weight"] for c in fake.mm_calls] == [(128, 64), (64, 128)]  # the kernels ran, once per layer
    assert all(c["backend"] == backend for c in fake.mm_calls)


def test_noncontiguous_input_is_made_contiguous(monkeypatch):
    fake_semi_structured.install(monkeypatch)
    torch.manual_seed(0)
    _, sparse, converted, _ = sparsify_model(nn.Sequential(nn.Linear(64, 128)), "float16")
    x = torch.randn(2, 64, 7, dtype=torch.float16).transpose(1, 2)  # (2, 7, 64), not contiguous
    weight = sparse[0].weight
    with pytest.raises(RuntimeError):  # torch's semi-structured linear views the input as 2-D
        F.linear(x, weight, sparse[0].bias)
    with torch.no_grad():
        out = sparse(x)
    torch.testing.assert_close(out, F.linear(x.contiguous(), weight, sparse[0].bias))
    assert out.shape == (2, 7, 128)


def test_strided_kernel_output_is_made_contiguous(monkeypatch):
    fake = fake_semi_structured.install(monkeypatch)
    fake.strided_output = True
    torch.manual_seed(0)
    _, sparse, _, _ = sparsify_model(nn.Sequential(nn.Linear(64, 128)), "float16")
    x = torch.randn(16, 64, dtype=torch.float16)
    raw = F.linear(x, sparse[0].weight, sparse[0].bias)
    assert not raw.is_contiguous()  # what the layer would hand on without its hook
    with torch.no_grad():
        out = sparse(x)
    assert out.is_contiguous()
    torch.testing.assert_close(out, raw)
    _, kernel_layout, _, _ = sparsify_model(nn.Sequential(nn.Linear(64, 128)), "float16", row_major_outputs=False)
    with torch.no_grad():
        assert not kernel_layout(x).is_contiguous()  # --kernel-layout: the kernel's own layout, no copy


def test_nothing_converted_is_a_skip(monkeypatch, capsys):
    fake = fake_semi_structured.install(monkeypatch)
    fake.refuse_compress = True
    with pytest.raises(NothingConverted, match=r"no layer converted .*0: conversion failed: fake cuSPARSELt"):
        sparsify_model(nn.Sequential(nn.Linear(64, 64)), "float16")
    assert benchmark_main(["--linear", "64x64", "--runs", "50", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipped: no layer converted" in out and "speed-up" not in out


def test_cuda_graph_runner_captures_every_timed_call(monkeypatch, few_runs):
    from lightning_sparse.semi_structured import bench

    fake_semi_structured.install(monkeypatch)
    captured = []

    def fake_graph(fn, device, warmup=3):
        captured.append(fn())
        return fn

    monkeypatch.setattr(bench, "cuda_graph", fake_graph)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    rep = benchmark_semi_structured(model, (64,), "bfloat16", batch_size=8, warmup=0, runs=2, runner="cuda-graph")
    assert rep.runner == "cuda-graph" and rep.converted == ["0", "2"]
    assert len(captured) == 2 + 2 * 2  # end to end (dense, sparse) and each converted layer (dense, sparse)
    assert [t.name for t in rep.layers] == ["0", "2"] and rep.layers[1].input_shape == (8, 128)
    assert rep.parity_ok and all(t.rel_err <= rep.parity_tolerance for t in rep.layers)
