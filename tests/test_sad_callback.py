"""SADTracker on a foreign LightningModule: mask_fn and MaskSource callbacks, resume, figures, W&B, memory."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader, Subset

from lightning_sparse.callbacks import SADTracker
from lightning_sparse.sparsity.sad import packed_nbytes, sad


def topk_masks(module: pl.LightningModule, density: float = 0.5) -> dict[str, torch.Tensor]:
    """Magnitude top-k mask of every conv weight: changes as the weights train."""
    masks = {}
    for name, p in module.named_parameters():
        if p.dim() == 4:
            k = max(1, int(density * p.numel()))
            idx = p.detach().abs().flatten().topk(k).indices
            masks[name] = torch.zeros(p.numel(), dtype=torch.bool).index_fill_(0, idx, True).view_as(p)
    return masks


class FakeMaskSource(pl.Callback):
    """Explicit masks; every step moves ``swap`` kept positions of each layer elsewhere (seeded)."""

    def __init__(self, density: float = 0.5, swap: int = 3, channels: bool = False) -> None:
        self.density, self.swap, self.channels = density, swap, channels
        self.masks: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator().manual_seed(0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, p in pl_module.named_parameters():
            if p.dim() > 1:
                self.masks[name] = torch.rand(p.shape, generator=self.gen) < self.density

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        for name, m in self.masks.items():
            flat = m.view(-1)
            on, off = flat.nonzero().flatten(), (~flat).nonzero().flatten()
            drop = on[torch.randperm(len(on), generator=self.gen)[: self.swap]]
            grow = off[torch.randperm(len(off), generator=self.gen)[: self.swap]]
            flat[drop], flat[grow] = False, True

    def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return dict(self.masks)

    def active_channels(self, pl_module: pl.LightningModule) -> dict[str, int]:
        if not self.channels:
            return {}
        return {n.removesuffix(".weight"): int(m.flatten(1).any(1).sum()) for n, m in self.masks.items()}


def _loader(dm: Any, n: int = 128) -> DataLoader:
    """Fixed order (no shuffle) so that a resumed run sees the same batches as an uninterrupted one."""
    return DataLoader(Subset(dm.train_set, range(n)), batch_size=32, shuffle=False)


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], max_epochs: int = 2, **kw: Any) -> pl.Trainer:
    kw.setdefault("logger", False)
    return pl.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, default_root_dir=tmp_path, accelerator="cpu", devices=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kw,
    )


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


# --------------------------------------------------------------------------------------- measuring


def test_mask_fn_topk_on_foreign_module(tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path) -> None:
    tracker = SADTracker(interval=2, mask_fn=topk_masks)
    _trainer(tmp_path, [tracker]).fit(tiny_net, _loader(digits_small))
    h = tracker.history
    # 4 batches x 2 epochs = optimizer steps 0..7, measured after steps 0, 2, 4, 6 (the initial masks are the
    # reference the first point is compared with)
    assert h["step"] == [0, 2, 4, 6]
    assert h["sad"][0] == h["sad_vs_init"][0]  # the first point is compared with the initial masks
    assert sum(h["sad"][1:]) > 0, "top-k masks of training weights must move"
    assert h["cumulative"] == [sum(h["sad"][: i + 1]) for i in range(len(h["sad"]))]
    # the recorded SAD vs init equals a direct computation on the final masks
    final = topk_masks(tiny_net)
    assert set(h["layer_density"]) == set(final) == {"stem.weight", "body.0.weight", "body.3.weight"}
    total = sum(m.numel() for m in final.values())
    assert h["sad_norm"] == pytest.approx([s / total for s in h["sad"]])
    assert h["density"] == pytest.approx([sum(int(0.5 * m.numel()) for m in final.values()) / total] * 4)
    last = tracker.collect_masks(tiny_net)
    assert sum(sad(last[n], final[n]) for n in final) == 0


def test_mask_source_callback_is_found(tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path) -> None:
    source = FakeMaskSource(swap=3)
    tracker = SADTracker(interval=1)
    _trainer(tmp_path, [source, tracker], max_epochs=1).fit(tiny_net, _loader(digits_small))
    h = tracker.history
    n_layers = len(source.masks)  # stem, body.0, body.3, head
    assert h["step"] == [0, 1, 2, 3]
    # every step moves 3 kept weights per layer: 3 drops + 3 grows = 6 differing positions per layer
    assert h["sad"] == [6 * n_layers] * 4
    assert h["layer_sad"]["head.weight"] == [6, 6, 6, 6]
    assert 0 < h["sad_vs_init"][-1] <= 4 * 6 * n_layers
    assert h["channels"] == {}


def test_interval_counts_optimizer_steps_with_accumulation(
    tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path
) -> None:
    tracker = SADTracker(interval=1, mask_fn=topk_masks)
    _trainer(tmp_path, [tracker], max_epochs=1, accumulate_grad_batches=2).fit(tiny_net, _loader(digits_small))
    assert tracker.history["step"] == [0, 1]  # 4 batches, 2 optimizer steps, one measurement each


def test_several_sources_are_merged_with_and(tiny_net: pl.LightningModule) -> None:
    class Source:
        def __init__(self, masks: dict[str, torch.Tensor]) -> None:
            self.masks = masks

        def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
            return self.masks

    a = Source({"x": torch.tensor([True, True, False]), "y": torch.tensor([True])})
    b = Source({"x": torch.tensor([True, False, False]), "z": torch.tensor([False])})
    tracker = SADTracker(interval=1)
    tracker.setup(SimpleNamespace(callbacks=[a, tracker, b], strategy=None), tiny_net, "fit")
    merged = tracker.collect_masks(tiny_net)
    assert merged.keys() == {"x", "y", "z"}
    assert merged["x"].tolist() == [True, False, False]


def test_sources_disagreeing_on_shape(tiny_net: pl.LightningModule) -> None:
    class Source:
        def __init__(self, n: int) -> None:
            self.n = n

        def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
            return {"x": torch.ones(self.n, dtype=torch.bool)}

    tracker = SADTracker(interval=1)
    tracker.setup(SimpleNamespace(callbacks=[Source(2), Source(3)], strategy=None), tiny_net, "fit")
    with pytest.raises(ValueError, match=r"Mask sources disagree on the shape of 'x': \(2,\) vs \(3,\)"):
        tracker.collect_masks(tiny_net)


def test_mask_fn_must_return_bool(tiny_net: pl.LightningModule) -> None:
    tracker = SADTracker(interval=1, mask_fn=lambda m: {"stem.weight": m.stem.weight.detach()})
    with pytest.raises(TypeError, match="mask_fn returned a mask for 'stem.weight' that is not a torch.bool"):
        tracker.collect_masks(tiny_net)


def test_shape_change_resets_that_layer(tiny_net: pl.LightningModule) -> None:
    """A layer slimmed mid-run (Chase) restarts its references; other layers keep theirs."""
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(8, 4, generator=g) > 0.5, "b": torch.rand(6, generator=g) > 0.5}
    tracker = SADTracker(interval=1, mask_fn=lambda _: masks)
    trainer = SimpleNamespace(global_step=0, loggers=[])
    tracker._run_measure(trainer, tiny_net)
    init_b = masks["b"].clone()
    masks["a"] = masks["a"][:5].clone()  # 3 output channels removed
    masks["b"] = ~masks["b"]
    trainer.global_step = 1
    with pytest.warns(UserWarning, match=r"mask of 'a' changed shape \(8, 4\) -> \(5, 4\) at step 1"):
        tracker._run_measure(trainer, tiny_net)
    h = tracker.history
    assert h["layer_sad"]["a"] == [0, 0] and h["layer_sad"]["b"] == [0, 6]
    assert h["resets"] == [[1, "a"]]
    assert h["sad_norm"][-1] == pytest.approx(6 / (20 + 6))  # normalised by the new total size
    masks["a"] = ~masks["a"]
    trainer.global_step = 2
    tracker._run_measure(trainer, tiny_net)
    assert h["layer_sad"]["a"][-1] == 20 and h["sad_vs_init"][-1] == 20 + sad(masks["b"], init_b)
    del masks["b"]  # a vanished layer is dropped, a new one starts from zero
    masks["c"] = torch.ones(3, dtype=torch.bool)
    trainer.global_step = 3
    tracker._run_measure(trainer, tiny_net)
    assert math.isnan(h["layer_density"]["b"][-1])
    assert h["layer_density"]["c"][-1] == 1.0 and all(math.isnan(v) for v in h["layer_density"]["c"][:3])
    assert h["layer_sad"]["c"][-1] == 0 and set(tracker.state_dict()["prev"]) == {"a", "c"}


def test_with_dynamic_sparsity(tiny_net: pl.LightningModule, tmp_path: Path) -> None:
    """Real explicit masks: SAD moves once per DST update (every 3 steps), density stays constant."""
    from helpers.training import fixed_loader, trainer

    from lightning_sparse.callbacks import DynamicSparsity

    dst = DynamicSparsity(density=0.3, growth="random", update_interval=3, stop_step=100)
    tracker = SADTracker(interval=1)
    trainer(tmp_path, 9, [dst, tracker]).fit(tiny_net, fixed_loader())
    h = tracker.history
    moved = [step for step, s in zip(h["step"], h["sad"]) if s > 0]
    assert moved == [0, 3, 6]  # updates at 3 of the 9 steps, from step 0, 3 steps apart
    assert set(h["layer_density"]) == set(dst.masks)
    assert max(h["density"]) - min(h["density"]) < 1e-9  # DST keeps every layer's count


def test_with_chase_slimming_resets_and_channels(tiny_net: pl.LightningModule, tmp_path: Path) -> None:
    """Chase removes channels (masks change shape): references reset, channel history is recorded."""
    from helpers.training import fixed_loader, trainer

    from lightning_sparse.callbacks import Chase

    chase = Chase(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1,
                  stop_gmp_epochs=2, stop_dst_epochs=1, update_interval=4, input_shape=(1, 8, 8))
    tracker = SADTracker(interval=2)
    snaps = {}

    class Snap(pl.Callback):  # the masks at each measurement, recorded independently of the tracker
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snaps[trainer.global_step] = {k: v.clone() for k, v in chase.masks.items()}

    with pytest.warns(UserWarning, match="changed shape"):
        trainer(tmp_path, 18, [chase, tracker, Snap()], max_epochs=3).fit(tiny_net, fixed_loader())
    h = tracker.history
    assert h["resets"], "slimming changes mask shapes"
    channels = h["channels"]
    assert channels and set(channels) >= set(chase.active_channels())
    assert sum(v[-1] for v in channels.values()) < sum(v[0] for v in channels.values())
    assert len(h["step"]) == 9 and h["step"][-2:] == [14, 16]  # after optimizer steps 0, 2, ..., 16 of 0..17
    # the point at 16 is the masks after step 16 (global_step 17 at its batch end) vs after step 14
    assert h["sad"][-1] == sum(int((snaps[17][k] ^ snaps[15][k]).sum()) for k in snaps[17])


# ------------------------------------------------------------------------------------------ resume


def test_resume_continues_curves_exactly(tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path) -> None:
    loader = _loader(digits_small)
    full = SADTracker(interval=3, mask_fn=topk_masks)
    _trainer(tmp_path / "full", [full], max_epochs=4).fit(tiny_net, loader)

    pl.seed_everything(0)
    first = SADTracker(interval=3, mask_fn=topk_masks)
    trainer = _trainer(tmp_path / "a", [first], max_epochs=2)
    trainer.fit(type(tiny_net)(), loader)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first.history["step"] == [0, 3, 6]

    pl.seed_everything(1)  # a different fresh init: everything must come from the checkpoint
    resumed = SADTracker(interval=3, mask_fn=topk_masks)
    _trainer(tmp_path / "b", [resumed], max_epochs=4).fit(type(tiny_net)(), loader, ckpt_path=ckpt)

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
    _trainer(tmp_path, [source, tracker], logger=logger).fit(tiny_net, _loader(digits_small))
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
    pl.Trainer(fast_dev_run=2, callbacks=[tracker], accelerator="cpu", enable_progress_bar=False,
               enable_model_summary=False).fit(tiny_net, _loader(digits_small))
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
        _trainer(tmp_path, [tracker], max_epochs=1, logger=logger).fit(tiny_net, _loader(digits_small))
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


# ------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("interval", [0, -3, 1.5, True])
def test_bad_interval(interval: Any) -> None:
    with pytest.raises(ValueError, match=r"`interval` \(optimizer steps\) must be an int >= 1, got interval="):
        SADTracker(interval=interval)


def test_bad_mask_fn() -> None:
    with pytest.raises(ValueError, match="`mask_fn` must be None or a callable pl_module -> dict"):
        SADTracker(mask_fn="topk")


@pytest.mark.parametrize("n", [0, 2.0])
def test_bad_plot_every_n_epochs(n: Any) -> None:
    with pytest.raises(ValueError, match=r"`plot_every_n_epochs` must be None .* or an int >= 1, got"):
        SADTracker(plot_every_n_epochs=n)


def test_bad_per_layer() -> None:
    with pytest.raises(ValueError, match="`per_layer` must be True or False, got per_layer='yes'"):
        SADTracker(per_layer="yes")


def test_no_mask_source(tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path) -> None:
    msg = (r"SADTracker found no mask source on trainer.callbacks .*'DynamicSparsity', 'Chase', 'NMSparsity'.*"
           r"`current_masks\(pl_module\)`.*`mask_fn=`")
    with pytest.raises(ValueError, match=msg):
        _trainer(tmp_path, [SADTracker(interval=1)]).fit(tiny_net, _loader(digits_small))


# ------------------------------------------------------------------------------ SR-STE paper finding


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
