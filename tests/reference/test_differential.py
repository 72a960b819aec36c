"""Differential tests: our callbacks, run through a real Trainer, against transcriptions of the reference updates.

Each test trains a small model with one of our callbacks and records, around one chosen iteration, the
dense gradient (before the callback masks it), the weights, masks and SGD momentum before the callback's
work and after it. The same inputs go through the transcription of the reference update
(:mod:`reference.rigl_ref`, :mod:`reference.chase_ref`), and the results must be equal: masks exactly, weights
and optimizer state bitwise. Random weights and gradients have no ties, so "ties aside" never bites here.

Where our code deliberately differs from the reference, the transcription is run with the flag that
selects our choice, and the README's fidelity table lists the deviation:

- ``exact_count=True``: the Chase reference grows by ``|g| > k-th largest |g|`` and so grows one fewer
  than it computes; we grow the computed number.
- Chase's per-layer ERK targets: the reference grows each layer to ``int(density_l · numel_l)`` of float
  densities; ours are integer counts that add up to B exactly. The update rule is compared with the
  reference's densities set from our counts, and the counts themselves against the reference's ERK (±1).
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet

from helpers.training import fixed_loader, trainer
from lightning_sparse.callbacks import Chase, DynamicSparsity
from lightning_sparse.sparsity.chase import budget_targets
from reference.chase_ref import ChaseRef, chase_erk_densities, minimum_layer, step_events
from reference.nm_ref import effective_decay, nm_mask_ref, srste_backward_ref
from reference.rigl_ref import erk_densities, rigl_drop_fraction, rigl_update

SPE, EPOCHS = 6, 3  # fixed_loader(): 96 images, batch 16


def _momentum(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, torch.Tensor]:
    opt = trainer.optimizers[0]
    return {n: opt.state[p]["momentum_buffer"].clone() for n, p in module.named_parameters() if p in opt.state}


def _weights(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class Before(pl.Callback):
    """Placed before the sparsity callback: what it sees in the iteration whose optimizer step makes ``at`` steps."""

    def __init__(self, sparsity: pl.Callback, at: int) -> None:
        self.sparsity, self.at = sparsity, at
        self.grads: dict[str, torch.Tensor] = {}
        self.pre: dict = {}   # before the optimizer step
        self.post: dict = {}  # after the optimizer step, before the callback's post-step work

    def _snap(self, trainer, pl_module) -> dict:
        removed = getattr(self.sparsity, "removed", {})
        return {"w": _weights(pl_module), "m": {k: v.clone() for k, v in self.sparsity.masks.items()},
                "s": _momentum(trainer, pl_module), "removed": {k: sorted(v) for k, v in removed.items()},
                "allowed": {k: v.clone() for k, v in getattr(getattr(self.sparsity, "engine", None), "allowed", {}).items()}}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step + 1 == self.at:
            self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
            self.pre = self._snap(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            self.post = self._snap(trainer, pl_module)


class After(Before):
    """Placed after the sparsity callback: the state when the iteration ends."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        pass


def _run(cb: pl.Callback, at: int, steps: int, **trainer_kw) -> tuple[Before, After]:
    pl.seed_everything(0)
    model = TinyNet()
    before, after = Before(cb, at), After(cb, at)
    trainer("/tmp/differential", steps, [before, cb, after], **trainer_kw).fit(model, fixed_loader())
    assert before.grads and before.post and after.post, "the recorded iteration did not run"
    return before, after


def _assert_state(after: dict, masks: dict, weights: dict, momentum: dict) -> None:
    for n in masks:
        assert torch.equal(after["m"][n], masks[n].bool()), n
        assert torch.equal(after["w"][n], weights[n]), n
        assert torch.equal(after["s"][n], momentum[n]), n


