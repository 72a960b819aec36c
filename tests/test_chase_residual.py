"""Chase with residual channels ("prune skip"): streams as coupled groups, pooled UMM, slimming, resume."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import timm
import torch
from conftest import TinyResNet
from pytorch_lightning.callbacks import ModelCheckpoint

from helpers.training import fixed_loader, trainer
from lightning_sparse.callbacks import Chase
from lightning_sparse.slim import channel_candidates, slim_model, zero_channels
from lightning_sparse.sparsity.channels import channel_floor, channel_scores, group_channel_scores


class StopAfter(pl.Callback):
    """Stop a run whose schedule spans max_epochs after ``steps`` steps (max_steps would have to fit the schedule)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


KW = dict(density=0.1, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1, stop_gmp_epochs=2,
          stop_dst_epochs=1, update_interval=4, input_shape=(1, 8, 8), residual_channels=True)
# the residual streams of TinyResNet("basic"), written out by hand from timm's ResNet: its 64-channel stem is
# followed by a downsample shortcut in stage 1 (so the stem is a plain candidate, dense, left out)
STREAMS = {f"model.layer{i}.0.conv2": {f"model.layer{i}.0.conv2", f"model.layer{i}.0.downsample.0"} for i in (1, 2, 3, 4)}


def pooled_umm(weights, masks):
    """UMM over several producers = UMM of their filters laid side by side (independent of the code under test)."""
    w = torch.cat([x.detach().reshape(x.shape[0], -1) for x in weights], dim=1)
    m = torch.cat([(torch.ones_like(x, dtype=torch.bool) if k is None else k).reshape(x.shape[0], -1)
                   for x, k in zip(weights, masks)], dim=1)
    return channel_scores(w, m)


def test_group_channel_scores_equal_concatenated_filters():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 4, 3, 3, generator=g), torch.randn(6, 2, 1, 1, generator=g), torch.randn(6, 5, generator=g)]
    ms = [torch.rand(6, 4, 3, 3, generator=g) < 0.3, None, torch.rand(6, 5, generator=g) < 0.5]
    torch.testing.assert_close(group_channel_scores(ws, ms), pooled_umm(ws, ms))
    torch.testing.assert_close(group_channel_scores(ws[:1], ms[:1]), channel_scores(ws[0], ms[0]))
    with pytest.raises(ValueError, match="disagree on the channel count"):
        group_channel_scores([ws[0], torch.randn(5, 3)], [None, None])


class Snapshot(pl.Callback):
    """Before Chase's post-step hook: pooled UMM of every stream and the plain candidates, from the model's weights."""

    def __init__(self, chase: Chase) -> None:
        self.chase, self.scores = chase, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.chase.groups or self.chase.removed:
            return
        params, masks = dict(pl_module.named_parameters()), self.chase.engine.enforced()
        scores = {}
        for key in self.chase.groups:
            producers = STREAMS.get(key, {key})
            ws = [params[f"{p}.weight"] for p in sorted(producers)]
            scores[key] = pooled_umm(ws, [masks.get(f"{p}.weight") for p in sorted(producers)])
        self.scores.append((trainer.global_step, scores))


