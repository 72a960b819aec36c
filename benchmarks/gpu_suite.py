"""GPU truth in one command: training step ÷ dense, Chase inference, 2:4 end to end and ``pytest -m gpu``.

    PYTHONPATH=. python benchmarks/gpu_suite.py                      # one GPU, <= 8 minutes (--budget-s 480)
    PYTHONPATH=. python benchmarks/gpu_suite.py --device cpu --tiny  # the whole suite at toy size, seconds

Sections (every ratio is measured side by side in this one process, warm-up excluded; on a GPU with CUDA
events, each timed call starting on an idle GPU):

a. **Training step ÷ dense.** The Lightning training step as a user runs it (``Trainer.fit`` of an
   ``ImageClassifier`` with the callback, bf16-mixed, channels_last, one synthetic batch held in memory, no
   loader). Each arm's ``fit`` runs in its own thread and the arms take one step each in turn, so the steps
   of all arms are interleaved. A step is timed from ``on_train_batch_start`` (first callback) to
   ``on_train_batch_end`` (last callback): forward, backward, optimizer step and every hook. Steps with a
   mask update (RigL, Chase) are timed apart and amortised over the recipe's ΔT at this batch size.
   ResNet-50 (224 px, batch 256): dense, DynamicSparsity (RigL), NMSparsity SR-STE 2:4, Chase before
   slimming, and Chase after slimming (S_c 0.4 plain; prune skip at ~0.5x FLOPs). ViT-B/16 (batch 128):
   dense, NMSparsity 2:4, DynamicSparsity.
b. **Chase inference.** Dense vs slim (S_c 0.4 plain; prune skip at ~0.5x FLOPs), BatchNorm folded,
   channels_last, batch 256, fp16 / bf16 / fp32, runners ``eager``, ``cuda-graph`` (replay of a captured
   graph: :func:`lightning_sparse.utils.cuda_graph`) and ``compile`` (``torch.compile(mode="max-autotune")``).
   After every model has been timed, each runner's output is checked against the CPU fp32 model.
c. **2:4 end to end.** ViT-B/16, ViT-L/16 and ViT-H/14 at batch 256 through
   :func:`lightning_sparse.semi_structured.benchmark_semi_structured`: fp16 / bf16, eager / compile, all
   linears / MLP only, with and without cuSPARSELt's algorithm search.
d. ``pytest -m gpu`` over the test files that hold GPU tests.

The suite enforces its own time budget (``--budget-s``, 480 s by default): a row is started only when its
estimated cost fits what is left (the rest of the budget keeps a reserve for section d), and a row that
overruns is stopped at the budget; every row not measured is reported as skipped with the reason. It writes
``<out>/<gpu>_<torch>/report.json`` and ``report.md`` (``--out``, default ``benchmarks/results/gpu``), both
complete or not at all. ``benchmarks/gpu_tables.py`` turns the reports into the README's GPU tables.

Chase slimming uses Torch-Pruning; without it the Chase rows are skipped with that reason (the GPU machine has
no package registry: carry the wheel, see docs/development.md). Everything else needs only torch, timm,
pytorch-lightning and torchmetrics.

``--tiny`` runs the same code at toy size (timm's ``test_resnet`` and ``test_vit`` at 32 px, batch 2, a few
steps); ``compile`` there uses Dynamo with the eager backend on a CPU (no C++ build) and Inductor without
autotuning on a GPU, the 2:4 rows run eager only, and on a CPU the rows that need CUDA (``cuda-graph``, the
2:4 kernels, GPU tests) are reported as skipped with the reason. It is what the default test run executes.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("lightning_sparse") is None:  # `python benchmarks/gpu_suite.py` without PYTHONPATH
    sys.path.insert(0, str(ROOT))

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# max |out - ref| / max |ref| against the CPU fp32 model (fp32 on a GPU: TF32 convs)
TOLERANCE = {"float16": 2e-2, "bfloat16": 6e-2, "float32": 1e-2}
CHECK_SAMPLES = 8  # outputs compared on the first samples of the batch (the CPU reference runs only those)
MLP_ONLY = ["*.mlp.fc1", "*.mlp.fc2"]
GPU_TEST_MARK = "pytest.mark.gpu"


# ------------------------------------------------------------------------------------------------ settings
@dataclass(frozen=True)
class Sizes:
    """Models, batches and repetitions of one mode (full GPU size or toy size)."""

    cnn: str
    cnn_px: int
    cnn_batch: int
    vit: str
    vit_px: int
    vit_batch: int
    infer_batch: int
    vits_24: tuple[str, ...]
    vit24_px: int
    batch_24: int
    train_warmup: int
    train_steps: int
    update_every: int  # ΔT used inside the timed window (so updates fall in it); amortised at the recipe's ΔT
    warmup: int
    reps: int
    runs_24: int
    sc_bisect_steps: int
    num_classes: int = 1000


FULL = Sizes("resnet50", 224, 256, "vit_base_patch16_224", 224, 128, 256,
             ("vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"), 224, 256,
             train_warmup=5, train_steps=20, update_every=10, warmup=5, reps=20, runs_24=50, sc_bisect_steps=6)
TINY = Sizes("test_resnet", 32, 2, "test_vit", 32, 2, 2, ("test_vit",), 32, 2,
             train_warmup=1, train_steps=4, update_every=2, warmup=1, reps=3, runs_24=50, sc_bisect_steps=2,
             num_classes=10)

# Recipe ΔT (and the batch it was set for) over which one update step is amortised, scaled to keep the images
# between updates: RigL 100 steps at 4096 (DESIGN.md §3); Chase 1000 steps at 4 x 128 (CHASE.md §4).
RECIPE_DT = {"rigl": (100, 4096), "chase": (1000, 512)}

# Seconds a row is expected to take on one H100/H200 at FULL size (a row starts only if it fits the budget).
# Guesses until a GPU run's report ("walls": estimate vs wall per row) replaces them.
ESTIMATE_FULL = {"prep": 30, "train_resnet": 110, "train_vit": 45, "infer_eager": 20, "infer_compile": 100,
                 "24_eager": 15, "24_compile": 100, "pytest": 150}
ESTIMATE_TINY = dict.fromkeys(ESTIMATE_FULL, 1.0)


# -------------------------------------------------------------------------------------------------- budget
class BudgetExceeded(Exception):
    """The suite's wall-clock budget ran out while a row was running."""