# ------------------------------------------------------------------------------------------ RigL / SET
@pytest.mark.parametrize("layers", ["one", "erk"])
def test_rigl_iteration_equals_reference(layers, tmp_path):
    """RigL: the update replaces the optimizer step (``SparseRigLOptimizerBase.apply_gradients``)."""
    kw = dict(include=["body.0.weight"]) if layers == "one" else dict(sparse_first_last=True)
    cb = DynamicSparsity(density=0.3, growth="gradient", update_interval=2, stop_step=100, **kw)
    before, after = _run(cb, at=5, steps=6)  # update iterations 0, 2, 4: check iteration 4
    pre = before.pre
    alpha = rigl_drop_fraction(4, 0, 100, 0.3)
    sparse = list(cb.masks)
    masks, weights, state = rigl_update({n: pre["w"][n] for n in sparse}, pre["m"], before.grads, alpha,
                                        opt_state={n: {"momentum_buffer": pre["s"][n]} for n in sparse})
    assert any(int(masks[n].sum()) != int((masks[n].bool() & pre["m"][n]).sum()) for n in sparse)  # it changed
    # dropped weights and their momentum are zeroed by us, hidden by the mask in the reference
    _assert_state(after.post, masks, {n: weights[n] * masks[n] for n in sparse},
                  {n: state[n]["momentum_buffer"] * masks[n] for n in sparse})
    for n, w in pre["w"].items():  # nothing else moved: no optimizer step on an update iteration
        if n not in sparse:
            assert torch.equal(after.post["w"][n], w), n
            assert torch.equal(after.post["s"][n], pre["s"][n]), n


def test_set_iteration_equals_reference(tmp_path):
    """SET: the optimizer steps, then the masks update (``SparseSETOptimizerBase.apply_gradients``)."""
    cb = DynamicSparsity(density=0.3, growth="random", update_interval=2, stop_step=100, sparse_first_last=True,
                         seed=3)
    before, after = _run(cb, at=5, steps=6)
    post = before.post
    sparse = list(cb.masks)
    # the random growth scores SET draws at iteration 4: the callback's documented per-step seed, layer by layer
    gen = torch.Generator().manual_seed(3 * 1_000_003 + 4)
    rand = {n: torch.rand(post["m"][n].numel(), generator=gen).view_as(post["m"][n]) for n in sparse}
    masks, weights, state = rigl_update({n: post["w"][n] for n in sparse}, post["m"], None,
                                        rigl_drop_fraction(4, 0, 100, 0.3), growth="random", rand=rand,
                                        opt_state={n: {"momentum_buffer": post["s"][n]} for n in sparse})
    _assert_state(after.post, masks, {n: weights[n] * masks[n] for n in sparse},
                  {n: state[n]["momentum_buffer"] * masks[n] for n in sparse})
    moved = [n for n in post["w"] if n not in sparse and not torch.equal(post["w"][n], before.pre["w"][n])]
    assert moved  # the optimizer step ran in the update iteration


def test_erk_equals_reference():
    """ERK as Chase's ``Masking.init`` solves it (exactly), and as RigL's ``get_sparsities_erdos_renyi`` (which
    floors each layer's zero count before solving: counts within one weight)."""
    shapes = {"a": (16, 1, 3, 3), "b": (32, 16, 3, 3), "c": (32, 32, 3, 3), "d": (10, 32), "e": (64, 32, 3, 3)}
    from lightning_sparse.sparsity.distributions import erk_densities as ours

    for density in (0.05, 0.1, 0.3):
        mine, chase, rigl = ours(shapes, density), chase_erk_densities(shapes, density), erk_densities(shapes, density)
        assert any(d == 1.0 for d in mine.values()) == (density >= 0.1)  # the dense-layer loop is exercised
        for n, shape in shapes.items():
            assert mine[n] == pytest.approx(chase[n], rel=1e-9, abs=1e-12), (density, n)
            assert abs(mine[n] - rigl[n]) * math.prod(shape) <= 1.0, (density, n)


# ----------------------------------------------------------------------------------------------- Chase
def _chase(**kw) -> Chase:
    base = dict(density=0.3, channel_sparsity=0.0, minimum_ratio=0.5, stop_gmp_epochs=1, channel_interval_epochs=1,
                stop_dst_epochs=1, update_interval=2, drop_fraction=0.05, sparse_first_last=True,
                input_shape=(1, 8, 8), slim="never")
    return Chase(**{**base, **kw})


def _events(s: int, cb: Chase):
    return step_events(s - 1, steps_per_epoch=SPE, total_epochs=EPOCHS, stop_dst_epochs=cb.stop_dst_epochs,
                       stop_gmp_epochs=cb.stop_gmp_epochs, update_frequency=cb.update_interval,
                       layer_interval_epochs=cb.channel_interval_epochs, start_layer_rate=cb.channel_sparsity,
                       prune_rate=cb.drop_fraction, density=cb.density, filter_dst=cb.channel_sparsity > 0,
                       growth="global_gradients" if cb.phase1 == "global" else "gradients")


def _pairs(cb: Chase) -> dict[str, str]:
    """Active layer -> its consumer, for TinyNet (stem -> body.0 -> body.3 -> head)."""
    chain = ["stem.weight", "body.0.weight", "body.3.weight", "head.weight"]
    return {a: p for a, p in zip(chain, chain[1:]) if a[: -len(".weight")] in cb.groups}


