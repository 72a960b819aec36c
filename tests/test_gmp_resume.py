"""GMP resumed mid-epoch from a step checkpoint continues exactly as the uninterrupted run (the digits
datamodule's sampler is resumable at any step)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet
from pytorch_lightning.callbacks import ModelCheckpoint

from helpers.training import optimizer_state, trainer
from lightning_sparse.callbacks import GradualMagnitudePruning
from lightning_sparse.data import DigitsDataModule

BATCHES = 4  # per epoch: steps 4-7 are epoch 1


def _fit(root, ckpt=None):
    pl.seed_everything(0)
    model = TinyNet()
    gmp = GradualMagnitudePruning(density=0.2, update_interval=2, stop_step=9)
    every = ModelCheckpoint(dirpath=root / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    t = trainer(root, 12, [gmp, every], enable_checkpointing=True, limit_train_batches=BATCHES, max_epochs=3)
    t.fit(model, datamodule=DigitsDataModule(image_size=8, batch_size=16, max_shift=1), ckpt_path=ckpt)
    return model, gmp, t


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("gmp_full")
    return root, *_fit(root)


@pytest.mark.parametrize("step", [5, 6])  # mid-epoch 1, between two updates; on an update step (6)
def test_mid_epoch_resume_equals_the_uninterrupted_run(tmp_path, full, step):
    root, full_model, full_gmp, full_t = full
    model, gmp, t = _fit(tmp_path, ckpt=str(root / "steps" / f"step={step}.ckpt"))
    assert gmp.num_updates == full_gmp.num_updates == 6  # steps 0, 2, 4, 6, 8, 9
    assert all(torch.equal(full_gmp.masks[n], gmp.masks[n]) for n in full_gmp.masks)
    for (n, a), b in zip(full_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(optimizer_state(full_t), optimizer_state(t)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
