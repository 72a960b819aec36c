"""compare's figures from table rows: a Pareto front per method, legends outside the data and only for what is
drawn, budget flags; checked on the matplotlib objects before saving and on the written PNGs."""

from __future__ import annotations

from pathlib import Path

import matplotlib.image as mpimg
import pytest

from helpers.logs import legends_clear_of_axes
from lightning_sparse.compare.report import FIGURES, flag_budgets, make_figures, pareto_front, save_figures


def _row(run: str, method: str, density: float, acc: float, throughput: float, seed: int = 0) -> dict:
    return {"run": run, "method": method, "density": density, "S_c": None, "N:M": None, "mode": None, "seed": seed,
            "test_acc": acc, "density_measured": density, "flops": 1e6 * density, "flops_nonzero": 1e6 * density,
            "throughput": throughput, "dense_throughput": 100.0}


# RigL in run order zig-zags in density (0.1, 0.01, 0.05, 0.02); 0.1 is beaten by the sparser, better 0.05
ROWS = [
    _row("dense", "dense", 1.0, 0.97, 100.0),
    _row("rigl_a", "RigL", 0.1, 0.95, 101.0),
    _row("rigl_b", "RigL", 0.01, 0.90, 99.0),
    _row("rigl_c", "RigL", 0.05, 0.96, 98.0),   # sparser than 0.1 and better: 0.1 falls off the density front
    _row("rigl_d", "RigL", 0.02, 0.93, 102.0),
    _row("rigl_e", "RigL", 0.02, 0.91, 103.0, seed=1),  # second seed of 0.02: pooled into its mean 0.92
    _row("chase", "Chase", 0.05, 0.94, 140.0),
]
SAD = {"rigl_a": {"sad/global_norm": ([0, 10], [0.0, 0.1]), "sad/global_vs_init_norm": ([0, 10], [0.0, 0.1])}}


def test_pareto_front_keeps_only_undominated_points() -> None:
    pts = [(0.1, 0.95), (0.01, 0.90), (0.05, 0.96), (0.02, 0.92)]
    assert pareto_front(pts) == [(0.01, 0.90), (0.02, 0.92), (0.05, 0.96)]
    # throughput: higher is better, so the slow accurate and the fast less accurate both stay
    assert pareto_front([(98.0, 0.96), (101.0, 0.95), (99.0, 0.90)], higher_x_better=True) == [(98.0, 0.96), (101.0, 0.95)]


def test_figures_draw_fronts_and_legends_only_for_data(tmp_path: Path) -> None:
    figs = make_figures(ROWS, SAD)
    assert set(figs) == set(FIGURES)
    density = figs["acc_vs_density"].axes[0]
    lines = {ln.get_label(): ln for ln in density.lines}
    rigl = lines["RigL (Pareto front)"]
    # the front is monotone (no zig-zag in run order) and 0.1 (beaten by 0.05) is off it; 0.02 is its seed mean
    assert list(rigl.get_xdata()) == [0.01, 0.02, 0.05]
    assert list(rigl.get_ydata()) == pytest.approx([0.90, 0.92, 0.96])
    speed = {ln.get_label(): ln for ln in figs["acc_vs_throughput"].axes[0].lines}["RigL (Pareto front)"]
    xs, ys = list(speed.get_xdata()), list(speed.get_ydata())
    assert xs == sorted(xs) and ys == sorted(ys, reverse=True)  # faster, less accurate: a front, not run order
    for name, fig in figs.items():
        assert legends_clear_of_axes(fig) == 1, name
    sad_labels = [t.get_text() for t in figs["sad_curves"].legends[0].get_texts()]
    assert sad_labels == ["RigL"]  # dense and Chase have no SAD curve: no entry
    density_labels = [t.get_text() for t in figs["acc_vs_density"].legends[0].get_texts()]
    assert density_labels == ["dense (Pareto front)", "Chase (Pareto front)", "RigL (Pareto front)",
                              "setting off its method's Pareto front"]
    paths = save_figures(ROWS, SAD, tmp_path)
    for name, path in paths.items():
        image = mpimg.imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600, name


def test_budget_flags_without_a_shared_budget() -> None:
    rows = [{"epochs": 12, "optimizer_steps": 240, "images_seen": 15360},
            {"epochs": 3, "optimizer_steps": 60, "images_seen": 3840},
            {"epochs": None, "optimizer_steps": None, "images_seen": None}]
    assert flag_budgets(rows) is None  # no two runs share one: every run with a budget is flagged
    assert [r["budget_flag"] for r in rows] == ["unequal", "unequal", "unknown"]
    assert [r["budget_ratio"] for r in rows] == [None, None, None]