def _reference(cb: Chase, snap: dict, grads: dict, mode: str, removed: dict | None = None) -> ChaseRef:
    names = list(snap["m"])
    layerwise = mode == "layerwise"
    kw = {}
    if removed is not None:
        pairs = _pairs(cb)
        alive = {}
        for a in pairs:
            v = torch.ones(snap["w"][a].shape[0])
            v[list(removed.get(a[: -len(".weight")], []))] = 0
            alive[a] = v
        kw = dict(pairs=pairs, alive=alive)
    ref = ChaseRef(weights={n: snap["w"][n].clone() for n in names}, masks=dict(snap["m"]),
                   grads={n: grads[n] for n in names}, momentum={n: snap["s"][n].clone() for n in names},
                   prune_mode="magnitude" if layerwise else "global_magnitude",
                   growth_mode="gradients" if layerwise else "global_gradients", exact_count=True, **kw)
    ref.total_params, ref.baseline_nonzero = cb.total_weights, cb.budget
    ref.update_erk_dic() if removed is not None else None
    # align the per-layer densities with our integer counts (compared with the reference's ERK separately)
    allowed = {n: a for n, a in snap["allowed"].items() if n in names}
    targets = budget_targets(snap["w"], snap["m"], allowed, cb.budget)
    room = {n: int(allowed[n].sum()) if n in allowed else snap["m"][n].numel() for n in names}
    ref.temp_mask = {n: torch.zeros(room[n]) for n in names}
    ref.density_dict = {n: 1.0 if targets[n] >= room[n] else (targets[n] + 0.5) / room[n] for n in names}
    return ref


@pytest.mark.parametrize("mode", ["layerwise", "global"])
def test_chase_phase1_iteration_equals_reference(mode):
    """Phase 1 (soft memory bound) after the optimizer step: ``truncate_weights_prune`` + ``truncate_weights_grow``."""
    cb = _chase(phase1=mode)
    s = 4
    before, after = _run(cb, at=s, steps=SPE * EPOCHS, max_epochs=EPOCHS)
    ev = _events(s, cb)
    assert ev.mask_update == "mest" and not ev.channel_removal
    ref = _reference(cb, before.post, before.grads, mode)
    ref.after_optimizer_step(ev)
    assert any(int((ref.masks[n].bool() & ~before.post["m"][n]).sum()) for n in ref.masks)  # it grew
    _assert_state(after.post, ref.masks, ref.weights, ref.momentum)


def test_chase_phase2_iteration_equals_reference():
    """Phase 2 (strict budget, per layer): ``truncate_weights`` with the whole-training ``dst_decay`` rate."""
    cb = _chase()
    s = 14  # phase 2 starts at 12 = 18 - 6
    before, after = _run(cb, at=s, steps=SPE * EPOCHS, max_epochs=EPOCHS)
    ev = _events(s, cb)
    assert ev.mask_update == "mest_dst"
    ref = _reference(cb, before.post, before.grads, "layerwise")
    ref.after_optimizer_step(ev)
    # the reference grows a layer only when it is short by more than 1; none is short by exactly 1 here
    assert 1 not in ref.pruning_rate.values()
    _assert_state(after.post, ref.masks, ref.weights, ref.momentum)


def test_chase_schedule_equals_reference_step_for_step():
    """Channel removals, DST updates, phases and rates at every step of a run (``Masking.step``)."""
    from lightning_sparse.sparsity.chase import ChaseSchedule

    for dt, interval, spe in ((1000, 2, 2502), (20, 1, 23), (4, 1, 6)):
        total_epochs = 10
        sched = ChaseSchedule.from_epochs(spe, total_epochs * spe, 2, 8, interval, 0.4, 0.05, (0.5, 0.005), 0.1,
                                          update_interval=dt)
        for s in range(1, total_epochs * spe):
            ev = step_events(s - 1, steps_per_epoch=spe, total_epochs=total_epochs, stop_dst_epochs=2,
                             stop_gmp_epochs=8, update_frequency=dt, layer_interval_epochs=interval,
                             start_layer_rate=0.4, prune_rate=0.05, density=0.1)
            _assert_step_equals_reference(sched, s, ev, dt)



