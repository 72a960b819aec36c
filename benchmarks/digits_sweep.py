"""Digits sweep where sparse-training methods separate: dense, SET, RigL, Chase (plain and prune skip), GMP, N:M SR-STE,
STE and one-shot N:M of the dense run.

    PYTHONPATH=. python benchmarks/digits_sweep.py --jobs 2              # the full sweep, 78 runs (docs/comparison.md)
    PYTHONPATH=. python benchmarks/digits_sweep.py --jobs 2 --densities [0.002,0.001] --nm [1to32] --out /tmp/reduced   # 22 runs
    PYTHONPATH=. python benchmarks/digits_sweep.py --dry_run true        # print the train.py commands only

Every run is ``python train.py --config configs/sweep/base.yaml --config configs/sweep/<method>.yaml`` plus
command-line overrides (density or N:M, seeds, run name ``sweep_<method>_<setting>_s<seed>``), run as
subprocesses, one at a time or ``--jobs`` at a time. Unstructured methods (SET, RigL, Chase, GMP) run at every density in
``densities``; N:M methods at every pattern in ``nm``; dense once per seed. ``oneshot_nm`` prunes the same seed's
dense run (its ``last.ckpt``) once to N:M and fine-tunes it with fixed masks, so it runs after every other run,
and needs that dense run (in this sweep or done already). ``seed`` sets ``seed_everything`` and the mask seed
of SET/RigL/Chase, so seed-to-seed spread covers weights, data order and initial masks. A run whose
``metrics.csv`` already holds a test accuracy is kept, so an interrupted sweep continues where it stopped.

Afterwards ``python -m lightning_sparse.compare`` measures every run into ``<out>/`` (table, figures) and
this script writes ``<out>/sweep.md``: test accuracy per method and setting over the seeds (mean, min–max)
and, for RigL vs SET and SR-STE vs STE at each setting, whether the difference of the means is smaller than
the seed-to-seed spread (the larger min–max range of the two).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jsonargparse import CLI

ROOT = Path(__file__).resolve().parent.parent
SWEEP = ROOT / "configs" / "sweep"
UNSTRUCTURED = ("set", "rigl", "chase", "chase_residual", "gmp")
NM = ("srste", "ste", "oneshot_nm")
DENSE_CKPT = "{dense_checkpoint}"  # oneshot_nm's checkpoint_path, filled in when its dense run has finished
METHODS = ("dense", *UNSTRUCTURED, *NM)
PAIRS = (("rigl", "set"), ("srste", "ste"), ("chase", "rigl"), ("chase_residual", "chase"), ("rigl", "gmp"),
         ("oneshot_nm", "srste"))


def plan(methods: list[str], densities: list[float], nm: list[str], seeds: list[int]) -> list[tuple[str, list[str]]]:
    """``[(run name, train.py arguments)]`` of the sweep, seed-major so every seed finishes a full pass."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"methods {bad} are not in the sweep; choose from {list(METHODS)}.")
    runs = []
    for seed in seeds:
        for method in methods:
            base = ["--config", str(SWEEP / "base.yaml"), "--config", str(SWEEP / f"{method}.yaml"),
                    f"--seed_everything={seed}"]
            if method == "dense":
                settings = [("dense", [])]
            elif method in UNSTRUCTURED:
                seeded = [f"--sparsity.seed={seed}"] if method != "gmp" else []  # GMP is deterministic
                settings = [(f"d{d:g}", [f"--sparsity.density={d}", *seeded]) for d in densities]
            else:
                settings = [(f"{_nm(p)[0]}to{_nm(p)[1]}", [f"--sparsity.n={_nm(p)[0]}",
                                                     f"--sparsity.m={_nm(p)[1]}"]) for p in nm]
            if method == "oneshot_nm":
                settings = [(tag, [*extra, f"--model.init_args.checkpoint_path={DENSE_CKPT}"]) for tag, extra in settings]
            for tag, extra in settings:
                name = f"sweep_{method}_{tag}_s{seed}" if method != "dense" else f"sweep_dense_s{seed}"
                runs.append((name, [*base, *extra, f"--run_name={name}"]))
    return runs


