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
- ``resets``: ``[[step, parameter name], ...]`` where a layer's mask changed shape;
- ``total``: number of mask elements at each measurement (the SAD normaliser; optional);
- ``events``: ``{"mask update" | "channel removal": [step, ...]}`` (optional);
- ``marks``: ``{label: step}`` of schedule stops, e.g. ``"DST stop"`` (optional);
- ``meta``: ``{"run": ..., "method": ...}`` for the titles (optional);
- ``layers``: ``{parameter name: {"numel": int, "kind": "unstructured" | "N:M" | "dense"}}`` of every
  conv/linear weight (optional; without it the bar chart shows the masked layers only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = [
    "plot_sad",
    "plot_density_heatmap",
    "plot_layer_density",
    "plot_active_channels",
    "heatmap_informative",
    "save_figures",
    "FIGURE_NAMES",
]

FIGURE_NAMES = ("sad", "layer_density", "density_heatmap", "active_channels")
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


def _title(history: Mapping[str, Any], what: str) -> str:
    meta = history.get("meta") or {}
    parts = [p for p in (meta.get("run"), meta.get("method")) if p]
    return f"{what}\n{' · '.join(parts)}" if parts else what


_EVENT_STYLE = {"mask update": dict(color="tab:green", linestyle="--"),
                "channel removal": dict(color="tab:red", linestyle="-.")}
_MARK_STYLE = dict(color="black", linestyle=":", linewidth=1.4)


def _legend_outside(fig: Figure, handles: Sequence[Any], labels: Sequence[str], **kwargs: Any) -> None:
    """One legend for the figure, right of its axes (and colorbar): never over the data."""
    if labels:
        fig.legend(list(handles), list(labels), loc="outside right upper", fontsize=7, **kwargs)


def _mark_events(axes: Sequence[Any], history: Mapping[str, Any], legend_ax: Any = None) -> None:
    """Vertical lines at mask updates, channel removals (one style each) and the schedule's stop steps."""
    steps = list(history.get("step", []))
    last = steps[-1] if steps else 0
    for ax in axes:
        for kind, at in (history.get("events") or {}).items():
            style = _EVENT_STYLE.get(kind, dict(color="tab:purple", linestyle="--"))
            for i, step in enumerate(at):
                ax.axvline(step, linewidth=0.8, alpha=0.6, label=f"{kind} ({len(at)})" if i == 0 else None, **style)
        for j, (name, step) in enumerate(sorted((history.get("marks") or {}).items(), key=lambda kv: kv[1])):
            if 0 <= step <= last:
                ax.axvline(step, label=f"{name} (step {step})", **{**_MARK_STYLE, "linestyle": [":", "-", "--"][j % 3]})
        removals = set((history.get("events") or {}).get("channel removal", []))
        resets = sorted({step for step, _name in history.get("resets", [])} - removals)  # slimming: already marked
        for i, step in enumerate(resets):
            ax.axvline(step, color="grey", linestyle=":", linewidth=0.8, label="mask shape change" if i == 0 else None)
    if legend_ax is not None:
        _legend_outside(legend_ax.figure, *legend_ax.get_legend_handles_labels())


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n:,}"


def _normaliser(history: Mapping[str, Any]) -> str:
    totals = history.get("total") or []
    if totals and min(totals) == max(totals):
        return f"fraction of all {_count(totals[-1])} mask elements"
    if totals:
        return f"fraction of all mask elements,\n{_count(totals[0])} → {_count(totals[-1])} as channels go"
    return "fraction of all mask elements"


def plot_sad(history: Mapping[str, Any]) -> Figure:
    """SAD over steps: step-to-step (vs the previous measurement) and vs the initial mask.

    Both are fractions of all tracked mask elements (the y labels say how many). A point at step ``s`` holds
    the mask updates made at ``s``; mask updates, channel removals and the schedule's stop steps are drawn as
    vertical lines with a legend. A flat step-to-step curve near 0 means the architecture has settled; the
    vs-init curve shows how far it travelled from where it started.

    Example:
        >>> h = {"step": [0, 10, 20], "sad_norm": [0.0, 0.2, 0.1], "sad_vs_init_norm": [0.0, 0.2, 0.25],
        ...      "resets": [], "events": {"mask update": [10, 20]}, "total": [500, 500, 500]}
        >>> fig = plot_sad(h)
        >>> len(fig.axes), len(fig.axes[0].lines)  # the curve and two update lines
        (2, 3)
        >>> fig.axes[1].get_ylabel().splitlines()[1]
        '(fraction of all 500 mask elements)'
    """
    steps = list(history["step"])
    fig = _new_figure(8.0, 5.5)
    ax_step, ax_init = fig.subplots(2, 1, sharex=True)
    # the first point (step 0) holds what moved during the first optimizer step (0 for explicit masks)
    norm = _normaliser(history)
    ax_step.plot(steps, history["sad_norm"], marker=".", color="tab:blue", label="SAD vs previous")
    ax_step.set_ylabel(f"SAD vs previous measurement\n({norm})", fontsize=8)
    ax_step.set_title(_title(history, "Sparse architecture divergence"), fontsize=10)
    ax_init.plot(steps, history["sad_vs_init_norm"], marker=".", color="tab:orange", label="SAD vs initial")
    ax_init.set_ylabel(f"SAD vs initial mask\n({norm})", fontsize=8)
    ax_init.set_xlabel("optimizer step")
    _mark_events([ax_step, ax_init], history)
    handles, labels = ax_step.get_legend_handles_labels()
    _legend_outside(fig, handles[1:], labels[1:])  # the events; the curves are named by the y labels
    for ax in (ax_step, ax_init):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0.0)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    return fig