def test_chase_fraction_schedule_equals_reference_with_fractional_epochs():
    """``*_fraction`` spans are the reference run with fractional epoch arguments (its ``stop_gmp_epochs`` and
    ``layer_interval`` are floats: ``floor(stop_gmp_epochs * len)``, ``int(layer_interval * len)``): the channel
    schedule ends at 7.5 of 10 epochs, removals every 1.3 epochs, phase 2 = the last 2 epochs."""
    from lightning_sparse.sparsity.chase import ChaseSchedule

    total_epochs, spe, dt = 10, 23, 20
    args = dict(stop_gmp_fraction=0.75, channel_interval_fraction=0.13, stop_dst_fraction=0.2, channel_sparsity=0.4,
                drop_fraction=0.05, phase2_drop_fraction=(0.5, 0.005), density=0.1, update_interval=dt)
    sched = ChaseSchedule.for_training(args, total_epochs * spe)
    removals = 0
    for s in range(1, total_epochs * spe):
        ev = step_events(s - 1, steps_per_epoch=spe, total_epochs=total_epochs, stop_dst_epochs=2,
                         stop_gmp_epochs=7.5, update_frequency=dt, layer_interval_epochs=1.3,
                         start_layer_rate=0.4, prune_rate=0.05, density=0.1)
        _assert_step_equals_reference(sched, s, ev)
        removals += ev.channel_removal
    assert removals >= 5 and (sched.channel_stop, sched.channel_interval) == (172, 29)

def test_chase_channel_removal_and_redistribution_equal_reference():
    """A removal (``del_layer``: UMM, global threshold, floors) leaves the other masks alone and only re-solves
    the ERK targets (``update_erk_dic``); the next update moves the layers towards them."""
    cb = _chase(channel_sparsity=0.5, stop_gmp_epochs=2)
    s = 5  # (5 + ΔT/2) % 6 == 0
    before, after = _run(cb, at=s, steps=SPE * EPOCHS, max_epochs=EPOCHS)
    ev = _events(s, cb)
    assert ev.channel_removal and ev.mask_update is None
    pairs = _pairs(cb)
    start = {a: before.post["w"][a].shape[0] for a in pairs}
    ref = ChaseRef(weights={n: w.clone() for n, w in before.post["w"].items() if n in before.post["m"]},
                   masks=dict(before.post["m"]), momentum={n: before.post["s"][n].clone() for n in before.post["m"]},
                   pairs=pairs, alive={a: torch.ones(c) for a, c in start.items()})
    removed = ref.del_layer(ev.layer_rate, sum(start.values()),
                            {a: minimum_layer(c, cb.channel_sparsity, cb.minimum_ratio) for a, c in start.items()})
    ours = {f"{k}.weight": v for k, v in after.post["removed"].items()}
    assert {a: sorted(v) for a, v in removed.items() if v} == {a: v for a, v in ours.items() if v}
    assert sum(len(v) for v in ours.values()) > 0
    _assert_state(after.post, ref.masks, ref.weights, ref.momentum)
    # the targets: ERK over the remaining shapes with the same B, as the reference's update_erk_dic (±1 weight)
    ref.baseline_nonzero = cb.budget
    ref.update_erk_dic()
    targets = budget_targets(after.post["w"], after.post["m"], after.post["allowed"], cb.budget)
    for n in targets:
        assert abs(targets[n] - ref.density_dict[n] * ref.temp_mask[n].numel()) <= 1.0, n
    assert sum(targets.values()) == cb.budget


def test_chase_update_after_removal_equals_reference():
    """The first DST update after a removal, with the removed channels blocked (phase 1, layerwise)."""
    cb = _chase(channel_sparsity=0.5, stop_gmp_epochs=2)
    s = 6
    before, after = _run(cb, at=s, steps=SPE * EPOCHS, max_epochs=EPOCHS)
    assert before.post["removed"] and _events(s, cb).mask_update == "mest"
    ref = _reference(cb, before.post, before.grads, "layerwise", removed=before.post["removed"])
    ref.after_optimizer_step(_events(s, cb))
    _assert_state(after.post, ref.masks, ref.weights, ref.momentum)
    for n, allowed in after.post["allowed"].items():
        if n in after.post["m"]:
            assert not (after.post["m"][n] & ~allowed).any(), n  # removed channels never grow again


