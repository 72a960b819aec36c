"""Chase channel pieces: UMM scores, cubic schedule, floors, global selection, ERK redistribution."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sparse.sparsity.channels import (
    channel_floor,
    channel_scores,
    channel_sparsity_schedule,
    n_channels_to_remove,
    redistribute_budget,
    select_channels_to_remove,
)


def test_umm_hand_computed_and_differs_from_maskwise():
    # 2 output channels, filter of 2x1x2 = 4 entries
    w = torch.tensor([[[[1.0, -2.0]], [[3.0, 4.0]]], [[[0.5, 0.5]], [[-1.0, 2.0]]]])
    m = torch.tensor([[[[1, 0]], [[0, 1]]], [[[1, 1]], [[1, 1]]]], dtype=torch.bool)
    umm = channel_scores(w, m)
    # channel 0: (|1| + |4|) / 4 = 1.25 ; channel 1: (0.5 + 0.5 + 1 + 2) / 4 = 1.0
    assert torch.allclose(umm, torch.tensor([1.25, 1.0]))
    maskwise = channel_scores(w, m, mode="maskwise")
    # channel 0: (1 + 4) / 2 = 2.5 ; channel 1: 4 / 4 = 1.0
    assert torch.allclose(maskwise, torch.tensor([2.5, 1.0]))
    # a sparse channel with one large weight ties with a dense small one under UMM, not under maskwise
    w2, m2 = torch.tensor([[4.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]]), torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    assert channel_scores(w2, m2).tolist() == [1.0, 1.0]
    assert channel_scores(w2, m2, mode="maskwise").tolist() == [4.0, 1.0]


def test_scores_empty_channel_and_no_mask():
    w = torch.tensor([[2.0, -2.0], [1.0, 3.0]])
    m = torch.tensor([[False, False], [True, False]])
    assert channel_scores(w, m, mode="maskwise").tolist() == [0.0, 1.0]
    assert channel_scores(w, m).tolist() == [0.0, 0.5]
    assert channel_scores(w).tolist() == [2.0, 2.0]


def test_scores_errors():
    with pytest.raises(ValueError, match=r"mode='l2' is not a channel score"):
        channel_scores(torch.ones(2, 2), None, mode="l2")
    with pytest.raises(ValueError, match=r"mask shape \(2, 3\) does not match weight shape \(2, 2\)"):
        channel_scores(torch.ones(2, 2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"output-channel dim 0"):
        channel_scores(torch.tensor(1.0))


def test_schedule_values():
    assert channel_sparsity_schedule(0, 80, 0.4) == 0.0
    assert channel_sparsity_schedule(80, 80, 0.4) == pytest.approx(0.4)
    assert channel_sparsity_schedule(200, 80, 0.4) == pytest.approx(0.4)
    assert channel_sparsity_schedule(-5, 80, 0.4) == 0.0
    assert channel_sparsity_schedule(40, 80, 0.4) == pytest.approx(0.4 * (1 - 0.5**3))
    assert channel_sparsity_schedule(20, 80, 0.5) == pytest.approx(0.5 * (1 - 0.75**3))
    vals = [channel_sparsity_schedule(t, 10, 0.3) for t in range(11)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"final_sparsity .* must be in \[0, 1\), got final_sparsity=1.0"):
        channel_sparsity_schedule(1, 10, 1.0)
    with pytest.raises(ValueError, match=r"total_steps \(T\) must be a positive number of steps, got total_steps=0"):
        channel_sparsity_schedule(1, 0, 0.4)


def test_floor():
    assert channel_floor(64, 0.4, 0.2) == 7  # floor(7.68)
    assert channel_floor(100, 0.5, 0.2) == 10  # float noise 10.000000000000002 / 9.999.. handled
    assert channel_floor(512, 0.5, 0.5) == 128
    assert channel_floor(64, 0.0, 1.0) == 64
    with pytest.raises(ValueError, match=r"beta \(minimum_ratio\) must be in \(0, 1\], got beta=0"):
        channel_floor(64, 0.4, 0)
    with pytest.raises(ValueError, match=r"beta \(minimum_ratio\) must be in \(0, 1\], got beta=1.5"):
        channel_floor(64, 0.4, 1.5)
    with pytest.raises(ValueError, match=r"final_sparsity .* got final_sparsity=-0.1"):
        channel_floor(64, -0.1, 0.2)
    with pytest.raises(ValueError, match=r"c_start must be a channel count >= 0, got c_start=-1"):
        channel_floor(-1, 0.4, 0.2)


def test_n_channels_to_remove():
    assert n_channels_to_remove(100, 100, 0.35) == 35
    assert n_channels_to_remove(65, 100, 0.4) == 5
    assert n_channels_to_remove(60, 100, 0.2) == 0  # never negative
    assert n_channels_to_remove(10, 10, 0.15) == 2  # keep floor(8.5) = 8, as the reference's prune_score
    assert n_channels_to_remove(1000, 1000, 0.4) == 400
    with pytest.raises(ValueError, match=r"s_t \(target channel sparsity\) must be in \[0, 1\], got s_t=1.2"):
        n_channels_to_remove(10, 10, 1.2)
    with pytest.raises(ValueError, match=r"channel counts must be >= 0"):
        n_channels_to_remove(-1, 10, 0.2)


def _ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool)


def test_select_global_lowest():
    scores = {"a": torch.tensor([0.5, 0.1, 0.9, 0.3]), "b": torch.tensor([0.2, 0.8, 0.05])}
    out = select_channels_to_remove(scores, {"a": _ones(4), "b": _ones(3)}, {"a": 0, "b": 0}, 3)
    assert out["a"].tolist() == [1] and out["b"].tolist() == [2, 0]  # 0.05, 0.1, 0.2 (priority order)


def test_select_floor_and_shortfall():
    scores = {"a": torch.tensor([0.01, 0.02, 0.03, 0.04, 0.9]), "b": torch.tensor([0.5, 0.6, 0.7])}
    out = select_channels_to_remove(scores, {"a": _ones(5), "b": _ones(3)}, {"a": 3, "b": 1}, 4)
    assert out["a"].tolist() == [0, 1]  # down to its floor of 3
    assert out["b"].tolist() == [0, 1]  # shortfall taken from b


def test_select_skips_inactive_and_ties_deterministic():
    scores = {"a": torch.tensor([0.0, 0.1, 0.1]), "b": torch.tensor([0.1, 0.1])}
    active = {"a": torch.tensor([False, True, True]), "b": _ones(2)}
    out = select_channels_to_remove(scores, active, {"a": 0, "b": 0}, 3)
    assert out["a"].tolist() == [1, 2] and out["b"].tolist() == [0]
    again = select_channels_to_remove(scores, active, {"a": 0, "b": 0}, 3)
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_select_errors():
    s, a = {"a": torch.zeros(3)}, {"a": _ones(3)}
    with pytest.raises(ValueError, match=r"cannot remove n_remove=2 channels: the floors leave only 1"):
        select_channels_to_remove(s, a, {"a": 2}, 2)
    with pytest.raises(ValueError, match=r"same layer names"):
        select_channels_to_remove(s, a, {"b": 0}, 1)
    with pytest.raises(ValueError, match=r"n_remove must be >= 0, got n_remove=-1"):
        select_channels_to_remove(s, a, {"a": 0}, -1)
    with pytest.raises(ValueError, match=r"layer 'a': scores has 3 channels but active has 2"):
        select_channels_to_remove(s, {"a": _ones(2)}, {"a": 0}, 1)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_select_property(data):
    n_layers = data.draw(st.integers(1, 4))
    scores, active, floors = {}, {}, {}
    for i in range(n_layers):
        c = data.draw(st.integers(1, 12))
        vals = data.draw(st.lists(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0, 2.0]), min_size=c, max_size=c))
        act = data.draw(st.lists(st.booleans(), min_size=c, max_size=c))
        scores[f"l{i}"], active[f"l{i}"] = torch.tensor(vals), torch.tensor(act)
        floors[f"l{i}"] = data.draw(st.integers(0, c))
    capacity = {k: max(0, int(active[k].sum()) - floors[k]) for k in scores}
    n = data.draw(st.integers(0, sum(capacity.values())))
    out = select_channels_to_remove(scores, active, floors, n)
    assert sum(len(v) for v in out.values()) == n  # exact total
    for k, idx in out.items():
        assert len(set(idx.tolist())) == len(idx)
        assert bool(active[k][idx].all())  # only active channels
        assert int(active[k].sum()) - len(idx) >= min(floors[k], int(active[k].sum()))  # never below floor
    # optimality: a channel left behind in a layer that is not at its floor scores >= every removed one
    removed_max = max((float(scores[k][i]) for k, v in out.items() for i in v.tolist()), default=-math.inf)
    for k in scores:
        if len(out[k]) < capacity[k]:
            left = [float(scores[k][i]) for i in range(len(scores[k])) if active[k][i] and i not in out[k].tolist()]
            assert all(v >= removed_max for v in left)
        # within a layer, the removed channels are its lowest active ones
        if len(out[k]):
            left = [float(scores[k][i]) for i in range(len(scores[k])) if active[k][i] and i not in out[k].tolist()]
            assert all(v >= float(scores[k][out[k]].max()) for v in left)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 16), st.integers(1, 16), st.sampled_from([1, 3])), min_size=1, max_size=5),
       st.floats(0.01, 1.0))
def test_redistribute_budget_exact(dims, frac):
    shapes = {f"l{i}": (o, c, k, k) for i, (o, c, k) in enumerate(dims)}
    total = sum(math.prod(s) for s in shapes.values())
    budget = max(len(shapes), int(frac * total))
    counts = redistribute_budget(shapes, budget)
    assert sum(counts.values()) == budget
    assert all(1 <= counts[k] <= math.prod(shapes[k]) for k in shapes)


def test_redistribute_makes_remaining_layers_denser():
    before = {"a": (64, 32, 3, 3), "b": (64, 64, 3, 3)}
    after = {"a": (32, 32, 3, 3), "b": (64, 32, 3, 3)}
    budget = 4000
    c0, c1 = redistribute_budget(before, budget), redistribute_budget(after, budget)
    assert sum(c1.values()) == budget
    assert c1["b"] / math.prod(after["b"]) > c0["b"] / math.prod(before["b"])
    with pytest.raises(ValueError, match=r"budget=100000 kept weights is impossible"):
        redistribute_budget(after, 100000)
    with pytest.raises(ValueError, match=r"at least one layer"):
        redistribute_budget({}, 10)
