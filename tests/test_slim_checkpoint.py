"""A checkpoint written after Chase slimmed the network works everywhere a checkpoint works.

For our ``ImageClassifier`` (its own ``on_load_checkpoint``) and for a LightningModule that is not ours
(Chase's strategy shim, or the one-line hook): ``Trainer.validate/test/predict(ckpt_path=...)``,
``fit(ckpt_path=...)`` and ``load_from_checkpoint``. Every result is compared with the in-memory slimmed
model that wrote the checkpoint (its logits, and accuracy/loss computed here by hand).
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from conftest import TinyNet
from torch.utils.data import DataLoader, TensorDataset

from helpers.training import fixed_loader, out_channels, trainer
from lightning_sparse.callbacks import Chase
from lightning_sparse.callbacks._slim_restore import restore_before_weights_load
from lightning_sparse.models import ImageClassifier
from lightning_sparse.slim import channel_config, find_channel_config, restore_channel_config

KW = dict(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1, stop_gmp_epochs=2,
          stop_dst_epochs=1, update_interval=4)


class Foreign(TinyNet):
    """A LightningModule that is not ours, with evaluation steps and nothing about slimming."""

    def _eval(self, batch, stage):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y))
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean())

    def validation_step(self, batch, batch_idx):
        self._eval(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval(batch, "test")


class ForeignWithHook(Foreign):
    """The one line a user adds so that ``load_from_checkpoint`` (no Trainer, no Chase) loads a slim checkpoint."""

    def on_load_checkpoint(self, checkpoint):
        restore_channel_config(self, checkpoint, torch.randn(1, 1, 8, 8))


def _data(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = next(iter(fixed_loader(n=64, batch_size=64, image_size=image_size)))
    return x, y


def _expected(model: pl.LightningModule, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Logits, accuracy and mean loss of the in-memory model, computed here without Lightning."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
    return logits, (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


def _train_slim(tmp_path, module: pl.LightningModule, input_shape, image_size) -> str:
    """Chase with slimming during training; returns the checkpoint path written at the end."""
    pl.seed_everything(0)
    chase = Chase(**KW, input_shape=input_shape)
    t = trainer(tmp_path, 9, [chase], max_epochs=3)
    dense = channel_config(module)
    t.fit(module, fixed_loader(n=48, image_size=image_size))
    assert chase.slimmed and chase.arch == channel_config(module)  # the network really was slimmed
    assert out_channels(chase.arch) < out_channels(dense)
    path = str(tmp_path / "slim.ckpt")
    t.save_checkpoint(path)
    return path


def _evaluate(module, ckpt, x, y, callbacks=()):
    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    t = trainer(callbacks=callbacks, enable_checkpointing=True)
    val = t.validate(module, loader, ckpt_path=ckpt, verbose=False)[0]
    test = t.test(module, loader, ckpt_path=ckpt, verbose=False)[0]
    preds = t.predict(module, DataLoader(x, batch_size=len(x)), ckpt_path=ckpt)
    return val, test, torch.cat(preds)


# ------------------------------------------------------------------------------------------------- ours
@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ours")
    model = ImageClassifier("resnet10t", num_classes=10, in_chans=1, lr=0.05)
    ckpt = _train_slim(tmp, model, (1, 16, 16), 16)
    x, y = _data(16)
    return model, ckpt, x, y


def test_imageclassifier_checkpoint_stores_its_channel_config(ours):
    model, ckpt, _, _ = ours
    state = torch.load(ckpt, weights_only=False)
    dense = ImageClassifier("resnet10t", num_classes=10, in_chans=1)
    assert state["channel_config"] == channel_config(model) != channel_config(dense)
    # Chase's state holds the same configuration; both are found under the module's names
    assert find_channel_config({"callbacks": state["callbacks"]}) == state["channel_config"]
    with pytest.raises(RuntimeError, match="size mismatch"):  # why the rebuild is needed at all
        dense.load_state_dict(state["state_dict"])


def test_imageclassifier_load_from_checkpoint(ours):
    model, ckpt, x, y = ours
    logits, _, _ = _expected(model, x, y)
    loaded = ImageClassifier.load_from_checkpoint(ckpt).eval()
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in loaded.parameters()) < sum(
        p.numel() for p in ImageClassifier("resnet10t", num_classes=10, in_chans=1).parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_chase", [False, True], ids=["no_callback", "with_chase"])
def test_imageclassifier_validate_test_predict(ours, with_chase):
    model, ckpt, x, y = ours
    logits, acc, loss = _expected(model, x, y)
    fresh = ImageClassifier("resnet10t", num_classes=10, in_chans=1)  # dense: the checkpoint must re-slim it
    callbacks = [Chase(**KW, input_shape=(1, 16, 16))] if with_chase else []
    val, test, preds = _evaluate(fresh, ckpt, x, y, callbacks)
    assert channel_config(fresh) == channel_config(model)
    assert val["val/acc"] == pytest.approx(acc, abs=1e-6) and test["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert test["test/loss"] == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(preds, logits, rtol=0, atol=1e-5)


def test_imageclassifier_create_backbone_from_slim_checkpoint(ours):
    model, ckpt, x, y = ours
    logits, _, _ = _expected(model, x, y)
    stage2 = ImageClassifier("resnet10t", num_classes=10, in_chans=1, checkpoint_path=ckpt).eval()
    with torch.no_grad():
        torch.testing.assert_close(stage2(x), logits, rtol=0, atol=1e-5)
    plain = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    assert restore_channel_config(plain, torch.load(ckpt, weights_only=False), prefix="model.")
    assert channel_config(plain) == channel_config(model.model)


# ---------------------------------------------------------------------------------------------- foreign
@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("foreign")
    model = Foreign()
    ckpt = _train_slim(tmp, model, (1, 8, 8), 8)
    x, y = _data(8)
    return model, ckpt, x, y


def test_foreign_module_needs_the_rebuild(foreign):
    """Without Chase and without the hook, Lightning cannot load the slim weights: the rebuild is what works."""
    _, ckpt, x, y = foreign
    t = trainer(enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        t.test(Foreign(), DataLoader(TensorDataset(x, y), batch_size=len(x)), ckpt_path=ckpt, verbose=False)


def test_foreign_module_validate_test_predict_with_chase(foreign):
    model, ckpt, x, y = foreign
    logits, acc, loss = _expected(model, x, y)
    fresh = Foreign()
    val, test, preds = _evaluate(fresh, ckpt, x, y, [Chase(**KW, input_shape=(1, 8, 8))])
    assert channel_config(fresh) == channel_config(model) != channel_config(Foreign())
    assert val["val/acc"] == pytest.approx(acc, abs=1e-6) and test["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert val["val/loss"] == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(preds, logits, rtol=0, atol=1e-5)


def test_foreign_module_load_from_checkpoint_with_the_hook(foreign):
    model, ckpt, x, y = foreign
    logits, _, _ = _expected(model, x, y)
    loaded = ForeignWithHook.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits, rtol=0, atol=1e-5)
    with pytest.raises(RuntimeError, match="size mismatch"):
        Foreign.load_from_checkpoint(ckpt)


def test_foreign_module_fit_from_slim_checkpoint_trains_on(foreign, tmp_path):
    model, ckpt, _, _ = foreign
    pl.seed_everything(0)
    fresh, chase = Foreign(), Chase(**KW, input_shape=(1, 8, 8))
    t = trainer(tmp_path, 12, [chase], max_epochs=4)
    t.fit(fresh, fixed_loader(n=48, image_size=8), ckpt_path=ckpt)
    assert t.global_step > 9 and channel_config(fresh) == channel_config(model)  # resumed and trained on
    params = dict(fresh.named_parameters())
    for name, mask in chase.masks.items():  # masks fit the slim shapes and hold
        assert mask.shape == params[name].shape and not params[name][~mask].any()


# -------------------------------------------------------------------------------------- the shim itself
class _Probe(pl.Callback):
    """Records what Lightning does around loading a checkpoint (the behaviour the shim relies on)."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def setup(self, trainer, pl_module, stage):
        self.events.append(f"setup ckpt_path={trainer.ckpt_path}")
        original = trainer.strategy.load_model_state_dict

        def load_model_state_dict(checkpoint, *args, **kwargs):
            whole = {"state_dict", "callbacks", "epoch"} <= set(checkpoint)
            self.events.append(f"strategy.load_model_state_dict whole_checkpoint={whole}")
            return original(checkpoint, *args, **kwargs)

        trainer.strategy.load_model_state_dict = load_model_state_dict


