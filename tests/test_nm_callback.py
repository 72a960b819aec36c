"""NMSparsity callback: N:M forward after every step, foreign modules, export to plain timm, resume, DDP."""

from __future__ import annotations

import copy

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from helpers.training import trainer as make_trainer
from lightning_sparse.callbacks import NMSparsity
from lightning_sparse.callbacks._base import MaskSource
from lightning_sparse.models import ImageClassifier
from lightning_sparse.sparsity.nm import nm_mask, nm_violations


def _reference_forward(mod: nn.Module, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Conv2d):
        return F.conv2d(x, w, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)
    return F.linear(x, w, mod.bias)


class _CheckForwardIsNM(pl.Callback):
    """After every optimizer step: each target layer's forward equals the layer run with W ⊙ M(W), and that
    weight has 0 N:M violations; skipped layers run dense."""

    def __init__(self, nm: NMSparsity) -> None:
        self.nm, self.checked = nm, 0

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        modules = dict(pl_module.named_modules())
        masks = self.nm.current_masks(pl_module)
        assert set(masks) == set(self.nm.targets)
        for name, mask in masks.items():
            mod = modules[name.removesuffix(".weight")]
            w_used = mod.weight * mask
            assert nm_violations(w_used, self.nm.n, self.nm.m, self.nm.layout) == 0
            assert nm_violations(mod.weight, self.nm.n, self.nm.m, self.nm.layout) > 0  # dense W is trained
            x = torch.randn(2, mod.in_channels, 5, 5) if isinstance(mod, nn.Conv2d) else torch.randn(2, mod.in_features)
            with self.nm.masked(pl_module):
                out = mod(x)
            torch.testing.assert_close(out, _reference_forward(mod, x, w_used), rtol=1e-5, atol=1e-6)
        for name in self.nm.skipped:
            mod = modules[name.removesuffix(".weight")]
            x = torch.randn(2, mod.in_channels, 5, 5)
            torch.testing.assert_close(mod(x), _reference_forward(mod, x, mod.weight))
        self.checked += 1


@pytest.mark.parametrize("mode", ["srste", "ste"])
def test_tiny_net_forward_is_nm_after_every_step(tiny_net, digits_small, tmp_path, mode):
    keys_before = list(tiny_net.state_dict())
    nm = NMSparsity(n=2, m=4, mode=mode)
    check = _CheckForwardIsNM(nm)
    with pytest.warns(UserWarning, match=r"skips 1 layer\(s\), left dense: stem.weight \(16, 1, 3, 3\)"):
        make_trainer(tmp_path, 5, [nm, check], num_sanity_val_steps=0).fit(tiny_net, digits_small.train_dataloader())
    assert check.checked == 5
    assert nm.targets == ["body.0.weight", "body.3.weight", "head.weight"]
    assert isinstance(nm, MaskSource)
    assert list(tiny_net.state_dict()) == keys_before
    assert "forward" not in tiny_net.head.__dict__  # teardown restored the class forward
    assert nm._decay_now == (0.0 if mode == "ste" else 2e-4)


def test_image_classifier_forward_is_nm_and_eval_uses_masks(digits_small, tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1, lr=0.05)
    nm = NMSparsity(n=1, m=4, layout="flattened", exclude=["model.fc.*"])
    check = _CheckForwardIsNM(nm)
    trainer = make_trainer(tmp_path, 3, [nm, check], num_sanity_val_steps=0, limit_val_batches=1)
    with pytest.warns(UserWarning, match="skips"):
        trainer.fit(model, digits_small.train_dataloader(), digits_small.val_dataloader())
    assert check.checked == 3
    assert "model.fc.weight" not in nm.targets and "model.layer1.0.conv1.weight" in nm.targets
    assert trainer.callback_metrics["nm/coverage"] > 0.9
    assert trainer.callback_metrics["sparsity/global"] == pytest.approx(0.75 * nm.coverage)
    # after fit the module holds the masked weights: its own forward is the one `nm.masked` gives, and differs
    # from the forward of the dense weights the callback keeps for the next fit
    x = next(iter(digits_small.val_dataloader()))[0][:4]
    model.eval()
    after_fit = model(x)
    with nm.masked(model):
        sparse = model(x)
    torch.testing.assert_close(sparse, after_fit, rtol=0, atol=0)
    torch.testing.assert_close(model(x), after_fit, rtol=0, atol=0)  # masked() left the module as it found it
    dense = copy.deepcopy(model)
    dense.load_state_dict(nm.engine.dense, strict=False)
    assert not torch.allclose(dense(x), sparse)


