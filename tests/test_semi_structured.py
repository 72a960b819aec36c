"""2:4 semi-structured inference: eligibility (CPU), skip paths (CPU), conversion/parity/timing (GPU, cap >= 8.0)."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.benchmark import main as benchmark_main
from lightning_sparse.semi_structured import (
    SHAPE_CONSTRAINTS,
    LAYER_COLUMNS,
    LayerTiming,
    NothingConverted,
    SemiStructuredReport,
    Timing,
    backend_capability_reason,
    benchmark_semi_structured,
    capture_linear_inputs,
    check_backend,
    format_report,
    resolve_dtype,
    semi_structured_eligibility,
    skip_reason,
    sparsify_model,
    torch_shape_constraint,
)
from lightning_sparse.sparsity.nm import nm_violations
from tests.helpers import fake_semi_structured
from tests.helpers.run_if import RunIf

ROOT = Path(__file__).resolve().parents[1]
GPU = [pytest.mark.gpu, RunIf(min_gpus=1, min_cuda_capability=(8, 0))]


class Mixed(nn.Module):
    """Eligible and ineligible linears, a 3x3 conv and a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3)
        self.pw = nn.Conv2d(16, 32, 1)
        self.fc_ok = nn.Linear(64, 32)  # (out=32, in=64): both backends
        self.fc_small_in = nn.Linear(32, 32)  # in=32: cuSPARSELt yes, CUTLASS needs in % 64
        self.fc_odd_in = nn.Linear(30, 32)
        self.head = nn.Linear(64, 10)  # out=10

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 10)
        return self.head(torch.cat([self.fc_ok(x), self.fc_small_in(self.fc_ok(x))], dim=-1))


class MLP(pl.LightningModule):
    """8x8 digits -> 64 -> 128 -> 64 -> 10: every hidden linear 2:4-eligible."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                                 nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


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


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend a CUDA device exists, with a settable capability (``fake_gpu.capability``)."""
    return fake_semi_structured.install(monkeypatch)


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


