"""The MaskSource protocol: the three built-in methods implement it, and a third-party callback that implements
it is found, named, drawn with its layer kind and marked on its schedule by SADTracker."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from lightning_sparse.callbacks import Chase, DynamicSparsity, MaskProvider, MaskSource, MaskSourceInfo, NMSparsity, SADTracker
from lightning_sparse.callbacks._sad_context import describe_source, layer_kinds, schedule_marks
from tests.helpers.training import fixed_loader, trainer


class BlockPruning(pl.Callback):
    """A minimal third-party mask method: keeps the first half of each 2-D weight's rows, then (after
    the optimizer step of iteration ``switch_at``) the second half. Knows nothing about lightning_sparse's classes."""

    def __init__(self, switch_at: int = 2) -> None:
        self.switch_at, self.num_updates = switch_at, 0
        self.masks: dict[str, torch.Tensor] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, p in pl_module.named_parameters():
            if p.dim() > 1:
                mask = torch.zeros(p.shape, dtype=torch.bool)
                mask[: p.shape[0] // 2] = True
                self.masks[name] = mask

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step - 1 == self.switch_at:  # the iteration whose optimizer step just ran
            self.masks = {n: ~m for n, m in self.masks.items()}
            self.num_updates += 1

    def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return dict(self.masks)

    def describe(self) -> MaskSourceInfo:
        return MaskSourceInfo(method="row blocks (density 0.5)", kind="row block", density=0.5)

    def schedule_marks(self, trainer: pl.Trainer) -> dict[str, int]:
        return {"block switch": self.switch_at}


def test_builtin_methods_implement_the_protocol() -> None:
    dst, nm = DynamicSparsity(density=0.2, growth="random"), NMSparsity(n=1, m=4, mode="ste")
    chase = Chase(density=0.1, channel_sparsity=0.3)
    for cb in (dst, nm, chase):
        assert isinstance(cb, MaskSource)
    assert dst.describe() == MaskSourceInfo(method="SET (ERK, density 0.2)", kind="unstructured", density=0.2)
    assert nm.describe() == MaskSourceInfo(method="1:4 STE", kind="1:4", density=0.25, n=1, m=4)
    assert chase.describe().method == "Chase (density 0.1, channel sparsity 0.3)"
    assert chase.schedule_marks(SimpleNamespace()) == {}  # no schedule before training starts


def test_third_party_source_is_tracked(tiny_net: pl.LightningModule, tmp_path: Any) -> None:
    source = BlockPruning(switch_at=2)
    tracker = SADTracker(interval=1)
    trainer(tmp_path, 4, [source, tracker]).fit(tiny_net, fixed_loader(n=64, batch_size=16))
    h = tracker.history
    assert h["meta"]["method"] == "row blocks (density 0.5)"
    assert h["marks"] == {"block switch": 2}
    assert h["events"] == {"mask update": [2]}
    assert {n: v["kind"] for n, v in h["layers"].items()} == {n: "row block" for n in source.masks}
    # the switch flips every position: SAD at step 2 counts all mask elements, and none before or after
    total = sum(m.numel() for m in source.masks.values())
    assert h["step"] == [0, 1, 2, 3]
    assert h["sad"] == [0, 0, total, 0]


def test_a_provider_without_describe_is_named_by_its_class(tiny_net: pl.LightningModule) -> None:
    class OnlyMasks:
        def current_masks(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
            return {"head.weight": torch.ones(10, 32, dtype=torch.bool)}

    provider = OnlyMasks()
    assert isinstance(provider, MaskProvider) and not isinstance(provider, MaskSource)
    assert describe_source(provider) == MaskSourceInfo(method="OnlyMasks")
    assert schedule_marks(SimpleNamespace(), [provider]) == {}
    kinds = layer_kinds(tiny_net, [provider], provider.current_masks(tiny_net))
    assert kinds["head.weight"]["kind"] == "unstructured" and kinds["stem.weight"]["kind"] == "dense"


def test_describe_must_return_mask_source_info() -> None:
    class BadSource(BlockPruning):
        def describe(self) -> Any:
            return "row blocks"

    with pytest.raises(TypeError, match="BadSource.describe\\(\\) must return a MaskSourceInfo, got str"):
        describe_source(BadSource())
