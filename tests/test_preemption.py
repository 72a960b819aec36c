"""Preemption safety in one process: resumable training order, SIGTERM checkpoint, atomic writes,
``--ckpt_path last`` fallback. The CLI versions (subprocess, real signals) are in test_preemption_cli.py."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet
from pytorch_lightning.callbacks import ModelCheckpoint

from helpers.training import assert_equal_nested
from helpers.training import trainer as make_trainer
from lightning_sparse.callbacks import DynamicSparsity, SADTracker
from lightning_sparse.data import DigitsDataModule, FakeDataModule
from lightning_sparse.preemption import AtomicCheckpointIO, PreemptionCheckpoint, find_last_checkpoint
from lightning_sparse.sampling import EpochSampler

BATCHES = 5  # per epoch (limit_train_batches); steps 0-4 are epoch 0, 5-9 epoch 1, ...


class Record(pl.Callback):
    """Per step: the loss, a fingerprint of the batch and (for DynamicSparsity) the masks."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.batch: dict[int, tuple[float, int]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.loss[step] = outputs["loss"].item()
        x, y = batch
        self.batch[step] = (x.double().sum().item(), int((y * torch.arange(1, len(y) + 1)).sum()))


class SignalAt(pl.Callback):
    """Sends ``signum`` to this process in the middle of step ``step`` (before its optimizer step)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class ScheduledNet(TinyNet):
    """TinyNet with a per-step cosine LR schedule sized by ``trainer.estimated_stepping_batches``, as
    ImageClassifier does: Lightning then builds the train loader before it restores the loop state."""

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + torch.cos(torch.tensor(s / total * 3.14)).item()))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RaiseAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            raise RuntimeError("boom inside a step")


def _fit(root: Path, epochs: int, callbacks: list, ckpt_path: str | None = None, num_workers: int = 0,
         sparse: bool = True, **kwargs) -> tuple[pl.Trainer, Record]:
    pl.seed_everything(0)
    model = ScheduledNet()
    dm = DigitsDataModule(image_size=8, batch_size=16, max_shift=1, num_workers=num_workers)
    rec = Record()
    extra = [DynamicSparsity(density=0.3, update_interval=2, drop_fraction=0.3), SADTracker(interval=2)] if sparse else []
    trainer = make_trainer(
        root, callbacks=[*extra, rec, *callbacks], max_epochs=epochs, limit_train_batches=BATCHES,
        limit_val_batches=2, enable_checkpointing=True, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()],
        **kwargs,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer, rec


def _final(trainer: pl.Trainer) -> dict:
    cbs = {type(c).__name__: c.state_dict() for c in trainer.callbacks if isinstance(c, (DynamicSparsity, SADTracker))}
    opt = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in trainer.optimizers[0].state.values()]
    return {"weights": {k: v.clone() for k, v in trainer.lightning_module.state_dict().items()}, "opt": opt, "cb": cbs}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 3-epoch run that also writes a checkpoint after every step."""
    root = tmp_path_factory.mktemp("full")
    every = ModelCheckpoint(dirpath=root / "steps", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer, rec = _fit(root, 3, [every])
    return root, _final(trainer), rec


@pytest.mark.parametrize("step", [7, 5, 4])  # mid-epoch 1; first batch of epoch 1; last batch of epoch 0
def test_resume_from_step_checkpoint_is_bitwise_equal(tmp_path, reference, step):
    root, full, full_rec = reference
    trainer, rec = _fit(tmp_path, 3, [], ckpt_path=str(root / "steps" / f"step={step}.ckpt"))
    assert sorted(rec.loss) == list(range(step, 3 * BATCHES))
    for s in rec.loss:  # same batch, same loss, at every step after the resume
        assert rec.batch[s] == full_rec.batch[s], s
        assert rec.loss[s] == full_rec.loss[s], s
    assert_equal_nested(_final(trainer), full)


def test_resume_with_workers_is_bitwise_equal(tmp_path, reference):
    root, full, full_rec = reference
    trainer, rec = _fit(tmp_path, 3, [], ckpt_path=str(root / "steps" / "step=7.ckpt"), num_workers=2)
    assert all(rec.batch[s] == full_rec.batch[s] and rec.loss[s] == full_rec.loss[s] for s in rec.loss)
    assert_equal_nested(_final(trainer), full)


def test_sigterm_mid_step_saves_that_step_and_resumes_bitwise(tmp_path, reference):
    _, full, full_rec = reference
    pre = PreemptionCheckpoint(dirpath=str(tmp_path / "ckpts"))
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException, raised after the step completes
        _fit(tmp_path / "a", 3, [SignalAt(8), pre])
    saved = sorted((tmp_path / "ckpts").glob("*.ckpt"))
    assert [p.name for p in saved] == ["interrupted-epoch=001-step=000009.ckpt"]
    assert torch.load(saved[0], weights_only=False)["global_step"] == 9
    trainer, rec = _fit(tmp_path / "b", 3, [], ckpt_path=str(saved[0]))
    assert min(rec.loss) == 9 and all(rec.loss[s] == full_rec.loss[s] for s in rec.loss)
    assert_equal_nested(_final(trainer), full)


def test_exception_inside_a_step_writes_nothing(tmp_path):
    pre = PreemptionCheckpoint(dirpath=str(tmp_path / "ckpts"))
    with pytest.warns(UserWarning, match="No checkpoint written for RuntimeError: it was raised inside a training"):
        with pytest.raises(RuntimeError, match="boom"):
            _fit(tmp_path, 1, [RaiseAt(2), pre], sparse=False)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_deferred_signal_handler_runs_at_the_batch_boundary(tmp_path):
    calls: list[tuple[int, int]] = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.trainer = trainer

    probe = Probe()
    previous = signal.signal(signal.SIGUSR1, lambda s, f: calls.append((s, probe.trainer.global_step)))
    try:
        # Probe runs before PreemptionCheckpoint's on_train_start, which then wraps the handler above
        _fit(tmp_path, 1, [probe, SignalAt(2, signal.SIGUSR1), PreemptionCheckpoint()], sparse=False)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [(signal.SIGUSR1, 3)]  # sent before step 2's optimizer step, handled after it


def test_sigterm_handler_is_ours_during_training_and_the_previous_one_after(tmp_path):
    """During training SIGTERM only records (the decision is taken at step ends, on every rank at once);
    after fit the handler from before fit is back."""
    seen: list = []

    class Peek(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(signal.getsignal(signal.SIGTERM))

    pre, before = PreemptionCheckpoint(), signal.getsignal(signal.SIGTERM)
    _fit(tmp_path, 1, [Peek(), pre], sparse=False)
    assert len(seen) == BATCHES and all(h == pre._defer for h in seen)
    assert signal.getsignal(signal.SIGTERM) == before


def test_defer_signals_refuses_sigterm():
    with pytest.raises(ValueError, match="defer_signals: 'SIGTERM' is always handled at batch boundaries"):
        PreemptionCheckpoint(defer_signals=("SIGUSR1", "SIGTERM"))


def test_epoch_sampler_shards_like_distributed_sampler_and_resumes():
    full = EpochSampler(10, seed=3)
    full.set_epoch(2)
    order = full.order(2)
    shards = [EpochSampler(10, seed=3, num_replicas=3, rank=r) for r in range(3)]
    for s in shards:
        s.set_epoch(2)
    padded = [i for i, _ in order + order[:2]]  # padded like DistributedSampler to 12 = 3 x 4
    seeds = {}
    for r, s in enumerate(shards):
        got = list(s)
        assert [i for i, _ in got] == padded[r::3] and len(s) == 4
        seeds.update({pos * 3 + r: seed for pos, (_, seed) in enumerate(got)})
    assert [seeds[k] for k in range(10)] == [seed for _, seed in order]  # item seeds follow the global position
    s = EpochSampler(10, seed=3)
    s.set_epoch(2)
    s.resume_at(2, 4)
    assert list(s) == order[4:]
    s.resume_at(1, 4)  # a position saved in epoch 1 does not apply to epoch 2
    assert list(s) == order


def test_fake_data_train_order_is_seeded_and_resumable():
    dm = FakeDataModule(num_samples=12, batch_size=4)
    a = [b[1] for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 0, "batches": 1})
    b = [b[1] for b in loader]
    assert len(b) == 2 and all(torch.equal(x, y) for x, y in zip(a[1:], b))
    assert loader.state_dict() == {"epoch": 0, "batches": 3}


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    good = target.read_bytes()

    def dies_halfway(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert target.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("damage", ["truncate", "empty"])
def test_last_falls_back_to_previous_good_checkpoint_with_one_warning(tmp_path, damage):
    io = AtomicCheckpointIO()
    old, new = tmp_path / "v0" / "last.ckpt", tmp_path / "v1" / "interrupted-epoch=000-step=000003.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 2}, old)
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 3}, new)
    data = new.read_bytes()
    new.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"")
    os.utime(old, (1, 1))  # older
    warnings: list[str] = []
    assert find_last_checkpoint([old, new], warn=warnings.append) == old
    assert len(warnings) == 1 and str(new) in warnings[0] and str(old) in warnings[0]
    assert find_last_checkpoint([new], warn=warnings.append) is None


