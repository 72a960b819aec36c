"""2:4 semi-structured inference on CPU: the constraint tables, eligibility, skip reasons, the report's
text and the capability check per backend."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.benchmark import main as benchmark_main
from lightning_sparse.semi_structured import (
    LAYER_COLUMNS,
    SHAPE_CONSTRAINTS,
    LayerTiming,
    SemiStructuredReport,
    Timing,
    backend_capability_reason,
    check_backend,
    format_report,
    resolve_dtype,
    semi_structured_eligibility,
    skip_reason,
    torch_shape_constraint,
)
from tests.helpers import fake_semi_structured
from tests.helpers.semi_structured import Mixed, baked_2to4


def _by_name(rows):
    return {r.name: r for r in rows}


# ------------------------------------------------------------------------------------- tables / eligibility
@pytest.mark.parametrize("key", list(SHAPE_CONSTRAINTS))
def test_constraint_table_matches_installed_torch(key):
    backend, dtype = key
    assert torch_shape_constraint(backend, dtype) == SHAPE_CONSTRAINTS[key]


def test_eligibility_mixed_model_cusparselt():
    rows = _by_name(semi_structured_eligibility(Mixed(), "float16", "cusparselt"))
    assert list(rows) == ["conv", "pw", "fc_ok", "fc_small_in", "fc_odd_in", "head"]
    assert {n for n, r in rows.items() if r.eligible} == {"fc_ok", "fc_small_in"}
    assert rows["fc_ok"].shape == (32, 64) and rows["fc_ok"].reason == "ok"
    assert rows["conv"].reason.startswith("Conv2d is not handled")
    assert rows["pw"].reason.startswith("1x1 Conv2d is not handled")
    assert rows["fc_odd_in"].reason == "in_features=30 is not a positive multiple of 16 (cusparselt, float16)"
    assert rows["head"].reason == "out_features=10 is not a positive multiple of 16 (cusparselt, float16)"


def test_eligibility_mixed_model_cutlass():
    rows = _by_name(semi_structured_eligibility(Mixed(), "bfloat16", "cutlass"))
    assert {n for n, r in rows.items() if r.eligible} == {"fc_ok"}
    assert rows["fc_small_in"].reason == "in_features=32 is not a positive multiple of 64 (cutlass, bfloat16)"
    assert "out_features=10 is not a positive multiple of 32" in rows["head"].reason
    assert "in_features=64" not in rows["head"].reason


@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_eligibility_vit(backend):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000, img_size=32)
    rows = semi_structured_eligibility(vit, "float16", backend)
    eligible = {r.name for r in rows if r.eligible}
    blocks = len(vit.blocks)
    expected = {f"blocks.{i}.{n}" for i in range(blocks) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert eligible == expected
    rest = _by_name(r for r in rows if not r.eligible)
    assert set(rest) == {"patch_embed.proj", "head"}
    assert rest["patch_embed.proj"].reason.startswith("Conv2d is not handled")
    assert "out_features=1000" in rest["head"].reason


def test_eligibility_float32_gives_reason():
    rows = semi_structured_eligibility(Mixed(), torch.float32)
    linears = [r for r in rows if r.name.startswith(("fc", "head"))]
    assert linears and not any(r.eligible for r in linears)
    assert all(r.reason == "dtype float32 is not supported; 2:4 semi-structured kernels need float16 or bfloat16"
               for r in linears)


def test_bad_dtype_and_backend_raise():
    with pytest.raises(ValueError, match=r"`dtype` must be one of \['float16', 'bfloat16'\].*dtype='float32'"):
        resolve_dtype("float32")
    with pytest.raises(ValueError, match=r"`backend` must be one of \['cusparselt', 'cutlass'\], got backend='triton'"):
        check_backend("triton")


# ------------------------------------------------------------------------------------- skip reasons
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_skip_reason_on_cpu():
    assert skip_reason().startswith("no CUDA device")
    assert skip_reason(Mixed(), "float16", "cutlass").startswith("no CUDA device")


def test_skip_reason_old_gpu(fake_gpu):
    fake_gpu.capability = (7, 5)
    assert skip_reason(Mixed()) == (
        "Fake GPU has compute capability 7.5; 2:4 sparse tensor cores need >= 8.0 (A100, RTX 30xx/40xx, H100)"
    )


def test_skip_reason_no_eligible_layer_and_no_cusparselt(fake_gpu, monkeypatch):
    assert skip_reason(Mixed()) is None
    assert skip_reason(Mixed(), "float32") == "dtype float32 is not supported; use float16 or bfloat16"
    reason = skip_reason(nn.Sequential(nn.Conv2d(3, 8, 1), nn.Linear(30, 10)))
    assert reason.startswith("no layer is eligible for 2:4 semi-structured sparsity (0 (8, 3, 1, 1): 1x1 Conv2d")
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert skip_reason(Mixed(), backend="cusparselt") == (
        "this torch build has no cuSPARSELt; use backend='cutlass' (compute capability 8.x only)"
    )
    assert skip_reason(Mixed(), backend="cutlass") is None


def test_format_report_and_metrics():
    layers = [LayerTiming("blocks.0.mlp.fc1", (3072, 768), (64, 197, 768), 0.10, 0.08, 0.01, 0.075, 1e-3),
              LayerTiming("blocks.0.mlp.fc2", (768, 3072), (64, 197, 3072), 0.10, 0.05, 0.01, 0.01, 2e-3)]
    rep = SemiStructuredReport("bfloat16", "cutlass", 64, (3, 224, 224), "GPU", 50, 10.0, 8.0, 0.2, 5e-2,
                               ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"], [], layers, dense_host_ms=9.5,
                               sparse_host_ms=1.0, runner="eager", layer_errors={"blocks.0.mlp.fc1": 1e-3,
                                                                                 "blocks.0.mlp.fc2": 2e-3})
    text = format_report(rep)
    assert "speed-up x1.250" in text and "6400 img/s" in text and "8000 img/s" in text
    assert "FAILED" in text and "worst layer blocks.0.mlp.fc2 2.00e-03" in text
    assert "HOST-BOUND" in text  # dense: 9.5 ms host for a 10 ms call
    table = text.split("\n\n")[1].splitlines()
    assert table[0].split() == LAYER_COLUMNS
    rows = [line.split() for line in table[2:]]
    assert [r[5] for r in rows] == ["1.25", "2.0"]
    assert [r[8] for r in rows] == ["yes", "no"]  # fc1's sparse call: 0.075 ms host of 0.08 ms
    assert rep.metrics()["semi/speedup_e2e"] == pytest.approx(1.25)
    assert rep.worst_layer == ("blocks.0.mlp.fc2", 2e-3)


def test_timing_host_bound_threshold():
    assert Timing(event_ms=1.0, host_ms=0.85).host_bound
    assert not Timing(event_ms=1.0, host_ms=0.5).host_bound


# ------------------------------------------------------------------------------------- capability per backend
@pytest.mark.parametrize(
    ("backend", "cap", "ok"),
    [("cusparselt", (8, 0), True), ("cusparselt", (9, 0), True), ("cusparselt", (7, 5), False),
     ("cutlass", (8, 0), True), ("cutlass", (8, 9), True), ("cutlass", (9, 0), False), ("cutlass", (7, 5), False)],
)
def test_backend_capability(backend, cap, ok):
    assert (backend_capability_reason(backend, cap, "GPU") is None) == ok


def test_cutlass_on_hopper_is_a_skip_not_a_crash(monkeypatch, capsys):
    """The real CUTLASS kernel raises on 9.0 (the fake does too): the check must stop before any matmul."""
    fake = fake_semi_structured.install(monkeypatch, capability=(9, 0), name="H100")
    assert skip_reason(Mixed(), "float16", "cutlass") == (
        "H100 has compute capability 9.0; torch's CUTLASS 2:4 kernels run only on 8.x (A100, RTX 30xx/40xx); "
        "use backend='cusparselt'"
    )
    assert benchmark_main(["--linear", "128x128", "--backend", "cutlass"]) == 0
    assert "skipped: H100 has compute capability 9.0" in capsys.readouterr().out
    assert fake.mm_calls == []
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    monkeypatch.setattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", True)  # bypassing the check crashes
    w = baked_2to4(torch.randn(64, 64)).half()
    with pytest.raises(RuntimeError, match="compute capability 8.x"):
        F.linear(torch.randn(8, 64).half(), to_sparse_semi_structured(w))
