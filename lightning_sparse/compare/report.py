"""Writing a comparison: ``comparison.csv`` / ``comparison.md``, the PNG figures, and W&B (a Table and images).

Figures use matplotlib's Agg canvas (no ``pyplot``), like :mod:`lightning_sparse.plots`. A run that lacks
a value is left out of the figures that need it and shows an empty cell ("—" in Markdown), never a number.
"""

from __future__ import annotations

import csv
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["COLUMNS", "FIGURES", "SPREAD", "write_tables", "group_seeds", "flag_budgets", "pareto_front", "make_figures",
           "save_figures", "log_wandb"]

# (column, Markdown header, format); every column goes to the CSV, those with a header to the Markdown table
COLUMNS: list[tuple[str, str | None, str]] = [
    ("run", "run", "s"), ("method", "method", "s"), ("density", "density", "g"), ("S_c", "S_c", "g"),
    ("N:M", "N:M", "s"), ("mode", "mode", "s"), ("seed", "seed", "d"),
    ("epochs", "epochs", "d"), ("optimizer_steps", "steps", ",d"), ("images_seen", "images seen", ",d"),
    ("train_batches", None, "d"), ("budget_ratio", None, ".4g"), ("budget_flag", "budget", "s"),
    ("val_acc", "val acc", ".4f"), ("test_acc", "test acc", ".4f"),
    ("nonzero_params", "nonzero params", ",d"), ("density_measured", "nonzero / dense params", ".4f"),
    ("sparsity_vs_original", "zero weights / original conv+linear", ".4f"),
    ("params", "params (deployable)", ",d"), ("dense_params", None, "d"),
    ("flops", "FLOPs (deployable)", ".3g"), ("flops_nonzero", "FLOPs (nonzero weights)", ".3g"),
    ("dense_flops", None, "d"),
    ("latency_ms", "latency ms", ".2f"), ("latency_ms_min", None, ".4g"), ("latency_ms_max", None, ".4g"),
    ("dense_latency_ms", "dense latency ms", ".2f"),
    ("throughput", "img/s", ".0f"), ("throughput_min", None, ".6g"), ("throughput_max", None, ".6g"),
    ("dense_throughput", "dense img/s", ".0f"),
    ("speedup", "speedup vs dense", ".2f"), ("speedup_min", None, ".4f"), ("speedup_max", None, ".4f"),
    ("latency_speedup", "latency speedup", ".2f"), ("latency_speedup_min", None, ".4f"),
    ("latency_speedup_max", None, ".4f"), ("timing_reps", None, "d"),
    ("train_time_s", "train time s", ".0f"), ("train_time_from", None, "s"),
    ("sad_global_norm", "last SAD (step)", ".2e"), ("sad_vs_init_norm", "last SAD (vs init)", ".3f"),
    ("sad_cumulative", None, ".0f"), ("checkpoint", None, "s"),
]
# measured columns with a range: ``<name>_min`` / ``<name>_max`` beside the median; Markdown shows "median (min–max)"
SPREAD = ("latency_ms", "throughput", "speedup", "latency_speedup")
FIGURES = ("acc_vs_density", "acc_vs_flops", "acc_vs_throughput", "sad_curves")
BUDGET_KEYS = ("epochs", "optimizer_steps", "images_seen")
UNEQUAL, UNKNOWN = "unequal", "unknown"
MISSING = "—"


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if fmt == "s":
        return str(value)
    return format(int(round(value)) if fmt.endswith("d") else float(value), fmt)


def _cell(row: dict[str, Any], column: str, fmt: str) -> str:
    """A Markdown cell: measured columns as ``median (min–max)``, the budget flag with its ratio."""
    text = _fmt(row.get(column), fmt)
    if column in SPREAD and row.get(f"{column}_min") is not None:
        return f"{text} ({_fmt(row[f'{column}_min'], fmt)}–{_fmt(row[f'{column}_max'], fmt)})"
    if column == "budget_flag" and row.get(column) == UNEQUAL:
        ratio = row.get("budget_ratio")
        return "**unequal**" + (f" ({ratio:.2f}x images)" if ratio is not None else "")
    if column == "budget_flag" and not row.get(column):
        return "same"
    return text


def _budget(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in BUDGET_KEYS)