def test_streams_are_candidates_scored_by_pooled_umm_and_slimmed(tmp_path):
    x = next(iter(fixed_loader()))[0][:8]
    pl.seed_everything(0)
    model = TinyResNet("basic")
    chase = Chase(**{**KW, "slim": "end"})
    snap = Snapshot(chase)
    zeroed = {}

    class AtFitEnd(pl.Callback):  # before Chase: the zeroed, not yet slimmed model
        def on_fit_end(self, trainer, pl_module):
            pl_module.eval()
            with torch.no_grad():
                zeroed["logits"] = pl_module(x).clone()

    trainer(tmp_path, 18, [AtFitEnd(), snap, chase], max_epochs=3).fit(model, fixed_loader())
    # the groups are the hand-derived streams (+ plain convs), with all producers
    residual = {k: set(g.producers) for k, g in chase.groups.items() if len(g.producers) > 1}
    assert residual == STREAMS
    assert any(chase.removed.get(k) for k in STREAMS), "no residual channel was removed"
    # the slim model: every stream is narrower, consistently for all producers and consumers
    m = model.model
    widths = [m.layer1[0].conv2.out_channels, m.layer2[0].conv2.out_channels, m.layer3[0].conv2.out_channels,
              m.fc.in_features]
    assert sum(widths) < 8 + 16 + 32 + 64
    for i, w in enumerate(widths[:3]):  # producers, their BNs and the next stage's consumers agree
        block, nxt = m.get_submodule(f"layer{i + 1}")[0], m.get_submodule(f"layer{i + 2}")[0]
        assert block.downsample[0].out_channels == block.bn2.num_features == block.downsample[1].num_features == w
        assert nxt.conv1.in_channels == nxt.downsample[0].in_channels == w
    assert m.layer4[0].conv2.out_channels == m.fc.in_features
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), zeroed["logits"], rtol=1e-5, atol=1e-5)


def test_first_removal_follows_pooled_umm(tmp_path):
    pl.seed_everything(0)
    chase = Chase(**{**KW, "slim": "never"})
    snap = Snapshot(chase)
    model = TinyResNet("basic")
    trainer(tmp_path, 18, [snap, chase, StopAfter(5)], max_epochs=3).fit(model, fixed_loader())
    step, scores = snap.scores[-1]
    assert step == 4  # the first channel step: (4 + ΔT/2) is the first multiple of the 6-step epoch
    floors = {k: channel_floor(chase.start_channels[k], 0.5, 0.5) for k in scores}
    removed, kept = [], []
    for k, s in scores.items():
        gone = set(chase.removed.get(k, []))
        assert chase.start_channels[k] - len(gone) >= floors[k]
        for c, v in enumerate(s.tolist()):
            (removed if c in gone else kept).append((v, k, c))
    assert removed and any(k in STREAMS for _, k, _ in removed)
    at_floor = {k for k in scores if chase.start_channels[k] - len(chase.removed.get(k, [])) == floors[k]}
    assert max(v for v, _, _ in removed) <= min(v for v, k, _ in kept if k not in at_floor)
    # removed stream channels are zero in every producer's filters and BN, and in the consumers' inputs
    checked = 0
    for i in (1, 2, 3, 4):
        gone = chase.removed.get(f"model.layer{i}.0.conv2", [])
        b = model.model.get_submodule(f"layer{i}")[0]
        for t in (b.conv2.weight, b.bn2.weight, b.bn2.bias, b.downsample[0].weight, b.downsample[1].weight,
                  b.downsample[1].bias):
            assert torch.count_nonzero(t[gone]) == 0
        nxt = model.model.get_submodule(f"layer{i + 1}")[0] if i < 4 else None
        for t in (nxt.conv1.weight, nxt.downsample[0].weight) if nxt else (model.model.fc.weight,):
            assert torch.count_nonzero(t[:, gone]) == 0
        checked += len(gone)
    assert checked


def _fit(tmp_path, block, steps=18, ckpt=None):
    pl.seed_everything(0)
    model = TinyResNet(block, optimizer="adamw")
    chase = Chase(**KW)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=6, save_top_k=-1)
    t = trainer(tmp_path, steps, [chase, saver], max_epochs=3, enable_checkpointing=True)
    t.fit(model, fixed_loader(), ckpt_path=ckpt)
    return model, chase, t


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resume_across_residual_slimming_equals_uninterrupted(tmp_path, block):
    full_model, full, t = _fit(tmp_path / "a", block)
    assert any(full.slimmed.get(k) for k in full.groups if len(full.groups[k].producers) > 1)
    # AdamW state follows the slim shapes
    for p in full_model.parameters():
        st = t.optimizers[0].state[p]
        assert st["exp_avg"].shape == p.shape
    res_model, res, _ = _fit(tmp_path / "b", block, ckpt=str(tmp_path / "a" / "ckpt" / "step=12.ckpt"))
    assert res.arch == full.arch and res.removed == full.removed
    for (k, a), b in zip(full_model.state_dict().items(), res_model.state_dict().values()):
        assert torch.equal(a, b), k