def _dense_checkpoint(runs_dir: Path, name: str) -> str:
    """The newest ``last.ckpt`` of the dense run of ``name``'s seed (``sweep_oneshot_nm_2to4_s1`` -> ``sweep_dense_s1``)."""
    dense = f"sweep_dense_s{name.rpartition('_s')[2]}"
    found = sorted((runs_dir / dense).glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"{name} prunes the dense run {dense}, which has no last.ckpt under {runs_dir / dense}: "
                                "add `dense` to --methods (or train it first).")
    return str(found[-1])


def _nm(pattern: str) -> tuple[int, int]:
    try:
        n, m = (int(v) for v in str(pattern).replace("to", ":").split(":"))
    except ValueError:
        raise ValueError(f"N:M pattern {pattern!r} must look like '2to4' (or a quoted '2:4').") from None
    return n, m


def _done(name: str, runs_dir: Path) -> bool:
    metrics = sorted((runs_dir / name).glob("version_*/metrics.csv"))
    return bool(metrics) and "test/acc" in metrics[-1].read_text().splitlines()[0]


def _summary(csv_path: Path) -> str:
    """Seed statistics per (method, setting) and the pairwise comparisons, as Markdown."""
    rows = list(csv.DictReader(csv_path.open()))
    acc: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for r in rows:
        stem = Path(r["run"]).parent.name.removeprefix("sweep_")  # <method>_<setting>_s<seed> or dense_s<seed>
        head, _, seed_txt = stem.rpartition("_s")
        method = max((m for m in METHODS if head == m or head.startswith(m + "_")), key=len)  # chase_residual
        tag = head[len(method) + 1:]
        if r["test_acc"]:
            acc[(method, tag or "dense")][int(seed_txt)] = float(r["test_acc"])
    lines = ["| method | setting | seeds | test acc mean | min–max (spread) |", "|---|---|---|---|---|"]
    stats = {}
    for (method, tag), per_seed in sorted(acc.items()):
        vals = list(per_seed.values())
        mean, lo, hi = sum(vals) / len(vals), min(vals), max(vals)
        stats[(method, tag)] = (mean, hi - lo, len(vals))
        seeds = ",".join(str(s) for s in sorted(per_seed))
        lines.append(f"| {method} | {tag} | {seeds} | {mean:.4f} | {lo:.4f}–{hi:.4f} ({hi - lo:.4f}) |")
    lines += ["", "| comparison | setting | Δ mean | seed spread | verdict |", "|---|---|---|---|---|"]
    for a, b in PAIRS:
        for (method, tag), (mean_a, spread_a, n_a) in sorted(stats.items()):
            if method != a or (b, tag) not in stats:
                continue
            mean_b, spread_b, n_b = stats[(b, tag)]
            spread = max(spread_a, spread_b)
            delta = mean_a - mean_b
            if min(n_a, n_b) < 2:
                verdict = "one seed: spread unknown"
            elif abs(delta) <= spread:
                verdict = "within seed spread"
            else:
                verdict = f"{a if delta > 0 else b} better, beyond seed spread"
            lines.append(f"| {a} vs {b} | {tag} | {delta:+.4f} | {spread:.4f} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(
    methods: list[str] = list(METHODS),
    densities: list[float] = [0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001],
    nm: list[str] = ["2to4", "1to4", "1to8", "1to16", "1to32"],
    seeds: list[int] = [0, 1],
    out: str = "docs/figures/digits_sweep",
    workdir: str = ".",
    max_epochs: int | None = None,
    image_size: int | None = None,
    train_threads: int | None = None,
    overrides: list[str] = [],
    jobs: int = 1,
    reps: int = 10,
    threads: int | None = None,
    dry_run: bool = False,
    train: bool = True,
    compare: bool = True,
) -> None:
    """Run the digits sweep (one run at a time, or ``jobs`` at a time), then compare the runs.

    Args:
        methods: methods to run (dense, set, rigl, chase, chase_residual, gmp, srste, ste, oneshot_nm).
        densities: densities of the unstructured methods (fraction of kept weights in the sparse layers).
        nm: N:M patterns of the SR-STE / STE runs, ``2to4`` (or ``"2:4"`` quoted: YAML reads 2:4 as a number).
        seeds: seeds; every (method, setting) runs once per seed.
        out: output directory of the comparison (table, figures, sweep.md); the default is where the
            figures of docs/comparison.md live.
        workdir: directory the runs are trained from: they land in ``<workdir>/runs/sweep_*``.
        max_epochs: override the base config's 8 epochs (Chase's schedule needs at least 5).
        image_size: override the base config's 32 px (16 px costs a quarter of the compute).
        train_threads: torch threads of each training run (``OMP_NUM_THREADS``); 1 is much faster than 2
            on a machine that other jobs keep busy; default 1 when ``jobs`` > 1.
        overrides: further ``train.py`` arguments for every run, e.g. ``--trainer.limit_train_batches=3``.
        jobs: training runs at a time (each its own process, one thread unless ``train_threads``). On 2
            cores ``jobs=2`` keeps both busy through each run's start-up, validation and checkpoint I/O;
            the runs' own wall-clock times (compare's ``train_time_s``) then count a shared machine.
        reps: round-robin timing repetitions passed to compare (at least 5).
        threads: torch threads for compare's timing (default torch's).
        dry_run: print the commands and stop.
        train: train the runs that are not done yet; ``false`` compares only the finished ones.
        compare: run ``lightning_sparse.compare`` and write ``sweep.md`` after training.
    """
    for pattern in nm:
        _nm(pattern)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got jobs={jobs}.")
    todo = plan(methods, densities, nm, seeds)
    env = dict(os.environ, PYTHONPATH=str(ROOT), WANDB_SILENT="true")
    runs_path = Path(workdir).resolve() / "runs"
    runs_path.mkdir(parents=True, exist_ok=True)
    extra = [f"--trainer.max_epochs={max_epochs}"] if max_epochs else []
    extra += [f"--data.init_args.image_size={image_size}"] if image_size else []
    extra += list(overrides)
    if train_threads or jobs > 1:
        env["OMP_NUM_THREADS"] = str(train_threads or 1)
    start = time.perf_counter()
    pending = []
    for i, (name, args) in enumerate(todo, 1):
        cmd = [sys.executable, str(ROOT / "train.py"), *args, *extra]
        if dry_run:
            print(" ".join(cmd))
        elif _done(name, runs_path) or not train:
            print(f"[{i}/{len(todo)}] {name}: {'done already, kept' if _done(name, runs_path) else 'not trained'}",
                  flush=True)
        else:
            pending.append((i, name, cmd))
    if dry_run:
        return

    def train_one(item: tuple[int, str, list[str]]) -> None:
        i, name, cmd = item
        if any(DENSE_CKPT in c for c in cmd):
            cmd = [c.replace(DENSE_CKPT, _dense_checkpoint(runs_path, name)) for c in cmd]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=runs_path.parent, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        print(f"[{i}/{len(todo)}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:  # one-shot runs prune finished dense runs: they go last
        for phase in ([p for p in pending if not _is_one_shot(p)], [p for p in pending if _is_one_shot(p)]):
            for _ in pool.map(train_one, phase):
                pass
    except BaseException:  # the first failure stops the sweep: queued runs are cancelled, finished ones kept
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    trained = len(pending)
    train_s = time.perf_counter() - start
    print(f"trained {trained} of {len(todo)} runs in {train_s / 60:.1f} min", flush=True)
    if not compare:
        return
    from lightning_sparse.compare import compare as run_compare

    names = [name for name, _ in todo if _done(name, runs_path)]
    out_dir = Path(out) if Path(out).is_absolute() else ROOT / out
    run_compare([os.path.relpath(runs_path / n) for n in names], out=str(out_dir), reps=reps, threads=threads)
    fit_s = [float(r["train_time_s"]) for r in csv.DictReader((out_dir / "comparison.csv").open()) if r["train_time_s"]]
    text = (
        f"# Digits sweep\n\n{len(names)} runs (seeds {seeds}); fit wall-clock of these runs {sum(fit_s) / 60:.1f} min "
        f"(sum over {len(fit_s)} runs); this invocation trained {trained} runs in {train_s / 60:.1f} min and "
        f"compared in {(time.perf_counter() - start - train_s) / 60:.1f} min.\n\n"
        + _summary(out_dir / "comparison.csv")
    )
    (out_dir / "sweep.md").write_text(text)
    print(text)


def _is_one_shot(item: tuple[int, str, list[str]]) -> bool:
    return any(DENSE_CKPT in c for c in item[2])


if __name__ == "__main__":
    CLI(main, allow_abbrev=False)
