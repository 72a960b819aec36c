"""The checkpoint load policy (lightning_sparse.utils.checkpoints): every file loads with weights_only=True;
what our training writes needs nothing more; anything that would unpickle other objects is refused unread,
by our own loader and by Lightning's load through AtomicCheckpointIO."""

from __future__ import annotations

import builtins
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint, Timer

import lightning_sparse.preemption as preemption
from helpers.training import trainer
from lightning_sparse.preemption import AtomicCheckpointIO, PreemptionCheckpoint, checkpoint_is_readable
from lightning_sparse.utils.checkpoints import (
    UnreadableCheckpoint,
    UntrustedCheckpoint,
    load_checkpoint,
    unsafe_globals,
)

SIZE = 8


class RunsCode:
    """Unpickling this writes ``marker``: the payload of a checkpoint that would execute code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@dataclass
class OwnConfig:
    """A class of a user's own inside a checkpoint (a LightningModule hyper-parameter that is an object)."""

    width: int = 3


def _crafted(tmp_path: Path, zip_format: bool) -> tuple[Path, Path]:
    marker = tmp_path / ("ran_zip" if zip_format else "ran_pickle")
    path = tmp_path / ("crafted_zip.ckpt" if zip_format else "crafted_pickle.ckpt")
    payload = {"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"lr": RunsCode(marker)}}
    if zip_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path, marker


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch.save zip", "plain pickle"])
def test_a_crafted_pickle_is_refused_unread_naming_the_file(tmp_path, zip_format):
    path, marker = _crafted(tmp_path, zip_format)
    error = UntrustedCheckpoint if zip_format else UnreadableCheckpoint
    detail = "builtins.exec" if zip_format else "not a torch.save zip file"
    with pytest.raises(error, match=f"{path.name}'.*{detail}"):
        load_checkpoint(path)
    assert checkpoint_is_readable(path) is not None and path.name in checkpoint_is_readable(path)
    with pytest.raises(error):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes()) if not zip_format else torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"  # the payload is live: loading without the policy runs it


def test_lightning_resume_of_a_crafted_file_is_refused_even_when_torch_is_told_to_trust_files(tmp_path, monkeypatch,
                                                                                               tiny_net):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD turns every torch.load that does not pass weights_only into an unsafe
    load: Lightning's own TorchCheckpointIO then runs the payload; ours passes the decision explicitly."""
    path, marker = _crafted(tmp_path, zip_format=True)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    t = trainer(tmp_path, 2, plugins=[AtomicCheckpointIO()])
    with pytest.raises(UntrustedCheckpoint, match="crafted_zip.ckpt"):
        t.fit(tiny_net, train_dataloaders=[(torch.zeros(2, 1, SIZE, SIZE), torch.zeros(2, dtype=torch.long))],
              ckpt_path=str(path))
    assert not marker.exists()
    with pytest.warns(UserWarning, match="forcing weights_only=False"):
        TorchCheckpointIO().load_checkpoint(path)
    assert marker.read_text() == "ran"


def test_weights_only_false_is_refused(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ValueError, match="weights_only=True .*got weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)


def test_a_class_of_your_own_loads_once_registered_with_torch(tmp_path):
    path = tmp_path / "own.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"cfg": OwnConfig(5)}}, path)
    assert unsafe_globals(path) == [f"{OwnConfig.__module__}.OwnConfig"]
    with pytest.raises(UntrustedCheckpoint, match="OwnConfig"):
        load_checkpoint(path)
    with torch.serialization.safe_globals([OwnConfig]):
        assert load_checkpoint(path)["hyper_parameters"]["cfg"] == OwnConfig(5)


@pytest.mark.parametrize("payload", [b"", b"\x00garbage", "truncated"])
def test_unreadable_files_name_the_file(tmp_path, payload):
    path = tmp_path / "bad.ckpt"
    if payload == "truncated":
        torch.save({"state_dict": {"w": torch.ones(64)}}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(payload)
    with pytest.raises(UnreadableCheckpoint, match=r"bad.ckpt' is not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(UnreadableCheckpoint, match=r"missing.ckpt' does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def _methods():
    from lightning_sparse.callbacks import Chase, DynamicSparsity, GradualMagnitudePruning, NMSparsity, SADTracker

    return {
        "DynamicSparsity + SADTracker": lambda: [DynamicSparsity(density=0.3, update_interval=2), SADTracker(interval=1)],
        "Chase": lambda: [Chase(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1,
                                stop_gmp_epochs=2, stop_dst_epochs=1, update_interval=2, round_to=4,
                                input_shape=(1, SIZE, SIZE))],
        "NMSparsity": lambda: [NMSparsity(n=2, m=4)],
        "GradualMagnitudePruning": lambda: [GradualMagnitudePruning(density=0.5, update_interval=1, stop_step=2)],
    }


@pytest.mark.parametrize("method", ["DynamicSparsity + SADTracker", "Chase", "NMSparsity", "GradualMagnitudePruning"])
def test_our_checkpoints_need_nothing_beyond_weights_only_and_resume_through_the_policy(tmp_path, monkeypatch, method):
    """A checkpoint of each method (its callbacks' state, ModelCheckpoint, Timer, PreemptionCheckpoint, the
    model's hyper-parameters) holds no global outside torch's allowlist, and Lightning's
    resume reads it through load_checkpoint without a weights_only warning."""
    from lightning_sparse.data import DigitsDataModule
    from lightning_sparse.models import ImageClassifier

    def fit(max_epochs: int, ckpt_path: str | None = None) -> pl.Trainer:
        pl.seed_everything(0)
        model = ImageClassifier("resnet10t", num_classes=10, in_chans=1, lr=0.05)
        data = DigitsDataModule(image_size=SIZE, batch_size=32, max_shift=0)
        t = trainer(tmp_path, -1, [*_methods()[method](), ModelCheckpoint(dirpath=tmp_path, filename="last"), Timer(),
                                   PreemptionCheckpoint()],
                    max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1, enable_checkpointing=True,
                    plugins=[AtomicCheckpointIO()])
        t.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return t

    fit(2)
    ckpt = tmp_path / "last.ckpt"
    assert unsafe_globals(ckpt) == []
    payload = load_checkpoint(ckpt)
    assert payload["hyper_parameters"]["model_name"] == "resnet10t"
    assert any(key.startswith(method.split(" ")[0]) for key in payload["callbacks"])
    calls = []
    monkeypatch.setattr(preemption, "load_checkpoint", lambda *a, **k: calls.append(a[0]) or load_checkpoint(*a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = fit(3, ckpt_path=str(ckpt))
    assert [str(c) for c in calls] == [str(ckpt)] and resumed.global_step == 6
    assert not [w for w in caught if "weights_only" in str(w.message)]
