"""Figures of how a sparse architecture evolves: SAD curves, per-layer density, active channels.

Every function takes the ``history`` mapping recorded by
:class:`~lightning_sparse.callbacks.SADTracker` (``tracker.history``) and returns a
:class:`matplotlib.figure.Figure` drawn on the Agg canvas. No ``pyplot`` and no global backend switch,
so this works headless, in threads and next to a user's own interactive backend.

``history`` keys (lists are aligned with ``step``; a layer missing at a measurement holds NaN):

- ``step``: global step of each measurement;
- ``sad``, ``sad_norm``: SAD vs the previous measurement (count; fraction of mask elements);
- ``sad_vs_init``, ``sad_vs_init_norm``: SAD vs the initial mask (count; fraction);
- ``cumulative``: running sum of ``sad``;
- ``density``: global fraction of kept weights;
- ``layer_density``: ``{parameter name: [density, ...]}``;
- ``layer_sad``: ``{parameter name: [SAD vs previous, ...]}`` (optional);
- ``channels``: ``{layer name: [active channels, ...]}`` (empty unless a mask source reports channels);
- ``resets``: ``[[step, parameter name], ...]`` where a layer's mask changed shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_sad",
    "plot_density_heatmap",
    "plot_active_channels",
    "save_figures",
    "FIGURE_NAMES",
]

FIGURE_NAMES = ("sad", "density_heatmap", "active_channels")
_MAX_LEGEND = 12


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _matrix(table: Mapping[str, Sequence[float]], n_cols: int) -> tuple[list[str], np.ndarray]:
    names = list(table)
    mat = np.full((len(names), n_cols), np.nan)
    for row, name in enumerate(names):
        values = np.asarray(table[name], dtype=float)[:n_cols]
        mat[row, : len(values)] = values
    return names, mat


def _step_ticks(ax: Any, steps: Sequence[int], n_max: int = 10) -> None:
    idx = np.unique(np.linspace(0, len(steps) - 1, min(n_max, len(steps))).round().astype(int))
    ax.set_xticks(idx)
    ax.set_xticklabels([str(steps[i]) for i in idx], rotation=45, ha="right")
    ax.set_xlabel("step")


def plot_sad(history: Mapping[str, Any]) -> Figure:
    """SAD over steps: step-to-step (vs the previous measurement) and vs the initial mask.

    Both are fractions of all tracked mask elements. A flat step-to-step curve near 0 means the
    architecture has settled; the vs-init curve shows how far it travelled from where it started.

    Example:
        >>> h = {"step": [0, 10, 20], "sad_norm": [0.0, 0.2, 0.1], "sad_vs_init_norm": [0.0, 0.2, 0.25],
        ...      "resets": []}
        >>> len(plot_sad(h).axes)
        2
    """
    steps = list(history["step"])
    fig = _new_figure(7.0, 5.0)
    ax_step, ax_init = fig.subplots(2, 1, sharex=True)
    # the first measurement has no predecessor (its step-to-step SAD is 0 by definition): not drawn
    ax_step.plot(steps[1:], history["sad_norm"][1:], marker=".", color="tab:blue")
    ax_step.set_ylabel("SAD vs previous\n(fraction)")
    ax_step.set_title("Sparse architecture divergence")
    ax_init.plot(steps, history["sad_vs_init_norm"], marker=".", color="tab:orange")
    ax_init.set_ylabel("SAD vs initial mask\n(fraction)")
    ax_init.set_xlabel("step")
    for step, _name in history.get("resets", []):
        for ax in (ax_step, ax_init):
            ax.axvline(step, color="grey", linestyle=":", linewidth=0.8)
    for ax in (ax_step, ax_init):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0.0)
    return fig


def plot_density_heatmap(history: Mapping[str, Any]) -> Figure:
    """Per-layer density (fraction of kept weights) over time: layers as rows, measurements as columns.

    Example:
        >>> h = {"step": [0, 10], "layer_density": {"a.weight": [0.5, 0.4], "b.weight": [0.2, 0.3]}}
        >>> plot_density_heatmap(h).axes[0].get_ylabel()
        'layer'
    """
    steps = list(history["step"])
    names, mat = _matrix(history["layer_density"], len(steps))
    fig = _new_figure(8.0, max(2.5, 1.2 + 0.22 * len(names)))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", interpolation="nearest", cmap="viridis",
                      vmin=0.0, vmax=1.0)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=max(4, min(9, 400 // max(1, len(names)))))
    ax.set_ylabel("layer")
    _step_ticks(ax, steps)
    ax.set_title("Density per layer")
    fig.colorbar(image, ax=ax, label="density (kept fraction)")
    return fig


def plot_active_channels(history: Mapping[str, Any]) -> Figure:
    """Active output channels per layer over time, as a fraction of each layer's first measured count.

    Example:
        >>> h = {"step": [0, 10], "channels": {"conv1": [64, 48], "conv2": [128, 128]}}
        >>> plot_active_channels(h).axes[0].get_ylabel()
        'active channels / initial'
    """
    steps = list(history["step"])
    names, mat = _matrix(history["channels"], len(steps))
    fig = _new_figure(7.0, 4.5)
    ax = fig.subplots()
    for name, row in zip(names, mat):
        valid = row[~np.isnan(row)]
        first = valid[0] if len(valid) and valid[0] > 0 else math.nan
        ax.plot(steps, row / first, marker=".", linewidth=1.0, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("active channels / initial")
    ax.set_title("Active channels per layer")
    ax.set_ylim(bottom=0.0)
    ax.grid(True, alpha=0.3)
    if len(names) <= _MAX_LEGEND:
        ax.legend(fontsize=7, loc="lower left")
    return fig


def save_figures(history: Mapping[str, Any], out_dir: str | Path, dpi: int = 110) -> list[Path]:
    """Write every figure the history supports as ``<out_dir>/<name>.png``; return the written paths.

    ``sad.png`` and ``density_heatmap.png`` need at least one measurement; ``active_channels.png`` also
    needs channel history. Existing files are overwritten (each save shows the latest state).

    Example:
        >>> import tempfile
        >>> h = {"step": [0, 10], "sad_norm": [0.0, 0.1], "sad_vs_init_norm": [0.0, 0.1],
        ...      "layer_density": {"w": [0.5, 0.5]}, "channels": {}, "resets": []}
        >>> [p.name for p in save_figures(h, tempfile.mkdtemp())]
        ['sad.png', 'density_heatmap.png']
    """
    if not history.get("step"):
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"sad": plot_sad, "density_heatmap": plot_density_heatmap}
    if history.get("channels"):
        makers["active_channels"] = plot_active_channels
    paths = []
    for name, make in makers.items():
        path = out / f"{name}.png"
        make(history).savefig(path, dpi=dpi)
        paths.append(path)
    return paths
