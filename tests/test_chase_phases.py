"""Chase's two DST phases against CHASE.md §1 (reference ``Imagenet/core.py`` / ``main.py``), counted on the masks.

The expected numbers are computed here from the formulas, independently of ``lightning_sparse.sparsity.chase``:
the updates run after the optimizer steps that make the step count a multiple of ΔT; phase 1 carries about
r_t·N weights right after each update (per-layer growth rounds each layer down), r_t a cosine from D + p0 to
D + 0.005 over the phase-1 steps; phase 2 reads its drop fraction from one cosine over the whole training
(0.5 → 0.005), so it starts near 0.05, and brings the network to B.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import TinyNet
from pytorch_lightning.loggers import Logger

from helpers.training import fixed_loader, trainer
from lightning_sparse.callbacks import Chase
from lightning_sparse.sparsity.chase import strict_budget_update

SPE = 6  # fixed_loader(): 96 images / batch 16
EPOCHS = 6
D, P0, DT = 0.3, 0.05, 2


def cosine(t: int, total: int, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


class Recorder(Logger):
    """A logger that keeps what the callbacks logged, by step."""

    def __init__(self) -> None:
        super().__init__()
        self.by_step: dict[int, dict[str, float]] = {}

    name, version = "recorder", 0

    def log_metrics(self, metrics, step=None):
        self.by_step.setdefault(step, {}).update(metrics)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class Counts(pl.Callback):
    """Runs after Chase in every hook: active weights right after each DST update, and the logged rate."""

    def __init__(self, chase: Chase, recorder: Recorder) -> None:
        self.chase, self.recorder, self.rows = chase, recorder, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step  # steps done; Chase has just updated after this step
        if 0 < step < SPE * EPOCHS and step % self.chase.update_interval == 0:
            # logged at the iteration that ran the update (steps done before it)
            rates = {k: v for k, v in self.recorder.by_step.get(step - 1, {}).items() if k.startswith("dst/")}
            self.rows.append((step, sum(int(m.sum()) for m in self.chase.masks.values()), rates))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pl.seed_everything(0)
    model = TinyNet()
    chase = Chase(density=D, channel_sparsity=0.0, stop_gmp_epochs=1, channel_interval_epochs=1, stop_dst_epochs=2,
                  update_interval=DT, drop_fraction=P0, input_shape=(1, 8, 8))
    params = dict(model.named_parameters())
    recorder = Recorder()
    counts = Counts(chase, recorder)
    t = trainer(tmp_path_factory.mktemp("phases"), SPE * EPOCHS, [chase, counts], max_epochs=EPOCHS, logger=recorder)
    t.fit(model, fixed_loader())
    sparse = ("body.0.weight", "body.3.weight")  # stem and head stay dense
    assert set(chase.masks) == set(sparse)
    n = sum(params[name].numel() for name in sparse)  # the sparse layers' weights (nothing slimmed here)
    return chase, counts.rows, n, model


def rates_of(rows, step):
    return next(r for s, _, r in rows if s == step)


def test_phase1_carries_r_t_times_n(run):
    chase, rows, n, _ = run
    t1 = SPE * (EPOCHS - 2)
    phase1 = [(s, c) for s, c, _ in rows if s < t1]
    assert len(phase1) == t1 // DT - 1  # after steps 2, 4, ..., t1 - 2
    for step, count in phase1:
        assert rates_of(rows, step)["dst/carry_fraction"] == pytest.approx(cosine(step, t1, D + P0, D + 0.005))
        expected = cosine(step, t1, D + P0, D + 0.005) * n
        assert expected - 0.01 * expected <= count <= expected, (step, count, expected)
    # the first update grows ~p0·N, i.e. p0/D of the budget (not p0 of B)
    assert phase1[0][1] - chase.budget > 0.9 * P0 * n


def test_phase2_reaches_b_and_starts_near_005(run):
    chase, rows, n, model = run
    t1, total = SPE * (EPOCHS - 2), SPE * EPOCHS
    phase2 = [(s, c, r) for s, c, r in rows if s >= t1]
    assert phase2 and all(c == round(D * n) for _, c, _ in phase2)  # B = D·N, rounded once
    assert abs(chase.budget - D * n) <= 0.01 * D * n
    first_step, _, rates = phase2[0]
    expected = cosine(first_step, total, 0.5, 0.005)
    assert rates["dst/drop_fraction"] == pytest.approx(expected, rel=1e-6)
    assert expected < 0.2  # whole-training cosine: 0.129 at step 24 of 36 (ImageNet: 0.052 at epoch 80), not 0.5
    final = sum(int(m.sum()) for m in chase.masks.values())
    assert final == chase.budget
    params = dict(model.named_parameters())
    assert sum(int(torch.count_nonzero(params[k])) for k in chase.masks) <= chase.budget


def test_strict_budget_update_drops_smallest_and_regrows_to_targets():
    torch.manual_seed(0)
    w = {"a": torch.randn(8, 16), "b": torch.randn(4, 32)}
    masks = {"a": torch.rand(8, 16) < 0.5, "b": torch.rand(4, 32) < 0.2}
    grads = {k: torch.randn_like(v) for k, v in w.items()}
    targets = {"a": 40, "b": 30}
    update = strict_budget_update(w, masks, grads, 0.25, targets, "gradient", torch.Generator().manual_seed(0), {})
    for k in w:
        active = int(masks[k].sum())
        keep = active - math.ceil(0.25 * active)  # reference ``magnitude_death``: ceil
        # a layer below its count after the drop grows back to it; one above stays above (never pruned to it)
        assert int(update.masks[k].sum()) == max(targets[k], keep)
        kept = masks[k] & ~update.pruned[k]
        assert int(kept.sum()) == keep
        # the kept weights are the `keep` largest |w| of the previously active ones
        order = w[k].abs()[masks[k]].sort(descending=True).values
        assert float(w[k].abs()[kept].min()) >= float(order[keep - 1]) - 1e-12
        # grown positions have the largest |grad| among the inactive ones
        grown = update.masks[k] & ~kept
        if grown.any():
            assert float(grads[k].abs()[grown].min()) >= float(grads[k].abs()[~kept & ~grown].max())