def _describe_budget(budget: tuple[Any, ...]) -> str:
    return ", ".join(f"{_fmt(v, ',d')} {what}" for v, what in zip(budget, ("epochs", "optimizer steps", "images")))


def flag_budgets(rows: Sequence[dict[str, Any]]) -> tuple[Any, ...] | None:
    """Flag the runs whose training budget (epochs, optimizer steps, images seen) is not the most common one.

    Sets ``budget_flag`` (``""`` same budget, ``"unequal"``, ``"unknown"`` where the run holds no budget) and
    ``budget_ratio`` (images seen / the common budget's images) on every row. Returns the common budget
    (the one most runs share; on a tie the first run's), or None when no run has one or no two runs share
    one (then every run with a budget is flagged).

    Example:
        >>> rows = [{"epochs": 3, "optimizer_steps": 60, "images_seen": 3840},
        ...         {"epochs": 12, "optimizer_steps": 240, "images_seen": 15360},
        ...         {"epochs": 3, "optimizer_steps": 60, "images_seen": 3840}]
        >>> flag_budgets(rows), [(r["budget_flag"], r["budget_ratio"]) for r in rows]
        ((3, 60, 3840), [('', 1.0), ('unequal', 4.0), ('', 1.0)])
    """
    known = Counter(_budget(r) for r in rows if any(v is not None for v in _budget(r)))
    common = known.most_common(1)[0][0] if known else None
    if len(known) > 1 and known[common] == 1:  # every run on its own budget: none is the reference
        common = None
    for r in rows:
        budget = _budget(r)
        if all(v is None for v in budget):
            r["budget_flag"], r["budget_ratio"] = UNKNOWN, None
            continue
        r["budget_flag"] = "" if budget == common else UNEQUAL
        images, ref = r.get("images_seen"), common[2] if common else None
        r["budget_ratio"] = images / ref if images is not None and ref else None
    return common


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
    lines = [header, ""]
    unequal = [r for r in rows if r.get("budget_flag") == UNEQUAL]
    if unequal:
        same = [_budget(r) for r in rows if r.get("budget_flag") == ""]
        what = (f"trained on another budget than the most common one ({_describe_budget(same[0])})" if same
                else "trained on budgets no other run shares")
        lines += [f"**Unequal training budgets**: {len(unequal)} of {len(rows)} runs {what}: "
                  + "; ".join(f"{r['run']}: {_describe_budget(_budget(r))}" for r in unequal)
                  + ". Their accuracy is not a comparison at equal training cost.", ""]
    lines += ["| " + " | ".join(h for _, h, _ in shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(r, c, fmt) for c, _, fmt in shown) + " |" for r in rows]
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


def pareto_front(points: Sequence[tuple[float, float]], higher_x_better: bool = False) -> list[tuple[float, float]]:
    """The points ``(x, accuracy)`` no other point beats on both axes, sorted by x.

    ``x`` is a cost (density, FLOPs: lower is better) or, with ``higher_x_better``, a speed (throughput).

    Example:
        >>> pareto_front([(0.1, 0.9), (0.2, 0.85), (0.05, 0.8), (0.3, 0.95)])
        [(0.05, 0.8), (0.1, 0.9), (0.3, 0.95)]
        >>> pareto_front([(100, 0.9), (200, 0.95), (300, 0.7)], higher_x_better=True)
        [(200, 0.95), (300, 0.7)]
    """
    order = sorted(points, key=lambda p: (-p[0] if higher_x_better else p[0], -p[1]))
    front, best = [], -math.inf
    for x, y in order:
        if y > best:
            front.append((x, y))
            best = y
    return sorted(front)


def _settings(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["method"], row["density"], row["S_c"], row["N:M"], row["mode"])


def _scatter(ax: Any, rows: Sequence[dict[str, Any]], x_key: str, colors: dict[str, Any],
             higher_x_better: bool = False) -> bool:
    """One series per method: every run as a small point, the seed mean of every setting as a marker (filled on
    the method's Pareto front, hollow off it) and the front as a line. Returns whether a point is off a front."""
    off_front = False
    for family, color in colors.items():
        members = [r for r in rows if _family(r) == family and r.get(x_key) is not None and r.get("test_acc") is not None]
        if not members:
            continue
        by_setting: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
        for r in members:
            by_setting[_settings(r)].append(r)
        means = [(sum(r[x_key] for r in g) / len(g), sum(r["test_acc"] for r in g) / len(g)) for g in by_setting.values()]
        if len(members) > len(means):  # seeds: every run, behind the seed means
            ax.scatter([r[x_key] for r in members], [r["test_acc"] for r in members], color=color, s=10, alpha=0.35,
                       linewidths=0)
        front = pareto_front(means, higher_x_better)
        on = set(front)
        off = [p for p in means if p not in on]
        off_front |= bool(off)
        ax.plot(*zip(*front), color=color, lw=1.2, marker="o", ms=5, label=f"{family} (Pareto front)")
        if off:
            ax.scatter(*zip(*off), facecolors="none", edgecolors=[color], s=28, linewidths=1.0)
    return off_front


