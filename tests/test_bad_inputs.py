"""Bad inputs at the API and CLI level: each gives one clear error naming the value, and leaves no
half-written run directory or checkpoint behind. The troubleshooting page (docs/troubleshooting.md) lists
the same cases."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet

from helpers.training import fixed_loader, trainer

ROOT = Path(__file__).resolve().parents[1]


def _dst(**kw):
    from lightning_sparse.callbacks import DynamicSparsity

    return DynamicSparsity(**kw)


def _chase(**kw):
    from lightning_sparse.callbacks import Chase

    return Chase(**kw)


def _nm(**kw):
    from lightning_sparse.callbacks import NMSparsity

    return NMSparsity(**kw)


def _model(**kw):
    from lightning_sparse.models import ImageClassifier

    return ImageClassifier(**{"model_name": "resnet10t", "num_classes": 10, "in_chans": 1, **kw})


def _corrupt_checkpoint(tmp_path):
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint at all")
    return _model(checkpoint_path=str(bad))


def _foreign_checkpoint(tmp_path):
    import timm

    other = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", num_classes=10, in_chans=1).state_dict(), other)
    return _model(checkpoint_path=str(other))


def _no_prunable_layer(tmp_path):
    class Scale(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

    _dst().setup(None, Scale(), "fit")


def _fit_with(tmp_path, callback, model=None, **trainer_kw):
    trainer(tmp_path, 6, [callback], **trainer_kw).fit(model or TinyNet(), fixed_loader(n=48))


def _nan_at_update(tmp_path):
    class NaNNet(TinyNet):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.trainer.global_step >= 2 else loss

    _fit_with(tmp_path, _dst(density=0.3, update_interval=2, stop_step=5, max_postponed=2), NaNNet())


def _residual_only(tmp_path):
    class Res(pl.LightningModule):
        """Every conv's output feeds a residual sum: Chase has no channel it may remove."""

        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
            self.c, self.fc = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Linear(8, 10)

        def forward(self, x):
            h = self.a(x)
            h = h + self.b(h)
            return self.fc((h + self.c(h)).mean((2, 3)))

        def training_step(self, batch, i):
            return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    chase = _chase(density=0.3, channel_sparsity=0.5, channel_interval_epochs=1, stop_gmp_epochs=2, stop_dst_epochs=1,
                   sparse_first_last=True, input_shape=(1, 8, 8))
    _fit_with(tmp_path, chase, Res(), max_epochs=3)


def _missing_imagefolder(tmp_path):
    from lightning_sparse.data import ImageFolderDataModule

    ImageFolderDataModule(data_dir=str(tmp_path / "imagenet")).setup("fit")


def _fsdp(tmp_path):
    from pytorch_lightning.strategies import FSDPStrategy

    _dst().setup(type("T", (), {"strategy": FSDPStrategy()})(), TinyNet(), "fit")


API_CASES = [
    ("density outside (0, 1)", lambda t: _dst(density=1.5), ValueError, r"density=1.5"),
    ("unknown growth mode", lambda t: _dst(growth="momentum"), ValueError, r"growth`='momentum'"),
    ("update interval < 1", lambda t: _dst(update_interval=0), ValueError, r"update_interval=0"),
    ("stop before start", lambda t: _dst(start_step=10, stop_step=5), ValueError, r"start_step=10, stop_step=5"),
    ("include pattern matching nothing", lambda t: _dst(include=["enc.*"]).setup(None, TinyNet(), "fit"), ValueError,
     r"`include` pattern\(s\) \['enc\.\*'\] match no weight with >= 2 dims"),
    ("model with no prunable layers", _no_prunable_layer, ValueError, r"Scale has no Conv/Linear/attention weight"),
    ("channel sparsity outside [0, 1)", lambda t: _chase(channel_sparsity=1.0), ValueError, r"channel_sparsity=1.0"),
    ("beta outside (0, 1]", lambda t: _chase(minimum_ratio=0.0), ValueError, r"minimum_ratio=0.0"),
    ("channel removal after stop", lambda t: _chase(channel_interval_epochs=9, stop_gmp_epochs=4), ValueError,
     "Conflicting channel schedule"),
    ("a schedule span in epochs and as a fraction", lambda t: _chase(stop_gmp_epochs=8, stop_gmp_fraction=0.8), ValueError,
     r"Give `stop_gmp_epochs` \(an int of epochs\) or `stop_gmp_fraction` \(a fraction of training\), not both"),
    ("network whose convs all feed residual sums", _residual_only, ValueError,
     r"Chase found no candidate conv among the sparse layers of Res"),
    ("missing ImageFolder directory", _missing_imagefolder, FileNotFoundError, r"ImageFolder data not found: missing"),
    ("n >= m for N:M", lambda t: _nm(n=4, m=4), ValueError, r"n=4, m=4"),
    ("unknown N:M layout", lambda t: _nm(layout="rows"), ValueError, r"'rows'"),
    ("unknown timm backbone", lambda t: _model(model_name="resnet181"), ValueError, r"resnet181.*resnet18"),
    ("unknown optimizer", lambda t: _model(optimizer="adam"), ValueError, r"optimizer='adam'"),
    ("corrupt checkpoint file", _corrupt_checkpoint, ValueError, r"corrupt.pth' is not a readable checkpoint"),
    ("foreign checkpoint", _foreign_checkpoint, ValueError, r"resnet18.pth' does not fit 'resnet10t'"),
    ("NaN loss during mask updates", _nan_at_update, FloatingPointError,
     r"non-finite (weight|gradient) in 'body.0.weight' at step 4; refusing the mask update after 2 postponements"),
    ("sharded strategy (FSDP)", _fsdp, ValueError, r"does not support the sharded strategy FSDPStrategy.*ddp"),
]


@pytest.mark.parametrize(("case", "make", "exc", "match"), API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input(tmp_path, case, make, exc, match):
    with pytest.raises(exc, match=match):
        make(tmp_path)
    assert not list(tmp_path.rglob("*.ckpt"))


CLI_CASES = [
    ("bad YAML value", ["--config", "configs/quickstart.yaml", "--trainer.max_epochs=abc"], "max_epochs"),
    ("unknown config key", ["--config", "configs/quickstart.yaml", "--model.init_args.depth=3"], "depth"),
    ("missing config file", ["--config", "configs/nope.yaml"], "nope.yaml"),
    ("density out of range in YAML", ["--config", "bad_density.yaml"], "density=2"),
    ("missing data directory", ["--config", "configs/cifar10_resnet18.yaml", "--data.init_args.data_dir=no_cifar",
     "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32"], "no_cifar/cifar-10-batches-py"),
    ("corrupt checkpoint to resume from", ["fit", "--config", "configs/debug.yaml", "--ckpt_path=corrupt.ckpt"],
     "corrupt.ckpt"),
]


@pytest.mark.parametrize(("case", "args", "needle"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_exits_nonzero_without_leftovers(tmp_path, case, args, needle):
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x00garbage")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    rigl = (ROOT / "configs" / "quickstart_rigl.yaml").read_text()
    (tmp_path / "bad_density.yaml").write_text(rigl.replace("density: 0.1", "density: 2", 1))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "WANDB_MODE": "disabled"})
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout, (proc.stderr + proc.stdout)[-3000:]
    assert not list(tmp_path.rglob("*.ckpt*")) or [p.name for p in tmp_path.rglob("*.ckpt*")] == ["corrupt.ckpt"]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))
