"""Masks hold however a module reads its weights: N:M on ``nn.Transformer`` layers and a timm ViT, DST on
``in_proj_weight``. Every check compares with a copy whose weights were baked 2:4 *outside* the callback."""

from __future__ import annotations

import logging

import pytest
import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.training import trainer
from helpers.transformer import TinyLM
from helpers.transformer import tokens as _tokens
from lightning_sparse.callbacks import DynamicSparsity, NMSparsity
from lightning_sparse.sparsity.nm import is_nm_eligible, nm_mask, nm_violations


def _baked(model: nn.Module, names: list[str], weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """A copy whose ``names`` hold W ⊙ M(W) computed here, with nm_mask only (no callback involved)."""
    out = type(model)()
    out.load_state_dict(model.state_dict())
    params = dict(out.named_parameters())
    with torch.no_grad():
        for n in names:
            w = weights[n] if weights is not None else params[n]
            params[n].copy_(w * nm_mask(w, 2, 4))
    return out


class BakedCopyCheck(pl.Callback):
    """Runs after NMSparsity: at each optimizer step (dense W restored), the logits the training step computed
    equal those of a copy baked from the weights the step started with."""

    def __init__(self, nm: NMSparsity) -> None:
        self.nm, self.checked, self.start = nm, 0, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start = {k: v.clone() for k, v in self.nm.engine.dense.items()}  # NMSparsity ran first: W aside

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        x, logits = pl_module.seen[-1]
        ref = _baked(pl_module, self.nm.targets, self.start)
        ref.train()
        with torch.no_grad():
            torch.testing.assert_close(logits, ref(x), atol=1e-4, rtol=0)
            assert (ref(x) - _baked(pl_module, [], None)(x)).abs().max() > 1e-3  # the masks matter
        self.checked += 1


def test_transformer_train_and_eval_outputs_equal_a_baked_copy(tmp_path):
    pl.seed_everything(0)
    model = TinyLM()
    nm = NMSparsity(n=2, m=4)
    check = BakedCopyCheck(nm)
    t = trainer(tmp_path, 3, [nm, check])
    t.fit(model, _tokens())
    assert check.checked == 3
    expected = {f"encoder.layers.{i}.{w}" for i in range(2)
                for w in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")}
    assert expected | {"head.weight"} == set(nm.targets)
    # eval: nn.TransformerEncoderLayer's fused fast path reads the weights itself
    model.seen.clear()
    t.validate(model, _tokens(16), verbose=False)
    ref = _baked(model, nm.targets).eval()
    dense = _baked(model, [])
    dense.load_state_dict(nm.engine.dense, strict=False)  # the dense W the callback keeps after a run
    dense.eval()
    for x, logits in model.seen:
        with torch.no_grad():
            torch.testing.assert_close(logits, ref(x), atol=1e-4, rtol=0)
            assert (dense(x) - ref(x)).abs().max() > 1e-3
    assert all(nm_violations(ref.get_parameter(n), 2, 4) == 0 for n in nm.targets)
    # after a run the Parameters hold W ⊙ M(W) (the model that was evaluated); the callback keeps the dense W
    assert all(nm_violations(model.get_parameter(n), 2, 4) == 0 for n in nm.targets)
    assert all(nm_violations(nm.engine.dense[n], 2, 4) > 0 for n in nm.targets)


class ViTModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, pretrained=False)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.seen.append((batch[0], logits.detach().clone()))
        return F.cross_entropy(logits, batch[1])

    def validation_step(self, batch, batch_idx):
        self.seen.append((batch[0], self(batch[0]).clone()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_timm_vit_train_and_eval_outputs_equal_a_baked_copy(tmp_path):
    pl.seed_everything(0)
    model = ViTModule()
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)),
                      batch_size=4)
    nm = NMSparsity(n=2, m=4)
    check = BakedCopyCheck(nm)
    with pytest.warns(UserWarning, match=r"skips 1 layer\(s\), left dense: model.patch_embed.proj.weight"):
        t = trainer(tmp_path, 2, [nm, check])
        t.fit(model, data)
    assert check.checked == 2
    for part in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"):
        assert f"model.blocks.11.{part}" in nm.targets
    model.seen.clear()
    t.validate(model, data, verbose=False)
    ref = _baked(model, nm.targets).eval()
    for x, logits in model.seen:
        with torch.no_grad():
            torch.testing.assert_close(logits, ref(x), atol=1e-4, rtol=0)


def test_dst_masks_in_proj_weight_and_logs_the_first_last_exclusions(tmp_path, caplog):
    pl.seed_everything(0)
    model = TinyLM()
    dst = DynamicSparsity(density=0.3, update_interval=2, stop_step=6)
    for name in ("lightning_utilities.core.rank_zero", "pytorch_lightning.utilities.rank_zero"):
        logging.getLogger(name).addHandler(caplog.handler)
    try:
        trainer(tmp_path, 6, [dst]).fit(model, _tokens())
    finally:
        for name in ("lightning_utilities.core.rank_zero", "pytorch_lightning.utilities.rank_zero"):
            logging.getLogger(name).removeHandler(caplog.handler)
    log = caplog.text
    in_proj = [n for n in dst.masks if n.endswith("self_attn.in_proj_weight")]
    assert in_proj == ["encoder.layers.1.self_attn.in_proj_weight"]  # layer 0's is the first candidate
    assert "kept dense as first/last: encoder.layers.0.self_attn.in_proj_weight, head.weight" in log
    params = dict(model.named_parameters())
    for name, mask in dst.masks.items():
        assert torch.count_nonzero(params[name][~mask]) == 0, name
        assert abs(mask.float().mean().item() - 0.3) < 0.3  # ERK: sparse, not dense
    assert "encoder.layers.0.self_attn.in_proj_weight" not in dst.masks
    assert DynamicSparsity(include=["*in_proj_weight"]).target_names(model) == [
        "encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.self_attn.in_proj_weight"]


def test_conv1d_and_attention_weights_are_eligible():
    assert is_nm_eligible(torch.zeros(8, 16, 3), 4) and not is_nm_eligible(torch.zeros(8, 1, 3), 4)
    w = torch.randn(4, 8, 3)
    mask = nm_mask(w, 2, 4)
    assert (mask.permute(0, 2, 1).reshape(-1, 4).sum(1) == 2).all()  # groups along C_in per kernel position
