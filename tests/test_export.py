"""Export for deployment: tiny real Chase and Chase->2:4 runs exported to model.pt / model.onnx / report.

Every check compares with something computed independently of the exporter: the Lightning loader
(``ImageClassifier.load_from_checkpoint``), the N:M callback's own masked forward, the ONNX file read back
with ``onnx.numpy_helper``, and onnxruntime run here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import timm
import torch
from torch import nn

from helpers.training import fixed_loader, out_channels, trainer
from lightning_sparse.callbacks import Chase, NMSparsity
from lightning_sparse.export import (
    LOAD_SNIPPET,
    CannotFoldError,
    ParityError,
    export_checkpoint,
    fold_batchnorm,
    load_compact,
    make_runner,
    pack_tensor,
    unpack_tensor,
)
from lightning_sparse.export.__main__ import main
from lightning_sparse.models import ImageClassifier
from lightning_sparse.slim import channel_config, export_slim, load_slim

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16
ARCH = "resnet10t"


# ----------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """(a) Chase that slimmed channels; (b) Chase -> 2:4 SR-STE fine-tune of that checkpoint."""
    tmp = tmp_path_factory.mktemp("runs")
    pl.seed_everything(0)
    stage1 = ImageClassifier(ARCH, num_classes=10, in_chans=1, lr=0.05)
    # 2 steps per epoch: channels go after step 3 ((3 + ΔT/2) % 2 == 0, cubic target 0.44 at t = 2 of 4)
    chase = Chase(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1, stop_gmp_epochs=2,
                  stop_dst_epochs=1, update_interval=2, round_to=4, input_shape=(1, SIZE, SIZE))
    t = trainer(tmp, 4, [chase], max_epochs=2)
    dense = channel_config(stage1)
    t.fit(stage1, fixed_loader(n=32, image_size=SIZE))
    assert chase.slimmed and chase.arch == channel_config(stage1) and out_channels(chase.arch) < out_channels(dense)
    t.save_checkpoint(tmp / "chase.ckpt")
    stage2 = ImageClassifier(ARCH, num_classes=10, in_chans=1, lr=0.02, checkpoint_path=str(tmp / "chase.ckpt"))
    t2 = trainer(tmp / "nm", 2, [NMSparsity(n=2, m=4)])
    t2.fit(stage2, fixed_loader(n=32, image_size=SIZE))
    t2.save_checkpoint(tmp / "chase_nm24.ckpt")
    return {"chase": tmp / "chase.ckpt", "nm": tmp / "chase_nm24.ckpt"}


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory) -> dict[str, Path]:
    """(c) a dense digits run laid out as the CLI writes it (``config.yaml`` next to ``checkpoints/``);
    (d) an SR-STE 2:4 run from scratch."""
    tmp = tmp_path_factory.mktemp("plain")
    run = tmp / "dense" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "model:\n  class_path: lightning_sparse.models.ImageClassifier\n"
        f"data:\n  class_path: lightning_sparse.data.DigitsDataModule\n  init_args:\n    image_size: {SIZE}\n"
        "    split_seed: 3\n    val_fraction: 0.2\n")
    pl.seed_everything(0)
    dense = ImageClassifier(ARCH, num_classes=10, in_chans=1, lr=0.05)
    t = trainer(tmp, 2)
    t.fit(dense, fixed_loader(n=32, image_size=SIZE))
    t.save_checkpoint(run / "checkpoints" / "last.ckpt")
    srste = ImageClassifier(ARCH, num_classes=10, in_chans=1, lr=0.05)
    t = trainer(tmp, 2, [NMSparsity(n=2, m=4)])
    t.fit(srste, fixed_loader(n=32, image_size=SIZE))
    t.save_checkpoint(tmp / "srste.ckpt")
    return {"dense": run / "checkpoints" / "last.ckpt", "srste": tmp / "srste.ckpt"}


@pytest.fixture(scope="module")
def slim_file(tmp_path_factory) -> Path:
    """A slim export file of a small untrained network (no training): for the cheap export checks."""
    torch.manual_seed(0)
    model = _randomise_bn(timm.create_model(ARCH, num_classes=10, in_chans=1))
    return export_slim(model, tmp_path_factory.mktemp("slim") / "slim.pt", example_inputs=_batch(2))


def _batch(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(123))


def _ort_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _lightning_logits(ckpt: Path, x: torch.Tensor, nm: NMSparsity | None = None) -> tuple[torch.Tensor, nn.Module]:
    """Logits of the checkpoint loaded by Lightning; with ``nm``, through the N:M callback's masked forward."""
    module = ImageClassifier.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        if nm is None:
            return module(x), module.model
        with nm.masked(module):
            return module(x), module.model


