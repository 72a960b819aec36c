"""Chase: channel schedule, floors, UMM selection, budget, slimming, resume, DDP, bad inputs."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet
from pytorch_lightning.callbacks import ModelCheckpoint

from helpers.training import fixed_loader, trainer
from lightning_sparse.callbacks import Chase
from lightning_sparse.sparsity.channels import channel_floor, channel_scores, channel_sparsity_schedule

KW = dict(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1, stop_gmp_epochs=2,
          stop_dst_epochs=1, update_interval=4, input_shape=(1, 8, 8))


class Before(pl.Callback):
    """Runs before Chase in every hook (after the optimizer step): snapshot of UMM scores and active channels."""

    def __init__(self, chase: Chase) -> None:
        self.chase, self.snap = chase, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        c = self.chase
        if not c.groups:
            return
        params = dict(pl_module.named_parameters())
        masks = c.engine.enforced()
        self.snap = {
            layer: (channel_scores(params[f"{layer}.weight"], masks[f"{layer}.weight"]).clone(),
                    set(c.channels.original_channels(layer)) - set(c.removed.get(layer, [])))
            for layer in c.groups
        }


class After(pl.Callback):
    """Runs after Chase: checks every channel removal against CHASE.md §2."""

    def __init__(self, chase: Chase, before: Before) -> None:
        self.chase, self.before, self.removals = chase, before, []
        self.prev_removed = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        c = self.chase
        n_removed = sum(len(v) for v in c.removed.values())
        if n_removed == self.prev_removed:
            return
        self.prev_removed = n_removed
        step = trainer.global_step  # steps done: the removal ran after this step
        spe = 6
        # the reference reads the cubic target before counting the step (t = step - 1)
        s_t = channel_sparsity_schedule(step - 1, c.stop_gmp_epochs * spe, c.channel_sparsity)
        total = sum(c.start_channels.values())
        active = c.active_channels()
        # 1. total active channels follow the cubic schedule
        assert sum(active.values()) == math.floor((1 - s_t) * total + 1e-9)
        # 2. floors hold
        for layer, n in active.items():
            assert n >= channel_floor(c.start_channels[layer], c.channel_sparsity, c.minimum_ratio)
        # 3. removed channels are the lowest-UMM ones among layers not held by their floor
        newly = {g: set(c.removed.get(g, [])) - (set(c.channels.original_channels(g)) - self.before.snap[g][1])
                 for g in c.groups}
        removed_scores, kept_scores = [], []
        for layer, (scores, was_active) in self.before.snap.items():
            orig = c.channels.original_channels(layer)
            floor = channel_floor(c.start_channels[layer], c.channel_sparsity, c.minimum_ratio)
            for i, ch in enumerate(orig):
                if ch in newly[layer]:
                    removed_scores.append(float(scores[i]))
                elif ch in was_active and active[layer] > floor:
                    kept_scores.append(float(scores[i]))
        assert removed_scores and max(removed_scores) <= min(kept_scores, default=float("inf"))
        # 4. the removal leaves the other masks alone (reference ``update_erk_dic`` only re-solves the targets):
        # the count can only have dropped below the budget B carried before; nothing in removed channels
        assert sum(int(m.sum()) for m in c.masks.values()) <= _budget() + c.total_weights * (c.drop_fraction + 0.005)
        params = dict(pl_module.named_parameters())
        for layer in c.groups:
            w = params[f"{layer}.weight"]
            idx = [i for i, ch in enumerate(c.channels.original_channels(layer)) if ch in set(c.removed.get(layer, []))]
            assert torch.count_nonzero(w[idx]) == 0 and not c.masks[f"{layer}.weight"][idx].any()
        self.removals.append(step)


def _budget() -> int:
    """B computed here from the density and TinyNet's shapes: the two middle convs are sparse, stem and head dense."""
    params = dict(TinyNet().named_parameters())
    return round(KW["density"] * sum(params[n].numel() for n in ("body.0.weight", "body.3.weight")))