class Skip(Exception):
    """A row that cannot run here (its message is the reason); recorded as skipped, not failed."""


@dataclass
class Task:
    """One row group of a section. Tasks run by ``priority`` (goal rows first), then in section order."""

    priority: int
    section: str
    what: str
    cost: str
    fn: Callable[[], None]


class Budget:
    """Wall-clock budget: ``fits`` before a row, a timer that interrupts a row that overruns."""

    def __init__(self, seconds: float, reserve: float) -> None:
        self.t0, self.seconds, self.reserve = time.monotonic(), seconds, reserve

    def left(self, for_last: bool = False) -> float:
        return self.seconds - (time.monotonic() - self.t0) - (0.0 if for_last else self.reserve)

    def fits(self, estimate: float, for_last: bool = False) -> str | None:
        """``None`` if a row of ``estimate`` seconds fits, else the reason it is skipped."""
        left = self.left(for_last)
        if estimate <= left:
            return None
        return (f"does not fit the time budget (estimated {estimate:.0f} s, {max(0.0, left):.0f} s left of "
                f"--budget-s {self.seconds:.0f}" + ("" if for_last else f", {self.reserve:.0f} s kept for pytest -m gpu") + ")")

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Raise :class:`BudgetExceeded` in the main thread when the whole budget is spent."""
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
            yield
            return

        def _alarm(signum: int, frame: Any) -> None:
            raise BudgetExceeded(f"stopped at the time budget (--budget-s {self.seconds:.0f})")

        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, max(0.01, self.left(for_last=True)))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


@dataclass
class Suite:
    """Run state: settings, budget and everything measured or skipped so far."""

    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    budget: Budget
    estimates: dict[str, float]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {k: [] for k in "abcd"})
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chase: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)  # row -> arm -> top ops
    walls: list[dict[str, Any]] = field(default_factory=list)  # estimate vs wall per row: recalibrates ESTIMATE_FULL
    finalizers: list[Callable[[], None]] = field(default_factory=list)  # run after every row (output checks)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def skip(self, section: str, what: str, reason: str) -> None:
        self.skipped.append({"section": section, "what": what, "reason": reason})
        print(f"[{section}] skipped {what}: {reason}", flush=True)

    def run(self, section: str, what: str, cost: str, fn: Callable[[], None], for_last: bool = False) -> bool:
        """Run ``fn`` if its estimate fits the budget; a skip or failure is recorded with its reason."""
        reason = self.budget.fits(self.estimates[cost], for_last)
        if reason is not None:
            self.skip(section, what, reason)
            return False
        print(f"[{section}] {what} ...", flush=True)
        t0 = time.monotonic()
        try:
            with self.budget.guard():
                fn()
        except BudgetExceeded as err:
            self.skip(section, what, str(err))
            return False
        except Skip as err:
            self.skip(section, what, str(err))
            return False
        except Exception as err:
            if _caused_by(err, BudgetExceeded):  # raised inside a library that wrapped it (torch.compile does)
                self.skip(section, what, f"stopped at the time budget (--budget-s {self.budget.seconds:.0f})")
                return False
            self.skip(section, what, f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
            if self.args.raise_errors:
                raise
            return False
        finally:
            self.walls.append({"section": section, "what": what, "estimate_s": self.estimates[cost],
                               "wall_s": round(time.monotonic() - t0, 1)})
        return True

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def _caused_by(err: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kind):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def has_torch_pruning() -> str | None:
    """``None`` when Torch-Pruning can be imported, else why the Chase rows are skipped."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError as err:
        return (f"Chase slimming needs Torch-Pruning, which is not installed ({err}); carry its wheel "
                "(docs/development.md, 'GPU suite')")
    return None


