"""GradualMagnitudePruning: the cubic schedule step by step, exact zeros under optimizers and AMP, resume, DDP."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.precision import MixedPrecision

from helpers.training import fixed_loader, optimizer_state, trainer
from lightning_sparse.callbacks import GradualMagnitudePruning
from lightning_sparse.sparsity.distributions import layer_densities
from lightning_sparse.sparsity.gmp import cubic_sparsity, keep_largest, update_steps


class Recorder(pl.Callback):
    """Placed after the pruning callback: masks at every iteration start (after a possible update), and after
    every optimizer step the check that pruned weights and their optimizer state are exactly 0."""

    def __init__(self, gmp: GradualMagnitudePruning) -> None:
        self.gmp, self.masks, self.checked = gmp, {}, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.masks[trainer.global_step] = {n: m.clone() for n, m in self.gmp.masks.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for n, m in self.gmp.masks.items():
            assert torch.count_nonzero(params[n][~m]) == 0, n
            for v in trainer.optimizers[0].state[params[n]].values():
                if torch.is_tensor(v) and v.shape == m.shape:
                    assert torch.count_nonzero(v[~m]) == 0, n
        self.checked += 1


def _formula(t: int, t0: int, t_end: int, s_f: float, s_i: float = 0.0) -> float:
    """s_t = s_f + (s_i − s_f)(1 − (t − t0)/(t_end − t0))³, written out independently of the package."""
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (t_end - t0)) ** 3


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
def test_schedule_follows_the_cubic_formula_at_every_update_step(tmp_path, distribution):
    pl.seed_everything(0)
    gmp = GradualMagnitudePruning(density=0.1, distribution=distribution, initial_sparsity=0.2, update_interval=3,
                                  start_step=2, stop_step=14, sparse_first_last=True)
    rec = Recorder(gmp)
    trainer(tmp_path, 17, [gmp, rec]).fit(TinyNet(), fixed_loader())
    assert rec.checked == 17 and gmp.num_updates == 5
    assert sorted(t for t in rec.masks if t in {2, 5, 8, 11, 14}) == [2, 5, 8, 11, 14]
    numel = {n: m.numel() for n, m in gmp.masks.items()}
    shapes = {n: tuple(m.shape) for n, m in gmp.masks.items()}
    finals = layer_densities(shapes, 0.1, "uniform" if distribution == "global" else distribution)
    for t, masks in rec.masks.items():
        if t < 2:
            assert all(bool(m.all()) for m in masks.values()), t  # dense until t0
            continue
        u = min(t, 14) if t < 14 else 14
        u = 2 + 3 * ((u - 2) // 3) if u < 14 else 14  # the last update at or before t
        if distribution == "global":
            kept = sum(int(m.sum()) for m in masks.values())
            assert abs(kept - sum(numel.values()) * (1 - _formula(u, 2, 14, 0.9, 0.2))) <= 1, t
        else:
            for n, m in masks.items():
                s_f = 1.0 - finals[n]
                s_i = min(0.2, s_f)
                assert abs(int(m.sum()) - numel[n] * (1 - _formula(u, 2, 14, s_f, s_i))) <= 1, (t, n)
    final = sum(int(m.sum()) for m in gmp.masks.values())
    assert final == round(0.1 * sum(numel.values()))  # the exact global budget at the end
    steps = sorted(rec.masks)
    for a, b in zip(steps, steps[1:]):  # kept sets only shrink: a pruned weight never comes back
        assert all(bool((rec.masks[b][n] & ~rec.masks[a][n]).sum() == 0) for n in gmp.masks)


def test_each_update_keeps_the_largest_magnitudes_among_the_kept(tmp_path):
    class Before(pl.Callback):
        def __init__(self):
            self.w = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.w[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    pl.seed_everything(0)
    gmp = GradualMagnitudePruning(density=0.2, update_interval=2, stop_step=6, include=["body.0.weight"])
    before, rec = Before(), Recorder(gmp)
    trainer(tmp_path, 8, [before, gmp, rec]).fit(TinyNet(), fixed_loader())
    for t in (2, 4, 6):
        w, m = before.w[t]["body.0.weight"], rec.masks[t]["body.0.weight"]
        prev = rec.masks[t - 1]["body.0.weight"]
        assert torch.equal(m, keep_largest(w, prev, int(m.sum())))
        assert float(w[m].abs().min()) >= float(w[prev & ~m].abs().max())  # every survivor beats every pruned one


@pytest.mark.parametrize("setup", ["sgd_momentum", "adamw", "amp_bf16", "amp_fp16_gradscaler"])
def test_pruned_weights_and_optimizer_state_stay_zero(tmp_path, setup):
    pl.seed_everything(0)
    kw = {"amp_bf16": dict(precision="bf16-mixed"),
          "amp_fp16_gradscaler": dict(plugins=[MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))])}
    model = TinyNet(optimizer="adamw" if setup == "adamw" else "sgd")
    gmp = GradualMagnitudePruning(density=0.2, update_interval=2, stop_step=8, sparse_first_last=True)
    rec = Recorder(gmp)
    trainer(tmp_path, 12, [gmp, rec], **kw.get(setup, {})).fit(model, fixed_loader())
    assert rec.checked == 12 and gmp.num_updates == 5  # steps 0, 2, 4, 6, 8
    params = dict(model.named_parameters())
    assert sum(int(m.sum()) for m in gmp.masks.values()) == round(0.2 * sum(m.numel() for m in gmp.masks.values()))
    assert all(torch.count_nonzero(params[n][~m]) == 0 and int((~m).sum()) > 0 for n, m in gmp.masks.items())


def test_resume_mid_schedule_equals_uninterrupted_run(tmp_path):
    def run(ckpt=None):
        pl.seed_everything(0)
        model = TinyNet()
        gmp = GradualMagnitudePruning(density=0.2, update_interval=3, stop_step=11)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=6, save_top_k=-1)
        t = trainer(tmp_path, 12, [gmp, saver], enable_checkpointing=True)
        t.fit(model, fixed_loader(), ckpt_path=ckpt)
        return model, gmp, t

    full_model, full, full_t = run()
    # 6 batches per epoch: step 6 is an epoch boundary, and the update at step 6 runs right after the resume
    res_model, res, res_t = run(ckpt=str(tmp_path / "ckpt" / "step=6.ckpt"))
    assert res.num_updates == full.num_updates == 5  # steps 0, 3, 6, 9, 11
    for n in full.masks:
        assert torch.equal(full.masks[n], res.masks[n]), n
    for (n, a), b in zip(full_model.state_dict().items(), res_model.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(optimizer_state(full_t), optimizer_state(res_t)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fast_dev_run_prunes_once_to_the_final_density(tmp_path):
    gmp = GradualMagnitudePruning(density=0.3, update_interval=100, stop_step=10_000)
    pl.Trainer(fast_dev_run=3, accelerator="cpu", callbacks=[gmp], enable_progress_bar=False,
               enable_model_summary=False).fit(TinyNet(), fixed_loader())
    assert gmp.num_updates == 1 and gmp.last_update_step == 2
    assert sum(int(m.sum()) for m in gmp.masks.values()) == round(0.3 * sum(m.numel() for m in gmp.masks.values()))


def test_schedule_functions():
    assert cubic_sparsity(5, 5, 15, 0.9, 0.5) == 0.5 and cubic_sparsity(15, 5, 15, 0.9, 0.5) == pytest.approx(0.9)
    assert cubic_sparsity(10, 5, 15, 0.9) == pytest.approx(0.9 - 0.9 * 0.125)
    assert cubic_sparsity(3, 5, 5, 0.8) == 0.8  # n = 0: one-shot
    assert update_steps(0, 9, 3) == [0, 3, 6, 9] and update_steps(1, 8, 3) == [1, 4, 7, 8]
    assert math.isclose(_formula(7, 2, 14, 0.9, 0.2), cubic_sparsity(7, 2, 14, 0.9, 0.2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0.0}, r"`density` \(final fraction of kept weights\) must be in \(0, 1\], got density=0.0"),
        ({"density": 1.5}, r"`density` \(final fraction of kept weights\) must be in \(0, 1\], got density=1.5"),
        ({"distribution": "normal"}, r"`distribution`='normal' is not supported; choose one of \['global', 'uniform', 'erk'\]"),
        ({"update_interval": 0}, r"`update_interval` \(Δt, in steps\) must be an int >= 1, got update_interval=0"),
        ({"start_step": 100, "stop_step": 50}, "`stop_step` must be after `start_step`, got start_step=100, stop_step=50"),
        ({"stop_step": 5, "stop_epoch": 1}, r"Give one of `stop_step`, `stop_epoch` or `stop_fraction`, not several \(got "
                                            r"stop_step=5, stop_epoch=1\)"),
        ({"density": 0.5, "initial_sparsity": 0.7}, r"`initial_sparsity` \(s_i\) must be <= the final sparsity"),
        ({"initial_sparsity": 1.0}, r"`initial_sparsity` \(s_i\) must be in \[0, 1\), got initial_sparsity=1.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradualMagnitudePruning(**kwargs)


def test_pattern_matching_nothing_and_end_before_start(tmp_path, tiny_net):
    with pytest.raises(ValueError, match=r"GradualMagnitudePruning: `include` pattern\(s\) \['encoder\.\*'\] match no"):
        GradualMagnitudePruning(include=["encoder.*"]).setup(None, tiny_net, "fit")
    with pytest.raises(ValueError, match=r"ends before it starts: start_step=500, stop step=6"):
        trainer(tmp_path, 10, [GradualMagnitudePruning(start_step=500, stop_epoch=1)], max_epochs=1).fit(
            TinyNet(), fixed_loader())


def test_ddp_two_processes_keep_identical_masks(tmp_path):
    from helpers.ddp import assert_equal_across_ranks, ddp_masks

    states = ddp_masks("gmp", tmp_path)
    assert_equal_across_ranks(states)
    for s in states:  # pruned to the final density (stop_step=12 of 16 steps), the same weights on both ranks
        kept, total = sum(int(m.sum()) for m in s["masks"].values()), sum(m.numel() for m in s["masks"].values())
        assert kept == round(0.2 * total)
        assert all(torch.count_nonzero(s["weights"][n][~m]) == 0 for n, m in s["masks"].items())


def test_compare_and_sad_name_the_methods(tmp_path):
    from lightning_sparse.callbacks import SADTracker
    from lightning_sparse.compare.runs import describe_method

    def cfg(cls, **args):
        return {"sparsity": {"class_path": f"lightning_sparse.callbacks.{cls}", "init_args": args}}

    assert describe_method(cfg("GradualMagnitudePruning", density=0.05))["method"] == "GMP"
    assert describe_method(cfg("GradualMagnitudePruning", density=0.05))["density"] == 0.05
    one_shot = describe_method(cfg("OneShotPruning", pattern="nm", n=2, m=4))
    assert (one_shot["method"], one_shot["N:M"], one_shot["density"]) == ("one-shot N:M", "2:4", 0.5)
    assert describe_method(cfg("OneShotPruning", density=0.2))["method"] == "one-shot"

    pl.seed_everything(0)
    gmp = GradualMagnitudePruning(density=0.2, update_interval=2, stop_step=6)
    tracker = SADTracker(interval=2)
    trainer(tmp_path, 8, [gmp, tracker]).fit(TinyNet(), fixed_loader())
    h = tracker.history
    assert h["meta"]["method"] == "GMP (density 0.2)"
    assert h["density"][0] == 1.0 and h["density"][-1] == pytest.approx(0.2, abs=1e-3)  # dense, then pruned
    assert sum(h["sad"]) > 0