def test_baked_checkpoint_loads_into_plain_timm(digits_small, tmp_path):
    pl.seed_everything(0)
    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1, lr=0.05)
    nm = NMSparsity(n=2, m=4)
    trainer = make_trainer(tmp_path, 4, [nm], num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="skips"):
        trainer.fit(model, digits_small.train_dataloader())
    x = next(iter(digits_small.val_dataloader()))[0][:8]
    model.eval()
    with torch.no_grad(), nm.masked(model):  # the trained sparse model's logits
        sparse_logits = model(x)
    baked = nm.bake(model)
    assert baked == nm.targets
    params = dict(model.named_parameters())
    assert all(nm_violations(params[k], 2, 4) == 0 for k in baked)
    nm.detach()
    path = tmp_path / "baked.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    plain = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    plain.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), sparse_logits, rtol=1e-5, atol=1e-5)


def _fit_tiny(root, loader, max_steps, ckpt_path=None):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from tests.conftest import TinyNet

    pl.seed_everything(0)
    model = TinyNet()
    nm = NMSparsity(n=2, m=4, decay=lambda step: 1e-3 * (step + 1))
    ckpt = ModelCheckpoint(dirpath=root, filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(root, max_steps, [nm, ckpt], enable_checkpointing=True, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="skips"):
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model, nm


def test_resume_equals_uninterrupted(digits_small, tmp_path):
    # 3 batches per epoch, checkpoint at step 3 = an epoch boundary (a non-stateful loader cannot resume mid-epoch)
    loader = DataLoader(Subset(digits_small.train_set, range(96)), batch_size=32, shuffle=False)
    full, nm_full = _fit_tiny(tmp_path / "a", loader, 6)
    ckpt = tmp_path / "a" / "step=3.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"][nm_full.state_key]
    assert saved["global_step"] == 2 and saved["targets"] == nm_full.targets
    resumed, nm_res = _fit_tiny(tmp_path / "b", loader, 6, ckpt_path=ckpt)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    masks_res = nm_res.current_masks(resumed)
    for k, mask in nm_full.current_masks(full).items():
        assert torch.equal(mask, masks_res[k])
    assert nm_res.global_step == nm_full.global_step == 5


def test_dense_warmup_then_masking(tiny_net, digits_small, tmp_path):
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(nm.masking)

    nm = NMSparsity(dense_warmup_steps=2, include=["body.*", "head.weight"])
    make_trainer(tmp_path, 4, [nm, Record()], num_sanity_val_steps=0).fit(tiny_net, digits_small.train_dataloader())
    assert seen == [False, False, True, True]
    assert nm.targets == ["body.0.weight", "body.3.weight", "head.weight"] and nm.skipped == {}


def test_include_selects_and_state_dict_roundtrip(tiny_net):
    nm = NMSparsity(n=2, m=8, include=["head.*"])
    nm.attach(tiny_net)
    assert nm.targets == ["head.weight"] and nm.skipped == {}
    dense = tiny_net.head.weight.detach().clone()
    with nm.masked(tiny_net):
        assert torch.equal(tiny_net.head.weight, dense * nm_mask(dense, 2, 8))
        assert torch.equal(tiny_net.body[0].weight, dict(tiny_net.named_parameters())["body.0.weight"])
    assert torch.equal(tiny_net.head.weight, dense)
    state = nm.state_dict()
    other = NMSparsity(n=2, m=8, include=["head.*"])
    other.load_state_dict({**state, "global_step": 7})
    assert other.global_step == 7
    nm.detach()


