"""Compare training runs in one command: a table and Pareto figures of accuracy vs density, FLOPs and speed.

    python -m lightning_sparse.compare runs/* --out comparison
    python -m lightning_sparse.compare runs/sweep_rigl_* runs/sweep_set_* --out cmp --wandb

A run is ``runs/<name>/version_N`` as ``train.py`` writes it (``runs/<name>`` means its latest version).
From each run's resolved ``config.yaml``, ``metrics.csv`` and checkpoint (no training code runs) it writes
``<out>/comparison.csv`` and ``comparison.md`` (one row per run, and seed statistics for runs that differ
only in their seed) and four PNGs: ``acc_vs_density``, ``acc_vs_flops``, ``acc_vs_throughput``,
``sad_curves``; with ``--wandb`` also a ``wandb.Table`` and the images in one W&B run (offline by default).

Per run: the method and its settings (density, S_c, N:M, mode, seed), the last val/test accuracy, the
checkpoint's nonzero parameters, params and FLOPs of the deployable model (see
:mod:`lightning_sparse.compare.measure`), its CPU latency (batch 1) and throughput (batch ``batch_size``)
as the median and range of ``reps`` (>= 5) repetitions measured round-robin with the dense model of the same
architecture, the speedup as the median and range of the per-repetition ratios, the training budget (epochs,
optimizer steps, images seen; runs whose budget differs from the most common one are flagged), the fit
wall-clock time (Lightning's ``Timer`` state when the run had one, else the time between ``config.yaml`` and
``last.ckpt``), and the last SAD values. A value a run does not have is an empty cell, never a guess.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

import torch

from lightning_sparse.compare.measure import MIN_REPS, arch_key, load_deployable, time_interleaved, timing_columns
from lightning_sparse.compare.report import COLUMNS, FIGURES, flag_budgets, log_wandb, save_figures, write_tables
from lightning_sparse.compare.runs import (
    NotARunError,
    Run,
    describe_method,
    last_value,
    read_run,
    resolve_runs,
    series,
    train_budget,
    train_time,
)
from lightning_sparse.run import measure_costs
from lightning_sparse.utils.errors import InputError

SAD_KEYS = ("sad/global_norm", "sad/global_vs_init_norm")

__all__ = ["compare", "collect", "NotARunError", "Run", "resolve_runs", "read_run", "FIGURES"]


def collect(runs: list[Run], image_size: int | None = None, batch_size: int = 64, reps: int = 10,
            timing: bool = True) -> list[dict[str, Any]]:
    """One row per run (see the module docstring); timing interleaves every model in one loop."""
    rows, models, shapes, owners, dense_refs = [], [], [], [], {}
    for run in runs:
        row: dict[str, Any] = dict.fromkeys(c for c, _, _ in COLUMNS)
        row.update(run=str(run.path), **describe_method(run.config))
        row["val_acc"] = last_value(run.metrics, "val/acc")
        row["test_acc"] = last_value(run.metrics, "test/acc")
        row["sad_global_norm"] = last_value(run.metrics, "sad/global_norm")
        row["sad_vs_init_norm"] = last_value(run.metrics, "sad/global_vs_init_norm")
        row["sad_cumulative"] = last_value(run.metrics, "sad/cumulative")
        row["train_time_s"], row["train_time_from"] = train_time(run)
        row.update(train_budget(run))
        row["checkpoint"] = run.checkpoint.name if run.checkpoint else None
        if run.checkpoint is not None:
            dep = load_deployable(run, image_size)
            dense = dep.dense()
            row.update(measure_costs(dep, dense))
            if timing:
                key = arch_key(dense, dep.input_shape)
                if key not in dense_refs:
                    dense_refs[key] = len(models)
                    models.append(dense), shapes.append(dep.input_shape), owners.append(None)
                models.append(dep.model), shapes.append(dep.input_shape), owners.append((len(rows), key))
        rows.append(row)
    if models:
        times = time_interleaved(models, shapes, batch_size=batch_size, reps=reps)
        for (owner, t) in zip(owners, times):
            if owner is not None:
                i, key = owner
                rows[i].update(timing_columns(t, times[dense_refs[key]], batch_size))
    flag_budgets(rows)
    return rows


def compare(runs: list[str], out: str = "comparison", wandb: bool = False, image_size: int | None = None,
            batch_size: int = 64, reps: int = 10, timing: bool = True, threads: int | None = None) -> list[dict[str, Any]]:
    """Compare runs into a table and figures under ``out``.

    Args:
        runs: run directories (``runs/<name>/version_N`` or ``runs/<name>`` for its latest version) or globs.
        out: output directory (created).
        wandb: also log the table and figures to W&B (offline unless ``WANDB_MODE`` says otherwise).
        image_size: input resolution for FLOPs and timing; default each run's ``data.init_args.image_size``.
        batch_size: batch size of the throughput measurement (latency uses batch 1).
        reps: timed repetitions per model (at least 5; median and range); every repetition runs every model
            once, round-robin.
        timing: measure CPU latency/throughput (off: those columns stay empty).
        threads: ``torch.set_num_threads`` for the timing (default: torch's); 1 gives steadier ratios on a
            machine that other jobs share.

    Returns:
        The table rows (column -> value, None where a run lacks it).

    Raises:
        InputError: (a ``ValueError``) no runs, a pattern that matches nothing, an argument out of range (``reps``
            < 5 with timing on), an ``out`` that is a file, or a run whose checkpoint cannot be loaded (the message
            names it).
        NotARunError: a path that is not a run directory (the message names it).
    """
    if threads is not None and threads < 1:
        raise InputError(f"threads must be >= 1, got threads={threads}.")
    if timing and (isinstance(reps, bool) or not isinstance(reps, int) or reps < MIN_REPS):
        raise InputError(f"reps must be an int >= {MIN_REPS} (timings are the median and range over the repetitions), "
                         f"got reps={reps!r}; pass --no_timing to skip the timing.")
    if reps < 1 or batch_size < 1:
        raise InputError(f"reps and batch_size must be >= 1, got reps={reps}, batch_size={batch_size}.")
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"out={str(out)!r} exists and is not a folder.")
    if threads is not None:
        torch.set_num_threads(threads)
    paths = resolve_runs(list(runs))
    loaded = [read_run(p) for p in paths]
    for run in loaded:
        for note in run.notes:
            print(f"compare: {run.name}: {note}", file=sys.stderr)
    rows = collect(loaded, image_size=image_size, batch_size=batch_size, reps=reps, timing=timing)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    timed = (f"CPU, {torch.get_num_threads()} thread(s), latency at batch 1 and throughput at batch {batch_size}, "
             f"median (min–max) of {reps} round-robin repetitions next to the dense model of the same architecture, "
             f"speedup = median (min–max) of the per-repetition ratios (load average {load})") if timing else "off"
    header = (
        f"# Comparison of {len(rows)} runs\n\n"
        f"`python -m lightning_sparse.compare` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; timing: {timed}. "
        "Deployable model: slimmed where Chase slimmed, dense-shaped otherwise, N:M counted at N/M. — = not in the run."
    )
    write_tables(rows, out_dir, header)
    sad = {str(r.path): {k: series(r.metrics, k) for k in SAD_KEYS} for r in loaded}
    figures = save_figures(rows, sad, out_dir)
    if wandb:
        print(f"compare: W&B run in {log_wandb(rows, figures, out_dir)}", file=sys.stderr)
    print(f"compare: {len(rows)} runs -> {out_dir}/comparison.md, comparison.csv, "
          + ", ".join(f"{n}.png" for n in FIGURES), file=sys.stderr)
    return rows