class _Hooked(Foreign):
    def __init__(self, probe: _Probe) -> None:
        super().__init__()
        self.probe = probe

    def on_load_checkpoint(self, checkpoint):
        self.probe.events.append("module.on_load_checkpoint")

    def load_state_dict(self, *args, **kwargs):
        self.probe.events.append("module.load_state_dict")
        return super().load_state_dict(*args, **kwargs)


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_lightning_loads_weights_through_the_strategy_after_setup(foreign, stage):
    """The shim relies on this order; if Lightning changes it (e.g. sets ``trainer.ckpt_path`` before
    ``setup``, so a public hook could read the checkpoint), this test fails and the shim can go."""
    _, ckpt, x, y = foreign
    probe = _Probe()
    module = _Hooked(probe)
    t = trainer(callbacks=[probe], enable_checkpointing=True)
    restore_before_weights_load(t, lambda m: torch.randn(1, 1, 8, 8))  # installed before the probe's wrapper
    loader = DataLoader(x, batch_size=len(x)) if stage == "predict" else DataLoader(TensorDataset(x, y), batch_size=64)
    getattr(t, stage)(module, loader, ckpt_path=ckpt)
    assert probe.events == ["setup ckpt_path=None", "module.on_load_checkpoint",
                            "strategy.load_model_state_dict whole_checkpoint=True", "module.load_state_dict"]
    assert channel_config(module) == channel_config(foreign[0])