def test_chase_regrown_weight_restarts_at_zero():
    """A weight pruned and regrown in the same update restarts at 0 with zeroed momentum (prune, apply_mask, grow)."""
    cb = _chase(phase1="global", drop_fraction=0.2)
    s = 4
    before, after = _run(cb, at=s, steps=SPE * EPOCHS, max_epochs=EPOCHS)
    post = before.post
    # the prune step keeps the B largest |w| of the active weights (one global threshold)
    flat = torch.cat([torch.where(post["m"][n], post["w"][n].abs(), -1.0).flatten() for n in cb.masks])
    kth = float(torch.topk(flat, cb.budget).values.min())
    again = {n: post["m"][n] & (post["w"][n].abs() < kth) & after.post["m"][n] for n in cb.masks}
    assert sum(int(a.sum()) for a in again.values()) > 0, "no weight was dropped and regrown: nothing tested"
    for n, a in again.items():
        assert not after.post["w"][n][a].any() and not after.post["s"][n][a].any(), n
        assert bool((post["w"][n][a] != 0).all())  # they had a value before the update


# ---------------------------------------------------------------------------------------------- SR-STE
def test_nm_mask_layout_equals_reference():
    """Groups of M consecutive input channels at each (C_out, k_h, k_w) (``SparseConv``: NHWC), rows for Linear."""
    from lightning_sparse.sparsity.nm import nm_mask

    torch.manual_seed(0)
    for shape in ((8, 16, 3, 3), (4, 8, 1, 1), (6, 32)):
        w = torch.randn(shape)
        for n, m in ((2, 4), (1, 4), (2, 8), (4, 8)):
            assert torch.equal(nm_mask(w, n, m), nm_mask_ref(w, n, m).bool()), (shape, n, m)


def test_srste_iteration_equals_reference():
    """One training iteration with ``NMSparsity``: the gradient the optimizer steps with is the reference's
    ``Sparse.backward`` (straight-through gradient of the masked forward + λ_W·(1 − M)⊙W), computed here on an
    independently baked copy of the model."""
    import copy

    from lightning_sparse.callbacks import NMSparsity

    decay = 1e-2  # large enough to show in the comparison

    class Grab(pl.Callback):  # placed before NMSparsity: the dense weights of iteration 2
        def __init__(self):
            self.w, self.g, self.batch = {}, {}, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                self.w = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                self.batch, self.model = batch, copy.deepcopy(pl_module)

    class GrabGrad(pl.Callback):  # placed after NMSparsity: the gradient the optimizer will step with
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 2:
                grab.g = {n: p.grad.clone() for n, p in pl_module.named_parameters()}

    pl.seed_everything(0)
    covered = ["body.0.weight", "body.3.weight"]
    nm, grab = NMSparsity(n=2, m=4, decay=decay, include=covered), Grab()
    trainer("/tmp/differential", 3, [grab, nm, GrabGrad()]).fit(TinyNet(), fixed_loader())
    baked = grab.model
    masks = {n: nm_mask_ref(grab.w[n], 2, 4) for n in covered}
    with torch.no_grad():
        for n, p in baked.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    baked.train()
    baked.zero_grad(set_to_none=True)  # the copy carries the previous iteration's gradients
    x, y = grab.batch
    torch.nn.functional.cross_entropy(baked(x), y).backward()
    params = dict(baked.named_parameters())
    for n in covered:
        expected = srste_backward_ref(params[n].grad, grab.w[n], masks[n], decay)
        torch.testing.assert_close(grab.g[n], expected, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(grab.g[n], params[n].grad)  # the decay term is really there


def test_imagenet_srste_config_carries_the_reference_effective_decay():
    """The released run: 8 processes, λ_W = 2e-4 per rank, loss / world size, SUM all-reduce."""
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[2] / "configs" / "imagenet_resnet50_srste_base.yaml").read_text())
    world = cfg["trainer"]["devices"] * cfg["trainer"].get("num_nodes", 1)
    assert world == 8
    assert cfg["sparsity"]["init_args"]["decay"] == pytest.approx(effective_decay(world))


def _assert_step_equals_reference(sched, s: int, ev, *where) -> None:
    """Our schedule at step ``s`` does what the reference's step events ``ev`` say."""
    assert sched.is_channel_step(s) == ev.channel_removal, (*where, s)
    assert sched.is_update_step(s) == (ev.mask_update is not None), (*where, s)
    if ev.channel_removal:
        assert sched.channel_target(s) == pytest.approx(ev.layer_rate, abs=1e-12)
    if ev.mask_update == "mest":
        assert not sched.in_phase2(s) and sched.phase1_fraction(s) == pytest.approx(ev.prune_rate, abs=1e-12)
    elif ev.mask_update is not None:
        assert sched.in_phase2(s) and sched.phase2_fraction(s) == pytest.approx(ev.dst_rate, abs=1e-12)