@pytest.mark.parametrize("accumulate", [1, 3])
def test_optimizer_sees_the_exact_srste_gradient(tiny_net, digits_small, tmp_path, accumulate):
    """The gradient at the optimizer step equals an independent computation: the loss of a copy whose weights
    are W ⊙ M(W) baked outside the callback, differentiated w.r.t. those weights, plus λ·(1 − M) ⊙ W —
    also with gradient accumulation (the decay is added once per optimizer step)."""
    decay = 0.05
    nm = NMSparsity(n=2, m=4, decay=decay, include=["body.*", "head.weight"])
    seen = {}

    class Check(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % accumulate == 0:
                seen["w"] = {k: w.clone() for k, w in nm.engine.dense.items()}  # NMSparsity ran first: W aside
                seen["batches"] = []
            seen["batches"].append(batch)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            copy = TinyNet()
            copy.load_state_dict(pl_module.state_dict())
            params = dict(copy.named_parameters())
            with torch.no_grad():
                for k in nm.targets:
                    params[k].mul_(nm_mask(seen["w"][k], 2, 4))
            for x, y in seen["batches"]:
                (F.cross_entropy(copy(x), y) / accumulate).backward()
            got = dict(pl_module.named_parameters())
            for k in nm.targets:
                w = seen["w"][k]
                assert torch.equal(got[k].detach(), w)  # the optimizer steps the dense W
                expected = params[k].grad + decay * (~nm_mask(w, 2, 4)) * w
                torch.testing.assert_close(got[k].grad, expected, rtol=1e-5, atol=1e-7)
            seen["checked"] = seen.get("checked", 0) + 1

    from tests.conftest import TinyNet

    make_trainer(tmp_path, 2, [nm, Check()], num_sanity_val_steps=0, accumulate_grad_batches=accumulate).fit(
        tiny_net, digits_small.train_dataloader())
    assert seen["checked"] == 2


# ---------------------------------------------------------------- bad inputs, one test per message
def test_bad_n_not_below_m():
    with pytest.raises(ValueError, match=r"`n` must be < `m` for N:M sparsity, got n=4, m=4"):
        NMSparsity(n=4, m=4)


def test_bad_n_below_one():
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 1 for N:M sparsity, got n=0"):
        NMSparsity(n=0, m=4)


def test_bad_layout():
    with pytest.raises(ValueError, match=r"`layout`='columns' is not supported; choose one of \['input_channels', 'flattened'\]"):
        NMSparsity(layout="columns")


def test_bad_mode():
    with pytest.raises(ValueError, match=r"`mode`='prune' is not supported; choose one of \['srste', 'ste'\]"):
        NMSparsity(mode="prune")


def test_bad_decay():
    with pytest.raises(ValueError,
                       match=r"`decay` \(λ_W, a float or a Callable\[\[int\], float\]\) must be >= 0, got decay=-1.0"):
        NMSparsity(decay=-1.0)


def test_bad_decay_callable_value():
    nm = NMSparsity(decay=lambda step: -1.0)
    with pytest.raises(ValueError, match=r"`decay` callable returned -1.0 at step 3; must be >= 0"):
        nm._run_step(3)


def test_bad_pattern_type():
    with pytest.raises(ValueError, match=r"`include` must be a list of fnmatch patterns \(str\) or None, got include='head'"):
        NMSparsity(include="head")


def test_bad_dense_warmup_steps():
    with pytest.raises(ValueError, match=r"`dense_warmup_steps` must be an int >= 0, got dense_warmup_steps=-2"):
        NMSparsity(dense_warmup_steps=-2)


def test_m_not_supported_for_layout(tiny_net):
    with pytest.raises(ValueError, match=r"m=5 is not supported for layout='input_channels' on this model"):
        NMSparsity(n=2, m=5).attach(tiny_net)


def test_include_matching_nothing(tiny_net):
    with pytest.raises(ValueError, match=r"NMSparsity: `include` pattern\(s\) \['encoder\.\*'\] match no weight with >= 2 "
                                         r"dims; candidates are: stem.weight"):
        NMSparsity(include=["head.weight", "encoder.*"]).attach(tiny_net)


def test_exclude_matching_nothing(tiny_net):
    with pytest.raises(ValueError, match=r"NMSparsity: `exclude` pattern\(s\) \['fc'\] match no weight"):
        NMSparsity(exclude=["fc"]).attach(tiny_net)


def test_checkpoint_from_other_config():
    nm = NMSparsity(n=2, m=4)
    with pytest.raises(ValueError, match=r"NMSparsity checkpoint was saved with \{'n': 1, 'm': 4"):
        nm.load_state_dict({**nm.state_dict(), "n": 1})


# ---------------------------------------------------------------- DDP
class _GatherMasks(pl.Callback):
    def __init__(self, nm: NMSparsity, out: str) -> None:
        self.nm, self.out = nm, out

    def on_train_end(self, trainer, pl_module):
        masks = self.nm.current_masks(pl_module)
        flat = torch.cat([m.flatten() for m in masks.values()]).to(torch.uint8)
        gathered = trainer.strategy.all_gather(flat)  # (world_size, numel)
        assert gathered.shape[0] == 2
        assert torch.equal(gathered[0], gathered[1])
        if trainer.global_rank == 0:
            torch.save({"masks": masks, "gathered": gathered}, self.out)


@pytest.mark.slow
def test_ddp_two_processes_hold_equal_masks(digits_small, tmp_path):
    from tests.conftest import TinyNet

    pl.seed_everything(0)
    nm = NMSparsity(n=2, m=4)
    out = str(tmp_path / "masks.pt")
    trainer = make_trainer(tmp_path, 4, [nm, _GatherMasks(nm, out)], devices=2, strategy="ddp_spawn")
    trainer.fit(TinyNet(), digits_small.train_dataloader())
    saved = torch.load(out, weights_only=False)
    assert saved["gathered"].shape[0] == 2
    assert set(saved["masks"]) == {"body.0.weight", "body.3.weight", "head.weight"}
    assert all((m.view(-1, 4) if m.ndim == 2 else m.permute(0, 2, 3, 1).reshape(-1, 4)).sum(1).eq(2).all()
               for m in saved["masks"].values())
