"""Under ``fast_dev_run`` each callback compresses its schedule and runs every mechanism once (one info line),
instead of refusing a schedule written for the full run or silently doing nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl

from helpers.training import fixed_loader
from helpers.training import trainer as make_trainer
from lightning_sparse.callbacks import Chase, DynamicSparsity, NMSparsity, SADTracker


def _smoke(tmp_path: Path, callbacks: list[pl.Callback], module: pl.LightningModule, n: int = 2) -> pl.Trainer:
    trainer = make_trainer(tmp_path, callbacks=callbacks, fast_dev_run=n, logger=True, enable_checkpointing=True)
    trainer.fit(module, fixed_loader())
    return trainer


@pytest.fixture
def info_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    """Lightning's rank-zero info lines (its loggers do not propagate to the root logger by default)."""
    for name in ("lightning_fabric", "pytorch_lightning"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.INFO)
    return caplog


def _info(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


def test_dst_updates_once_with_a_full_run_schedule(tiny_net: pl.LightningModule, tmp_path: Path,
                                                   info_log: pytest.LogCaptureFixture) -> None:
    dst = DynamicSparsity(density=0.3, update_interval=1000, start_step=500)  # nothing would happen in 2 steps
    tracker = SADTracker(interval=100)
    zero_before = {}

    class Snap(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            zero_before.update({n: (p == 0).clone() for n, p in pl_module.named_parameters() if n in dst.masks})

    _smoke(tmp_path, [dst, tracker, Snap()], tiny_net)
    params = dict(tiny_net.named_parameters())
    flips = sum(int(((params[n] == 0) ^ z).sum()) for n, z in zero_before.items())
    assert flips > 0 and dst.num_updates == 1
    assert "DynamicSparsity: fast_dev_run: schedule compressed to one mask update at step 1" in _info(info_log)
    # the tracker measures after every step; the update at step 1 shows at step 1
    assert tracker.history["step"] == [0, 1] and tracker.history["events"] == {"mask update": [1]}
    # RigL's update replaces that iteration's optimizer step, the last one: the dropped weights are now 0 and
    # the as many grown ones are still 0, so the weights' zero pattern shows half of the mask change
    assert tracker.history["sad"][1] == 2 * flips


def test_chase_paper_schedule_removes_and_slims(tiny_net: pl.LightningModule, tmp_path: Path,
                                                info_log: pytest.LogCaptureFixture) -> None:
    chase = Chase(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, stop_gmp_epochs=80, stop_dst_epochs=20,
                  update_interval=1000, input_shape=(1, 8, 8))
    before = sum(p.numel() for p in tiny_net.parameters())
    _smoke(tmp_path, [chase, SADTracker(interval=100)], tiny_net)
    assert sum(p.numel() for p in tiny_net.parameters()) < before  # slimmed
    assert "Chase: fast_dev_run: schedule compressed to a channel removal with slimming" in _info(info_log)
    assert "mask(s) changed shape (channels removed)" in _info(info_log)  # one line for the slimming
    assert chase.num_updates == 1


def test_chase_single_step_smoke_run_says_what_it_needs(tiny_net: pl.LightningModule, tmp_path: Path,
                                                        info_log: pytest.LogCaptureFixture) -> None:
    chase = Chase(density=0.3, channel_sparsity=0.5, stop_gmp_epochs=80, stop_dst_epochs=20, input_shape=(1, 8, 8))
    _smoke(tmp_path, [chase], tiny_net, n=1)  # no refusal of the schedule
    assert "use --trainer.fast_dev_run=2" in _info(info_log)


def test_nm_warmup_is_cut_to_the_smoke_run(tiny_net: pl.LightningModule, tmp_path: Path) -> None:
    nm = NMSparsity(n=2, m=4, dense_warmup_steps=1000)
    seen = []
    conv = tiny_net.body[0]
    assert conv.weight.shape[1] % 4 == 0
    conv.register_forward_pre_hook(
        lambda mod, args: seen.append(int((mod.weight.movedim(1, -1).reshape(-1, 4) != 0).sum(1).max()))
        if mod.training else None)
    _smoke(tmp_path, [nm], tiny_net)
    assert seen == [4, 2]  # step 0 dense (warm-up), step 1 masked 2:4
