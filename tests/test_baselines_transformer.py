"""GMP and one-shot pruning on a transformer: MultiheadAttention's in_proj_weight (a plain Parameter) and
out_proj are pruned like any Linear, and what the forward reads is checked on the weights themselves."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from helpers.training import trainer
from helpers.transformer import TinyLM, tokens
from lightning_sparse.callbacks import GradualMagnitudePruning, OneShotPruning
from lightning_sparse.sparsity.nm import nm_mask, nm_violations

# layer 1: the first weight (layer 0's in_proj_weight) stays dense by default under unstructured pruning
ATTENTION = ["encoder.layers.1.self_attn.in_proj_weight", "encoder.layers.1.self_attn.out_proj.weight"]


def test_gmp_prunes_attention_weights_to_the_global_density(tmp_path):
    pl.seed_everything(0)
    model = TinyLM()
    cb = GradualMagnitudePruning(density=0.3, distribution="global", update_interval=1, start_step=0, stop_step=3)
    trainer(tmp_path, 5, [cb]).fit(model, tokens())
    params = dict(model.named_parameters())
    assert set(ATTENTION) <= set(cb.masks)
    kept = sum(int(torch.count_nonzero(params[n])) for n in cb.masks)  # read from the weights, not the masks
    total = sum(params[n].numel() for n in cb.masks)
    assert kept == round(0.3 * total)
    for n, m in cb.masks.items():
        assert torch.count_nonzero(params[n][~m]) == 0, n


def test_one_shot_nm_holds_on_attention_weights(tmp_path):
    pl.seed_everything(0)
    model = TinyLM()
    loaded = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = OneShotPruning(pattern="nm", n=2, m=4)
    trainer(tmp_path, 3, [cb]).fit(model, tokens())
    params = dict(model.named_parameters())
    assert set(ATTENTION) <= set(cb.masks)
    for n, m in cb.masks.items():
        assert torch.equal(m, nm_mask(loaded[n], 2, 4)), n  # the 2:4 pattern of the weights it started from
        assert nm_violations(params[n].detach(), 2, 4) == 0, n