def heatmap_informative(history: Mapping[str, Any], tol: float = 1e-9) -> bool:
    """Whether any layer's density changes over time (else the heatmap is flat rows: 2:4, fixed ERK)."""
    for values in history.get("layer_density", {}).values():
        finite = [v for v in values if not math.isnan(v)]
        if finite and max(finite) - min(finite) > tol:
            return True
    return False


def plot_density_heatmap(history: Mapping[str, Any]) -> Figure:
    """Per-layer density (fraction of kept weights) over time: layers as rows, optimizer steps on x.

    Columns span the steps between measurements, so the x axis is in steps with evenly spaced ticks;
    mask updates, channel removals and stop steps are marked.

    Example:
        >>> h = {"step": [0, 10], "layer_density": {"a.weight": [0.5, 0.4], "b.weight": [0.2, 0.3]}}
        >>> plot_density_heatmap(h).axes[0].get_ylabel()
        'layer'
    """
    steps = list(history["step"])
    names, mat = _matrix(history["layer_density"], len(steps))
    fig = _new_figure(9.0, max(3.0, 1.6 + 0.22 * len(names)))
    ax = fig.subplots()
    gap = (steps[-1] - steps[-2]) if len(steps) > 1 else 1
    edges = np.asarray([*steps, steps[-1] + max(1, gap)], dtype=float)
    image = ax.pcolormesh(edges, np.arange(len(names) + 1), np.ma.masked_invalid(mat), cmap="viridis",
                          vmin=0.0, vmax=1.0, shading="flat")
    ax.set_ylim(len(names), 0)
    ax.set_yticks(np.arange(len(names)) + 0.5)
    ax.set_yticklabels(names, fontsize=max(4, min(9, 400 // max(1, len(names)))))
    ax.set_ylabel("layer")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    ax.set_title(_title(history, "Density per layer (masked layers)"), fontsize=10)
    fig.colorbar(image, ax=ax, label="density (kept fraction)")
    _mark_events([ax], history, legend_ax=ax)
    return fig


_KIND_COLOR = {"unstructured": "tab:blue", "dense": "tab:gray", "masked": "tab:purple"}


def plot_layer_density(history: Mapping[str, Any]) -> Figure:
    """Final density of every conv/linear layer as horizontal bars, dense layers included and labelled.

    Bar colours give each layer's kind (unstructured mask, an N:M pattern, or dense); the title states the
    global density and the N:M coverage (fraction of conv/linear weights under N:M).

    Example:
        >>> h = {"step": [0], "layer_density": {"b.weight": [0.5]},
        ...      "layers": {"a.weight": {"numel": 100, "kind": "dense"}, "b.weight": {"numel": 300, "kind": "2:4"}}}
        >>> [t.get_text() for t in plot_layer_density(h).axes[0].get_yticklabels()]
        ['a.weight (dense)', 'b.weight (2:4)']
    """
    layers = dict(history.get("layers") or {})
    final = {n: v[-1] for n, v in history["layer_density"].items() if v and not math.isnan(v[-1])}
    for name in final:
        layers.setdefault(name, {"numel": 0, "kind": "masked"})
    names = list(layers)
    density = [1.0 if layers[n]["kind"] == "dense" else final.get(n, math.nan) for n in names]
    kinds = [layers[n]["kind"] for n in names]
    fig = _new_figure(9.5, max(3.0, 1.8 + 0.2 * len(names)))
    ax = fig.subplots()
    y = np.arange(len(names))
    colors = [_KIND_COLOR.get(k, "tab:green") for k in kinds]
    ax.barh(y, density, color=colors, height=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{n} ({k})" for n, k in zip(names, kinds)], fontsize=max(4, min(9, 400 // max(1, len(names)))))
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlim(0.0, 1.05)
    ax.set_xlabel("final density (kept fraction of the layer's weights)")
    ax.grid(True, axis="x", alpha=0.3)
    numel = {n: layers[n]["numel"] for n in names}
    total = sum(numel.values()) or 1
    kept = sum(d * numel[n] for n, d in zip(names, density) if not math.isnan(d))
    by_kind: dict[str, int] = {}
    for n, k in zip(names, kinds):
        by_kind[k] = by_kind.get(k, 0) + numel[n]
    coverage = ", ".join(f"{k} {v / total:.1%}" for k, v in by_kind.items())
    ax.set_title(f"{_title(history, 'Final density per layer')}\n"
                 f"density {kept / total:.3f} of {total:,} conv/linear weights ({coverage})", fontsize=9)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=_KIND_COLOR.get(k, "tab:green"), label=k) for k in by_kind], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), title="layer kind", title_fontsize=7)
    return fig


