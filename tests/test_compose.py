"""Chase, then N:M: a slimmed Chase checkpoint is fine-tuned with 2:4 SR-STE (the composition rule)."""

from __future__ import annotations

import pytorch_lightning as pl
import timm
import torch

from helpers.training import fixed_loader, out_channels, trainer
from lightning_sparse.callbacks import Chase, NMSparsity
from lightning_sparse.models import ImageClassifier
from lightning_sparse.slim import channel_config, export_slim, load_slim
from lightning_sparse.sparsity.nm import nm_violations


def test_chase_then_nm_gives_a_slim_2to4_model(tmp_path):
    pl.seed_everything(0)
    stage1 = ImageClassifier("resnet10t", num_classes=10, in_chans=1, lr=0.05)
    chase = Chase(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1, stop_gmp_epochs=2,
                  stop_dst_epochs=1, update_interval=4, round_to=4, input_shape=(1, 16, 16))
    t = trainer(tmp_path, 9, [chase], max_epochs=3)
    dense = channel_config(stage1)
    t.fit(stage1, fixed_loader(n=48, image_size=16))
    t.save_checkpoint(tmp_path / "chase.ckpt")
    assert chase.arch == channel_config(stage1) and out_channels(chase.arch) < out_channels(dense)

    # stage 2: the slim architecture comes back from the checkpoint; N:M owns every eligible layer
    stage2 = ImageClassifier("resnet10t", num_classes=10, in_chans=1, lr=0.02, checkpoint_path=str(tmp_path / "chase.ckpt"))
    dense = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    slim_params = sum(p.numel() for p in stage2.model.parameters())
    assert slim_params < sum(p.numel() for p in dense.parameters())
    x = torch.randn(2, 1, 16, 16)
    stage1.eval(), stage2.eval()
    torch.testing.assert_close(stage2(x), stage1(x), atol=1e-5, rtol=0)  # same weights, same slim shapes
    nm = NMSparsity(n=2, m=4)
    trainer(tmp_path / "nm", 6, [nm]).fit(stage2, fixed_loader(n=48, image_size=16))
    covered = nm.bake(stage2)
    params = dict(stage2.named_parameters())
    assert covered and all(nm_violations(params[n], 2, 4) == 0 for n in covered)
    assert sum(p.numel() for p in stage2.model.parameters()) == slim_params  # still slim
    # and it exports as a plain slim timm model
    path = export_slim(stage2.model, tmp_path / "slim_nm.pt", example_inputs=x, arch="resnet10t")
    loaded = load_slim(path).eval()
    stage2.eval()
    torch.testing.assert_close(loaded(x), stage2.model(x), atol=1e-5, rtol=0)
    assert all(nm_violations(loaded.get_parameter(n.removeprefix("model.")), 2, 4) == 0 for n in covered)