def test_shim_reads_the_module_at_call_time(foreign):
    """Installed once on a trainer, the shim rebuilds whichever module that trainer runs next."""
    model, ckpt, x, y = foreign
    t = trainer(enable_checkpointing=True)
    restored = []
    restore_before_weights_load(t, lambda m: torch.randn(1, 1, 8, 8), lambda m, cfg: restored.append(m))
    restore_before_weights_load(t, lambda m: torch.randn(1, 1, 8, 8), lambda m, cfg: restored.append(m))  # no double wrap
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    first, second = Foreign(), Foreign()
    t.test(first, loader, ckpt_path=ckpt, verbose=False)
    t.test(second, loader, ckpt_path=ckpt, verbose=False)
    assert restored == [first, second]
    assert channel_config(second) == channel_config(model)


# ------------------------------------------------------------------------------------ train.py, 4 stages
@pytest.mark.slow
def test_train_py_stages_on_the_quickstart_chase_checkpoint(tmp_path, monkeypatch):
    """``train.py fit/validate/test/predict --ckpt_path <slim last.ckpt>`` with ``configs/quickstart_chase.yaml``
    (shortened so the channels are removed and slimmed within two epochs)."""
    import yaml

    from lightning_sparse.cli import main
    from lightning_sparse.data import DigitsDataModule

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = yaml.safe_load((root / "configs/quickstart_chase.yaml").read_text())
    cfg["trainer"].update(max_epochs=2, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2,
                          enable_progress_bar=False, enable_model_summary=False, logger=False)
    cfg["trainer"].pop("callbacks")  # Chase (the sparsity section) only
    cfg["sparsity"]["init_args"].update(update_interval=2, stop_gmp_epochs=2, stop_dst_epochs=1)
    cfg["model"]["init_args"]["model_name"] = "resnet10t"
    cfg["data"]["init_args"].update(image_size=16, batch_size=32)
    config = tmp_path / "chase.yaml"
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    fit = main(["fit", "--config", str(config)])
    last = next(tmp_path.rglob("last.ckpt"))
    slim = fit.model.eval()
    assert find_channel_config(torch.load(last, weights_only=False)) == channel_config(slim)
    assert channel_config(slim) != channel_config(ImageClassifier("resnet10t", num_classes=10, in_chans=1))

    dm = DigitsDataModule(image_size=16, batch_size=32)
    dm.setup()
    x, y = dm.test_set.tensors[0][:64], dm.test_set.tensors[1][:64]
    xv, yv = dm.val_set.tensors[0][:64], dm.val_set.tensors[1][:64]
    logits, acc, _ = _expected(slim, x, y)
    _, val_acc, _ = _expected(slim, xv, yv)

    args = ["--config", str(config), f"--ckpt_path={last}"]
    assert main(["validate", *args]).trainer.callback_metrics["val/acc"].item() == pytest.approx(val_acc, abs=1e-6)
    assert main(["test", *args]).trainer.callback_metrics["test/acc"].item() == pytest.approx(acc, abs=1e-6)
    # predict runs over the DataModule's test split
    preds = torch.cat(main(["predict", *args, "--trainer.limit_predict_batches=2"]).trainer.predict_loop.predictions)
    torch.testing.assert_close(preds, logits, rtol=0, atol=1e-5)
    loaded = ImageClassifier.load_from_checkpoint(last).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), logits, rtol=0, atol=1e-5)
    resumed = main(["fit", *args, "--trainer.max_epochs=3"])
    assert resumed.trainer.current_epoch == 3  # resumed on the slim shapes (and Chase may slim further)
    assert sum(p.numel() for p in resumed.model.parameters()) <= sum(p.numel() for p in slim.parameters())
