"""GradualMagnitudePruning against the transcription of TF model-optimization's GMP (:mod:`reference.gmp_ref`).

A real Trainer runs our callback on TinyNet; around every iteration the weights the update sees and the masks
it leaves are recorded, and the reference's ``PolynomialDecay`` + ``_update_mask`` (per layer, as
``prune_low_magnitude``) is run on the same weights. Deliberate deviations (docs/baselines.md): our per-layer
counts add up to the exact global budget at the end (±1 weight per layer against the reference's
``round(size·(1 − s))``), ties keep exactly the count (the reference keeps every ``|w| >=`` threshold), and we
also prune at the stop step when it is off the Δt grid.
"""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet

from helpers.training import fixed_loader, trainer
from lightning_sparse.callbacks import GradualMagnitudePruning
from reference.gmp_ref import polynomial_decay, should_prune_in_step, update_mask, update_steps


class Around(pl.Callback):
    """Placed before (``masks=False``) or after the callback: weights at every iteration start, or the masks."""

    def __init__(self, gmp: GradualMagnitudePruning, masks: bool) -> None:
        self.gmp, self.take_masks, self.seen = gmp, masks, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.take_masks:
            self.seen[trainer.global_step] = {n: m.clone() for n, m in self.gmp.masks.items()}
        else:
            self.seen[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _run(**kw) -> tuple[GradualMagnitudePruning, Around, Around]:
    pl.seed_everything(0)
    gmp = GradualMagnitudePruning(density=0.1, distribution="uniform", sparse_first_last=True, **kw)
    before, after = Around(gmp, masks=False), Around(gmp, masks=True)
    trainer("/tmp/gmp_reference", 18, [before, gmp, after]).fit(TinyNet(), fixed_loader())
    return gmp, before, after


@pytest.mark.parametrize("initial", [0.0, 0.3])
def test_every_update_equals_the_reference(initial):
    gmp, before, after = _run(initial_sparsity=initial, update_interval=3, start_step=2, stop_step=14)
    ref_steps = update_steps(2, 14, 3, last_step=17)
    assert ref_steps == [2, 5, 8, 11, 14] and gmp.num_updates == len(ref_steps)
    prev = {n: torch.ones_like(m) for n, m in gmp.masks.items()}
    for t in range(18):
        ours = after.seen[t]
        if t not in ref_steps:
            assert all(torch.equal(ours[n], prev[n]) for n in ours), t  # nothing changes between updates
            continue
        _, s = polynomial_decay(t, initial, 0.9, 2, 14, frequency=3)
        for n, m in ours.items():
            ref = update_mask(before.seen[t][n] * prev[n], s)  # the variable holds w·mask in the reference
            k_ours, k_ref = int(m.sum()), int(ref.sum())
            assert abs(k_ours - k_ref) <= 1, (t, n, k_ours, k_ref)
            if k_ours == k_ref:
                assert torch.equal(m, ref), (t, n)
            else:  # one weight more or fewer: the same magnitude order, so one set holds the other
                assert bool((m & ~ref).sum() == 0) or bool((ref & ~m).sum() == 0), (t, n)
        prev = ours


def test_stop_step_off_the_grid_is_also_an_update():
    """The reference's last update is the last grid step <= end (short of s_f); ours adds the end step itself."""
    gmp, _, after = _run(update_interval=4, start_step=0, stop_step=10)
    assert [t for t in range(18) if should_prune_in_step(t, 0, 10, 4)] == [0, 4, 8]
    assert gmp.num_updates == 4 and gmp.last_update_step == 10
    _, s8 = polynomial_decay(8, 0.0, 0.9, 0, 10, frequency=4)
    assert s8 < 0.9
    kept = sum(int(m.sum()) for m in after.seen[10].values())
    assert kept == round(0.1 * sum(m.numel() for m in after.seen[10].values()))


def test_transcription_on_hand_values():
    assert polynomial_decay(0, 0.0, 0.8, 0, 100, frequency=10) == (True, 0.0)
    should, s = polynomial_decay(50, 0.0, 0.8, 0, 100, frequency=10)
    assert should and s == pytest.approx(0.8 - 0.8 * 0.125)
    assert polynomial_decay(55, 0.0, 0.8, 0, 100, frequency=10)[0] is False
    assert polynomial_decay(200, 0.0, 0.8, 0, 100, frequency=10) == (False, pytest.approx(0.8))
    w = torch.tensor([0.1, -0.4, 0.3, 0.0, 0.2])
    assert update_mask(w, 0.6).tolist() == [False, True, True, False, False]  # k = round(5·0.4) = 2
    assert update_mask(w, 0.99).tolist() == [False, True, False, False, False]  # k >= 1