# ------------------------------------------------------------------------------------- callback
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"when": "epoch_end"}, r"`when` must be one of \['fit_end', 'test_end', 'both'\], got when='epoch_end'"),
        ({"dtype": "float32"}, r"`dtype` must be one of \['float16', 'bfloat16'\].*got dtype='float32'"),
        ({"backend": "triton"}, r"`backend` must be one of \['cusparselt', 'cutlass'\], got backend='triton'"),
        ({"batch_size": 0}, r"`batch_size` must be an int >= 1, got batch_size=0"),
        ({"warmup": -1}, r"`warmup` must be an int >= 0, got warmup=-1"),
        ({"runs": 10}, r"`runs` must be an int >= 50 \(medians of many runs\), got runs=10"),
        ({"input_shape": [3, 0, 8]}, r"`input_shape` must be None or a list of positive ints.*got input_shape=\[3, 0, 8\]"),
    ],
)
def test_callback_argument_validation(kwargs, match):
    from lightning_sparse.callbacks import SemiStructuredBenchmark

    with pytest.raises(ValueError, match=match):
        SemiStructuredBenchmark(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_callback_skips_on_cpu_and_run_succeeds(tmp_path, caplog):
    from lightning_sparse.callbacks import SemiStructuredBenchmark
    from tests.helpers.training import fixed_loader

    model = MLP()
    cb = SemiStructuredBenchmark(when="both")
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    loader = fixed_loader(n=32, batch_size=16)

    class Collect(logging.Handler):  # attached to Lightning's rank-zero logger itself: no reliance on propagation
        def __init__(self):
            super().__init__(logging.INFO)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    handler = Collect()
    rank_zero_logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    old_level = rank_zero_logger.level
    rank_zero_logger.addHandler(handler)
    rank_zero_logger.setLevel(logging.INFO)
    try:
        trainer.fit(model, loader)
        trainer.test(model, loader, verbose=False)
    finally:
        rank_zero_logger.removeHandler(handler)
        rank_zero_logger.setLevel(old_level)
    lines = [r.getMessage() for r in handler.records if "SemiStructuredBenchmark" in r.getMessage()]
    assert lines == [
        "SemiStructuredBenchmark (fit_end) skipped: no CUDA device: 2:4 semi-structured sparse kernels need an "
        "NVIDIA GPU with compute capability >= 8.0.",
        "SemiStructuredBenchmark (test_end) skipped: no CUDA device: 2:4 semi-structured sparse kernels need an "
        "NVIDIA GPU with compute capability >= 8.0.",
    ]
    assert trainer.state.finished and cb.reports == [] and cb.last_skip_reason.startswith("no CUDA device")
    assert cb._infer_input_shape(trainer, model) == (1, 8, 8)


# ------------------------------------------------------------------------------------- CLI
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_cli_on_cpu_prints_table_reason_and_what_to_run(capsys):
    assert benchmark_main(["--linear", "8192x8192", "--batch-size", "4096"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "0      8192x8192  yes       ok" in lines
    assert "1 of 1 nn.Linear layer(s) eligible" in "\n".join(lines)
    assert lines[-3:] == [
        "2:4 semi-structured benchmark skipped: no CUDA device: 2:4 semi-structured sparse kernels need an NVIDIA "
        "GPU with compute capability >= 8.0.",
        "To time it, run this on an NVIDIA GPU with compute capability >= 8.0 (A100, RTX 30xx/40xx, H100):",
        "    python -m lightning_sparse.benchmark --linear 8192x8192 --batch-size 4096",
    ]


def _classifier_checkpoint(tmp_path: Path, model_name: str, num_classes: int, in_chans: int, **kwargs) -> Path:
    from lightning_sparse.models import ImageClassifier

    module = ImageClassifier(model_name=model_name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    path = tmp_path / f"{model_name}.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cli_checkpoint_table_on_cpu_says_no_layer_is_eligible(tmp_path, capsys):
    """The digits 2:4 ResNet-18: its convs stay dense and its 10-class fc is too small, on any device."""
    ckpt = _classifier_checkpoint(tmp_path, "resnet18", 10, 1)
    assert benchmark_main(["--checkpoint", str(ckpt), "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    n_convs = sum(isinstance(m, nn.Conv2d) for m in timm.create_model("resnet18", num_classes=10, in_chans=1).modules())
    assert out.count("Conv2d is not handled") == n_convs == 20
    assert re.search(r"^fc\s+10x512\s+no\s+out_features=10 is not a positive multiple of 16", out, re.M)
    assert f"0 of 1 nn.Linear layer(s) eligible ({n_convs} conv(s) stay dense)" in out
    assert out.strip().endswith("No layer is eligible, so a GPU would skip this input too. Inputs with eligible "
                                "layers: --linear 8192x8192, --model vit_base_patch16_224 --random-init, or a "
                                "checkpoint of a model with nn.Linear layers (a ViT, an MLP-Mixer).")


@pytest.mark.parametrize("gpu", [False, True])
def test_cli_missing_checkpoint_is_an_error_before_the_device_check(tmp_path, monkeypatch, capsys, gpu):
    fake = fake_semi_structured.install(monkeypatch) if gpu else None
    missing = tmp_path / "runs" / "nope.ckpt"
    with pytest.raises(SystemExit) as exc:
        benchmark_main(["--checkpoint", str(missing)])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and f"--checkpoint {missing}: no such file" in captured.err
    assert "skipped" not in captured.out and (fake is None or fake.compressed == [])


def test_cli_unknown_timm_model_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_main(["--model", "vit_tiny_patch16_22", "--random-init"])
    assert exc.value.code == 2 and "--model vit_tiny_patch16_22: not a timm model name; did you mean" in capsys.readouterr().err


def test_cli_table_also_printed_on_a_gpu(monkeypatch, capsys, few_runs):
    fake_semi_structured.install(monkeypatch)
    assert benchmark_main(["--linear", "64x64", "--runs", "2", "--warmup", "0", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert out.index("== 2:4 eligibility of nn.Linear(64, 64)") < out.index("speed-up") and "To time it" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--linear", "64x64", "--runs", "10"], "--runs must be >= 50, got 10"),
        (["--model", "vit_tiny_patch16_224"], "--model needs --random-init"),
        (["--linear", "64by64"], "--linear must look like INxOUT"),
        (["--linear", "64x64", "--dtype", "float32"], "invalid choice: 'float32'"),
    ],
)
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_runs_without_optional_extras():
    """As on a GPU box with only torch/timm/lightning: no wandb, jsonargparse or torch_pruning importable.

    (``lightning_sparse.callbacks`` as a package imports Chase -> ``lightning_sparse.slim`` -> torch_pruning,
    so the callback is checked through its own file's dependencies only: ``_base`` and the plain module.)"""
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"wandb", "jsonargparse", "torch_pruning"}:
                    raise ImportError(f"blocked {name}")
        sys.meta_path.insert(0, Block())
        from lightning_sparse.semi_structured import semi_structured_eligibility
        import lightning_sparse.benchmark as b
        assert b.main(["--linear", "64x64"]) == 0
        """
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "skipped: no CUDA device" in out.stdout




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
    w = _baked_2to4(torch.randn(64, 64)).half()
    with pytest.raises(RuntimeError, match="compute capability 8.x"):
        F.linear(torch.randn(8, 64).half(), to_sparse_semi_structured(w))


# ------------------------------------------------------------------------------------- the whole path on CPU
def _baked_2to4(w: torch.Tensor) -> torch.Tensor:
    """2:4 by magnitude along the last dim, written independently of the package."""
    groups = w.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.abs().topk(2, dim=1).indices, True)
    return (groups * keep).reshape(w.shape)


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


@pytest.fixture
def few_runs(monkeypatch):
    """Keep the statistics floor out of the way of CPU tests that check the path, not the figures."""
    import lightning_sparse.semi_structured.__main__ as cli
    from lightning_sparse.callbacks import semi_structured as cb_module
    from lightning_sparse.semi_structured import bench

    for mod in (cli, bench, cb_module):
        monkeypatch.setattr(mod, "MIN_RUNS", 2)


def test_parity_failure_exits_1_and_names_the_layer(monkeypatch, capsys, few_runs):
    fake = fake_semi_structured.install(monkeypatch)
    fake.perturb_out_features = 128  # the kernel of the 64x128 layer returns wrong numbers
    code = benchmark_main(["--linear", "64x64", "64x128", "--runs", "2", "--warmup", "0", "--batch-size", "16"])
    captured = capsys.readouterr()
    assert code == 1
    assert "parity FAILED for nn.Linear(64, 128)" in captured.err and "worst layer 0" in captured.err
    assert "nn.Linear(64, 64)" not in captured.err


def test_cli_vit_tiny_whole_path(monkeypatch, capsys, tmp_path, few_runs):
    fake = fake_semi_structured.install(monkeypatch)
    out = tmp_path / "r.json"
    code = benchmark_main(["--model", "vit_tiny_patch16_224", "--random-init", "--image-size", "32",
                           "--num-classes", "16", "--batch-size", "2", "--runs", "2", "--warmup", "0",
                           "--no-layers", "--search", "--json", str(out)])
    assert code == 0, capsys.readouterr()
    report = json.loads(out.read_text())["reports"][0]
    assert report["input_shape"] == [3, 32, 32]  # the ViT was built for 32 px (timm asserts the size otherwise)
    vit_blocks = 12
    assert len(report["converted"]) == 4 * vit_blocks + 1  # qkv, proj, fc1, fc2 per block, and the 16-class head
    assert report["parity_ok"] and report["dense_ms"] > 0 and report["sparse_ms"] > 0
    assert set(report["algorithms"].values()) == {fake.search_result}
    # the searched algorithm reaches the kernel; the searched input is the layer's real 2-D shape, padded
    assert {c["alg_id"] for c in fake.mm_calls if c["weight"] != (16, 16)} >= {fake.search_result}
    # qkv (576x192) sees 2 images x 5 tokens = 10 rows, padded to 16 (a multiple of 8); the head sees 2 rows -> 8
    assert (576, 192, 16) in fake.searched and (16, 192, 8) in fake.searched
    assert "nn.Linear" not in capsys.readouterr().err


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


def test_callback_fit_and_test_end_with_fake_kernels(monkeypatch, tmp_path, few_runs):
    from lightning_sparse.callbacks import SemiStructuredBenchmark
    from tests.helpers.training import fixed_loader

    fake = fake_semi_structured.install(monkeypatch)
    model = MLP()
    cb = SemiStructuredBenchmark(when="both", batch_size=8, warmup=0, runs=2)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb])
    loader = fixed_loader(n=32, batch_size=16)
    trainer.fit(model, loader)
    trainer.test(model, loader, verbose=False)
    assert [r.converted for r in cb.reports] == [["net.1", "net.3"], ["net.1", "net.3"]]
    rep = cb.reports[-1]
    assert rep.input_shape == (1, 8, 8) and [t.input_shape for t in rep.layers] == [(8, 64), (8, 128)]
    assert rep.parity_ok and len(rep.layer_rows()[0]) == len(LAYER_COLUMNS)
    assert nm_violations(model.net[1].weight, 2, 4) > 0 and model.net[1].weight.dtype == torch.float32
    assert fake.compressed == [(128, 64), (64, 128)] * 2

    fake.refuse_compress = True
    trainer.test(model, loader, verbose=False)
    assert len(cb.reports) == 2 and cb.last_skip_reason.startswith("no layer converted")


# ------------------------------------------------------------------------------------- GPU (real kernels)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
@pytest.mark.gpu
@RunIf(min_gpus=1, min_cuda_capability=(8, 0))
def test_gpu_conversion_and_parity(dtype, backend):
    from torch.sparse import SparseSemiStructuredTensor

    if skip_reason(None, dtype, backend) is not None:
        pytest.skip(skip_reason(None, dtype, backend))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    dense, sparse, converted, skipped = sparsify_model(model, dtype, backend, "cuda")
    assert converted == ["0", "2"] and [s.name for s in skipped] == ["4"]
    for name in converted:
        w_sparse, w_dense = sparse.get_submodule(name).weight, dense.get_submodule(name).weight
        assert isinstance(w_sparse, SparseSemiStructuredTensor) and w_sparse.BACKEND == backend
        assert torch.equal(w_sparse.to_dense(), w_dense)
    x = torch.randn(37, 128, device="cuda", dtype=resolve_dtype(dtype))  # batch not a multiple of 8: padded
    x3 = torch.randn(4, 128, 9, device="cuda", dtype=resolve_dtype(dtype)).transpose(1, 2)  # non-contiguous 3-D
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(sparse(x3), dense(x3), rtol=2e-2, atol=2e-2)
    assert not isinstance(model[0].weight, SparseSemiStructuredTensor) and model[0].weight.device.type == "cpu"


@pytest.mark.gpu
@RunIf(min_gpus=1, min_cuda_capability=(8, 0))
@pytest.mark.parametrize("runner", ["eager", "cuda-graph"])
def test_gpu_benchmark_report_table(runner):
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    rep = benchmark_semi_structured(vit, (3, 32, 32), "float16", "cusparselt", batch_size=8, warmup=2, runs=50,
                                    runner=runner, device="cuda:0")
    assert len(rep.converted) == 4 * len(vit.blocks) and len(rep.layers) == len(rep.converted)
    assert rep.parity_ok, (rep.parity_max_rel_err, rep.worst_layer)
    assert rep.dense_ms > 0 and rep.sparse_ms > 0 and rep.dense_host_ms > 0
    fc1 = next(t for t in rep.layers if t.name == "blocks.0.mlp.fc1")
    assert fc1.input_shape == (8, 5, 192) and fc1.weight_shape == (768, 192)  # 4 patches + cls token
    if runner == "cuda-graph":  # one replay launch: the host no longer sets the pace
        assert rep.dense_host_ms < rep.dense_ms


@pytest.mark.gpu
@RunIf(min_gpus=1, min_cuda_capability=(8, 0))
def test_gpu_search_sets_algorithms():
    if skip_reason(None, "float16", "cusparselt") is not None:
        pytest.skip(skip_reason(None, "float16", "cusparselt"))
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    rep = benchmark_semi_structured(model, (1024,), "float16", batch_size=256, warmup=2, runs=50, search=True)
    assert set(rep.algorithms) == {"0", "2"} and rep.parity_ok


@pytest.mark.gpu
@RunIf(min_gpus=1, min_cuda_capability=(8, 0))
def test_gpu_callback_runs_and_leaves_model_dense(tmp_path):
    from lightning_sparse.callbacks import SemiStructuredBenchmark
    from tests.helpers.training import fixed_loader

    model = MLP()
    cb = SemiStructuredBenchmark(when="fit_end", batch_size=32, warmup=2, runs=50)
    trainer = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[cb])
    trainer.fit(model, fixed_loader(n=32, batch_size=16))
    assert len(cb.reports) == 1 and cb.reports[0].input_shape == (1, 8, 8)
    assert cb.reports[0].converted == ["net.1", "net.3"] and cb.reports[0].parity_ok
    assert nm_violations(model.net[1].weight, 2, 4) > 0 and model.net[1].weight.dtype == torch.float32


@pytest.mark.gpu
@RunIf(min_gpus=1, min_cuda_capability=(8, 0))
def test_gpu_cli_linear(capsys, tmp_path):
    out = tmp_path / "r.json"
    code = benchmark_main(["--linear", "256x512", "--batch-size", "64", "--runs", "50", "--json", str(out),
                           "--runner", "eager", "cuda-graph"])
    assert code == 0, capsys.readouterr()
    reports = json.loads(out.read_text())["reports"]
    assert [r["runner"] for r in reports] == ["eager", "cuda-graph"]
    for r in reports:
        assert r["converted"] == ["0"] and r["parity_ok"] and r["dense_ms"] > 0 and r["sparse_ms"] > 0
        assert r["speedup_e2e"] == pytest.approx(r["dense_ms"] / r["sparse_ms"])
