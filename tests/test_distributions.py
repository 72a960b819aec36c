import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_sparse.sparsity.distributions import erk_densities, layer_counts, layer_densities, uniform_densities

RESNETISH = {
    "conv1": (64, 3, 7, 7),
    "l1": (64, 64, 3, 3),
    "l2": (128, 64, 3, 3),
    "l3": (256, 128, 3, 3),
    "fc": (10, 256),
}


def _kept(d, shapes):
    return sum(d[k] * math.prod(s) for k, s in shapes.items())


@pytest.mark.parametrize("density", [0.05, 0.1, 0.2, 0.5, 0.9])
def test_erk_total_matches_budget(density):
    d = erk_densities(RESNETISH, density)
    total = sum(math.prod(s) for s in RESNETISH.values())
    assert _kept(d, RESNETISH) == pytest.approx(density * total, rel=1e-9)
    assert all(0 < v <= 1 for v in d.values())


def test_erk_prefers_small_layers_and_follows_the_formula():
    d = erk_densities(RESNETISH, 0.1)
    raw = {k: sum(s) / math.prod(s) for k, s in RESNETISH.items()}
    ratios = {k: d[k] / raw[k] for k in d if d[k] < 1}
    assert max(ratios.values()) == pytest.approx(min(ratios.values()))  # one epsilon for all
    assert d["l1"] > d["l2"] > d["l3"]


def test_erk_caps_dense_layers_and_resolves_the_rest():
    shapes = {"tiny": (4, 3, 3, 3), "big": (512, 512, 3, 3)}
    d = erk_densities(shapes, 0.3)
    assert d["tiny"] == 1.0
    total = sum(math.prod(s) for s in shapes.values())
    assert _kept(d, shapes) == pytest.approx(0.3 * total)


def test_erk_all_dense_when_budget_is_everything():
    assert erk_densities(RESNETISH, 1.0) == {k: pytest.approx(1.0) for k in RESNETISH}


@settings(max_examples=60, deadline=None)
@given(
    dims=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3])), min_size=1, max_size=6),
    density=st.floats(0.01, 0.99),
)
def test_erk_property_budget_and_cap(dims, density):
    shapes = {f"l{i}": (o, c, k, k) for i, (o, c, k) in enumerate(dims)}
    d = erk_densities(shapes, density)
    total = sum(math.prod(s) for s in shapes.values())
    assert _kept(d, shapes) == pytest.approx(density * total, rel=1e-6)
    assert all(0 < v <= 1 + 1e-12 for v in d.values())
    counts = layer_counts(d, shapes, total=max(len(shapes), round(density * total)))
    assert sum(counts.values()) == max(len(shapes), round(density * total))
    for k, s in shapes.items():
        assert 1 <= counts[k] <= math.prod(s)
    # within one weight of the real-valued density per layer, as long as no layer hit its lower bound (a layer
    # under one weight is raised to one, and the total is then taken from the others)
    exact = {k: d[k] * math.prod(s) for k, s in shapes.items()}
    if all(v >= 1 for v in exact.values()) and round(density * total) >= len(shapes):
        assert all(abs(counts[k] - exact[k]) <= 1 for k in shapes), (counts, exact)


def test_layer_counts_exact_within_one_weight_per_layer():
    d = erk_densities(RESNETISH, 0.1)
    total = sum(math.prod(s) for s in RESNETISH.values())
    counts = layer_counts(d, RESNETISH, total=round(0.1 * total))
    assert sum(counts.values()) == round(0.1 * total)
    for k, s in RESNETISH.items():
        assert abs(counts[k] - d[k] * math.prod(s)) <= 1


def test_uniform_and_dispatch_errors():
    assert set(uniform_densities(RESNETISH, 0.2).values()) == {0.2}
    with pytest.raises(ValueError, match=r"distribution='erdos' is not supported; choose one of \['uniform', 'erk'\]"):
        layer_densities(RESNETISH, 0.2, "erdos")
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got density=0"):
        erk_densities(RESNETISH, 0)
