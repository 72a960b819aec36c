"""OneShotPruning: the masks of a loaded dense checkpoint (largest |w| or N:M), fixed through fine-tuning."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from helpers.training import fixed_loader, trainer
from lightning_sparse.callbacks import OneShotPruning
from lightning_sparse.models import ImageClassifier
from lightning_sparse.sparsity.nm import nm_mask, nm_violations


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """A 'trained' dense resnet10t saved as a plain state_dict file, and its weights."""
    torch.manual_seed(0)
    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1)
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    torch.save(model.model.state_dict(), path)
    return str(path), {f"model.{k}": v.clone() for k, v in model.model.state_dict().items()}


class FineTuneCheck(pl.Callback):
    """The masks right after the fit started, and a check after every step that they are unchanged and exact."""

    def __init__(self, cb: OneShotPruning) -> None:
        self.cb, self.first, self.steps = cb, None, 0

    def on_train_start(self, trainer, pl_module):
        self.first = {n: m.clone() for n, m in self.cb.masks.items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        for n, m in self.cb.masks.items():
            assert torch.equal(m, self.first[n]), n
            assert torch.count_nonzero(params[n][~m]) == 0, n
            for v in trainer.optimizers[0].state[params[n]].values():
                if torch.is_tensor(v) and v.shape == m.shape:
                    assert torch.count_nonzero(v[~m]) == 0, n
        self.steps += 1


def _fit(path: str, cb: OneShotPruning, tmp_path, steps: int = 3) -> tuple[ImageClassifier, FineTuneCheck]:
    pl.seed_everything(0)
    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1, checkpoint_path=path)
    check = FineTuneCheck(cb)
    trainer(tmp_path, steps, [cb, check]).fit(model, fixed_loader(n=48))
    assert check.steps == steps
    return model, check


def test_global_keeps_exactly_the_largest_magnitudes_of_the_loaded_weights(dense_checkpoint, tmp_path):
    path, loaded = dense_checkpoint
    cb = OneShotPruning(density=0.1, distribution="global")
    _, check = _fit(path, cb, tmp_path)
    names = list(check.first)
    assert "model.conv1.0.weight" not in names and "model.fc.weight" not in names  # first/last stay dense
    scores = torch.cat([loaded[n].abs().flatten() for n in names])
    budget = round(0.1 * scores.numel())
    threshold = torch.sort(scores, descending=True).values[budget - 1]
    kept = torch.cat([check.first[n].flatten() for n in names])
    assert int(kept.sum()) == budget
    assert torch.equal(kept, scores >= threshold)  # random weights: no ties at the threshold


def test_per_layer_uniform_prunes_every_layer_by_its_own_magnitudes(dense_checkpoint, tmp_path):
    path, loaded = dense_checkpoint
    cb = OneShotPruning(density=0.25, distribution="uniform")
    _, check = _fit(path, cb, tmp_path, steps=2)
    for n, m in check.first.items():
        k = int(m.sum())
        assert abs(k - 0.25 * m.numel()) <= 1, n
        threshold = torch.sort(loaded[n].abs().flatten(), descending=True).values[k - 1]
        assert torch.equal(m, loaded[n].abs() >= threshold), n


def test_nm_keeps_the_nm_pattern_of_the_loaded_weights(dense_checkpoint, tmp_path):
    path, loaded = dense_checkpoint
    cb = OneShotPruning(pattern="nm", n=2, m=4)
    model, check = _fit(path, cb, tmp_path)
    assert "model.conv1.0.weight" in cb.skipped  # C_in = 1: left dense, with a warning
    assert "model.fc.weight" in check.first  # N:M covers every eligible layer, the classifier included
    params = dict(model.named_parameters())
    for n, m in check.first.items():
        assert torch.equal(m, nm_mask(loaded[n], 2, 4)), n
        assert nm_violations(params[n].detach(), 2, 4) == 0, n
    assert cb.density == 0.5


def test_loaded_run_counts_one_shot_nm_as_nm(dense_checkpoint, tmp_path):
    from lightning_sparse.run import NM, load_run_model

    path, _ = dense_checkpoint
    cb = OneShotPruning(pattern="nm", n=2, m=4)
    model, check = _fit(path, cb, tmp_path, steps=1)
    t = trainer(tmp_path, 1, [cb])
    t.strategy.connect(model)
    t.save_checkpoint(tmp_path / "nm.ckpt")
    run = load_run_model(tmp_path / "nm.ckpt", image_size=32)
    assert run.nm == {n.removeprefix("model."): NM(2, 4) for n in check.first}  # compare and export count N/M
    payload = torch.load(tmp_path / "nm.ckpt", weights_only=False)
    payload["state_dict"]["model.fc.weight"][0, :4] = 1.0  # four nonzeros in a group of four
    torch.save(payload, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=r"nonzero outside the masks of callback OneShotPruning.*'model.fc.weight': 2"):
        load_run_model(tmp_path / "bad.ckpt", image_size=32)


def test_masks_survive_a_resume(dense_checkpoint, tmp_path):
    path, _ = dense_checkpoint
    cb = OneShotPruning(density=0.2)
    model, check = _fit(path, cb, tmp_path, steps=2)
    t = trainer(tmp_path, 2, [cb])
    t.strategy.connect(model)
    t.save_checkpoint(tmp_path / "c.ckpt")
    resumed = OneShotPruning(density=0.2)
    fresh = ImageClassifier("resnet10t", num_classes=10, in_chans=1)  # other weights: other one-shot masks
    check2 = FineTuneCheck(resumed)
    trainer(tmp_path, 4, [resumed, check2]).fit(fresh, fixed_loader(n=48), ckpt_path=str(tmp_path / "c.ckpt"))
    assert all(torch.equal(check2.first[n], check.first[n]) for n in check.first)


def test_dense_weights_given_as_ckpt_path_are_refused(dense_checkpoint, tmp_path):
    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1)
    t = trainer(tmp_path, 1, [])
    t.strategy.connect(model)
    t.save_checkpoint(tmp_path / "dense.ckpt")  # a training state without OneShotPruning masks
    with pytest.raises(ValueError, match=r"OneShotPruning: fit started from ckpt_path=.*dense.ckpt.*holds no "
                                         r"OneShotPruning masks.*model.init_args.checkpoint_path"):
        trainer(tmp_path, 2, [OneShotPruning(density=0.2)]).fit(model, fixed_loader(n=48),
                                                                ckpt_path=str(tmp_path / "dense.ckpt"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pattern": "channel"}, r"`pattern`='channel' is not supported; choose one of \['unstructured', 'nm'\]"),
        ({"density": 0.0}, r"`density` \(fraction of kept weights\) must be in \(0, 1\], got density=0.0"),
        ({"density": 2}, r"`density` \(fraction of kept weights\) must be in \(0, 1\], got density=2"),
        ({"distribution": "normal"}, r"`distribution`='normal' is not supported; choose one of \['global', 'uniform', 'erk'\]"),
        ({"pattern": "nm", "n": 4, "m": 4}, r"`n` must be < `m` for N:M sparsity, got n=4, m=4"),
        ({"layout": "rows"}, r"`layout`='rows' is not supported; choose one of \['input_channels', 'flattened'\]"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OneShotPruning(**kwargs)


def test_pattern_matching_nothing_and_m_fitting_no_layer(tiny_net):
    with pytest.raises(ValueError, match=r"OneShotPruning: `exclude` pattern\(s\) \['encoder\.\*'\] match no weight"):
        OneShotPruning(exclude=["encoder.*"]).setup(None, tiny_net, "fit")
    with pytest.raises(ValueError, match=r"OneShotPruning: m=64 fits none of the 4 target weights"):
        OneShotPruning(pattern="nm", n=1, m=64).setup(None, tiny_net, "fit")