def _check_onnx(out: Path, reference: torch.Tensor, x: torch.Tensor) -> onnx.ModelProto:
    model = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    diff = (_ort_logits(out / "model.onnx", x) - reference).abs().max().item()
    assert diff <= 1e-3, diff
    return model


def _conv_out_channels(model: onnx.ModelProto) -> dict[str, int]:
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    return {n.input[1].removesuffix(".weight"): inits[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv"}


def _load_with_snippet(path: Path) -> nn.Module:
    scope: dict = {}
    exec(LOAD_SNIPPET.replace("export/model.pt", str(path)), scope)
    return scope["model"]


def _baked_section(out: Path) -> str:
    """The "Baked into the weights" section of report.md."""
    text = (out / "report.md").read_text()
    return text.split("## Baked into the weights", 1)[1].split("## ", 1)[0]


def _conv_channels(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _check_compact(out: Path, x: torch.Tensor) -> None:
    """model_sparse.pt rebuilds model.pt's model bitwise (weights and logits); report sizes are the files'."""
    from_pt, from_compact = load_slim(out / "model.pt"), load_compact(out / "model_sparse.pt")
    a, b = from_pt.state_dict(), from_compact.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k
    with torch.no_grad():
        assert torch.equal(from_pt(x), from_compact(x))
    files = json.loads((out / "report.json").read_text())["files"]
    assert files["bytes"] == {n: (out / n).stat().st_size for n in ("model.pt", "model_sparse.pt", "model.onnx")}
    floats = [t for t in a.values() if t.is_floating_point()]
    assert files["model.pt stores"]["values"] == sum(t.numel() for t in floats)
    assert files["model.pt stores"]["nonzero"] == sum(int(t.count_nonzero()) for t in floats)
    # the files hold what they say: model.pt 4 bytes per value; model_sparse.pt 4 per nonzero + 1 bit per value
    # (2 where the tensor holds -0.0) where that is smaller (plus the example batch and the pickle's own bytes)
    dense_bytes = sum(t.numel() * 4 for t in floats)
    compact_bytes = sum(min(t.numel() * 4, int(t.count_nonzero()) * 4 + (t.numel() + 7) // 8
                            * (1 + bool(((t == 0) & t.signbit()).any()))) for t in floats)
    assert 0 <= files["bytes"]["model.pt"] - dense_bytes < 100_000
    assert 0 <= files["bytes"]["model_sparse.pt"] - compact_bytes < 100_000


# --------------------------------------------------------------------------------------------- exports
def test_export_chase_slim_checkpoint(runs, tmp_path):
    out = export_checkpoint(str(runs["chase"]), out=str(tmp_path / "deploy"), image_size=SIZE, no_bench=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt", "model_sparse.pt", "report.json", "report.md"]
    x = _batch()
    ref, slim = _lightning_logits(runs["chase"], x)
    graph = _check_onnx(out, ref, x)
    # conv out channels in the ONNX graph are the slimmed model's, and the run really slimmed
    want = {n: m.out_channels for n, m in slim.named_modules() if isinstance(m, nn.Conv2d)}
    assert _conv_out_channels(graph) == want
    dense = timm.create_model(ARCH, num_classes=10, in_chans=1)
    assert sum(want.values()) < sum(m.out_channels for m in dense.modules() if isinstance(m, nn.Conv2d))
    # BatchNorm is folded: no BatchNormalization node is left
    assert not [n for n in graph.graph.node if n.op_type == "BatchNormalization"]
    # model.pt loads with the documented torch + timm snippet and gives the same logits
    loaded = _load_with_snippet(out / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, atol=1e-5, rtol=0)
    report = json.loads((out / "report.json").read_text())
    stored = sum(p.numel() for p in slim.parameters())
    assert report["costs"]["exported"]["params"] == stored
    assert report["costs"]["dense"]["params"] == sum(p.numel() for p in dense.parameters())
    assert report["costs"]["exported"]["nonzero_params"] == sum(int(p.count_nonzero()) for p in slim.parameters())
    assert "Timing skipped" in (out / "report.md").read_text()
    # what was baked: Chase's unstructured masks and its slimmed channels, no N:M
    baked = _baked_section(out)
    assert "Unstructured masks" in baked and "Slimmed channels" in baked and "N:M" not in baked, baked
    masks = next(v for k, v in torch.load(runs["chase"], weights_only=True)["callbacks"].items() if k.startswith("Chase"))
    params = dict(slim.named_parameters())
    sparse = [k.removeprefix("model.") for k, m in masks["masks"].items() if not m.all()]
    nonzero, numel = sum(int(params[k].count_nonzero()) for k in sparse), sum(params[k].numel() for k in sparse)
    assert f"{len(sparse)} weights, {nonzero:,} of {numel:,} entries nonzero" in baked
    dense_ch, slim_ch = _conv_channels(dense), _conv_channels(slim)
    assert f"{sum(dense_ch.values()) - sum(slim_ch.values()):,} of {sum(dense_ch.values()):,} conv output channels" in baked
    assert f"from {sum(dense_ch[n] > slim_ch[n] for n in dense_ch)} convs" in baked
    assert torch.load(out / "model.pt", weights_only=True)["meta"]["baked"] == report["baked"]
    # no DataModule next to the bare checkpoint, and timm's data config is for 3 channels, not 1: said so
    assert "## Preprocessing\n\nNot recorded: the run names no DataModule" in (out / "report.md").read_text()
    # model_sparse.pt: the same model, bitwise, in fewer bytes (30% density)
    _check_compact(out, x)
    assert report["files"]["bytes"]["model_sparse.pt"] < 0.6 * report["files"]["bytes"]["model.pt"]



def test_export_chase_then_nm24_via_cli(runs, tmp_path, capsys):
    out = tmp_path / "deploy"
    main([str(runs["nm"]), "--out", str(out), "--image-size", str(SIZE), "--no-bench"])
    assert "model.onnx" in capsys.readouterr().out
    state = torch.load(runs["nm"], map_location="cpu", weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("NMSparsity")]
    targets = [t.removeprefix("model.") for t in state["callbacks"][key]["targets"]]
    assert len(targets) > 5
    x = _batch()
    ref, _ = _lightning_logits(runs["nm"], x, nm=NMSparsity(n=2, m=4))
    graph = _check_onnx(out, ref, x)
    # read the ONNX weights back: every group of 4 input channels holds <= 2 nonzeros
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    dense_params = dict(timm.create_model(ARCH, num_classes=10, in_chans=1).named_parameters())
    for name in targets:
        w = inits[name]
        assert w.ndim == dense_params[name].ndim
        grouped = np.moveaxis(w, 1, -1).reshape(-1, 4)  # (out, [kh, kw,] in) -> groups of 4 input channels
        assert (np.count_nonzero(grouped, axis=1) <= 2).all(), name
        assert np.count_nonzero(w) <= w.size // 2
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["source"]["nm"]) == sorted(targets)
    # baked: 2:4 in the callback's targets and the stage-1 slim channels; the fine-tune kept no unstructured masks
    baked = _baked_section(out)
    assert f"N:M masks: 2:4 in {len(targets)} weights" in baked and "Slimmed channels" in baked, baked
    assert "Unstructured" not in baked
    _check_compact(out, x)
    # exporting the exported model.pt again reads what it baked back from its meta
    again = export_checkpoint(str(out / "model.pt"), out=str(tmp_path / "again"), no_bench=True)
    assert json.loads((again / "report.json").read_text())["baked"] == report["baked"]


def test_export_dense_digits_run_records_preprocessing(plain_runs, tmp_path):
    """A dense run: nothing baked; its DigitsDataModule's preprocessing (from config.yaml) is in model.pt and the
    report, and applying it to raw digits gives exactly the tensors the DataModule trains on."""
    from sklearn.datasets import load_digits

    from lightning_sparse.data import DigitsDataModule

    out = export_checkpoint(str(plain_runs["dense"]), out=str(tmp_path / "d"), no_bench=True)  # size from config.yaml
    assert _baked_section(out).strip() == "- Nothing baked: dense weights, every channel kept."
    pre = torch.load(out / "model.pt", weights_only=True)["meta"]["preprocessing"]
    report = json.loads((out / "report.json").read_text())
    assert report["preprocessing"] == pre and report["source"]["image_size"] == SIZE
    assert pre["input_size"] == [1, SIZE, SIZE] and pre["interpolation"] == "bilinear" and pre["crop"] is None
    raw = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1)
    x = torch.nn.functional.interpolate(raw / pre["scale"], size=pre["resize"], mode=pre["interpolation"],
                                        align_corners=False)
    x = (x - pre["mean"][0]) / pre["std"][0]
    dm = DigitsDataModule(image_size=SIZE, split_seed=3, val_fraction=0.2)
    dm.setup()
    perm = torch.randperm(len(raw), generator=torch.Generator().manual_seed(3))
    n_test = int(len(raw) * 0.15)
    val_idx = perm[n_test: n_test + int(len(raw) * 0.2)]
    torch.testing.assert_close(x[val_idx], dm.val_set.tensors[0], rtol=0, atol=1e-6)
    md = (out / "report.md").read_text()
    assert (f"From lightning_sparse.data.DigitsDataModule (the run's config.yaml): gray image; pixel values / 16; "
            f"resize (shorter side) to {SIZE}, bilinear; then (x - mean) / std") in md
    # a dense model has no sparse tensor worth packing: the compact file is model.pt's size
    _check_compact(out, _batch())
    sizes = report["files"]["bytes"]
    assert 0.95 < sizes["model_sparse.pt"] / sizes["model.pt"] < 1.05


def test_export_srste_run_reports_only_nm(plain_runs, tmp_path):
    out = export_checkpoint(str(plain_runs["srste"]), out=str(tmp_path / "d"), image_size=SIZE, no_bench=True)
    state = torch.load(plain_runs["srste"], map_location="cpu", weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("NMSparsity")]
    baked = _baked_section(out)
    n_targets = len(state["callbacks"][key]["targets"])
    assert baked.strip() == f"- N:M masks: 2:4 in {n_targets} weights (exact zeros in the stored weights)."
    x = _batch()
    ref, _ = _lightning_logits(plain_runs["srste"], x, nm=NMSparsity(n=2, m=4))
    with torch.no_grad():
        torch.testing.assert_close(load_compact(out / "model_sparse.pt")(x), ref, atol=1e-5, rtol=0)
    _check_compact(out, x)
    sizes = json.loads((out / "report.json").read_text())["files"]["bytes"]
    assert sizes["model_sparse.pt"] < sizes["model.pt"]  # 2:4 weights at 2.125 of 4 bytes each (fc, stem dense)


def test_pack_tensor_is_bitwise_and_only_when_smaller(tmp_path):
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        w = torch.randn(7, 5, 3, generator=g).to(dtype)
        w[torch.rand(w.shape, generator=g) < 0.8] = 0.0
        w[0, 0, 0], w[1, 1, 1], w[2, 2, 2] = -0.0, float("nan"), float("-inf")
        packed = pack_tensor(w)
        assert isinstance(packed, dict) and packed["values"].dtype == dtype
        back = unpack_tensor(packed)
        assert back.dtype == dtype and back.shape == w.shape
        assert torch.equal(back.view(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)), dtype
    dense = torch.randn(4, 4, generator=g)
    assert torch.equal(pack_tensor(dense), dense)  # nothing to gain: stored as is
    steps = torch.tensor(3)
    assert torch.equal(pack_tensor(steps), steps)  # BatchNorm's num_batches_tracked
    assert torch.equal(unpack_tensor(pack_tensor(torch.zeros(3, 9))), torch.zeros(3, 9))
    torch.save({"format": "lightning_sparse.slim/1"}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="is not a compact export"):
        load_compact(tmp_path / "model.pt")


@pytest.mark.slow
def test_export_chase_run_that_never_slimmed(tmp_path):
    """slim="never" keeps removed channels as zeros during training; the export removes them."""
    pl.seed_everything(0)
    module = ImageClassifier(ARCH, num_classes=10, in_chans=1, lr=0.05)
    chase = Chase(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1, stop_gmp_epochs=2,
                  stop_dst_epochs=1, update_interval=4, slim="never", input_shape=(1, SIZE, SIZE))
    t = trainer(tmp_path, 9, [chase], max_epochs=3)
    t.fit(module, fixed_loader(n=48, image_size=SIZE))
    t.save_checkpoint(tmp_path / "never.ckpt")
    out = export_checkpoint(str(tmp_path / "never.ckpt"), out=str(tmp_path / "d"), image_size=SIZE, no_bench=True)
    x = _batch()
    ref, dense_shaped = _lightning_logits(tmp_path / "never.ckpt", x)
    graph = _check_onnx(out, ref, x)
    removed = {k.removeprefix("model."): len(v) for k, v in chase.removed.items() if v}
    assert removed
    want = {n: m.out_channels - removed.get(n, 0) for n, m in dense_shaped.named_modules() if isinstance(m, nn.Conv2d)}
    assert _conv_out_channels(graph) == want


@pytest.mark.slow
def test_export_report_times_dense_and_exported(slim_file, tmp_path):
    """With timing (and --overwrite of an existing folder): eager and onnxruntime rows, dense vs exported."""
    out = tmp_path / "d"
    out.mkdir()
    (out / "old.txt").write_text("old")
    main([str(slim_file), "--out", str(out), "--batch-size", "4", "--reps", "2", "--warmup", "0", "--threads", "1",
          "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt", "model_sparse.pt", "report.json", "report.md"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    bench = json.loads((out / "report.json").read_text())["benchmark"]
    rows = {(r["runtime"], r["model"]): r for r in bench["rows"]}
    assert sorted(rows) == [("eager", "dense"), ("eager", "exported"), ("onnxruntime", "dense"),
                            ("onnxruntime", "exported")]
    for runtime in ("eager", "onnxruntime"):
        d, e = rows[(runtime, "dense")], rows[(runtime, "exported")]
        assert e["throughput"] == pytest.approx(4e3 / bench["median_ms"][f"{runtime}/exported/batch4"])
        assert e["throughput_speedup"] == pytest.approx(e["throughput"] / d["throughput"])
        assert e["latency_speedup"] == pytest.approx(d["latency_ms"] / e["latency_ms"])
    assert "| onnxruntime | exported |" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------------------ bad inputs
def test_export_bad_inputs(runs, slim_file, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        export_checkpoint(str(tmp_path / "missing.ckpt"), out=str(tmp_path / "o1"))
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.ckpt' is not a readable checkpoint: not a torch.save zip file"):
        export_checkpoint(str(text), out=str(tmp_path / "o2"))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.ones(2)}, other)
    with pytest.raises(ValueError, match="neither a Lightning checkpoint nor a slim export"):
        export_checkpoint(str(other), out=str(tmp_path / "o3"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty; pass --overwrite"):
        export_checkpoint(str(slim_file), out=str(busy), no_bench=True)
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        export_checkpoint(str(slim_file), out=str(tmp_path / "o4"), batch_size=0)
    with pytest.raises(ValueError, match="cannot tell the input size"):  # a bare checkpoint: no config.yaml
        export_checkpoint(str(runs["chase"]), out=str(tmp_path / "o5"), no_bench=True)


def test_failed_export_leaves_no_folder(slim_file, tmp_path, monkeypatch):
    """An export that fails after it started writing leaves neither ``out`` nor a partial folder."""
    import lightning_sparse.export.exporter as exporter

    def fail(*args, **kwargs):
        assert len(list(tmp_path.glob(".deploy.*.partial/model.pt"))) == 1  # model.pt was already written
        raise RuntimeError("injected failure")

    monkeypatch.setattr(exporter, "fold_batchnorm", fail)
    with pytest.raises(RuntimeError, match="injected failure"):
        export_checkpoint(str(slim_file), out=str(tmp_path / "deploy"), no_bench=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_parity_failure_leaves_no_folder(slim_file, tmp_path):
    """A real parity failure (tolerance below float32 rounding) is a clear error and writes nothing."""
    with pytest.raises(ParityError, match="onnxruntime logits differ from PyTorch"):
        export_checkpoint(str(slim_file), out=str(tmp_path / "deploy"), no_bench=True, atol=1e-12)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------- BatchNorm folding
def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(0.5 * torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def _vgg_like() -> nn.Module:
    layers, c = [], 3
    for width in (16, 32, "M", 64, 64, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg_like"])
def test_fold_batchnorm_keeps_logits(name):
    model = _vgg_like() if name == "vgg_like" else timm.create_model(name, num_classes=10)
    model = _randomise_bn(model)
    x = torch.randn(2, 3, 32, 32)
    folded = fold_batchnorm(model, x)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert n_bn > 0 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert type(folded) is type(model) and any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():
        ref = model(x)
        assert (folded(x) - ref).abs().max().item() <= 1e-4


class _PreAct(nn.Module):
    """BatchNorm before the conv (pre-activation) and a conv output read by two consumers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pre, self.conv1 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv0(x)
        return self.conv1(torch.relu(self.pre(self.bn0(y) + y)))


def test_fold_batchnorm_errors_name_the_layers():
    model = _randomise_bn(_PreAct())
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(CannotFoldError, match=re.escape("bn0 (the output of 'conv0' is also read by another operation)")):
        fold_batchnorm(model, x)
    with pytest.raises(CannotFoldError, match=re.escape("pre (its input is not the output of a Conv2d)")):
        fold_batchnorm(model, x)
    loose = fold_batchnorm(model, x, strict=False)
    assert sorted(loose.folded_batchnorm.unfoldable) == ["bn0", "pre"]
    with torch.no_grad():
        torch.testing.assert_close(loose(x), model(x))


def test_make_runner_eager_and_onnxruntime(tmp_path):
    model = _randomise_bn(timm.create_model("resnet10t", num_classes=5, in_chans=1))
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
    eager = make_runner(model, x, "eager", threads=1)()
    onnx_out = make_runner(model, x, "onnxruntime", tmp_path, threads=1)()[0]
    assert (eager - ref).abs().max().item() <= 1e-4 and eager.is_contiguous(memory_format=torch.contiguous_format)
    assert np.abs(onnx_out - ref.numpy()).max() <= 1e-3
    assert (tmp_path / "model.onnx").is_file()
    with pytest.raises(ValueError, match="runtime='tensorrt' is not supported; choose one of"):
        make_runner(model, x, "tensorrt")
    with pytest.raises(ValueError, match="needs a workdir"):
        make_runner(model, x, "onnxruntime")


# ------------------------------------------------------------------------------------- optional onnx
def test_package_imports_without_onnx():
    """``import lightning_sparse`` and the 2:4 benchmark need torch and timm only; the export says what is missing."""
    code = (
        "import sys\n"
        "for m in ('onnx', 'onnxruntime', 'onnxscript'): sys.modules[m] = None\n"
        "import lightning_sparse, lightning_sparse.semi_structured, lightning_sparse.benchmark\n"
        "import lightning_sparse.export as ex, torch, timm\n"
        "assert not [m for m in ('onnx', 'onnxruntime', 'onnxscript') if sys.modules.get(m) is not None]\n"
        "try:\n"
        "    ex.export_onnx(timm.create_model('resnet10t', num_classes=2), torch.randn(1, 3, 16, 16), 'x.onnx')\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ONNX export needs 'onnx'" in proc.stdout and "pip install -r requirements.txt" in proc.stdout


def test_export_page_shows_the_tested_load_snippet():
    readme = (ROOT / "docs" / "export.md").read_text()
    assert "## Export for deployment" in readme
    assert LOAD_SNIPPET in readme
