"""Where the mask update sits in its iteration (DESIGN.md §3, issue: DST updates equal to the reference code).

- RigL runs the update *instead of* the optimizer step: at the end of an update iteration every weight and
  every optimizer state tensor is what it was before the iteration, except that dropped weights (and their
  state) are 0; grown connections are 0 with zeroed state.
- SET and Chase step first and update after the step: the optimizer step ran (weights moved), and the
  grown connections are 0 with zeroed state when the iteration ends.

Each holds with gradient accumulation, AMP with a real GradScaler (including a step it skips) and manual
optimization. The DDP case is in ``tests/scripts/ddp_masks.py`` (``test_dst.py``/``test_chase.py``).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from conftest import TinyNet
from pytorch_lightning.plugins.precision import MixedPrecision
from torch import nn

from helpers.training import fixed_loader, trainer
from lightning_sparse.callbacks import Chase, DynamicSparsity


class ManualNet(TinyNet):
    """Manual optimization that clears the gradients right after the step (the gradient is gone by batch end)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
        opt.step()
        opt.zero_grad(set_to_none=True)


class InfOnce(TinyNet):
    """An inf gradient at one optimizer step: the GradScaler skips that step (and the update is postponed)."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.inf_step = step

    def on_after_backward(self):
        if self.trainer.global_step == self.inf_step:
            self.body[0].weight.grad[0, 0, 0, 0] = float("inf")


def _state(trainer: pl.Trainer, module: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    opt = trainer.optimizers[0]
    return {n: {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.shape == p.shape}
            for n, p in module.named_parameters() if p in opt.state}


class Watch(pl.Callback):
    """Records, for every iteration in which the masks change, the state before and after it."""

    def __init__(self, cb: pl.Callback, before: bool) -> None:
        self.cb, self.before, self.rows = cb, before, {}
        self._pre: dict | None = None

    def _snap(self, trainer, module):
        return ({n: p.detach().clone() for n, p in module.named_parameters()}, _state(trainer, module),
                {k: v.clone() for k, v in self.cb.masks.items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.before:
            self._pre = self._snap(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.before:
            self.partner.pre = self._pre
            return
        w, s, m = self._snap(trainer, pl_module)
        pre = self.pre
        if any(not torch.equal(m[k], pre[2][k]) for k in m):
            self.rows[trainer.global_step] = (pre, (w, s, m))


def _fit(model, cb, **kw):
    first, last = Watch(cb, before=True), Watch(cb, before=False)
    first.partner = last
    t = trainer("/tmp/iteration", callbacks=[first, cb, last], **kw)
    t.fit(model, fixed_loader())
    assert last.rows, "no mask update happened"
    return last.rows


SETUPS = {
    "plain": (TinyNet, dict(max_steps=10)),
    "accumulation": (TinyNet, dict(max_steps=6, accumulate_grad_batches=2)),
    "amp_gradscaler": (TinyNet, dict(max_steps=10, plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])),
    "manual": (ManualNet, dict(max_steps=10)),
}


def _grown_are_zero(pre, post):
    (_, _, m0), (w1, s1, m1) = pre, post
    for k in m1:
        grown = m1[k] & ~m0[k]
        assert not w1[k][grown].any(), k
        for v in s1.get(k, {}).values():
            assert not v[grown].any(), k


@pytest.mark.parametrize("setup", list(SETUPS))
def test_rigl_update_replaces_the_optimizer_step(setup):
    pl.seed_everything(0)
    make, kw = SETUPS[setup]
    cb = DynamicSparsity(density=0.3, growth="gradient", update_interval=2, stop_step=100, sparse_first_last=True)
    rows = _fit(make(), cb, **kw)
    for step, (pre, post) in rows.items():
        (w0, s0, m0), (w1, s1, m1) = pre, post
        for k in w0:
            keep = m1[k] if k in m1 else torch.ones_like(w0[k], dtype=torch.bool)
            stay = keep & (m0[k] if k in m0 else keep)  # neither grown nor dropped: untouched
            assert torch.equal(w1[k][stay], w0[k][stay]), (setup, step, k)
            for name, v in s1.get(k, {}).items():
                assert torch.equal(v[stay], s0[k][name][stay]), (setup, step, k, name)
            if k in m1:
                assert not w1[k][~m1[k]].any()
        _grown_are_zero(pre, post)


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("method", ["set", "chase"])
def test_set_and_chase_update_after_the_step(setup, method):
    pl.seed_everything(0)
    make, kw = SETUPS[setup]
    if method == "set":
        cb = DynamicSparsity(density=0.3, growth="random", update_interval=2, stop_step=100, sparse_first_last=True)
    else:
        kw = {**kw, "max_steps": -1, "max_epochs": 3}
        cb = Chase(density=0.3, channel_sparsity=0.0, stop_gmp_epochs=1, channel_interval_epochs=1, stop_dst_epochs=1,
                   update_interval=2, sparse_first_last=True, input_shape=(1, 8, 8))
    rows = _fit(make(), cb, **kw)
    for step, (pre, post) in rows.items():
        w0, w1 = pre[0], post[0]
        assert not torch.equal(w1["head.bias"], w0["head.bias"]), (setup, step)  # the optimizer step ran
        _grown_are_zero(pre, post)


@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_a_step_the_gradscaler_skips_postpones_the_update(growth):
    """An update due at a step whose gradients overflow runs at the next finite step, in the right place."""
    pl.seed_everything(0)
    cb = DynamicSparsity(density=0.3, growth=growth, update_interval=4, stop_step=100, sparse_first_last=True)
    with pytest.warns(UserWarning, match="postponed"):
        rows = _fit(InfOnce(4), cb, max_steps=7,
                    plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    # updates at iterations 0 and 5 (4 overflowed); iteration k ends with k + 1 steps counted
    assert sorted(rows) == [1, 6]
    pre, post = rows[6]
    moved = not torch.equal(post[0]["head.bias"], pre[0]["head.bias"])
    assert moved == (growth == "random")  # RigL skipped the step, SET stepped
    _grown_are_zero(pre, post)


class SkipBatch(TinyNet):
    """``training_step`` returns None at the given steps: Lightning still calls the optimizer hooks, with no gradient."""

    def __init__(self, steps: set[int]) -> None:
        super().__init__()
        self.skip = steps

    def training_step(self, batch, batch_idx):
        return None if self.trainer.global_step in self.skip else super().training_step(batch, batch_idx)


@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_a_skipped_batch_postpones_the_update(growth):
    pl.seed_everything(0)
    cb = DynamicSparsity(density=0.3, growth=growth, update_interval=4, stop_step=100, sparse_first_last=True)
    with pytest.warns(UserWarning, match=r"no gradient in any sparse layer \(a skipped batch\) at step 4; the mask update "
                                         r"is postponed"):
        rows = _fit(SkipBatch({4}), cb, max_steps=7)
    assert sorted(rows) == [1, 6]  # iterations 0 and 5: the update due at 4 ran at the next batch with a gradient
    _grown_are_zero(*rows[6])


class TwoOptimizers(ManualNet):
    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(F.cross_entropy(self(batch[0]), batch[1]))
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.body.parameters(), lr=0.05), torch.optim.SGD(self.head.parameters(), lr=0.05)]


@pytest.mark.parametrize("method", ["rigl", "chase"])
def test_manual_optimization_with_two_optimizers_is_refused(method):
    cb = (DynamicSparsity(density=0.3) if method == "rigl" else
          Chase(density=0.3, channel_sparsity=0.0, stop_gmp_epochs=1, channel_interval_epochs=1, stop_dst_epochs=1,
                input_shape=(1, 8, 8)))
    t = trainer(callbacks=[cb], max_epochs=3)
    with pytest.raises(ValueError, match=r"supports manual optimization with one optimizer, got 2"):
        t.fit(TwoOptimizers(), fixed_loader())


def test_rigl_with_a_fused_optimizer_under_a_gradscaler_is_refused():
    class Fused(TinyNet):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)

    t = trainer(None, 2, [DynamicSparsity(density=0.3)],
                plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])
    with pytest.raises(ValueError, match=r"a GradScaler cannot follow with a fused optimizer \(Adam, fused=True\)"):
        t.fit(Fused(), fixed_loader())


def test_chase_phase1_mode_is_checked():
    with pytest.raises(ValueError, match=r"`phase1`='per_layer' is not supported; choose one of \['layerwise', 'global'\]"):
        Chase(phase1="per_layer")
