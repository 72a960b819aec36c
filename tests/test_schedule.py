"""Schedules count real optimizer steps (max_steps, max_epochs, accumulation, manual optimization), and a
non-finite gradient at an update step postpones the update instead of ending the run."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import TinyNet
from torch import nn

from helpers.training import fixed_loader, trainer
from lightning_sparse.callbacks import DynamicSparsity
from lightning_sparse.callbacks._schedule import steps_per_epoch, total_steps


class StepsPerEpoch(pl.Callback):
    """Independent count: the optimizer steps Lightning actually took in each epoch."""

    def __init__(self, dst: DynamicSparsity) -> None:
        self.dst, self.per_epoch, self.stop, self.total, self._start = dst, [], None, None, 0

    def on_train_start(self, trainer, pl_module):
        self.stop, self.total = self.dst.resolved_stop_step(trainer), total_steps(trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = trainer.global_step

    def on_train_epoch_end(self, trainer, pl_module):
        self.per_epoch.append(trainer.global_step - self._start)


class ManualMLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.parametrize(
    ("make", "trainer_kw"),
    [
        (TinyNet, {"max_steps": 20, "max_epochs": -1}),  # 6 batches/epoch, training ends by max_steps
        (TinyNet, {"max_steps": -1, "max_epochs": 3, "accumulate_grad_batches": 4}),  # ceil(6/4) = 2 steps/epoch
        (ManualMLP, {"max_steps": -1, "max_epochs": 3}),
    ],
    ids=["max_steps", "accumulation", "manual_optimization"],
)
def test_stop_epoch_counts_real_optimizer_steps(tmp_path, make, trainer_kw):
    dst = DynamicSparsity(density=0.5, update_interval=1, stop_epoch=2, sparse_first_last=True)
    count = StepsPerEpoch(dst)
    t = trainer(tmp_path, callbacks=[dst, count], **trainer_kw)
    t.fit(make(), fixed_loader())
    assert count.stop == 2 * count.per_epoch[0]
    assert count.total == t.global_step  # the whole fit, as it actually ran
    assert dst.num_updates == count.stop  # one update per step from step 0 to the stop step (exclusive)


def test_explicit_stop_step_wins_and_unbounded_training_needs_one(tmp_path):
    dst = DynamicSparsity(density=0.5, stop_step=3, sparse_first_last=True)
    t = trainer(tmp_path, 4, [dst], max_epochs=-1)
    t.fit(TinyNet(), fixed_loader())
    assert dst.resolved_stop_step(t) == 3 and steps_per_epoch(t) == 6
    with pytest.raises(ValueError, match=r"Training has no end \(max_steps=-1, max_epochs=-1\)"):
        total_steps(type("T", (), {"max_steps": -1, "max_epochs": -1})())


class InfAtStep(TinyNet):
    """fp16-overflow stand-in: an inf gradient in one layer at the given optimizer steps."""

    def __init__(self, steps: set[int]) -> None:
        super().__init__()
        self.inf_steps = steps

    def on_after_backward(self):
        if self.trainer.global_step in self.inf_steps:
            self.body[0].weight.grad[0, 0, 0, 0] = float("inf")

    def on_before_optimizer_step(self, optimizer):  # runs after the callbacks' hook
        if not all(torch.isfinite(p.grad).all() for p in self.parameters() if p.grad is not None):
            for p in self.parameters():  # what the GradScaler does with an overflow: skip this step
                p.grad = None


class MaskLog(pl.Callback):
    """Placed after the callback: the iterations (step counts before their optimizer step) that changed the masks."""

    def __init__(self, dst: DynamicSparsity) -> None:
        self.dst, self.changed_at, self.prev = dst, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prev = {k: v.clone() for k, v in self.dst.masks.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if any(not torch.equal(m, self.prev[k]) for k, m in self.dst.masks.items()):
            self.changed_at.append(trainer.global_step - 1)


def test_inf_gradient_at_an_update_step_postpones_the_update(tmp_path):
    pl.seed_everything(0)
    dst = DynamicSparsity(density=0.3, update_interval=4, stop_step=12, growth="random")
    log = MaskLog(dst)
    model = InfAtStep({4, 5})
    with pytest.warns(UserWarning, match=r"non-finite gradient in 'body.0.weight' at step 4 .*postponed"):
        trainer(tmp_path, 10, [dst, log]).fit(model, fixed_loader())
    # steps 0, 4 (postponed: 4 and 5 overflow, it runs at 6, the first finite step), then 8 on schedule
    assert log.changed_at == [0, 6, 8]
    assert dst.num_updates == 3 and dst.guard.postponed_total == 2
    params = dict(model.named_parameters())
    assert all(torch.isfinite(params[k]).all() for k in dst.masks)


def test_persistent_non_finite_values_give_up_with_a_clear_error(tmp_path):
    dst = DynamicSparsity(density=0.3, update_interval=2, stop_step=20, max_postponed=3)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient in 'body.0.weight' at step 5; refusing the "
                                                 r"mask update after 3 postponements"):
        trainer(tmp_path, 12, [dst]).fit(InfAtStep(set(range(2, 12))), fixed_loader())
