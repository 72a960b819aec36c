"""What SADTracker keeps and writes: resume, state dict, figures, W&B history, reference memory, and the
SR-STE finding."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from helpers.sad import FakeMaskSource, digits_loader, topk_masks
from helpers.training import trainer as make_trainer
from lightning_sparse.callbacks import SADTracker
from lightning_sparse.sparsity.sad import packed_nbytes


def _history_close(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "meta":  # run label and method: the runs write to different folders
            continue
        if isinstance(a[key], dict):
            assert a[key].keys() == b[key].keys(), key
            for name in a[key]:
                assert a[key][name] == pytest.approx(b[key][name], nan_ok=True), (key, name)
        else:
            assert a[key] == pytest.approx(b[key]) if key != "resets" else a[key] == b[key], key




def test_resume_continues_curves_exactly(tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path) -> None:
    loader = digits_loader(digits_small)
    full = SADTracker(interval=3, mask_fn=topk_masks)
    make_trainer(tmp_path / "full", callbacks=[full], max_epochs=4).fit(tiny_net, loader)

    pl.seed_everything(0)
    first = SADTracker(interval=3, mask_fn=topk_masks)
    trainer = make_trainer(tmp_path / "a", callbacks=[first], max_epochs=2)
    trainer.fit(type(tiny_net)(), loader)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.history["step"] == [0, 3, 6]

    pl.seed_everything(1)  # a different fresh init: everything must come from the checkpoint
    resumed = SADTracker(interval=3, mask_fn=topk_masks)
    make_trainer(tmp_path / "b", callbacks=[resumed], max_epochs=4).fit(type(tiny_net)(), loader, ckpt_path=ckpt)

    assert full.history["step"] == [0, 3, 6, 9, 12, 15]
    assert sum(full.history["sad"][3:]) > 0  # the comparison covers steps where masks moved
    _history_close(resumed.history, full.history)
    assert resumed.state_dict()["cumulative"] == full.state_dict()["cumulative"]


def test_state_dict_round_trip() -> None:
    masks = {"w": torch.rand(10, 10) > 0.5}
    a = SADTracker(interval=1, mask_fn=lambda _: masks)
    trainer = SimpleNamespace(global_step=0, loggers=[])
    a._run_measure(trainer, None)
    masks["w"] = torch.rand(10, 10) > 0.5
    trainer.global_step = 1
    a._run_measure(trainer, None)
    b = SADTracker(interval=1, mask_fn=lambda _: masks)
    b.load_state_dict(a.state_dict())
    masks["w"] = ~masks["w"]
    for t in (a, b):
        trainer.global_step = 2
        t._run_measure(trainer, None)
    assert a.history == b.history and a.history["sad"][-1] == 100
    assert a.state_key == b.state_key == "SADTracker{'interval': 1, 'per_layer': True}"


# -------------------------------------------------------------------------------------- figures/W&B


def test_figures_are_valid_pngs(tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.image as mpimg
    from PIL import Image

    import lightning_sparse.plots as plots

    calls = []
    real = plots.save_figures
    monkeypatch.setattr(plots, "save_figures", lambda h, d: calls.append(d) or real(h, d))
    source = FakeMaskSource(swap=2, channels=True)
    tracker = SADTracker(interval=2, plot_every_n_epochs=1)
    logger = CSVLogger(tmp_path, name="run")
    make_trainer(tmp_path, callbacks=[source, tracker], max_epochs=2, logger=logger).fit(tiny_net, digits_loader(digits_small))
    fig_dir = Path(logger.log_dir) / "figures"
    assert len(calls) == 3 and all(Path(d) == fig_dir for d in calls)  # epoch 1, epoch 2, end of fit
    names = sorted(p.name for p in fig_dir.iterdir())
    # every layer keeps its count (the source swaps positions): no heatmap, the per-layer bars instead
    assert names == ["active_channels.png", "layer_density.png", "sad.png"]
    for path in fig_dir.iterdir():
        with Image.open(path) as im:
            im.verify()
        assert mpimg.imread(path).ndim == 3
    assert set(tracker.history["channels"]) == {"stem", "body.0", "body.3", "head"}
    # the CSV logger received the sad/* history at the measured steps
    text = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "sad/global" in text and "sad/stem.weight" in text and "sparsity/" not in text


def _wandb_history(path: Path) -> list[dict[str, Any]]:
    """History rows of an offline ``.wandb`` file (LevelDB log format: 7-byte W&B header, 32 KiB blocks of
    ``crc(4) length(2) type(1) data`` chunks, type 1 full / 2 first / 3 middle / 4 last) as dicts."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, chunk, rows, block = path.read_bytes(), 7, b"", [], 32768
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        chunk = data if kind in (1, 2) else chunk + data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_fast_dev_run_writes_no_figures(tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = SADTracker(interval=1, mask_fn=topk_masks)
    make_trainer(None, callbacks=[tracker], fast_dev_run=2, logger=True, enable_checkpointing=True).fit(
        tiny_net, digits_loader(digits_small))
    assert tracker.history["step"] == [0, 1]
    assert not list(tmp_path.rglob("*.png"))


def test_wandb_offline_run_holds_sad_history(tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    from lightning_sparse.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(mode="offline", save_dir=str(tmp_path), name="sad-test", project="lightning_sparse")
    tracker = SADTracker(interval=2, mask_fn=topk_masks)
    try:
        make_trainer(tmp_path, callbacks=[tracker], max_epochs=1, logger=logger).fit(tiny_net, digits_loader(digits_small))
    finally:
        wandb.finish()
        wandb.teardown()  # stops the wandb-core service: the offline .wandb file is flushed and closed
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = list(runs[0].glob("*.wandb"))
    data = files[0].read_bytes()
    for key in (b"sad/global", b"sad/global_vs_init", b"sad/cumulative", b"sparsity/global"):
        assert key in data
    logged = {row["trainer/global_step"]: row for row in _wandb_history(files[0]) if "sad/global" in row}
    h = tracker.history
    assert sorted(logged) == h["step"] == [0, 2]
    assert [logged[s]["sad/global"] for s in h["step"]] == h["sad"]
    assert [logged[s]["sad/global_vs_init_norm"] for s in h["step"]] == pytest.approx(h["sad_vs_init_norm"])
    # with mask_fn the tracker also logs sparsity (pruned fraction) like the mask-source callbacks do
    assert [logged[s]["sparsity/global"] for s in h["step"]] == pytest.approx([1 - d for d in h["density"]])
    images = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert {p.name.split("_")[0] for p in images} >= {"sad", "layer"}


# ---------------------------------------------------------------------------------------- memory


def test_resnet50_references_fit_in_8_mb() -> None:
    timm = pytest.importorskip("timm")
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in timm.create_model("resnet50").named_parameters() if p.dim() > 1}
    numel = sum(s.numel() for s in shapes.values())
    assert numel > 25_000_000
    g = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(s, generator=g) < 0.2 for n, s in shapes.items()}
    tracker = SADTracker(interval=1, mask_fn=lambda _: masks)
    trainer = SimpleNamespace(global_step=0, loggers=[])
    tracker._run_measure(trainer, None)
    for n in masks:  # the masks move: initial and previous references now differ
        masks[n] = masks[n].roll(1, 0) if masks[n].shape[0] > 1 else ~masks[n]
    trainer.global_step = 1
    tracker._run_measure(trainer, None)
    held = tracker.reference_nbytes()
    per_mask = sum(packed_nbytes(s.numel()) for s in shapes.values())
    assert held == 2 * per_mask  # initial + previous, packed 8 per byte, nothing else
    assert held <= 8 * 2**20, f"{held / 2**20:.2f} MB"
    assert sum(v.numel() for v in tracker.state_dict()["prev"].values()) == per_mask




@pytest.mark.slow
def test_srste_ends_with_lower_sad_than_ste(tmp_path: Path) -> None:
    """SR-STE paper (arXiv 2102.04010, Sec. 4): with the same seed and schedule, SR-STE's N:M masks
    move less at the end of training than vanilla STE's (lower last-epoch step-to-step SAD)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sad_srste_vs_ste.py"
    spec = importlib.util.spec_from_file_location("sad_srste_vs_ste", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    results = bench.compare(epochs=3, image_size=16, interval=5, decay=0.1, out_dir=str(tmp_path))
    srste, ste = results["srste"], results["ste"]
    assert srste["steps"] == ste["steps"] and srste["history"]["step"] == ste["history"]["step"]
    assert ste["last_epoch_sad_norm"] > 0, "vanilla STE masks must still move in the last epoch"
    assert results["ratio"] < 1.0, results["ratio"]
    assert min(srste["val_acc"], ste["val_acc"]) > 0.3  # both trained (10 classes: chance is 0.1)
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "srste" / "figures" / "sad.png").shape[:2] > (100, 100)