def _same_curves(names: Sequence[str], rows: np.ndarray) -> list[tuple[list[str], np.ndarray]]:
    """Layers whose curves are identical (NaN where missing), grouped in first-seen order."""
    groups: list[tuple[list[str], np.ndarray]] = []
    for name, row in zip(names, rows):
        for members, curve in groups:
            if np.array_equal(curve, row, equal_nan=True):
                members.append(name)
                break
        else:
            groups.append(([name], row))
    return groups


def plot_active_channels(history: Mapping[str, Any]) -> Figure:
    """Active output channels per layer over time, as a fraction of each layer's first measured count.

    Counts change only at channel removals, so each curve is drawn as steps (a value holds until the
    measurement that shows the next removal). Layers with identical curves share one line labelled with
    their count (e.g. every layer that keeps all its channels: "12 layers unchanged (1.0)"); the legend
    sits outside the axes.

    Example:
        >>> h = {"step": [0, 10], "channels": {"conv1": [64, 48], "conv2": [128, 128], "conv3": [32, 32]}}
        >>> fig = plot_active_channels(h)
        >>> fig.axes[0].get_ylabel(), [t.get_text() for t in fig.legends[0].get_texts()]
        ('active channels / initial', ['conv1', '2 layers unchanged (1.0)'])
    """
    steps = list(history["step"])
    names, mat = _matrix(history["channels"], len(steps))
    fig = _new_figure(8.0, 4.8)
    ax = fig.subplots()
    curves = []
    for row in mat:
        valid = row[~np.isnan(row)]
        first = valid[0] if len(valid) and valid[0] > 0 else math.nan
        curves.append(row / first)
    groups = _same_curves(names, np.asarray(curves).reshape(len(names), len(steps)))
    styles = ["-", "--", "-.", ":"]
    for i, (members, curve) in enumerate(groups):
        finite = curve[~np.isnan(curve)]
        if len(members) == 1:
            label = members[0]
        elif len(finite) and np.all(finite == 1.0):
            label = f"{len(members)} layers unchanged (1.0)"
        else:
            label = f"{members[0]} and {len(members) - 1} more (same curve)"
        ax.plot(steps, curve, drawstyle="steps-post", marker=".", linewidth=1.2 if len(members) == 1 else 2.0,
                linestyle=styles[(i // 10) % len(styles)], label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("active channels / initial")
    ax.set_title(_title(history, "Active channels per layer"), fontsize=10)
    ax.set_ylim(bottom=0.0, top=1.05)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    if len(groups) > _MAX_LEGEND:
        for line in ax.lines:
            line.set_label(None)
    _mark_events([ax], history, legend_ax=ax)
    return fig


def save_figures(history: Mapping[str, Any], out_dir: str | Path, dpi: int = 110) -> list[Path]:
    """Write every figure the history supports as ``<out_dir>/<name>.png``; return the written paths.

    ``sad.png`` and ``layer_density.png`` need at least one measurement; ``density_heatmap.png`` is written
    only when some layer's density changes over time (for 2:4 or fixed-ERK runs it would be flat rows);
    ``active_channels.png`` needs channel history. Existing files are overwritten (each save shows the
    latest state).

    Example:
        >>> import tempfile
        >>> h = {"step": [0, 10], "sad_norm": [0.0, 0.1], "sad_vs_init_norm": [0.0, 0.1],
        ...      "layer_density": {"w": [0.5, 0.5]}, "channels": {}, "resets": []}
        >>> [p.name for p in save_figures(h, tempfile.mkdtemp())]
        ['sad.png', 'layer_density.png']
    """
    if not history.get("step"):
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"sad": plot_sad, "layer_density": plot_layer_density}
    if heatmap_informative(history):
        makers["density_heatmap"] = plot_density_heatmap
    if history.get("channels"):
        makers["active_channels"] = plot_active_channels
    paths = []
    for name, make in makers.items():
        path = out / f"{name}.png"
        make(history).savefig(path, dpi=dpi)
        paths.append(path)
    return paths
