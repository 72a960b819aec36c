"""SADTracker on a foreign LightningModule: mask_fn and MaskSource callbacks, merged sources, shape
changes, DST and Chase, bad inputs."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from helpers.logs import capture_lightning_info, info_lines
from helpers.sad import FakeMaskSource, digits_loader, topk_masks
from helpers.training import fixed_loader
from helpers.training import trainer as make_trainer
from lightning_sparse.callbacks import SADTracker
from lightning_sparse.sparsity.sad import sad

# --------------------------------------------------------------------------------------- measuring


def test_mask_fn_topk_on_foreign_module(tiny_net: pl.LightningModule, digits_small: Any, tmp_path: Path) -> None:
    tracker = SADTracker(interval=2, mask_fn=topk_masks)
    make_trainer(tmp_path, callbacks=[tracker], max_epochs=2).fit(tiny_net, digits_loader(digits_small))
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
    make_trainer(tmp_path, callbacks=[source, tracker], max_epochs=1).fit(tiny_net, digits_loader(digits_small))
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
    make_trainer(tmp_path, callbacks=[tracker], max_epochs=1, accumulate_grad_batches=2).fit(
        tiny_net, digits_loader(digits_small))
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


def test_shape_change_resets_that_layer(tiny_net: pl.LightningModule, caplog: pytest.LogCaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
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
    capture_lightning_info(caplog, monkeypatch)
    tracker._run_measure(trainer, tiny_net)
    assert info_lines(caplog, "SADTracker: step") == [
        "SADTracker: step 1: 1 mask(s) changed shape (channels removed), their initial/previous references restart "
        "from the new masks: a (8, 4) -> (5, 4)."]
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

    from lightning_sparse.callbacks import DynamicSparsity

    dst = DynamicSparsity(density=0.3, growth="random", update_interval=3, stop_step=100)
    tracker = SADTracker(interval=1)
    make_trainer(tmp_path, 9, [dst, tracker]).fit(tiny_net, fixed_loader())
    h = tracker.history
    moved = [step for step, s in zip(h["step"], h["sad"]) if s > 0]
    assert moved == [0, 3, 6]  # updates at 3 of the 9 steps, from step 0, 3 steps apart
    assert set(h["layer_density"]) == set(dst.masks)
    assert max(h["density"]) - min(h["density"]) < 1e-9  # DST keeps every layer's count


def test_with_chase_slimming_resets_and_channels(tiny_net: pl.LightningModule, tmp_path: Path) -> None:
    """Chase removes channels (masks change shape): references reset, channel history is recorded."""

    from lightning_sparse.callbacks import Chase

    chase = Chase(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1,
                  stop_gmp_epochs=2, stop_dst_epochs=1, update_interval=4, input_shape=(1, 8, 8))
    tracker = SADTracker(interval=2)
    snaps = {}

    class Snap(pl.Callback):  # the masks at each measurement, recorded independently of the tracker
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snaps[trainer.global_step] = {k: v.clone() for k, v in chase.masks.items()}

    make_trainer(tmp_path, 18, [chase, tracker, Snap()], max_epochs=3).fit(tiny_net, fixed_loader())
    h = tracker.history
    assert h["resets"], "slimming changes mask shapes"
    channels = h["channels"]
    assert channels and set(channels) >= set(chase.active_channels())
    assert sum(v[-1] for v in channels.values()) < sum(v[0] for v in channels.values())
    assert len(h["step"]) == 9 and h["step"][-2:] == [14, 16]  # after optimizer steps 0, 2, ..., 16 of 0..17
    # the point at 16 is the masks after step 16 (global_step 17 at its batch end) vs after step 14
    assert h["sad"][-1] == sum(int((snaps[17][k] ^ snaps[15][k]).sum()) for k in snaps[17])


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
        make_trainer(tmp_path, callbacks=[SADTracker(interval=1)], max_epochs=2).fit(tiny_net, digits_loader(digits_small))


# ------------------------------------------------------------------------------ SR-STE paper finding
