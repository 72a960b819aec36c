"""After a Trainer run, an NMSparsity module is the sparse model: checked against copies baked outside the callback.

The dense weights each check starts from are taken from the module at ``on_train_end`` (between batches the
Parameters hold the dense ``W``) or from a checkpoint written during fit, never from the callback's state; the
N:M mask is a reference written here (top-n of |w| per group of m along the input channels).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from helpers.training import trainer as make_trainer
from lightning_sparse.callbacks import NMSparsity
from tests.conftest import TinyNet

TARGETS = ("body.0.weight", "body.3.weight", "head.weight")  # the stem (C_in = 1) stays dense


def reference_nm(w: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """W ⊙ M(W) by top-n of |w| in each group of m consecutive input channels (per output channel and tap)."""
    moved = w.movedim(1, -1) if w.ndim > 2 else w  # (C_out, k_h, k_w, C_in)
    groups = moved.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.abs().topk(n, dim=1).indices, True)
    out = (groups * keep).reshape(moved.shape)
    return out.movedim(-1, 1) if w.ndim > 2 else out


class EvalNet(TinyNet):
    """TinyNet with validation and test steps, and plain SGD (no momentum: a second fit equals a longer one)."""

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class DenseAtTrainEnd(pl.Callback):
    """Records the module's weights when training ends (the dense W: no batch is running)."""

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def baked_copy(dense_state: dict[str, torch.Tensor]) -> EvalNet:
    copy = EvalNet()
    copy.load_state_dict({k: reference_nm(v) if k in TARGETS else v for k, v in dense_state.items()})
    return copy


@pytest.fixture
def loader(digits_small):
    # 3 batches per epoch, unshuffled: a run of 3 + 3 steps sees the batches of one run of 6
    return DataLoader(Subset(digits_small.train_set, range(96)), batch_size=32, shuffle=False)


def _fit(root, loader, max_steps, nm=None, ckpt_path=None, seed=0, **kwargs):
    pl.seed_everything(seed)
    model = EvalNet()
    nm = nm or NMSparsity(n=2, m=4, decay=1e-3)
    probe = DenseAtTrainEnd()
    trainer = make_trainer(root, max_steps, [nm, probe], num_sanity_val_steps=0, **kwargs)
    with pytest.warns(UserWarning, match="skips"):
        trainer.fit(model, loader, ckpt_path=ckpt_path)
    return model, nm, probe, trainer


def test_model_after_fit_is_the_masked_model(loader, tmp_path):
    model, nm, probe, trainer = _fit(tmp_path, loader, 4)
    x = next(iter(loader))[0]
    copy = baked_copy(probe.state)
    params = dict(model.named_parameters())
    for name in TARGETS:  # the weights themselves are W ⊙ M(W): exactly half zeros, the kept ones unchanged
        assert torch.equal(params[name], reference_nm(probe.state[name])), name
        assert int((params[name] == 0).sum()) == params[name].numel() // 2
    assert torch.equal(params["stem.weight"], probe.state["stem.weight"])
    with torch.no_grad():
        for mode in (False, True):  # eval, then train mode (batch statistics)
            model.train(mode), copy.train(mode)
            torch.testing.assert_close(model(x), copy(x), rtol=0, atol=0)
        model.eval()
        with nm.masked(model):  # still works, gives the same, and leaves the module masked
            torch.testing.assert_close(model(x), copy.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), copy(x), rtol=0, atol=0)
    # what a user saves is the sparse model: a plain module loads it and computes the same logits
    plain = EvalNet()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), copy(x), rtol=0, atol=0)


def test_validate_and_test_after_fit_use_the_masked_model(loader, tmp_path):
    model, nm, probe, trainer = _fit(tmp_path, loader, 4, limit_val_batches=2, limit_test_batches=2)
    val = trainer.validate(model, loader, verbose=False)[0]["val/loss"]
    test = trainer.test(model, loader, verbose=False)[0]["test/loss"]
    reference = make_trainer(tmp_path / "ref", limit_val_batches=2, limit_test_batches=2)
    copy = baked_copy(probe.state)
    assert val == reference.validate(copy, loader, verbose=False)[0]["val/loss"]
    assert test == reference.test(copy, loader, verbose=False)[0]["test/loss"]
    params = dict(model.named_parameters())
    for name in TARGETS:  # evaluating left the module as fit did
        assert torch.equal(params[name], reference_nm(probe.state[name])), name