def _fit(tmp_path, steps=18, ckpt=None, extra=(), **kw):
    pl.seed_everything(0)
    model = TinyNet()
    chase = Chase(**{**KW, **kw})
    cbs = [chase, *extra]
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=6, save_top_k=-1)
    t = trainer(tmp_path, steps, [*cbs, saver], max_epochs=3, enable_checkpointing=True)
    t.fit(model, fixed_loader(), ckpt_path=ckpt)
    return model, chase, t


def test_channel_schedule_floor_selection_and_budget(tmp_path):
    pl.seed_everything(0)
    chase = Chase(**KW, slim="never")
    before = Before(chase)
    after = After(chase, before)
    model = TinyNet()
    trainer(tmp_path, 18, [before, chase, after], max_epochs=3).fit(model, fixed_loader())
    # (step + ΔT/2) % (1 epoch = 6 steps) == 0 while step < 2 epochs: after steps 4 and 10
    assert after.removals == [4, 10]
    last_target = channel_sparsity_schedule(9, 12, 0.5)
    assert sum(chase.active_channels().values()) == math.floor((1 - last_target) * sum(chase.start_channels.values()))
    # phase 2 never leaves a layer below its count, so the network ends with at least B weights
    assert set(chase.masks) == {"body.0.weight", "body.3.weight"} and chase.budget == _budget() == 4147
    assert sum(int(m.sum()) for m in chase.masks.values()) >= _budget()


def test_slimming_during_training_keeps_outputs_and_trains_on(tmp_path):
    class Probe(pl.Callback):
        """Logits on a fixed batch right before and right after the slimming at step 6."""

        def __init__(self):
            self.x = fixed_loader(n=16).dataset.tensors[0]
            self.logits, self.losses = {}, []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            pl_module.eval()
            with torch.no_grad():
                self.logits[trainer.global_step] = (sum(p.numel() for p in pl_module.parameters()), pl_module(self.x))
            pl_module.train()

    probe = Probe()
    pl.seed_everything(0)
    chase = Chase(**KW)
    model = TinyNet()
    pre = {}
    slim = chase._run_slim

    def logits_then_slim(trainer, pl_module):  # the zeroed model's logits right before it is slimmed
        pl_module.eval()
        with torch.no_grad():
            pre[trainer.global_step] = pl_module(probe.x)
        pl_module.train()
        slim(trainer, pl_module)

    chase._run_slim = logits_then_slim
    trainer(tmp_path, 18, [chase, probe], max_epochs=3).fit(model, fixed_loader())
    assert sorted(pre) == [4, 10]
    for step, logits in pre.items():
        torch.testing.assert_close(probe.logits[step][1], logits, atol=1e-5, rtol=0)
    n_params = [probe.logits[s][0] for s in (3, 4, 10)]
    assert n_params[0] > n_params[1] > n_params[2]
    assert model.body[0].out_channels < 32 and model.head.in_features < 32
    assert sum(probe.losses[-4:]) < sum(probe.losses[:4])  # the slim model keeps learning


def test_resume_across_slimming_equals_uninterrupted(tmp_path):
    full_model, full, _ = _fit(tmp_path / "a")  # checkpoints every 6 steps; slimming after steps 4 and 10
    res_model, res, _ = _fit(tmp_path / "b", ckpt=str(tmp_path / "a" / "ckpt" / "step=12.ckpt"))
    assert res.arch == full.arch and res.removed == full.removed and res.slimmed == full.slimmed
    assert full.slimmed  # the checkpoint really was taken after a slimming point
    for k in full.masks:
        assert torch.equal(full.masks[k], res.masks[k]), k
    for (k, a), b in zip(full_model.state_dict().items(), res_model.state_dict().values()):
        assert torch.equal(a, b), k


def test_chase_umm_differs_from_maskwise_choice():
    w = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.6, 0.6, 0.6, 0.6]])
    m = w != 0
    umm = channel_scores(w, m, "umm")
    maskwise = channel_scores(w, m, "maskwise")
    assert umm.argmin() == 0 and maskwise.argmin() == 1


