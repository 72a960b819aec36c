"""`python -m lightning_sparse.benchmark`: tables, errors, skips, and the whole path with fake kernels."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
from torch import nn

from lightning_sparse.benchmark import main as benchmark_main
from tests.helpers import fake_semi_structured

ROOT = Path(__file__).resolve().parents[1]


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
        (["--linear", "64x64", "--dtype", "float32"], "--dtype=float32: expected one of ['float16', 'bfloat16']"),
        (["--linear", "64x64", "--batch", "8"], "--batch: unknown option; did you mean --batch-size?"),
        (["--linear", "64x64", "--batch-size", "x"], "--batch-size=x: expected int (one or more)"),
        (["--linear", "64x64", "--model", "resnet18"], "--linear, --model: give only one of --checkpoint, --model, --linear"),
    ],
)
def test_cli_argument_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark_main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("python -m lightning_sparse.benchmark: error: ") and message in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_runs_without_optional_extras():
    """As on a GPU box with only torch, timm and jsonargparse: no wandb, Lightning or torch_pruning importable.

    (``lightning_sparse.callbacks`` as a package imports Chase -> ``lightning_sparse.slim`` -> torch_pruning,
    so the callback is checked through its own file's dependencies only: ``_base`` and the plain module.)"""
    code = textwrap.dedent(
        """
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {"wandb", "torch_pruning", "pytorch_lightning", "lightning_fabric"}:
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
    start = time.perf_counter()
    code = benchmark_main(["--model", "vit_tiny_patch16_224", "--random-init", "--image-size", "32",
                           "--num-classes", "16", "--batch-size", "2", "--runs", "2", "--warmup", "0",
                           "--no-layers", "--search", "--json", str(out)])
    elapsed_ms = (time.perf_counter() - start) * 1e3
    assert code == 0, capsys.readouterr()
    report = json.loads(out.read_text())["reports"][0]
    assert report["input_shape"] == [3, 32, 32]  # the ViT was built for 32 px (timm asserts the size otherwise)
    vit_blocks = 12
    assert len(report["converted"]) == 4 * vit_blocks + 1  # qkv, proj, fc1, fc2 per block, and the 16-class head
    assert report["parity_ok"]
    # one forward of a ViT-Tiny on a CPU: more than 10 µs, less than the whole command that timed it
    assert 0.01 < report["dense_ms"] < elapsed_ms and 0.01 < report["sparse_ms"] < elapsed_ms
    assert set(report["algorithms"].values()) == {fake.search_result}
    # the searched algorithm reaches the kernel; the searched input is the layer's real 2-D shape, padded
    assert {c["alg_id"] for c in fake.mm_calls if c["weight"] != (16, 16)} >= {fake.search_result}
    # qkv (576x192) sees 2 images x 5 tokens = 10 rows, padded to 16 (a multiple of 8); the head sees 2 rows -> 8
    assert (576, 192, 16) in fake.searched and (16, 192, 8) in fake.searched
    assert "nn.Linear" not in capsys.readouterr().err


def test_cli_reports_the_timed_figures(monkeypatch, capsys, tmp_path, few_runs):
    """The figures are the timer's: with the timings fixed here (dense 10 ms, sparse 8 ms per call of batch 16)
    the JSON and the printed line hold exactly what those imply."""
    from lightning_sparse.semi_structured import Timing, bench

    fake_semi_structured.install(monkeypatch)
    monkeypatch.setattr(bench, "interleaved_times",
                        lambda fns, warmup, runs, device: [Timing(event_ms=10.0, host_ms=1.0),
                                                           Timing(event_ms=8.0, host_ms=1.0)])
    out = tmp_path / "r.json"
    argv = ["--linear", "64x64", "--runs", "2", "--warmup", "0", "--batch-size", "16", "--json", str(out)]
    assert benchmark_main(argv) == 0
    (report,) = json.loads(out.read_text())["reports"]
    assert (report["dense_ms"], report["sparse_ms"]) == (10.0, 8.0)
    assert report["speedup_e2e"] == pytest.approx(1.25)
    assert (report["dense_img_s"], report["sparse_img_s"]) == (pytest.approx(1600.0), pytest.approx(2000.0))
    assert "speed-up x1.250" in capsys.readouterr().out