def test_second_fit_continues_from_the_dense_weights(loader, tmp_path):
    """fit(3 steps) then fit again on the same trainer up to 6 steps equals one fit of 6 steps, bitwise: the second
    fit trains the dense W the callback kept, not the masked weights the module held in between."""
    full, _, full_probe, _ = _fit(tmp_path / "a", loader, 6)
    model, nm, probe, trainer = _fit(tmp_path / "b", loader, 3)
    trainer.fit_loop.epoch_loop.max_steps = 6
    trainer.fit(model, loader)
    assert trainer.global_step == 6
    for k, v in full_probe.state.items():
        assert torch.equal(probe.state[k], v), k
    for (k, a), (_, b) in zip(full.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k


def _resume(root, loader, path):
    pl.seed_everything(1)  # other initial weights: everything comes from the checkpoint
    model, nm, probe = EvalNet(), NMSparsity(n=2, m=4, decay=1e-3), DenseAtTrainEnd()
    with pytest.warns(UserWarning, match="skips"):
        make_trainer(root, 6, [nm, probe], num_sanity_val_steps=0).fit(model, loader, ckpt_path=path)
    return model, probe


def test_checkpoint_saved_after_fit_holds_the_sparse_model_and_resumes_bitwise(loader, tmp_path):
    """``trainer.save_checkpoint`` after fit: the model weights are the sparse model (a plain module computes the
    masked logits from them), and resuming trains the dense W bitwise as resuming from the same checkpoint with
    the dense weights written into it (the loop state a finished fit saves is Lightning's, the same in both)."""
    model, nm, probe, trainer = _fit(tmp_path / "b", loader, 3)
    path = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    for name in TARGETS:  # the model weights are the sparse model, the dense W is in the callback's state
        assert torch.equal(saved["state_dict"][name], reference_nm(probe.state[name])), name
        assert torch.equal(saved["callbacks"][nm.state_key]["dense"][name], probe.state[name]), name
    plain = EvalNet()
    plain.load_state_dict(saved["state_dict"])
    x = next(iter(loader))[0]
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), baked_copy(probe.state).eval()(x), rtol=0, atol=0)
    # the same checkpoint holding the dense W in its model weights, as a checkpoint written during fit does
    dense_path = tmp_path / "dense.ckpt"
    del saved["callbacks"][nm.state_key]["dense"]
    saved["state_dict"] = probe.state
    torch.save(saved, dense_path)
    resumed, res_probe = _resume(tmp_path / "c", loader, path)
    reference, ref_probe = _resume(tmp_path / "d", loader, dense_path)
    for k, v in ref_probe.state.items():
        assert torch.equal(res_probe.state[k], v), k
    for (k, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_evaluating_a_checkpoint_after_fit_drops_the_kept_dense_weights(loader, tmp_path):
    """test(ckpt_path=<written during fit>) evaluates that checkpoint's weights masked, and leaves them (masked) in
    the module; a later fit continues from that checkpoint's dense W, not from the end of the earlier fit."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    every = ModelCheckpoint(dirpath=tmp_path / "ck", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    pl.seed_everything(0)
    model, nm = EvalNet(), NMSparsity(n=2, m=4, decay=1e-3)
    trainer = make_trainer(tmp_path, 4, [nm, every], num_sanity_val_steps=0, enable_checkpointing=True,
                           limit_test_batches=2)
    with pytest.warns(UserWarning, match="skips"):
        trainer.fit(model, loader)
    mid = tmp_path / "ck" / "step=2.ckpt"
    dense_mid = torch.load(mid, map_location="cpu", weights_only=True)["state_dict"]
    got = trainer.test(model, loader, ckpt_path=str(mid), verbose=False)[0]["test/loss"]
    reference = make_trainer(tmp_path / "ref", limit_test_batches=2)
    assert got == reference.test(baked_copy(dense_mid), loader, verbose=False)[0]["test/loss"]
    params = dict(model.named_parameters())
    for name in TARGETS:
        assert torch.equal(params[name], reference_nm(dense_mid[name])), name
        assert torch.equal(nm.engine.dense[name], dense_mid[name]), name


def test_load_state_dict_between_runs_is_kept(loader, tmp_path):
    """Dense weights loaded into the module after fit are what the next run masks and trains (not the kept W)."""
    model, nm, probe, trainer = _fit(tmp_path, loader, 2, limit_val_batches=1)
    pl.seed_everything(5)
    other = EvalNet().state_dict()
    model.load_state_dict(other)
    loss = trainer.validate(model, loader, verbose=False)[0]["val/loss"]
    reference = make_trainer(tmp_path / "ref", limit_val_batches=1)
    assert loss == reference.validate(baked_copy(other), loader, verbose=False)[0]["val/loss"]


def test_bake_after_fit_drops_the_dense_weights(loader, tmp_path):
    model, nm, probe, trainer = _fit(tmp_path, loader, 2)
    assert nm.at_rest and "dense" in nm.state_dict()
    assert nm.bake(model) == list(TARGETS)
    assert not nm.at_rest and "dense" not in nm.state_dict()
    params = dict(model.named_parameters())
    for name in TARGETS:
        assert torch.equal(params[name], reference_nm(probe.state[name])), name


def test_dense_warmup_not_over_leaves_the_dense_model(loader, tmp_path):
    model, nm, probe, trainer = _fit(tmp_path, loader, 2, nm=NMSparsity(n=2, m=4, dense_warmup_steps=5))
    assert not nm.at_rest
    for k, v in model.state_dict().items():
        assert torch.equal(v, probe.state[k]), k


def test_reference_mask_groups_input_channels():
    from lightning_sparse.sparsity.nm import nm_mask

    w = torch.randn(3, 8, 2, 2)
    out = reference_nm(w)
    assert ((out != 0).sum(dim=1) == 4).all()  # 2 of each group of 4 input channels, per (C_out, k_h, k_w)
    assert torch.equal(out != 0, nm_mask(w, 2, 4))
    lin = torch.randn(4, 8)
    assert torch.equal(reference_nm(lin) != 0, nm_mask(lin, 2, 4))


def test_dense_weights_that_fit_no_parameter_are_refused():
    from lightning_sparse.sparsity.engine import MaskEngine

    net = torch.nn.Linear(8, 4)
    engine = MaskEngine()
    engine.bind(net, ["weight"])
    with pytest.raises(ValueError, match=r"MaskEngine.hold_dense: dense weights \{'weight': \(4, 4\)\} fit no bound parameter"):
        engine.hold_dense({"weight": torch.zeros(4, 4)})
    engine.hold_dense({"weight": torch.ones(4, 8)})  # the module holds W ⊙ M(W) of these: here it does not
    assert engine.restore_dense_where_unchanged(lambda w: w * 0) == ["weight"]  # overwritten: keeps its value
    assert not engine.is_masked and not torch.equal(net.weight, torch.ones(4, 8))