def test_cli_ckpt_path_last_resolves_newest_readable_across_versions(tmp_path, monkeypatch, capsys):
    from lightning_sparse.cli import SparseCLI

    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1]
    args = ["fit", "--config", str(root / "configs" / "debug.yaml"), "--ckpt_path", "last"]
    with pytest.raises(SystemExit) as exc:  # one line on stderr, exit code 2
        SparseCLI(args=args)
    assert exc.value.code == 2
    assert re.search(r"--ckpt_path=last: no readable checkpoint matches .*runs/debug/", capsys.readouterr().err)
    io = AtomicCheckpointIO()
    good = tmp_path / "runs/debug/version_0/checkpoints/last.ckpt"
    io.save_checkpoint({"state_dict": {}}, good)
    bad = tmp_path / "runs/debug/version_1/checkpoints/interrupted-epoch=000-step=000002.ckpt"
    io.save_checkpoint({"state_dict": {}}, bad)
    bad.write_bytes(b"")
    os.utime(good, (1, 1))

    resolved = []

    class Parsed(SparseCLI):  # stop after parsing: nothing to train in this test
        def before_instantiate_classes(self):
            resolved.append(self.config.fit.ckpt_path)
            raise SystemExit(0)

    with pytest.warns(UserWarning, match="newest checkpoint is unreadable") as record, pytest.raises(SystemExit):
        Parsed(args=args)
    assert len([w for w in record if "unreadable" in str(w.message)]) == 1
    assert resolved == ["runs/debug/version_0/checkpoints/last.ckpt"]
    io.save_checkpoint({"state_dict": {}}, tmp_path / "runs/debug/hpc_ckpt_1.ckpt")  # SLURM's, newest now
    with pytest.raises(SystemExit):
        Parsed(args=args)
    assert resolved[-1] == "runs/debug/hpc_ckpt_1.ckpt"
