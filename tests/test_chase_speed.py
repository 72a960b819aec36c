"""benchmarks/chase_speed.py: the slim proxy model, CPU timing, and the GPU runtimes (real kernels: ``gpu``)."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
import timm
import torch

from helpers.run_if import RunIf
from lightning_sparse.export import make_runner

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("chase_speed", ROOT / "benchmarks" / "chase_speed.py")
chase_speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(chase_speed)

TINY = ["--arch", "resnet18", "--size", "32", "--batch", "2", "--reps", "1", "--warmup", "0", "--sparsity", "0.4"]


LINE = r"^\s+(\S+)\s+images/s dense\s+([0-9.]+)\s+slim\s+([0-9.]+)\s+speedup ([0-9.]+)x"


def _figures(out: str) -> tuple[float, dict[str, float]]:
    flops = float(re.search(r"FLOPs ratio ([0-9.]+)", out).group(1))
    speedups = {m.group(1): float(m.group(4)) for m in re.finditer(LINE, out, re.M)}
    return flops, speedups


def _check_speedups(out: str, speedups: dict[str, float]) -> None:
    """Each speedup is the slim model's throughput over the dense one's, both printed on its line (images/s
    to 0.1, the speedup to 0.01): the ratio recomputed here from those figures."""
    for runtime, dense, slim, _ in re.findall(LINE, out, re.M):
        dense, slim = float(dense), float(slim)
        assert math.isfinite(dense) and math.isfinite(slim) and dense >= 0.1 and slim >= 0.1, (dense, slim)
        ratio, tol = slim / dense, 0.005 + (0.05 / slim + 0.05 / dense) * slim / dense
        assert abs(speedups[runtime] - ratio) <= tol + 1e-9, (runtime, speedups[runtime], ratio)


def test_cpu_eager_run_prints_flops_and_speedup(capsys):
    chase_speed.main([*TINY, "--runtime", "eager", "--threads", "1"])
    out = capsys.readouterr().out
    flops, speedups = _figures(out)
    assert 0.3 < flops < 0.95  # S_c 0.4 of the candidate channels removed
    assert list(speedups) == ["eager"]
    _check_speedups(out, speedups)
    assert "goal (plain Chase at S_c 0.4" in out


def test_default_runtimes_are_the_cpu_ones():
    assert chase_speed.parser().parse_args([]).runtime == ["eager", "onnxruntime"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a CUDA GPU")
def test_gpu_runtimes_without_a_gpu_are_one_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        chase_speed.main([*TINY, "--runtime", "eager", "cuda"])
    assert exc.value.code == 2
    assert "--runtime cuda needs a CUDA GPU" in capsys.readouterr().err
    net, x = timm.create_model("resnet10t", num_classes=3), torch.randn(2, 3, 32, 32)
    with pytest.raises(RuntimeError, match="runtime 'cuda' needs a CUDA GPU"):
        make_runner(net, x, "cuda")
    with pytest.raises(ValueError, match="dtype='int8' is not supported on the GPU; choose one of"):
        make_runner(net, x, "cuda", dtype="int8")


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-2), ("float16", 3e-2), ("bfloat16", 1e-1)])
def test_cuda_runners_match_the_cpu_model(dtype, tol):
    """The GPU runner gives the CPU fp32 logits (up to the dtype / TF32), also after another model ran in between."""
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=10).eval()
    for m in net.modules():  # non-trivial BN statistics, so folding matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
    scale = ref.abs().max().item()
    first = make_runner(net, x, "cuda", dtype=dtype)
    other = make_runner(timm.create_model("resnet10t", num_classes=10).eval(), x, "cuda", dtype=dtype)
    for run in (first, other, first):
        out = run()
        assert out.device.type == "cuda" and out.dtype == getattr(torch, dtype)
    assert (out.float().cpu() - ref).abs().max().item() <= tol * scale


@pytest.mark.gpu
@RunIf(min_gpus=1)
def test_gpu_run_prints_speedups_and_the_paper_reference(capsys):
    chase_speed.main([*TINY, "--runtime", "cuda", "--dtype", "float16", "--reps", "5"])
    out = capsys.readouterr().out
    flops, speedups = _figures(out)
    assert 0.3 < flops < 0.95 and list(speedups) == ["cuda"]
    _check_speedups(out, speedups)
    assert "reference: the Chase paper reports 1.7x GPU throughput" in out and torch.cuda.get_device_name() in out
