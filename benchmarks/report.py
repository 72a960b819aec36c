"""Run every benchmark in ``benchmarks/`` (plus the 2:4 inference benchmark) and write ``benchmarks/README.md``.

    PYTHONPATH=. python benchmarks/report.py             # each script with its own (paper-sized) defaults
    PYTHONPATH=. python benchmarks/report.py --quick     # modest settings: a few minutes on 2 CPU cores
    PYTHONPATH=. python benchmarks/report.py --quick --only nm_speed overhead
    PYTHONPATH=. python benchmarks/report.py --chase-checkpoint runs/quickstart_chase/version_0/checkpoints/last.ckpt

Each benchmark runs as its own subprocess (``sys.executable``, ``PYTHONPATH`` = the repository root), so a
crash or a missing GPU in one does not stop the others. Its printed lines (the ratios measured side by side
inside one run) go into the report verbatim, with the command, the exit status and the wall time; scripts
that need CUDA print their skip reason on a machine without one, and that text is what the report shows.
The header records the date, CPU model, cores, ``torch.get_num_threads()``, the Python/torch/timm/Lightning
versions and the load average at the start (on a shared machine absolute times move; the ratios are the
figures to read).

``chase_checkpoint_speed`` (``chase_speed.py --checkpoint``) needs a Chase checkpoint:
``--chase-checkpoint PATH``, else the newest
``runs/**/*.ckpt`` that holds a slimmed Chase state; with none it is reported as skipped, with the command
that makes one. A script found in ``benchmarks/`` that this file has no settings for runs with its defaults;
one registered with ``skip`` (``digits_sweep.py``: 78 training runs, hours) is listed with its command and the
reason, not run. Every script and file the report names exists (``tests/test_benchmarks_readme.py``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CHASE_CKPT_HINT = "python train.py --config configs/quickstart_chase.yaml   # writes runs/quickstart_chase/.../last.ckpt"


@dataclass
class Bench:
    """One benchmark: a script in ``benchmarks/`` (or a ``-m`` module) and its full / quick arguments."""

    name: str
    target: list[str]  # [path] or ["-m", module]
    full: list[str] = field(default_factory=list)
    quick: list[str] = field(default_factory=list)
    what: str = ""
    skip: str = ""  # why report.py does not run it (it is listed with its command and this reason)


BENCHES = [
    Bench("dst_update", ["benchmarks/dst_update.py"], [], ["--model", "resnet18", "--reps", "3"],
          "time of one RigL mask update (drop + gradient growth over every layer)"),
    Bench("overhead", ["benchmarks/overhead.py"], [],
          ["--image-size", "16", "--batch-size", "32", "--update-interval", "10", "--rounds", "2"],
          "train-step time with DynamicSparsity / dense (one mask update per ΔT steps amortised)"),
    Bench("nm_speed", ["benchmarks/nm_speed.py"], [],
          ["--skip-resnet50-step", "--reps18", "5", "--mask-reps", "5"],
          "SR-STE 2:4 train-step time / dense, and one full 2:4 mask pass over resnet50's weights"),
    Bench("chase_speed", ["benchmarks/chase_speed.py"], [],
          ["--arch", "resnet18", "--size", "64", "--batch", "16", "--reps", "5", "--warmup", "1"],
          "dense vs Chase-slimmed timm ResNet: FLOPs ratio and measured speedup"),
    Bench("chase_checkpoint_speed", ["benchmarks/chase_speed.py"], [],
          ["--checkpoint-size", "16", "--batch", "32", "--reps", "5"],
          "a trained Chase checkpoint (slim) vs the same architecture dense"),
    Bench("semi_structured_2to4", ["-m", "lightning_sparse.benchmark"],
          ["--model", "vit_base_patch16_224", "--random-init", "--dtype", "float16", "bfloat16",
           "--batch-size", "64", "256"],
          ["--linear", "4096x4096", "--batch-size", "1024", "--dtype", "float16"],
          "2:4 semi-structured (torch.sparse) inference vs dense 2:4-masked, CUDA only "
          "(H100 figures: benchmarks/results/semi_structured_h100/)"),
    Bench("sad_srste_vs_ste", ["benchmarks/sad_srste_vs_ste.py"], [],
          ["--model-name", "resnet10t", "--epochs", "4"],
          "last-epoch SAD of SR-STE / vanilla STE N:M masks on digits (< 1: SR-STE's masks settle, as in the paper)"),
    Bench("digits_sweep", ["benchmarks/digits_sweep.py"], ["--jobs", "2"], ["--jobs", "2"],
          "test accuracy of every method over densities, N:M patterns and seeds (docs/comparison.md)",
          skip="78 training runs (hours on 2 CPU cores); its tables and figures are in docs/comparison.md"),
    Bench("gpu_suite", ["benchmarks/gpu_suite.py"], [], ["--device", "cpu", "--tiny"],
          "training step / dense, Chase inference and 2:4 end to end on one GPU, one prepared command",
          skip="a GPU measurement (docs/development.md, GPU suite); its CPU toy run is tests/test_gpu_suite.py, "
               "gpu_tables.py turns its report into the README's GPU tables"),
    Bench("gpu_tables", ["benchmarks/gpu_tables.py"], [], ["--check"],
          "the README's GPU tables, written from the GPU suite's reports",
          skip="writes tables, measures nothing"),
]


def machine_info() -> dict[str, str]:
    """Date, CPU, cores, torch threads, library versions and load average (read before any benchmark runs)."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": version("timm"),
        "lightning": version("pytorch-lightning"),
        "load": " / ".join(f"{v:.2f}" for v in load),
        "load1": f"{load[0]:.2f}",
    }


