"""Writing a comparison: ``comparison.csv`` / ``comparison.md``, the PNG figures, and W&B (a Table and images).

Figures use matplotlib's Agg canvas (no ``pyplot``), like :mod:`lightning_sparse.plots`. A run that lacks
a value is left out of the figures that need it and shows an empty cell ("—" in Markdown), never a number.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["COLUMNS", "FIGURES", "write_tables", "group_seeds", "save_figures", "log_wandb"]

# (column, Markdown header, format); every column goes to the CSV, those with a header to the Markdown table
COLUMNS: list[tuple[str, str | None, str]] = [
    ("run", "run", "s"), ("method", "method", "s"), ("density", "density", "g"), ("S_c", "S_c", "g"),
    ("N:M", "N:M", "s"), ("mode", "mode", "s"), ("seed", "seed", "d"),
    ("val_acc", "val acc", ".4f"), ("test_acc", "test acc", ".4f"),
    ("nonzero_params", "nonzero params", ",d"), ("density_measured", "nonzero / dense params", ".4f"),
    ("sparsity_vs_original", "zero weights / original conv+linear", ".4f"),
    ("params", "params (deployable)", ",d"), ("dense_params", None, "d"),
    ("flops", "FLOPs (deployable)", ".3g"), ("flops_nonzero", "FLOPs (nonzero weights)", ".3g"),
    ("dense_flops", None, "d"),
    ("latency_ms", "latency ms", ".2f"), ("dense_latency_ms", "dense latency ms", ".2f"),
    ("throughput", "img/s", ".0f"), ("dense_throughput", "dense img/s", ".0f"),
    ("speedup", "speedup vs dense", ".2f"),
    ("train_time_s", "train time s", ".0f"), ("train_time_from", None, "s"),
    ("sad_global_norm", "last SAD (step)", ".2e"), ("sad_vs_init_norm", "last SAD (vs init)", ".3f"),
    ("sad_cumulative", None, ".0f"), ("checkpoint", None, "s"),
]
FIGURES = ("acc_vs_density", "acc_vs_flops", "acc_vs_throughput", "sad_curves")
MISSING = "—"


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if fmt == "s":
        return str(value)
    return format(int(round(value)) if fmt.endswith("d") else float(value), fmt)


def group_seeds(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that differ only in their seed, pooled: test accuracy mean, min, max and the seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["density"], r["S_c"], r["N:M"], r["mode"])].append(r)
    out = []
    for (method, density, s_c, nm, mode), members in groups.items():
        accs = [r["test_acc"] for r in members if r["test_acc"] is not None]
        out.append({
            "method": method, "density": density, "S_c": s_c, "N:M": nm, "mode": mode,
            "seeds": ",".join(str(r["seed"]) for r in members), "runs": len(members),
            "test_acc_mean": sum(accs) / len(accs) if accs else None,
            "test_acc_min": min(accs) if accs else None, "test_acc_max": max(accs) if accs else None,
        })
    return sorted(out, key=lambda g: (g["method"], -(g["density"] or 0)))


def write_tables(rows: Sequence[dict[str, Any]], out: Path, header: str = "") -> tuple[Path, Path]:
    """``comparison.csv`` (every column, empty cell = missing) and ``comparison.md`` (table + seed summary)."""
    csv_path, md_path = out / "comparison.csv", out / "comparison.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([c for c, _, _ in COLUMNS])
        for r in rows:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c, _, _ in COLUMNS])
    shown = [(c, h, fmt) for c, h, fmt in COLUMNS if h]
    lines = [header, "", "| " + " | ".join(h for _, h, _ in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_fmt(r.get(c), fmt) for c, _, fmt in shown) + " |" for r in rows]
    groups = group_seeds(rows)
    if any(g["runs"] > 1 for g in groups):
        lines += ["", "Runs that differ only in their seed (test accuracy):", "",
                  "| method | density | S_c | N:M | mode | seeds | mean | min | max | spread |", "|" + "---|" * 10]
        for g in groups:
            spread = None if g["test_acc_min"] is None else g["test_acc_max"] - g["test_acc_min"]
            cells = [g["method"], _fmt(g["density"], "g"), _fmt(g["S_c"], "g"), _fmt(g["N:M"], "s"),
                     _fmt(g["mode"], "s"), g["seeds"]] + [_fmt(g[k], ".4f") for k in
                                                         ("test_acc_mean", "test_acc_min", "test_acc_max")]
            lines.append("| " + " | ".join(cells + [_fmt(spread, ".4f")]) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _family(row: dict[str, Any]) -> str:
    """Series of a figure: the method, N:M methods pooled over their patterns."""
    return row["method"]


def _scatter(ax: Any, rows: Sequence[dict[str, Any]], x_key: str, colors: dict[str, Any]) -> None:
    """One series per method: every run as a point, the seed mean per x as a line."""
    for family, color in colors.items():
        pts = [(r[x_key], r["test_acc"]) for r in rows if _family(r) == family
               and r.get(x_key) is not None and r.get("test_acc") is not None]
        if not pts:
            continue
        ax.scatter(*zip(*pts), color=color, s=28, alpha=0.8, label=family)
        by_x: dict[float, list[float]] = defaultdict(list)
        for x, y in pts:
            by_x[round(x, 12)].append(y)
        xs = sorted(by_x)
        if len(xs) > 1:
            ax.plot(xs, [sum(by_x[x]) / len(by_x[x]) for x in xs], color=color, lw=1)


def _figure(ncols: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(6.4 * ncols, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _colors(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from matplotlib import colormaps

    families = sorted({_family(r) for r in rows}, key=lambda f: (f != "dense", f))
    cmap = colormaps["tab10"]
    return {f: cmap(i % 10) for i, f in enumerate(families)}


def save_figures(rows: Sequence[dict[str, Any]], sad: dict[str, dict[str, tuple[list[float], list[float]]]],
                 out: Path) -> dict[str, Path]:
    """The four PNGs of a comparison; ``sad``: run -> metric -> (steps, values). Returns ``{figure name: path}``."""
    colors, paths = _colors(rows), {}
    fig, (ax,) = _figure()
    _scatter(ax, rows, "density_measured", colors)
    ax.set(xscale="log", xlabel="nonzero parameters / dense parameters", ylabel="test accuracy",
           title="Accuracy vs density")
    paths["acc_vs_density"] = fig
    fig, axes = _figure(2)
    for ax, key, title in ((axes[0], "flops", "deployable model (slim; N:M at N/M; unstructured dense)"),
                           (axes[1], "flops_nonzero", "nonzero weights only (theoretical)")):
        _scatter(ax, rows, key, colors)
        ax.set(xscale="log", xlabel="FLOPs per image", ylabel="test accuracy", title=title)
    paths["acc_vs_flops"] = fig
    fig, (ax,) = _figure()
    _scatter(ax, rows, "throughput", colors)
    dense = {r["dense_throughput"] for r in rows if r.get("dense_throughput") is not None}
    if len(dense) == 1:  # one architecture: its dense model, timed in the same loop
        ax.axvline(dense.pop(), color="grey", ls=":", lw=1, label="dense model of the same architecture")
    ax.set(xlabel="measured CPU throughput (images/s)", ylabel="test accuracy", title="Accuracy vs measured throughput")
    paths["acc_vs_throughput"] = fig
    fig, axes = _figure(2)
    for ax, key, ylabel in ((axes[0], "sad/global_norm", "SAD vs previous measurement (fraction)"),
                            (axes[1], "sad/global_vs_init_norm", "SAD vs initial mask (fraction)")):
        for r in rows:
            steps, values = sad.get(r["run"], {}).get(key, ([], []))
            if steps:
                ax.plot(steps, values, color=colors[_family(r)], lw=0.8, alpha=0.7)
        for family, color in colors.items():
            ax.plot([], [], color=color, label=family)
        ax.set(xlabel="step", ylabel=ylabel, title="Sparse architecture divergence")
    axes[0].set_yscale("symlog", linthresh=1e-6)
    paths["sad_curves"] = fig
    saved = {}
    for name, fig in paths.items():
        for a in fig.axes:
            if a.get_legend_handles_labels()[0]:
                a.legend(fontsize=7)
            a.grid(alpha=0.3)
        saved[name] = out / f"{name}.png"
        fig.savefig(saved[name], dpi=110)
    return saved


def log_wandb(rows: Sequence[dict[str, Any]], figures: dict[str, Path], out: Path) -> str:
    """The table as a ``wandb.Table`` and the figures as images in one W&B run (offline unless
    ``WANDB_MODE`` says otherwise). Returns the run's directory."""
    import wandb

    from lightning_sparse.loggers import resolve_wandb_mode

    run = wandb.init(project="lightning_sparse", name=f"compare-{out.name}", job_type="compare", dir=str(out),
                     mode=resolve_wandb_mode(None))
    try:
        cols = [c for c, _, _ in COLUMNS]
        table = wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])
        run.log({"comparison": table, **{f"figures/{k}": wandb.Image(str(p)) for k, p in figures.items()}})
        return str(run.dir)
    finally:
        run.finish()
