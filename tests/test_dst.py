"""DynamicSparsity: mask invariants under optimizers, exact counts, resume, bad inputs."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet
from pytorch_lightning.callbacks import ModelCheckpoint

from helpers.training import fixed_loader, optimizer_state, trainer
from lightning_sparse.callbacks import DynamicSparsity
from lightning_sparse.sparsity.dst import cosine_drop_fraction, drop_grow, global_grow, global_magnitude_prune, topk_indices
from lightning_sparse.sparsity.masks import mask_optimizer_state_, random_mask
from lightning_sparse.sparsity.targets import select_targets


class InvariantChecker(pl.Callback):
    """After every optimizer step: masked weights and their optimizer state are exactly 0; counts fixed."""

    def __init__(self, dst: DynamicSparsity) -> None:
        self.dst, self.counts, self.checked, self.changed = dst, None, 0, 0
        self.prev = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        counts = {n: int(m.sum()) for n, m in self.dst.masks.items()}
        self.counts = self.counts or counts
        assert counts == self.counts
        for n, m in self.dst.masks.items():
            assert torch.count_nonzero(params[n][~m]) == 0, n
            for v in trainer.optimizers[0].state[params[n]].values():
                if torch.is_tensor(v) and v.shape == m.shape:
                    assert torch.count_nonzero(v[~m]) == 0, n
        if self.prev is not None:
            self.changed += sum(int((self.prev[n] != m).sum()) for n, m in self.dst.masks.items())
        self.prev = {n: m.clone() for n, m in self.dst.masks.items()}
        self.checked += 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("growth", ["gradient", "random"])
def test_masked_weights_stay_zero_under_every_optimizer(tmp_path, optimizer, growth):
    pl.seed_everything(0)
    model = TinyNet(optimizer=optimizer)
    dst = DynamicSparsity(density=0.2, growth=growth, update_interval=2, stop_step=10, sparse_first_last=True)
    checker = InvariantChecker(dst)
    trainer(tmp_path, 12, [dst, checker]).fit(model, fixed_loader())
    assert checker.checked == 12
    assert dst.num_updates == 5  # steps 0, 2, 4, 6, 8 (from start_step itself, as google-research/rigl)
    assert checker.changed > 0  # the masks really moved
    assert set(dst.masks) == {"stem.weight", "body.0.weight", "body.3.weight", "head.weight"}


def test_default_layers_skip_first_and_last_and_patterns_filter(tiny_net):
    assert DynamicSparsity().target_names(tiny_net) == ["body.0.weight", "body.3.weight"]
    assert DynamicSparsity(include=["body.*"], exclude=["*.3.*"]).target_names(tiny_net) == ["body.0.weight"]


def test_erk_budget_is_exact_at_init(tiny_net):
    dst = DynamicSparsity(density=0.1, sparse_first_last=True)
    dst.setup(None, tiny_net, "fit")
    total = sum(m.numel() for m in dst.masks.values())
    assert sum(int(m.sum()) for m in dst.masks.values()) == round(0.1 * total)
    params = dict(tiny_net.named_parameters())
    assert all(torch.count_nonzero(params[n][~m]) == 0 for n, m in dst.masks.items())


def test_drop_grow_keeps_count_and_uses_magnitude_and_gradient():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 16, 3, 3)
    mask = random_mask(w.shape, 400, g)
    w = w * mask
    grad = torch.randn_like(w) * ~mask  # active positions get zero gradient: dropped ones are not regrown
    new = drop_grow(w, mask, 100, "gradient", grad)
    assert int(new.sum()) == 400
    dropped = mask & ~new
    kept = mask & new
    # every dropped weight is smaller than every kept-from-before weight
    assert w[dropped].abs().max() <= w[kept].abs().min()
    grown = new & ~mask
    assert grad[grown].abs().min() >= grad[~new].abs().max()


def test_drop_grow_respects_allowed_positions():
    w = torch.arange(1.0, 17.0).view(4, 4)
    mask = torch.ones(4, 4, dtype=torch.bool)
    mask[2:] = False
    allowed = torch.ones(4, 4, dtype=torch.bool)
    allowed[3] = False
    new = drop_grow(w * mask, mask, 3, "gradient", torch.full((4, 4), 1.0), allowed=allowed)
    assert not new[3].any() and int(new.sum()) == 8


@pytest.mark.parametrize("n,k", [(100, 7), (300_000, 10), (300_000, 9_000), (300_000, 299_999)])
def test_topk_indices_matches_topk(n, k):
    torch.manual_seed(n)
    x = torch.randn(n)
    for largest in (True, False):
        ours = set(topk_indices(x, k, largest).tolist())
        ref = set(torch.topk(x, k, largest=largest).indices.tolist())
        assert ours == ref


def test_global_prune_and_grow():
    w = {"a": torch.tensor([3.0, 1.0, 0.5, 0.0]), "b": torch.tensor([2.0, 0.1, 0.0, 0.0])}
    m = {"a": torch.tensor([True, True, True, False]), "b": torch.tensor([True, True, False, False])}
    pruned = global_magnitude_prune(w, m, 3)
    assert pruned["a"].tolist() == [True, True, False, False] and pruned["b"].tolist() == [True, False, False, False]
    grads = {"a": torch.tensor([0.0, 0.0, 9.0, 1.0]), "b": torch.tensor([0.0, 5.0, 0.0, 8.0])}
    grown = global_grow(pruned, 2, "gradient", grads)
    assert grown["a"].tolist() == [True, True, True, False] and grown["b"].tolist() == [True, False, False, True]


def test_cosine_drop_fraction():
    assert cosine_drop_fraction(0, 100, 0.3) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 100, 0.3) == pytest.approx(0.15)
    assert cosine_drop_fraction(100, 100, 0.3) == 0.0


def test_mask_optimizer_state_touches_every_state_tensor():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = torch.optim.Adam([p])
    p.grad = torch.randn(4, 4)
    opt.step()
    mask = torch.rand(4, 4) > 0.5
    assert mask_optimizer_state_([opt], {"p": p}, {"p": mask}) == 2  # exp_avg, exp_avg_sq
    assert torch.count_nonzero(opt.state[p]["exp_avg"][~mask]) == 0


def test_resume_equals_uninterrupted_run(tmp_path):
    """Train 12 steps with a checkpoint at step 6; resuming from it reproduces the uninterrupted run."""

    def run(ckpt=None):
        pl.seed_everything(0)
        model = TinyNet()
        dst = DynamicSparsity(density=0.2, update_interval=2, stop_step=14, growth="random")
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=6, save_top_k=-1)
        t = trainer(tmp_path, 12, [dst, saver], enable_checkpointing=True)
        t.fit(model, fixed_loader(), ckpt_path=ckpt)  # 6 batches per epoch: step 6 is an epoch boundary
        return model, dst, t

    full_model, full_dst, full_t = run()
    res_model, res_dst, res_t = run(ckpt=str(tmp_path / "ckpt" / "step=6.ckpt"))
    assert res_dst.num_updates == full_dst.num_updates == 6  # steps 0, 2, ..., 10
    for n in full_dst.masks:
        assert torch.equal(full_dst.masks[n], res_dst.masks[n]), n
    for (n, a), b in zip(full_model.state_dict().items(), res_model.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(optimizer_state(full_t), optimizer_state(res_t)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_keeps_plain_model_keys(tmp_path):
    from lightning_sparse.models import ImageClassifier

    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1)
    dst = DynamicSparsity(density=0.3, update_interval=2)
    t = trainer(tmp_path, 3, [dst])
    t.fit(model, fixed_loader(n=48))
    t.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == set(model.state_dict())
    state = ckpt["callbacks"][dst.state_key]
    assert set(state["masks"]) == set(dst.masks) and all(v.dtype == torch.bool for v in state["masks"].values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0.0}, r"`density` must be in \(0, 1\), got density=0.0"),
        ({"density": 1.0}, r"`density` must be in \(0, 1\), got density=1.0"),
        ({"drop_fraction": 1.5}, r"`drop_fraction` must be in \(0, 1\), got drop_fraction=1.5"),
        ({"update_interval": 0}, r"`update_interval` \(ΔT, in steps\) must be an int >= 1, got update_interval=0"),
        ({"distribution": "normal"}, r"`distribution`='normal' is not supported; choose one of \['uniform', 'erk'\]"),
        ({"growth": "momentum"}, r"`growth`='momentum' is not supported; choose one of \['gradient', 'random'\]"),
        ({"start_step": 100, "stop_step": 50}, "`stop_step` must be after `start_step`, got start_step=100, stop_step=50"),
        ({"stop_step": 5, "stop_epoch": 1}, r"Give one of `stop_step`, `stop_epoch` or `stop_fraction`, not several \(got "
                                            r"stop_step=5, stop_epoch=1\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DynamicSparsity(**kwargs)


def test_include_pattern_matching_nothing(tiny_net):
    with pytest.raises(ValueError, match=r"DynamicSparsity: `include` pattern\(s\) \['encoder\.\*'\] match no weight "
                                         r"with >= 2 dims; candidates are: stem.weight, body.0.weight"):
        DynamicSparsity(include=["encoder.*"]).setup(None, tiny_net, "fit")
    with pytest.raises(ValueError, match=r"`exclude` pattern\(s\) \['b\.\*'\]"):
        select_targets(tiny_net, None, ["b.*"])


def test_stop_epoch_before_start_step_fails_at_train_start(tmp_path):
    dst = DynamicSparsity(start_step=500, stop_epoch=1)
    with pytest.raises(ValueError, match=r"stops before it starts: start_step=500, stop step=6"):
        trainer(tmp_path, 10, [dst], max_epochs=1).fit(TinyNet(), fixed_loader())


def test_model_without_prunable_layers():
    class NoConv(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

    with pytest.raises(ValueError, match="NoConv has no Conv/Linear/attention weight to make sparse; DynamicSparsity needs"):
        DynamicSparsity().setup(None, NoConv(), "fit")


@pytest.mark.parametrize("method", ["dst_rigl", "dst_set"])
def test_ddp_two_processes_keep_identical_masks(tmp_path, method):
    from helpers.ddp import assert_equal_across_ranks, assert_update_iterations_exact, ddp_masks

    states = ddp_masks(method, tmp_path)
    assert_equal_across_ranks(states)
    assert_update_iterations_exact(states)


def test_exclude_of_a_weight_the_first_last_rule_keeps_dense_is_a_noop_with_an_info_line(caplog):
    """``exclude=["*.fc.weight"]`` on a classifier whose fc is the (dense) last layer: same selection, one note."""
    import logging

    from torch import nn

    net = nn.Sequential()
    net.add_module("stem", nn.Conv2d(3, 4, 3))
    net.add_module("body", nn.Conv2d(4, 4, 3))
    net.add_module("fc", nn.Linear(4, 2))
    with caplog.at_level(logging.INFO, logger="lightning_sparse.sparsity.targets"):
        plain, excluded = select_targets(net), select_targets(net, exclude=["*fc.weight"], owner="DynamicSparsity")
    assert plain.names == excluded.names == ["body.weight"] and not plain.notes
    assert len(excluded.notes) == 1 and "['*fc.weight']" in excluded.notes[0] and "fc.weight" in excluded.describe()
    assert [r.getMessage() for r in caplog.records] == excluded.notes
    # with the first/last rule off the same pattern excludes for real, and one matching nothing is still an error
    assert select_targets(net, exclude=["*fc.weight"], first_last=False).names == ["stem.weight", "body.weight"]
    with pytest.raises(ValueError, match=r"`exclude` pattern\(s\) \['\*head\*'\] match no weight"):
        select_targets(net, exclude=["*head*"])