ARCHS = ["resnet18", "resnet50", "vgg11", "mobilenetv2_050", "regnetx_002"]


@pytest.mark.parametrize("arch", ARCHS)
def test_zeroed_residual_groups_slim_to_the_same_logits(arch):
    """Every candidate group (streams included) zeroed in 30 % of its channels slims to the same logits."""
    model = timm.create_model(arch, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    groups = channel_candidates(model, x, include_residual=True)
    has_streams = any(len(g.producers) > 1 for g in groups.values())
    assert has_streams == (arch != "vgg11")
    if arch == "resnet18":  # the stem writes into stage 1's stream (identity shortcuts): one group with it
        assert set(groups["conv1"].producers) == {"conv1", "layer1.0.conv2", "layer1.1.conv2"}
    g = torch.Generator().manual_seed(0)
    removed = {k: torch.randperm(grp.channels, generator=g)[: int(0.3 * grp.channels)].tolist()
               for k, grp in groups.items()}
    for k, grp in groups.items():
        zero_channels(model, grp, removed[k])
    with torch.no_grad():
        ref = model(x)
    before = sum(p.numel() for p in model.parameters())
    slim_model(model, removed, x, include_residual=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in model.parameters()) < 0.75 * before


@pytest.mark.slow
def test_ddp_two_processes_make_identical_residual_choices(tmp_path):
    from helpers.ddp import assert_equal_across_ranks, ddp_masks

    states = ddp_masks("chase_residual", tmp_path)
    assert_equal_across_ranks(states)
    assert any(states[0]["removed"].get(k) for k in STREAMS)


def test_residual_channels_must_be_a_bool():
    with pytest.raises(ValueError, match=r"residual_channels=.yes."):
        Chase(residual_channels="yes")


def test_without_residual_streams_it_is_plain_chase(tmp_path):
    """A VGG-like net has no residual sums: residual_channels=True trains exactly as plain Chase."""
    from conftest import TinyNet

    runs = []
    for flag in (False, True):
        pl.seed_everything(0)
        model, chase = TinyNet(), Chase(**{**KW, "residual_channels": flag})
        trainer(tmp_path / str(flag), 13, [chase], max_epochs=3).fit(model, fixed_loader())
        runs.append((chase.removed, model.state_dict()))
    (rem_a, sd_a), (rem_b, sd_b) = runs
    assert rem_a == rem_b and any(rem_a.values())
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k


def test_resnet18_stream_with_the_dense_stem(tmp_path):
    """resnet18's stem feeds stage 1 through identity shortcuts: the stream's group holds the dense stem conv,
    which is scored with all its entries and slimmed with the stream."""
    from lightning_sparse.models import ImageClassifier

    pl.seed_everything(0)
    model = ImageClassifier("resnet18", num_classes=10, in_chans=1, lr=0.05)
    chase = Chase(**{**KW, "minimum_ratio": 0.2, "channel_sparsity": 0.6})
    trainer(tmp_path, 18, [chase, StopAfter(7)], max_epochs=3).fit(model, fixed_loader())  # one removal + slimming at step 6
    stem = chase.groups["model.conv1"]
    assert set(stem.producers) == {"model.conv1", "model.layer1.0.conv2", "model.layer1.1.conv2"}
    assert "model.conv1.weight" not in chase.masks  # dense first layer, still a producer of the stream
    m = model.model
    assert (m.conv1.out_channels == m.layer1[0].conv2.out_channels == m.layer1[1].conv2.out_channels
            == m.layer2[0].conv1.in_channels)
    assert sum(c.out_channels for c in (m.conv1, m.layer2[0].conv2, m.layer3[0].conv2, m.layer4[0].conv2)) < 64 + 128 + 256 + 512