# --------------------------------------------------------------------------------------- Chase slim models
def _chase_speed() -> Any:
    """``benchmarks/chase_speed.py``, for its Chase proxy (random ERK masks, UMM scores, the cubic schedule with
    floors, then :func:`~lightning_sparse.slim.slim_model` with a logits check)."""
    if "_gpu_suite_chase_speed" not in sys.modules:
        spec = importlib.util.spec_from_file_location("_gpu_suite_chase_speed", HERE / "chase_speed.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["_gpu_suite_chase_speed"] = module
        spec.loader.exec_module(module)
    return sys.modules["_gpu_suite_chase_speed"]


def chase_models(suite: Suite) -> None:
    """Dense and Chase-slimmed copies of the CNN (plain S_c 0.4; prune skip at ~0.5x FLOPs), shared by a and b.

    The prune-skip S_c is bisected as ``chase_speed.sc_for_flops`` does (``sizes.sc_bisect_steps`` steps).
    """
    import timm

    slim_proxy = _chase_speed().slim_proxy
    s = suite.sizes
    ns = argparse.Namespace(seed=17, density=0.1, score="umm", beta=0.2, schedule_steps=8, round_to=8, size=s.cnn_px)
    torch.manual_seed(0)
    dense = timm.create_model(s.cnn, pretrained=False, num_classes=s.num_classes).eval()
    plain, plain_ratio = slim_proxy(dense, 0.4, ns, residual=False)
    lo, hi = 0.1, 0.8
    for _ in range(s.sc_bisect_steps):
        mid = round((lo + hi) / 2, 3)
        _, ratio = slim_proxy(dense, mid, ns, residual=True)
        lo, hi = (mid, hi) if ratio > 0.5 else (lo, mid)
    sc_skip = round((lo + hi) / 2, 2)
    skip, skip_ratio = slim_proxy(dense, sc_skip, ns, residual=True)
    suite.chase = {"dense": dense, "plain": plain, "skip": skip,
                   "meta": {"plain": {"S_c": 0.4, "flops_ratio": round(plain_ratio, 4)},
                            "skip": {"S_c": sc_skip, "flops_ratio": round(skip_ratio, 4)}}}
    print(f"    Chase slim models: plain S_c 0.4 FLOPs {plain_ratio:.3f}; prune skip S_c {sc_skip} FLOPs {skip_ratio:.3f}")


# ------------------------------------------------------------------------------------ a. training step
class Turns:
    """Arms take one training step each in turn; an arm holds the turn from one step's start to the next's."""

    def __init__(self, n: int) -> None:
        self.cond = threading.Condition()
        self.turn, self.n, self.done = 0, n, [False] * n
        self.abort: str | None = None

    def _advance(self, i: int) -> None:
        for k in range(1, self.n + 1):
            j = (i + k) % self.n
            if not self.done[j]:
                self.turn = j
                break
        self.cond.notify_all()

    def take(self, i: int, holding: bool) -> None:
        with self.cond:
            if holding:
                self._advance(i)
            self.cond.wait_for(lambda: self.turn == i or self.abort is not None)
            if self.abort is not None:
                raise RuntimeError(f"stopped: {self.abort}")

    def finish(self, i: int) -> None:
        with self.cond:
            self.done[i] = True
            if self.turn == i:
                self._advance(i)
            self.cond.notify_all()

    def stop(self, reason: str) -> None:
        with self.cond:
            self.abort = reason
            self.cond.notify_all()


class StepClock:
    """CUDA-event (GPU) or wall (CPU) time of each training step of one arm, and whether it updated masks."""

    def __init__(self, turns: Turns, index: int, device: torch.device, warmup: int, steps: int,
                 updates: Callable[[], int]) -> None:
        self.turns, self.index, self.device = turns, index, device
        self.warmup, self.steps, self.updates = warmup, steps, updates
        self.holding, self.seen = False, 0
        self.times: list[tuple[float, bool]] = []
        self._start: Any = None
        self._updates_before = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self.turns.take(self.index, self.holding)
        self.holding = True
        self._sync()
        self._updates_before = self.updates()
        if self.device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self, trainer: Any) -> None:
        if self.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._sync()
            ms = self._start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - self._start) * 1e3
        self.seen += 1
        if self.seen > self.warmup:
            self.times.append((ms, self.updates() != self._updates_before))
        if self.seen >= self.warmup + self.steps:
            trainer.should_stop = True


