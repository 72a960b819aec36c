"""Chase's channel-removal planning and phase choice as plain functions (no Lightning, no Trainer)."""

from __future__ import annotations

import torch

from lightning_sparse.sparsity.chase import ChannelBook, ChaseSchedule, plan_channel_removal, scheduled_update


def _setup() -> tuple[dict, dict, ChannelBook]:
    weights = {"a.w": torch.tensor([[0.1, 0.1], [0.2, 0.2], [5.0, 5.0], [6.0, 6.0]]),
               "b.w": torch.tensor([[0.05], [7.0], [8.0], [9.0]])}
    return {"a": ["a.w"], "b": ["b.w"]}, weights, ChannelBook(start={"a": 4, "b": 4})


def test_plan_takes_the_lowest_scores_across_layers_within_the_floors() -> None:
    producers, weights, book = _setup()
    # S_c = 0.5, beta = 1: each layer keeps floor(4 * 0.5 * 1) = 2 channels; target 0.5 -> remove 4 of 8
    plan = plan_channel_removal(producers, weights, {}, book, {"a": 4, "b": 4}, 0.5, 0.5, 1.0)
    assert plan.count == 4
    # the four lowest are a0, b0, a1 (0.05, 0.1, 0.2) then b1 (7.0): a's floor stops it at two
    assert {k: v.tolist() for k, v in plan.chosen.items()} == {"a": [0, 1], "b": [0, 1]}


def test_plan_reads_masks_and_skips_removed_channels() -> None:
    producers, weights, book = _setup()
    masks = {"a.w": torch.tensor([[True, True], [True, True], [False, False], [True, True]])}  # a2 scores 0
    book.remove("b", [0])
    plan = plan_channel_removal(producers, weights, masks, book, {"a": 4, "b": 4}, 0.25, 0.5, 0.5)
    assert plan.count == 1  # 2 of 8 in all, one already gone
    assert {k: v.tolist() for k, v in plan.chosen.items()} == {"a": [2]}


def test_plan_at_the_target_removes_nothing() -> None:
    producers, weights, book = _setup()
    book.remove("a", [0])
    book.remove("b", [0])
    plan = plan_channel_removal(producers, weights, {}, book, {"a": 4, "b": 4}, 0.25, 0.5, 0.5)
    assert plan.count == 0 and plan.chosen == {}


def test_scheduled_update_follows_the_phases() -> None:
    sched = ChaseSchedule(total_steps=100, phase2_steps=20, channel_stop=60, channel_interval=20, channel_sparsity=0.5,
                          density=0.5, update_interval=10)
    torch.manual_seed(0)
    w = {"l": torch.randn(8, 8)}
    masks = {"l": torch.rand(8, 8) < 0.5}
    grads = {"l": torch.randn(8, 8)}
    budget = int(masks["l"].sum())
    first = scheduled_update(sched, 20, w, masks, grads, {}, budget, 64, "gradient", torch.Generator().manual_seed(0))
    second = scheduled_update(sched, 80, w, masks, grads, {}, budget, 64, "gradient", torch.Generator().manual_seed(0))
    assert (first.phase, first.rate) == (1, sched.phase1_fraction(20))
    assert (second.phase, second.rate) == (2, sched.phase2_fraction(80))
    # phase 1 carries r_t * N weights (above B); phase 2 holds the layer at its budget count
    assert int(first.masks["l"].sum()) == int(sched.phase1_fraction(20) * 64)
    assert int(second.masks["l"].sum()) == budget