def find_chase_checkpoint() -> Path | None:
    """Newest ``runs/**/*.ckpt`` holding a slimmed Chase state, or None."""
    from lightning_sparse.utils.checkpoints import load_checkpoint
    from lightning_sparse.utils.errors import InputError

    for path in sorted((ROOT / "runs").glob("**/*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            ckpt = load_checkpoint(path)
        except InputError:  # an unreadable or untrusted file is not a candidate
            continue
        if any(k.startswith("Chase") and s.get("arch") for k, s in ckpt.get("callbacks", {}).items()):
            return path
    return None


def discover(benches: list[Bench]) -> list[Bench]:
    """The registered benchmarks plus any ``benchmarks/*.py`` script without settings here (run with defaults)."""
    known = {b.target[0] for b in benches}
    extra = [
        Bench(p.stem, [f"benchmarks/{p.name}"], what="(no settings registered in report.py: script defaults)")
        for p in sorted(HERE.glob("*.py"))
        if p.name != Path(__file__).name and f"benchmarks/{p.name}" not in known
    ]
    return benches + extra


def run_one(bench: Bench, args: list[str], timeout: float) -> dict[str, object]:
    cmd = [sys.executable, *bench.target, *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = f"stopped after {timeout:.0f} s (--timeout)"
    lines = [ln.rstrip() for ln in out.splitlines() if ln.strip()]
    if rc != 0:  # keep the end of stderr so a failure explains itself
        lines += ["[stderr]", *[ln.rstrip() for ln in err.splitlines() if ln.strip()][-8:]]
    shown = ["python", *[a if a != str(ROOT) else "." for a in cmd[1:]]]
    return {"cmd": " ".join(shown), "rc": rc, "wall": time.perf_counter() - t0, "lines": lines}


def render(info: dict[str, str], quick: bool, results: list[tuple[Bench, dict[str, object]]], note: str) -> str:
    shared = float(info["load1"]) > 0.5 * int(info["cores"])
    out = [
        "# Benchmark report",
        "",
        f"Generated by `python benchmarks/report.py{' --quick' if quick else ''}` on {info['date']}."
        + (" **Quick mode**: modest sizes and few repetitions, for a first look — run without `--quick`"
           " for the figures quoted in the documentation (docs/)." if quick else ""),
        "",
        "| | |",
        "|---|---|",
        f"| CPU | {info['cpu']} |",
        f"| cores / `torch.get_num_threads()` | {info['cores']} / {info['torch threads']} |",
        f"| GPU | {info['gpu']} |",
        f"| Python / torch / timm / Lightning | {info['python']} / {info['torch']} / {info['timm']} / {info['lightning']} |",
        f"| load average at start (1 / 5 / 15 min) | {info['load']} |",
        "",
    ]
    if shared or note:
        out += [
            "> " + (note + " " if note else "")
            + ("The machine was shared with other jobs while this ran (load average above half the cores): "
               "absolute times are inflated and noisy; the ratios, measured side by side with interleaved "
               "repetitions inside one run, are the figures to read." if shared else ""),
            "",
        ]
    out += ["| benchmark | what | exit | wall |", "|---|---|---|---|"]
    for b, r in results:
        out.append(f"| [{b.name}](#{b.name}) | {b.what} | {r['rc']} | {r['wall']:.0f} s |")
    out.append("")
    for b, r in results:
        out += [f"## {b.name}", "", f"`{r['cmd']}`", "", "```", *r["lines"], "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--quick", action="store_true", help="modest settings (minutes on a 2-core CPU)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (names as in the report)")
    ap.add_argument("--chase-checkpoint", type=Path, help="Chase checkpoint for chase_checkpoint_speed")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per benchmark (default 900 quick, 7200 full)")
    ap.add_argument("--note", default="", help="free text put at the top of the report")
    ap.add_argument("--out", type=Path, default=HERE / "README.md", help="report path (default benchmarks/README.md)")
    args = ap.parse_args(argv)
    benches = discover(BENCHES)
    if args.only:
        unknown = sorted(set(args.only) - {b.name for b in benches})
        if unknown:
            ap.error(f"--only got unknown benchmark(s) {unknown}; choose from {[b.name for b in benches]}")
        benches = [b for b in benches if b.name in args.only]
    if args.chase_checkpoint is not None and not args.chase_checkpoint.is_file():
        ap.error(f"--chase-checkpoint={str(args.chase_checkpoint)!r} is not a file")
    timeout = args.timeout or (900.0 if args.quick else 7200.0)
    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, load {info['load']}", flush=True)

    results = []
    for b in benches:
        extra = b.quick if args.quick else b.full
        if b.skip:
            cmd = " ".join(["python", *b.target, *extra])
            results.append((b, {"cmd": cmd, "rc": "not run", "wall": 0.0, "lines": [f"not run by report.py: {b.skip}."]}))
            print(f"{b.name}: not run ({b.skip})", flush=True)
            continue
        if b.name == "chase_checkpoint_speed":
            ckpt = args.chase_checkpoint or find_chase_checkpoint()
            if ckpt is None:
                results.append((b, {"cmd": "python benchmarks/chase_speed.py --checkpoint CHECKPOINT", "rc": "skipped",
                                    "wall": 0.0, "lines": ["skipped: no Chase checkpoint given (--chase-checkpoint) "
                                                           "or found under runs/. Make one with:", CHASE_CKPT_HINT]}))
                print(f"{b.name}: skipped (no checkpoint)", flush=True)
                continue
            extra = ["--checkpoint", str(ckpt), *extra]
        r = run_one(b, extra, timeout)
        print(f"{b.name}: exit {r['rc']} in {r['wall']:.0f} s", flush=True)
        for line in r["lines"]:
            print("   ", line, flush=True)
        results.append((b, r))

    args.out.write_text(render(info, args.quick, results, args.note) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(r["rc"] in (0, "skipped", "not run") for _, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