def test_ddp_two_processes_make_identical_channel_choices(tmp_path):
    from helpers.ddp import assert_equal_across_ranks, assert_update_iterations_exact, ddp_masks

    states = ddp_masks("chase", tmp_path)
    assert_equal_across_ranks(states)
    assert_update_iterations_exact(states)
    assert any(states[0]["removed"].values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"channel_sparsity": 1.0}, r"`channel_sparsity` \(S_c\) must be in \[0, 1\), got channel_sparsity=1.0"),
        ({"channel_sparsity": -0.1}, r"`channel_sparsity` \(S_c\) must be in \[0, 1\), got channel_sparsity=-0.1"),
        ({"minimum_ratio": 0.0}, r"`minimum_ratio` \(β\) must be in \(0, 1\], got minimum_ratio=0.0"),
        ({"minimum_ratio": 1.5}, r"`minimum_ratio` \(β\) must be in \(0, 1\], got minimum_ratio=1.5"),
        ({"channel_interval_epochs": 10, "stop_gmp_epochs": 5}, "Conflicting channel schedule"),
        ({"score": "l1"}, r"`score`='l1' is not supported; choose one of \['umm', 'maskwise'\]"),
        ({"slim": "later"}, r"`slim`='later' is not supported"),
        ({"phase2_drop_fraction": (0.1, 0.5)}, "phase2_drop_fraction"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Chase(**kwargs)


def test_schedule_longer_than_training_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"does not fit max_epochs=3, max_steps=18 \(18 optimizer steps\): stop_gmp_epochs=5 "
                                         r"\(step 30\) must be <= the 18 training steps\. Give the schedule as fractions"):
        trainer(tmp_path, 18, [Chase(**{**KW, "stop_gmp_epochs": 5})], max_epochs=3).fit(TinyNet(), fixed_loader())


def test_architecture_that_cannot_be_slimmed(tmp_path):
    class ResidualOnly(TinyNet):
        """Every conv feeds a residual sum: nothing can be removed."""

        def forward(self, x):
            h = torch.relu(self.stem(x))
            return self.head(self.body(h) + 0)

    class Res(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.c = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.fc = torch.nn.Linear(8, 10)

        def forward(self, x):
            h = self.a(x)
            h = h + self.b(h)
            h = h + self.c(h)
            return self.fc(h.mean((2, 3)))

        def training_step(self, batch, i):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match=r"Chase found no candidate conv among the sparse layers of Res"):
        trainer(tmp_path, 6, [Chase(**{**KW, "sparse_first_last": True})], max_epochs=3).fit(Res(), fixed_loader())


class LogitsAtFitEnd(pl.Callback):
    """Placed before Chase: the zeroed (not yet slimmed) model's logits and conv widths at the end of fit."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.logits, self.widths = x, None, None

    def on_fit_end(self, trainer, pl_module):
        pl_module.eval()
        with torch.no_grad():
            self.logits = pl_module(self.x).clone()
        self.widths = {n: m.out_channels for n, m in pl_module.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_slim_at_end_on_one_device(tmp_path):
    x = next(iter(fixed_loader()))[0][:8]
    probe = LogitsAtFitEnd(x)
    pl.seed_everything(0)
    model = TinyNet()
    chase = Chase(**{**KW, "slim": "end"})
    trainer(tmp_path, 18, [probe, chase], max_epochs=3).fit(model, fixed_loader())
    removed = {layer: len(ch) for layer, ch in chase.removed.items() if ch}
    assert removed  # channels were removed during training ...
    for layer, n in removed.items():  # ... kept as zeros until the end (full width then), slimmed after
        assert probe.widths[layer] == chase.start_channels[layer]
        assert model.get_submodule(layer).out_channels == chase.start_channels[layer] - n
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), probe.logits, rtol=1e-5, atol=1e-5)