def _figure(ncols: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(6.4 * ncols + 1.8, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _colors(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    from matplotlib import colormaps

    families = sorted({_family(r) for r in rows}, key=lambda f: (f != "dense", f))
    cmap = colormaps["tab10"]
    return {f: cmap(i % 10) for i, f in enumerate(families)}


def _legend_outside(fig: Figure, off_front: bool = False) -> None:
    """One legend for the figure, right of its axes (never over data), with an entry only for what is drawn."""
    from matplotlib.lines import Line2D

    handles, labels = [], []
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if off_front:
        handles.append(Line2D([], [], ls="", marker="o", mfc="none", mec="grey"))
        labels.append("setting off its method's Pareto front")
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=7)


def make_figures(rows: Sequence[dict[str, Any]], sad: dict[str, dict[str, tuple[list[float], list[float]]]]) -> dict[str, Figure]:
    """The four figures of a comparison (unsaved); ``sad``: run -> metric -> (steps, values)."""
    colors, figs = _colors(rows), {}
    fig, (ax,) = _figure()
    off = _scatter(ax, rows, "density_measured", colors)
    ax.set(xscale="log", xlabel="nonzero parameters / dense parameters", ylabel="test accuracy",
           title="Accuracy vs density")
    figs["acc_vs_density"] = (fig, off)
    fig, axes = _figure(2)
    off = False
    for ax, key, title in ((axes[0], "flops", "deployable model (slim; N:M at N/M; unstructured dense)"),
                           (axes[1], "flops_nonzero", "nonzero weights only (theoretical)")):
        off |= _scatter(ax, rows, key, colors)
        ax.set(xscale="log", xlabel="FLOPs per image", ylabel="test accuracy", title=title)
    figs["acc_vs_flops"] = (fig, off)
    fig, (ax,) = _figure()
    off = _scatter(ax, rows, "throughput", colors, higher_x_better=True)
    dense = {r["dense_throughput"] for r in rows if r.get("dense_throughput") is not None}
    if len(dense) == 1:  # one architecture: its dense model, timed in the same loop
        ax.axvline(dense.pop(), color="grey", ls=":", lw=1, label="dense model of the same architecture")
    ax.set(xlabel="measured CPU throughput (images/s, median)", ylabel="test accuracy",
           title="Accuracy vs measured throughput")
    figs["acc_vs_throughput"] = (fig, off)
    fig, axes = _figure(2)
    for ax, key, ylabel in ((axes[0], "sad/global_norm", "SAD vs previous measurement (fraction)"),
                            (axes[1], "sad/global_vs_init_norm", "SAD vs initial mask (fraction)")):
        drawn = set()
        for r in rows:
            steps, values = sad.get(r["run"], {}).get(key, ([], []))
            if steps:
                family = _family(r)
                ax.plot(steps, values, color=colors[family], lw=0.8, alpha=0.7,
                        label=None if family in drawn else family)
                drawn.add(family)
        ax.set(xlabel="step", ylabel=ylabel, title="Sparse architecture divergence")
    axes[0].set_yscale("symlog", linthresh=1e-6)
    figs["sad_curves"] = (fig, False)
    for fig, off in figs.values():
        _legend_outside(fig, off)
        for a in fig.axes:
            a.grid(alpha=0.3)
    return {name: fig for name, (fig, _) in figs.items()}


def save_figures(rows: Sequence[dict[str, Any]], sad: dict[str, dict[str, tuple[list[float], list[float]]]],
                 out: Path) -> dict[str, Path]:
    """The four PNGs of a comparison (:func:`make_figures`); returns ``{figure name: path}``."""
    saved = {}
    for name, fig in make_figures(rows, sad).items():
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