def _clock_callbacks(clock: StepClock) -> tuple[Any, Any]:
    import pytorch_lightning as pl

    class StepStart(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            clock.start()

    class StepEnd(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            clock.stop(trainer)

    return StepStart(), StepEnd()


class SameBatch:
    """``n`` references to one batch held in memory: a sized iterable Lightning takes as the train loader."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.repeat(self.batch, self.n)


@dataclass
class Arm:
    """One training configuration: a model factory, an optional sparsity callback, its recipe ΔT key."""

    name: str
    make_model: Callable[[], Any]
    make_callback: Callable[[], Any] | None = None
    recipe: str | None = None  # "rigl" / "chase": amortise update steps over that recipe's ΔT
    flops_ratio: float | None = None
    error: str | None = None
    clock: StepClock | None = None


def _arm_thread(suite: Suite, arm: Arm, index: int, turns: Turns, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    import pytorch_lightning as pl

    s = suite.sizes
    try:
        model = arm.make_model()
        callback = arm.make_callback() if arm.make_callback else None
        clock = StepClock(turns, index, suite.device, s.train_warmup, s.train_steps,
                          lambda: int(getattr(callback, "num_updates", 0)))
        arm.clock = clock
        start, end = _clock_callbacks(clock)
        callbacks = [start, *([callback] if callback else []), end]
        trainer = pl.Trainer(
            accelerator="gpu" if suite.cuda else "cpu", devices=1, precision="bf16-mixed", max_epochs=10,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks, benchmark=suite.cuda or None,
        )
        n = s.train_warmup + s.train_steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, train_dataloaders=SameBatch(batch, n))
        if len(clock.times) < s.train_steps:
            raise RuntimeError(f"timed {len(clock.times)} of {s.train_steps} steps")
    except Exception as err:  # noqa: BLE001 - reported as this arm's failure
        arm.error = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    finally:
        turns.finish(index)


def run_arms(suite: Suite, model_name: str, arms: list[Arm], batch_size: int, px: int) -> None:
    """Interleave the arms' training steps; one row per arm, its step time ÷ the dense arm's."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, px, px, generator=gen).to(suite.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, suite.sizes.num_classes, (batch_size,), generator=gen).to(suite.device)
    turns = Turns(len(arms))
    threads = [threading.Thread(target=_arm_thread, args=(suite, a, i, turns, (x, y)), daemon=True)
               for i, a in enumerate(arms)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.2)
    except BaseException:
        turns.stop("the main thread stopped (time budget)")
        for t in threads:
            t.join(timeout=30)
        raise
    dense = arms[0]
    if dense.error:
        raise RuntimeError(f"dense arm failed: {dense.error}")
    base = _step_cost(suite, dense, batch_size)["amortised_ms"]
    for arm in arms:
        row = {"model": model_name, "arm": arm.name, "batch": batch_size, "px": px, "flops_ratio": arm.flops_ratio}
        if arm.error:
            suite.skip("a", f"{model_name} {arm.name}", f"FAILED: {arm.error}")
            continue
        row |= _step_cost(suite, arm, batch_size)
        row["ratio"] = round(row["amortised_ms"] / base, 4)
        suite.rows["a"].append(row)
        print(f"    {model_name:22s} {arm.name:28s} step {row['amortised_ms']:9.2f} ms  ÷ dense {row['ratio']:.3f}"
              + (f"  (update step {row['update_ms']:.1f} ms amortised over ΔT {row['recipe_dt']})" if row['update_ms'] else ""),
              flush=True)


def _step_cost(suite: Suite, arm: Arm, batch_size: int) -> dict[str, Any]:
    assert arm.clock is not None
    plain = [ms for ms, upd in arm.clock.times if not upd]
    upd = [ms for ms, u in arm.clock.times if u]
    step = statistics.median(plain) if plain else statistics.median(ms for ms, _ in arm.clock.times)
    out: dict[str, Any] = {"step_ms": round(step, 4), "update_ms": None, "recipe_dt": None, "amortised_ms": round(step, 4),
                           "timed_steps": len(arm.clock.times)}
    if arm.recipe is not None:
        ref_dt, ref_batch = RECIPE_DT[arm.recipe]
        dt_here = max(1, round(ref_dt * ref_batch / batch_size))
        out["recipe_dt"] = dt_here
        if upd:
            u = statistics.median(upd)
            out["update_ms"] = round(u, 4)
            out["amortised_ms"] = round(step + (u - step) / dt_here, 4)
        else:
            out["note"] = "no mask update fell in the timed steps"
    return out


def section_a(suite: Suite) -> list[Task]:
    """The two training-step tasks (ResNet arms with Chase where its slim models exist; ViT arms)."""
    from lightning_sparse.callbacks import DynamicSparsity, NMSparsity  # Chase (Torch-Pruning) only where it runs
    from lightning_sparse.models import ImageClassifier

    s = suite.sizes
    k = s.update_every

    def classifier(name: str, px: int, body: nn.Module | None = None) -> Callable[[], Any]:
        def make() -> Any:
            torch.manual_seed(0)
            kwargs = {"img_size": px} if "vit" in name else {}
            m = ImageClassifier(name, num_classes=s.num_classes, model_kwargs=kwargs)
            if body is not None:
                m.model = copy.deepcopy(body).train()
            return m.to(memory_format=torch.channels_last)
        return make

    def rigl() -> Any:
        return DynamicSparsity(density=0.1, update_interval=k, stop_step=10**9, growth="gradient", log_per_layer=False)

    def chase(sc: float, residual: bool) -> Callable[[], Any]:
        from lightning_sparse.callbacks import Chase

        return lambda: Chase(density=0.1, channel_sparsity=sc, residual_channels=residual, update_interval=k,
                             stop_gmp_epochs=10, stop_dst_epochs=1, channel_interval_epochs=10, slim="never",
                             input_shape=(3, s.cnn_px, s.cnn_px), log_per_layer=False)

    def cnn_arms() -> list[Arm]:  # built when the task runs: the Chase slim models come from the prep task
        arms = [Arm("dense", classifier(s.cnn, s.cnn_px)),
                Arm("DynamicSparsity (RigL)", classifier(s.cnn, s.cnn_px), rigl, "rigl"),
                Arm("NMSparsity SR-STE 2:4", classifier(s.cnn, s.cnn_px), NMSparsity)]
        no_tp = has_torch_pruning()
        if no_tp is not None:
            suite.skip("a", f"{s.cnn} Chase (before and after slimming)", no_tp)
            return arms
        if not suite.chase:
            suite.skip("a", f"{s.cnn} Chase (before and after slimming)", "the Chase slim models were not built (see above)")
            return arms
        meta = suite.chase["meta"]
        return arms + [Arm("Chase before slimming", classifier(s.cnn, s.cnn_px), chase(0.4, False), "chase"),
                 Arm(f"Chase slim S_c {meta['plain']['S_c']}", classifier(s.cnn, s.cnn_px, suite.chase["plain"]),
                     chase(0.0, False), "chase", meta["plain"]["flops_ratio"]),
                 Arm(f"Chase slim prune skip S_c {meta['skip']['S_c']}", classifier(s.cnn, s.cnn_px, suite.chase["skip"]),
                     chase(0.0, True), "chase", meta["skip"]["flops_ratio"])]

    vit_arms = [Arm("dense", classifier(s.vit, s.vit_px)),
                Arm("NMSparsity SR-STE 2:4", classifier(s.vit, s.vit_px), NMSparsity),
                Arm("DynamicSparsity (RigL)", classifier(s.vit, s.vit_px), rigl, "rigl")]
    return [Task(1, "a", f"training step {s.cnn} {s.cnn_px}px batch {s.cnn_batch}", "train_resnet",
                 lambda: run_arms(suite, s.cnn, cnn_arms(), s.cnn_batch, s.cnn_px)),
            Task(1, "a", f"training step {s.vit} batch {s.vit_batch}", "train_vit",
                 lambda: run_arms(suite, s.vit, vit_arms, s.vit_batch, s.vit_px))]


# ----------------------------------------------------------------------------------- b. Chase inference
def _max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float().cpu() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def _inference_runner(model: nn.Module, x: torch.Tensor, runner: str, suite: Suite) -> Callable[[], torch.Tensor]:
    """A zero-argument call of ``model`` (already folded, on device, in its dtype) on ``x`` in ``runner``."""
    from lightning_sparse.utils import cuda_graph

    if runner == "compile":
        if not suite.cuda:  # toy size on CPU: Dynamo's tracing without a C++ build
            compiled = torch.compile(model, backend="eager")
        else:  # toy size on a GPU: Inductor without the (minutes of) autotuning
            compiled = torch.compile(model, mode="max-autotune" if suite.sizes is FULL else None)

        def run_compiled() -> torch.Tensor:
            if suite.cuda:
                torch.compiler.cudagraph_mark_step_begin()  # max-autotune replays CUDA graphs
            with torch.inference_mode():
                return compiled(x)

        return run_compiled

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return cuda_graph(run, suite.device) if runner == "cuda-graph" else run


def profile_top(fn: Callable[[], object], device: torch.device, calls: int = 3, top: int = 12) -> list[dict[str, Any]]:
    """Where the time of ``fn`` goes: the ``top`` operators by self time over ``calls`` calls (torch.profiler;
    device time on a GPU, CPU time on a CPU), in ms per call."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    rows = []
    for ev in prof.key_averages():
        self_us = getattr(ev, "self_device_time_total", None) if cuda else ev.self_cpu_time_total
        if cuda and self_us is None:
            self_us = getattr(ev, "self_cuda_time_total", 0)
        if self_us and self_us > 0:
            rows.append({"op": ev.key[:80], "self_ms": round(self_us / 1e3 / calls, 4), "calls": ev.count // calls})
    return sorted(rows, key=lambda r: r["self_ms"], reverse=True)[:top]


# priority of each (dtype, runner): the goal row (fp16 compile) and the plain fp16 rows first
B_PRIORITY = {("float16", "eager"): 1, ("float16", "compile"): 1, ("float16", "cuda-graph"): 2, ("bfloat16", "eager"): 2,
              ("float32", "eager"): 2}


def section_b(suite: Suite) -> list[Task]:
    """One task per (dtype, runner), dense / plain / prune skip interleaved; outputs checked after every row ran."""
    from lightning_sparse.utils import interleaved_times

    s = suite.sizes
    runners = ["eager", "cuda-graph", "compile"]
    if not suite.cuda:
        suite.skip("b", "cuda-graph runner", "CUDA graphs need a CUDA device")
        runners.remove("cuda-graph")
    dtypes = ["float16", "bfloat16", "float32"] if suite.cuda else ["float32"]
    if not suite.cuda:
        suite.skip("b", "float16 and bfloat16", "timed on the GPU only (a CPU run checks the fp32 paths)")
    gen = torch.Generator().manual_seed(1)
    x_cpu = torch.randn(s.infer_batch, 3, s.cnn_px, s.cnn_px, generator=gen)
    state: dict[str, Any] = {}
    fns: dict[tuple[str, str, str], Callable[[], torch.Tensor]] = {}

    def folded() -> dict[str, nn.Module]:
        """BN-folded dense / plain / prune-skip models and their CPU fp32 outputs (once, after the prep task)."""
        if not suite.chase:
            raise Skip(has_torch_pruning() or "the Chase slim models were not built (see above)")
        if "folded" not in state:
            from lightning_sparse.export import fold_batchnorm

            state["folded"] = {k: fold_batchnorm(suite.chase[k], x_cpu[:1], strict=False).eval()
                               for k in ("dense", "plain", "skip")}
            with torch.inference_mode():
                state["refs"] = {k: m(x_cpu[:CHECK_SAMPLES]) for k, m in state["folded"].items()}
        return state["folded"]

    def measure(dtype: str, runner: str) -> None:
        torch.backends.cudnn.benchmark = True
        x = x_cpu.to(suite.device, DTYPES[dtype]).contiguous(memory_format=torch.channels_last)
        batch = {}
        for key, m in folded().items():
            dev_model = copy.deepcopy(m).to(suite.device, DTYPES[dtype]).to(memory_format=torch.channels_last)
            batch[(dtype, runner, key)] = _inference_runner(dev_model, x, runner, suite)
        times = interleaved_times(list(batch.values()), s.warmup, s.reps, suite.device)
        fns.update(batch)
        ms = {key[2]: (t.event_ms if suite.cuda else t.host_ms) for key, t in zip(batch, times)}
        host = {key[2]: t.host_bound for key, t in zip(batch, times)}
        for key in ("dense", "plain", "skip"):
            meta = suite.chase["meta"].get(key, {"S_c": 0.0, "flops_ratio": 1.0})
            suite.rows["b"].append({"variant": key, "S_c": meta["S_c"], "flops_ratio": meta["flops_ratio"],
                                    "dtype": dtype, "runner": runner, "batch": s.infer_batch, "ms": round(ms[key], 4),
                                    "speedup": round(ms["dense"] / ms[key], 4),
                                    "host_bound": bool(host[key]) if suite.cuda else None})
        print(f"    {dtype:9s} {runner:10s} dense {ms['dense']:8.2f} ms  plain {ms['dense'] / ms['plain']:.2f}x  "
              f"prune skip {ms['dense'] / ms['skip']:.2f}x", flush=True)
        if runner == "eager" and dtype == dtypes[0]:  # where the time goes, dense vs prune skip
            suite.profiles[f"Chase inference {dtype} eager"] = {
                key: profile_top(batch[(dtype, runner, key)], suite.device) for key in ("dense", "skip")}

    def check_outputs() -> None:
        """Every runner's output against the CPU fp32 model, once every row of the suite has run (latest first)."""
        for (dtype, runner, key), fn in reversed(list(fns.items())):
            out = fn()
            out = out.clone() if isinstance(out, torch.Tensor) else out
            suite.sync()
            err = _max_rel_err(out[:CHECK_SAMPLES], state["refs"][key])
            ok = err <= TOLERANCE[dtype]
            for row in suite.rows["b"]:
                if (row["dtype"], row["runner"], row["variant"]) == (dtype, runner, key):
                    row |= {"max_rel_err": err, "tolerance": TOLERANCE[dtype], "output_ok": ok}
            if not ok:
                print(f"    OUTPUT MISMATCH {dtype} {runner} {key}: max rel err {err:.2e} > {TOLERANCE[dtype]:.0e}", flush=True)

    suite.finalizers.append(check_outputs)
    return [Task(B_PRIORITY.get((dtype, runner), 3), "b", f"Chase inference {dtype} {runner}",
                 "infer_compile" if runner == "compile" else "infer_eager",
                 lambda dtype=dtype, runner=runner: measure(dtype, runner))
            for dtype in dtypes for runner in runners]


# ---------------------------------------------------------------------------------------- c. 2:4 e2e
def _c_priority(name: str, dtype: str, runner: str, layers: str, search: bool) -> int:
    """The goal row (MLP only, compile, fp16; ViT-L before the others) first; plain fp16 eager rows next."""
    if (dtype, runner, layers, search) == ("float16", "compile", "mlp", False):
        return 1 if "large" in name else 2
    if dtype == "float16" and runner == "eager" and not search:
        return 2
    return 3


def section_c(suite: Suite) -> list[Task]:
    """One task per (model, dtype, runner, layers, search); models are built when their first row runs."""
    import timm

    from lightning_sparse.semi_structured import benchmark_semi_structured, semi_structured_eligibility, skip_reason

    s = suite.sizes
    reason = skip_reason(None, "float16", "cusparselt", suite.device if suite.cuda else None)
    models: dict[str, nn.Module] = {}

    def model_of(name: str) -> nn.Module:
        if name not in models:
            kwargs = {"img_size": s.vit24_px} if s.vit24_px != 224 else {}
            models[name] = timm.create_model(name, pretrained=False, num_classes=s.num_classes, **kwargs).eval()
            rows = semi_structured_eligibility(models[name], "float16", "cusparselt")
            eligible = [r.name for r in rows if r.eligible]
            mlp = [n for n in eligible if n.endswith((".mlp.fc1", ".mlp.fc2"))]
            print(f"    {name}: {len(eligible)} eligible linears, {len(mlp)} of them MLP", flush=True)
        return models[name]

    def measure(name: str, dtype: str, runner: str, layers: str, search: bool, what: str) -> None:
        rep = benchmark_semi_structured(
            model_of(name), (3, s.vit24_px, s.vit24_px), dtype, "cusparselt", batch_size=s.batch_24, warmup=5,
            runs=s.runs_24, layers=False, device=suite.device, runner=runner, search=search,
            include=MLP_ONLY if layers == "mlp" else None)
        suite.rows["c"].append({"model": name, "dtype": dtype, "runner": runner, "layers": layers,
                                "search": search, "batch": s.batch_24, "converted": len(rep.converted),
                                "dense_ms": round(rep.dense_ms, 4), "sparse_ms": round(rep.sparse_ms, 4),
                                "speedup": round(rep.speedup_e2e, 4), "parity_ok": bool(rep.parity_ok),
                                "parity_max_rel_err": rep.parity_max_rel_err, "host_bound": bool(rep.host_bound)})
        print(f"    {what}: {rep.speedup_e2e:.2f}x (dense {rep.dense_ms:.2f} ms)", flush=True)
        torch.cuda.empty_cache()

    tasks = []
    for name in s.vits_24:
        if reason is not None:
            model_of(name)  # the eligibility (all linears vs MLP only) is still computed and printed
            suite.skip("c", f"2:4 {name} (all rows)", reason)
            continue
        for search in (False, True):
            for layers in ("mlp", "all"):
                for runner in ("compile", "eager"):
                    for dtype in ("float16", "bfloat16"):
                        what = (f"2:4 {name} {dtype} {runner} {'MLP only' if layers == 'mlp' else 'all linears'}"
                                + (" --search" if search else ""))
                        if suite.sizes is not FULL and runner == "compile":
                            continue  # the 2:4 benchmark compiles with max-autotune: minutes even at toy size
                        tasks.append(Task(_c_priority(name, dtype, runner, layers, search), "c", what,
                                          "24_compile" if runner == "compile" else "24_eager",
                                          lambda a=(name, dtype, runner, layers, search, what): measure(*a)))
    return tasks


# --------------------------------------------------------------------------------------- d. pytest -m gpu
def gpu_test_files() -> list[str]:
    """The test files that hold GPU tests (collecting only these keeps CPU-only dependencies out)."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if GPU_TEST_MARK in p.read_text())


def section_d(suite: Suite) -> list[Task]:
    """``pytest -m gpu`` in a subprocess, last, in the time kept for it."""
    files = gpu_test_files()
    if not suite.cuda:
        suite.skip("d", "pytest -m gpu", "GPU tests need a CUDA device (a CPU run only lists the files: "
                   + ", ".join(files) + ")")
        suite.rows["d"].append({"files": files, "rc": None, "summary": "not run (no CUDA device)"})
        return []

    def run() -> None:
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=max(5.0, suite.budget.left(for_last=True) - 3))
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = "timeout", (e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        lines = [ln for ln in out.splitlines() if ln.strip()]
        summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|skipped|error)", ln)),
                       lines[-1] if lines else "")
        suite.rows["d"].append({"files": files, "rc": rc, "summary": summary,
                                "wall_s": round(time.monotonic() - t0, 1), "tail": lines[-25:]})
        print(f"    pytest -m gpu: exit {rc}: {summary}", flush=True)

    return [Task(9, "d", "pytest -m gpu", "pytest", run)]


# -------------------------------------------------------------------------------------------------- report
def machine(device: torch.device) -> dict[str, Any]:
    import platform

    import timm

    info: dict[str, Any] = {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
                            "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}
    try:
        import pytorch_lightning as pl

        info["lightning"] = pl.__version__
    except ImportError:  # pragma: no cover
        info["lightning"] = None
    if device.type == "cuda":
        info |= {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device)),
                 "cudnn": torch.backends.cudnn.version()}
    else:
        info["gpu"] = "cpu"
    return info


def report_dir(out: Path, info: dict[str, Any]) -> Path:
    """``<out>/<gpu>_<torch>`` with both names reduced to letters, digits, '.', '-' (``nvidia-h200_2.11.0-cu130``)."""
    def slug(text: str) -> str:
        return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")

    return out / f"{slug(info['gpu'])}_{slug(info['torch'])}"


GOALS = [
    ("a", "DynamicSparsity / NMSparsity training step ÷ dense on ResNet-50 and ViT-B", "<= 1.03"),
    ("a", "Chase after slimming (S_c 0.4): training step speedup vs dense", ">= 1.3x"),
    ("a", "Chase prune skip after slimming: training step speedup vs dense", ">= 1.4x"),
    ("b", "Chase prune skip (~0.5x FLOPs) inference, fp16, compile", ">= 1.4x"),
    ("c", "2:4 MLP only, compile, ViT-L/H end to end", ">= 1.10x"),
]


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal of the GPU suite with the measured figure (``None`` where that row was not measured)."""
    a, b, c = report["rows"]["a"], report["rows"]["b"], report["rows"]["c"]
    out = []

    def add(i: int, value: float | None, ok: bool | None, detail: str) -> None:
        sec, what, target = GOALS[i]
        out.append({"section": sec, "goal": what, "target": target, "measured": value, "met": ok, "detail": detail})

    dst = [r for r in a if r["arm"].startswith(("DynamicSparsity", "NMSparsity"))]
    worst = max(dst, key=lambda r: r["ratio"]) if dst else None
    add(0, worst and worst["ratio"], worst and worst["ratio"] <= 1.03,
        worst and f"worst: {worst['model']} {worst['arm']}" or "not measured")
    for i, prefix in ((1, "Chase slim S_c"), (2, "Chase slim prune skip")):
        r = next((r for r in a if r["arm"].startswith(prefix) and (i == 2 or "prune skip" not in r["arm"])), None)
        target = 1.3 if i == 1 else 1.4
        add(i, r and round(1 / r["ratio"], 4), r and 1 / r["ratio"] >= target, r and r["arm"] or "not measured")
    r = next((r for r in b if r["variant"] == "skip" and r["dtype"] == "float16" and r["runner"] == "compile"), None)
    add(3, r and r["speedup"], r and r["speedup"] >= 1.4, r and f"FLOPs {r['flops_ratio']}" or "not measured")
    big = [r for r in c if r["layers"] == "mlp" and r["runner"] == "compile" and ("large" in r["model"] or "huge" in r["model"])]
    best = max(big, key=lambda r: r["speedup"]) if big else None
    add(4, best and best["speedup"], best and best["speedup"] >= 1.10,
        best and f"{best['model']} {best['dtype']}" + (" --search" if best["search"] else "") or "not measured")
    return out


def _fmt(v: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if v is None else f"{v:{spec}}{suffix}"


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"# GPU suite: {m['gpu']}, torch {m['torch']}", "",
             f"`{report['command']}` on {m['date']}; wall {report['wall_s']:.0f} s of a {report['budget_s']:.0f} s budget"
             + (" (**toy size**: --tiny)" if report["tiny"] else "") + ".",
             f"timm {m['timm']}, Lightning {m['lightning']}, CUDA {m['cuda']}"
             + (f", cuDNN {m.get('cudnn')}" if m.get("cudnn") else ""), ""]
    lines += ["## Goals", "", "| goal | target | measured | met |", "|---|---|---|---|"]
    for g in report["goals"]:
        met = "–" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} ({g['detail']}) | {g['target']} | {_fmt(g['measured'], '.3f')} | {met} |")
    lines += ["", "## a. Training step ÷ dense", "",
              "| model | arm | batch | FLOPs | step ms | update step ms (ΔT) | amortised ms | ÷ dense |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]["a"]:
        upd = f"{r['update_ms']:.1f} ({r['recipe_dt']})" if r.get("update_ms") else "–"
        lines.append(f"| {r['model']} | {r['arm']} | {r['batch']} | {_fmt(r['flops_ratio'], '.3f')} | {r['step_ms']:.2f} | "
                     f"{upd} | {r['amortised_ms']:.2f} | {r['ratio']:.3f} |")
    lines += ["", "## b. Chase inference (BN folded, channels_last)", "",
              "| variant | S_c | FLOPs | dtype | runner | ms | speedup | output vs CPU fp32 |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]["b"]:
        check = "–" if "output_ok" not in r else f"{'ok' if r['output_ok'] else '**WRONG**'} ({r['max_rel_err']:.1e})"
        lines.append(f"| {r['variant']} | {r['S_c']} | {r['flops_ratio']:.3f} | {r['dtype']} | {r['runner']} | {r['ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {check} |")
    lines += ["", "## c. 2:4 end to end", "",
              "| model | dtype | runner | layers | search | dense ms | 2:4 ms | speedup | parity |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]["c"]:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['runner']} | {r['layers']} | {'yes' if r['search'] else 'no'} | "
                     f"{r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['speedup']:.2f}x | "
                     f"{'ok' if r['parity_ok'] else '**FAILED**'} |")
    lines += ["", "## d. pytest -m gpu", ""]
    for r in report["rows"]["d"]:
        lines.append(f"exit {r['rc']}: {r['summary']} (files: {', '.join(r['files'])})")
    for what, arms in report.get("profiles", {}).items():
        lines += ["", f"## Profile: {what} (self time per call, top operators)", ""]
        for arm, ops in arms.items():
            lines += [f"**{arm}**", "", "| op | ms | calls |", "|---|---|---|"]
            lines += [f"| `{o['op']}` | {o['self_ms']:.3f} | {o['calls']} |" for o in ops] + [""]
    lines += ["", "## Skipped", ""] + [f"- [{s['section']}] {s['what']}: {s['reason']}" for s in report["skipped"]]
    lines += [""] + [f"> {n}" for n in report["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict[str, Any], folder: Path) -> None:
    """Write report.json and report.md into ``folder`` all at once (a temporary sibling renamed into place)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (tmp / "report.md").write_text(render_markdown(report))
    old = folder.with_name(folder.name + f".old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False,
                                epilog="Sections: a training step, b Chase inference, c 2:4 end to end, d pytest -m gpu.")
    p.add_argument("--device", default="cuda", help="'cuda', 'cuda:N' or 'cpu' (default: cuda)")
    p.add_argument("--tiny", action="store_true", help="toy sizes: the whole suite in seconds (what the tests run)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget in seconds (default 480)")
    p.add_argument("--sections", nargs="+", default=list("abcd"), choices=list("abcd"))
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu", help="reports go to <out>/<gpu>_<torch>/")
    p.add_argument("--raise-errors", action="store_true", help="stop at the first failed row (debugging)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a device; use 'cuda', 'cuda:N' or 'cpu'")
    if device.type not in ("cuda", "cpu"):
        p.error(f"--device {args.device!r}: the suite runs on 'cuda' (the measurement) or 'cpu' (with --tiny)")
    if args.budget_s < 0 or not math.isfinite(args.budget_s):
        p.error(f"--budget-s must be a finite number >= 0, got {args.budget_s}")
    if device.type == "cpu" and not args.tiny:
        p.error("--device cpu runs only at toy size: add --tiny (full-size rows are GPU measurements)")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("GPU suite skipped: torch.cuda.is_available() is False (no CUDA GPU here). "
              "The toy-size CPU run is: python benchmarks/gpu_suite.py --device cpu --tiny")
        return 0
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    quiet = {name: logging.getLogger(name).level for name in ("pytorch_lightning", "pytorch_lightning.utilities.rank_zero",
             "lightning_fabric", "lightning_fabric.utilities.rank_zero", "lightning.pytorch")}
    for name in quiet:  # one line per row, not per Trainer; put back when the suite ends (it also runs in-process)
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return _run(args, device, argv)
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def _run(args: argparse.Namespace, device: torch.device, argv: list[str] | None) -> int:
    sizes = TINY if args.tiny else FULL
    # every compiled model is one more cache entry of the same forward code (ResNet.forward, ...): past Dynamo's
    # recompile limit (8) it would silently run eager, so the compile rows would time eager
    from torch import _dynamo

    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(_dynamo.config, knob):
            setattr(_dynamo.config, knob, 256)
    estimates = ESTIMATE_TINY if args.tiny else ESTIMATE_FULL
    reserve = estimates["pytest"] if "d" in args.sections else 0.0
    suite = Suite(args, sizes, device, Budget(args.budget_s, reserve), dict(estimates))
    info = machine(device)
    print(f"GPU suite on {info['gpu']}, torch {info['torch']}, budget {args.budget_s:.0f} s"
          + (" (tiny)" if args.tiny else ""), flush=True)
    tasks: list[Task] = []
    if any(sec in args.sections for sec in "ab"):
        no_tp = has_torch_pruning()
        if no_tp is None:
            tasks.append(Task(0, "a", f"Chase slim models of {sizes.cnn}", "prep", lambda: chase_models(suite)))
        elif "b" in args.sections:
            suite.skip("b", "Chase inference (all rows)", no_tp)
    for sec, make in (("a", section_a), ("b", section_b), ("c", section_c), ("d", section_d)):
        if sec not in args.sections or (sec == "b" and has_torch_pruning() is not None):
            continue
        try:
            tasks += make(suite)
        except Exception as err:  # a section that cannot even list its rows is reported, not fatal
            suite.skip(sec, f"section {sec}", f"FAILED: {type(err).__name__}: {err}")
            if args.raise_errors:
                raise
    for task in sorted((t for t in tasks if t.section != "d"), key=lambda t: (t.priority, "abc".index(t.section))):
        suite.run(task.section, task.what, task.cost, task.fn)  # goal rows first; within a priority, section order
    for finalize in suite.finalizers:  # output checks, once every model has run
        finalize()
    for task in (t for t in tasks if t.section == "d"):  # last, in the time kept for it
        suite.run(task.section, task.what, task.cost, task.fn, for_last=True)
    if "b" in args.sections and suite.cuda:
        suite.notes.append("cuda-graph runner: lightning_sparse.utils.cuda_graph keeps the captured function (weights, "
                           "input) alive; its outputs are checked against the CPU fp32 model after all other models ran.")
    report = {"machine": info, "tiny": args.tiny, "device": str(device), "budget_s": args.budget_s,
              "wall_s": round(time.monotonic() - suite.budget.t0, 1), "sections": args.sections,
              "command": "python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": suite.rows, "skipped": suite.skipped, "notes": suite.notes, "walls": suite.walls,
              "profiles": suite.profiles}
    report["command"] = report["command"].strip()
    report["goals"] = goals(report)
    folder = report_dir(args.out, info)
    write_report(report, folder)
    print(f"wrote {folder / 'report.json'} and report.md ({report['wall_s']:.0f} s)")
    wrong = [r for r in suite.rows["b"] if r.get("output_ok") is False]
    failed_parity = [r for r in suite.rows["c"] if not r["parity_ok"]]
    if wrong or failed_parity:
        print(f"{len(wrong)} Chase output(s) differ from the CPU fp32 model, {len(failed_parity)} 2:4 parity failure(s)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
