"""Chase speed: images/s of a dense vs a channel-slimmed timm CNN in a deployment runtime, side by side.

The slim channel counts come from the real Chase code path: the model gets random ERK masks (density D;
the first conv and the last layer dense, as Chase keeps them), candidate groups are scored by UMM (pooled
over every producer filter for a residual stream, :func:`group_channel_scores`), and the cubic schedule with
global selection and per-group floors (beta) removes channels until S_c of the candidate channels are gone;
then :func:`slim_model` deletes them (after zeroing, so the logits are checked to be unchanged).
``--checkpoint`` times the channel configuration of a trained Chase checkpoint instead of this proxy.

Both models are timed as deployed: BatchNorm folded into the convs, in PyTorch eager (channels_last,
inference mode) and in onnxruntime (CPU), repetitions interleaved, medians. The goal line uses the runtime
in which the dense model is faster (the fair baseline). On a GPU, ``--runtime cuda`` times the same two
models in PyTorch eager on the GPU (``--dtype``, channels_last, cuDNN autotuning on) with CUDA events: the
throughput figure of the Chase paper (1.7x for ResNet-50 at S_c 0.4). fp32 convs use TF32 tensor cores
unless ``NVIDIA_TF32_OVERRIDE=0`` is set.

    python benchmarks/chase_speed.py                        # plain Chase, ResNet-50 224 px, batch 32, S_c 0.4
    python benchmarks/chase_speed.py --residual-channels    # prune-skip at the S_c giving ~0.5x FLOPs
    python benchmarks/chase_speed.py --sweep 0.2 0.3 0.4 0.5 0.6 0.7 --out benchmarks/results/chase_speed
    python benchmarks/chase_speed.py --checkpoint runs/quickstart_chase/version_0/checkpoints/last.ckpt
    python benchmarks/chase_speed.py --runtime cuda --batch 256 --dtype float16   # GPU throughput

Prints the FLOPs ratio (slim / dense), the measured speedup (dense time / slim time) per runtime and the
speedup divided by the FLOPs speedup (1.0 = perfectly FLOPs-bound). Goals (CPU, batch 32): plain Chase at
S_c 0.4 >= 1.35x; prune-skip at ~0.5x FLOPs >= 1.5x and >= 0.85 of its FLOPs speedup.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from lightning_sparse.export.runners import CUDA_RUNTIMES, GPU_DTYPES
from lightning_sparse.export.runners import RUNTIMES as CPU_RUNTIMES
from lightning_sparse.slim import channel_candidates, count_flops, slim_model, zero_channels
from lightning_sparse.sparsity.channels import (
    channel_floor,
    channel_sparsity_schedule,
    group_channel_scores,
    n_channels_to_remove,
    select_channels_to_remove,
)
from lightning_sparse.sparsity.dst import initial_masks
from lightning_sparse.utils.timing import interleaved_times

RUNTIMES = CPU_RUNTIMES + CUDA_RUNTIMES


def proxy_masks(model: nn.Module, density: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ERK masks (module name -> mask) over every Conv2d/Linear except the first and the last (dense)."""
    layers = [(n, m.weight) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return initial_masks(dict(layers[1:-1]), density, "erk", gen)


def chase_channels(model: nn.Module, sparsity: float, args: argparse.Namespace, residual: bool) -> dict[str, list[int]]:
    """Run Chase's channel schedule to the end on fixed weights/masks; zero and return conv -> removed channels."""
    gen = torch.Generator().manual_seed(args.seed)
    masks = proxy_masks(model, args.density, gen)
    groups = channel_candidates(model, torch.randn(1, 3, 64, 64), include_residual=residual)
    groups = {k: g for k, g in groups.items() if any(p in masks for p in g.producer_layers)}
    modules = dict(model.named_modules())
    scores = {k: group_channel_scores([modules[p].weight for p in g.producer_layers],
                                      [masks.get(p) for p in g.producer_layers], args.score)
              for k, g in groups.items()}
    active = {n: torch.ones(g.channels, dtype=torch.bool) for n, g in groups.items()}
    floors = {n: channel_floor(g.channels, sparsity, args.beta) for n, g in groups.items()}
    c_total = sum(g.channels for g in groups.values())
    order: dict[str, list[int]] = {n: [] for n in groups}
    for step in range(1, args.schedule_steps + 1):  # the gradual schedule, evaluated at its removal points
        s_t = channel_sparsity_schedule(step, args.schedule_steps, sparsity)
        n = n_channels_to_remove(sum(int(a.sum()) for a in active.values()), c_total, s_t)
        for name, idx in select_channels_to_remove(scores, active, floors, n).items():
            active[name][idx] = False
            order[name].extend(idx.tolist())
    for name, idx in order.items():
        zero_channels(model, groups[name], idx)
    return {n: v for n, v in order.items() if v}


def slim_proxy(dense: nn.Module, sparsity: float, args: argparse.Namespace, residual: bool) -> tuple[nn.Module, float]:
    """A slimmed copy of ``dense`` (Chase's choice at S_c = ``sparsity``) and its FLOPs ratio at ``args.size``."""
    slim = copy.deepcopy(dense)
    removed = chase_channels(slim, sparsity, args, residual)
    check = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = slim(check)
    slim_model(slim, removed, check[:1], round_to=args.round_to, include_residual=residual)
    with torch.no_grad():
        diff = (slim(check) - ref).abs().max().item()
    if diff > 1e-3:
        raise SystemExit(f"slimming changed the logits by {diff:.2e}: the zeroed channels were not removable")
    x = torch.randn(1, 3, args.size, args.size)
    return slim, count_flops(slim, x) / count_flops(dense, x)


def sc_for_flops(dense: nn.Module, target: float, args: argparse.Namespace, residual: bool) -> float:
    """The S_c (to ~0.01) whose slim model has the FLOPs ratio closest to ``target`` (bisection)."""
    lo, hi = 0.1, 0.8
    for _ in range(6):
        mid = round((lo + hi) / 2, 3)
        _, ratio = slim_proxy(dense, mid, args, residual)
        lo, hi = (mid, hi) if ratio > target else (lo, mid)
    return round((lo + hi) / 2, 2)


def runners(models: dict[str, nn.Module], x: torch.Tensor, runtime: str, workdir: Path,
            dtype: str = "float16") -> dict[str, Callable[[], object]]:
    """One zero-argument callable per model running one batch in ``runtime`` (BN folded)."""
    from lightning_sparse.export import make_runner

    return {k: make_runner(m, x, runtime, workdir / k, dtype=dtype) for k, m in models.items()}


def measure(dense: nn.Module, slim: nn.Module, args: argparse.Namespace, shape: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Per runtime: dense and slim seconds per batch and the speedup, measured side by side.

    CPU runtimes: wall time per call. GPU runtimes: CUDA-event time per call (the GPU's time, launch gaps
    included), each call starting on an idle GPU.
    """
    x = torch.randn(*shape)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in args.runtime:
            gpu = runtime in CUDA_RUNTIMES
            fns = runners({"dense": dense, "slim": slim}, x, runtime, Path(tmp), args.dtype)
            times = interleaved_times([fns["dense"], fns["slim"]], args.warmup, args.reps, "cuda" if gpu else "cpu")
            d, s = ((t.event_ms if gpu else t.host_ms) / 1e3 for t in times)
            out[runtime] = {"dense_s": d, "slim_s": s, "speedup": d / s}
            if gpu:
                out[runtime]["host_bound"] = any(t.host_bound for t in times)
    return out


def per_layer(dense: nn.Module, slim: nn.Module, x: torch.Tensor, top: int = 10) -> None:
    """Where the eager time goes (BN folded, channels_last): wall time per conv and the rest, dense vs slim."""
    from lightning_sparse.export import fold_batchnorm

    res: dict[str, dict[str, float]] = {}
    x = x.to(memory_format=torch.channels_last)
    for key, model in (("dense", dense), ("slim", slim)):
        model = fold_batchnorm(model).to(memory_format=torch.channels_last)
        starts: dict[str, float] = {}
        acc: dict[str, float] = {}
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_pre_hook(
                    lambda mod, inp, n=name, starts=starts: starts.__setitem__(n, time.perf_counter())))
                hooks.append(m.register_forward_hook(
                    lambda mod, inp, out, n=name, acc=acc, starts=starts: acc.__setitem__(
                        n, acc.get(n, 0.0) + time.perf_counter() - starts[n])))
        with torch.inference_mode():
            model(x)
            acc.clear()
            t0 = time.perf_counter()
            model(x)
            whole = time.perf_counter() - t0
        for h in hooks:
            h.remove()
        res[key] = {**acc, "<all convs>": sum(acc.values()), "<rest: act, add, pool, fc>": whole - sum(acc.values()),
                    "<whole forward>": whole}
    d, s = res["dense"], res["slim"]
    print(f"\nper-layer eager wall time (BN folded, channels_last), ms: dense / slim / slim÷dense (top {top} dense convs)")
    convs = [n for n in d if not n.startswith("<")]
    for n in sorted(convs, key=d.get, reverse=True)[:top] + [n for n in d if n.startswith("<")]:
        print(f"  {n:28s} {d[n] * 1e3:9.2f} {s.get(n, 0.0) * 1e3:9.2f} {s.get(n, 0.0) / d[n]:6.2f}")


def deployment(result: dict[str, dict[str, float]]) -> str:
    """The runtime in which the dense model is fastest (the baseline a deployment would pick)."""
    return min(result, key=lambda r: result[r]["dense_s"])


def where(args: argparse.Namespace) -> str:
    """The hardware the runtimes ran on, for printouts and figure titles."""
    parts = []
    if any(r in CPU_RUNTIMES for r in args.runtime):
        parts.append(f"CPU ({torch.get_num_threads()} threads)")
    if any(r in CUDA_RUNTIMES for r in args.runtime):
        parts.append(f"{torch.cuda.get_device_name()} {args.dtype}")
    return ", ".join(parts)


def report(label: str, flops_ratio: float, result: dict[str, dict[str, float]], batch: int) -> tuple[str, float]:
    for runtime, r in result.items():
        print(f"  {runtime:12s} images/s dense {batch / r['dense_s']:7.1f}  slim {batch / r['slim_s']:7.1f}  "
              f"speedup {r['speedup']:.2f}x" + ("  (host-bound: the GPU waited on Python)" if r.get("host_bound") else ""))
    best = deployment(result)
    speedup = result[best]["speedup"]
    print(f"{label}: FLOPs ratio {flops_ratio:.3f} (FLOPs speedup {1 / flops_ratio:.2f}x); "
          f"measured speedup {speedup:.2f}x in {best} (the faster runtime for dense); "
          f"speedup / FLOPs speedup {speedup * flops_ratio:.2f}")
    return best, speedup


def run_single(dense: nn.Module, args: argparse.Namespace) -> None:
    residual = args.residual_channels
    sc = args.sparsity if args.sparsity is not None else (sc_for_flops(dense, 0.5, args, True) if residual else 0.4)
    slim, ratio = slim_proxy(dense, sc, args, residual)
    params = sum(p.numel() for p in slim.parameters()) / sum(p.numel() for p in dense.parameters())
    variant = "prune-skip (residual_channels)" if residual else "plain Chase"
    print(f"{args.arch} {args.size}px batch {args.batch}, {variant}, S_c {sc}, D {args.density}, beta {args.beta}, "
          f"round_to {args.round_to}, {where(args)}; params ratio {params:.3f}")
    result = measure(dense, slim, args, (args.batch, 3, args.size, args.size))
    best, speedup = report(variant, ratio, result, args.batch)
    if best in CUDA_RUNTIMES:  # the goals below are CPU goals; on a GPU the reference is the paper's figure
        print(f"reference: the Chase paper reports 1.7x GPU throughput for ResNet-50 at S_c 0.4 (GPU FLOPs 0.67x); "
              f"measured {speedup:.2f}x at FLOPs {ratio:.3f}")
        return
    if residual:
        ok = speedup >= 1.5 and speedup >= 0.85 / ratio
        print(f"goal (prune-skip at ~0.5x FLOPs: >= 1.5x and >= 0.85 of the FLOPs speedup {0.85 / ratio:.2f}x): "
              f"{'met' if ok else 'MISSED'}")
    else:
        ok = speedup >= 1.35
        print(f"goal (plain Chase at S_c 0.4: >= 1.35x): {'met' if ok else 'MISSED'}")
    if args.per_layer or not ok:
        per_layer(dense, slim, torch.randn(args.batch, 3, args.size, args.size))


def run_sweep(dense: nn.Module, args: argparse.Namespace) -> None:
    rows = []
    for residual in (False, True):
        for sc in args.sweep:
            slim, ratio = slim_proxy(dense, sc, args, residual)
            result = measure(dense, slim, args, (args.batch, 3, args.size, args.size))
            row = {"variant": "prune-skip" if residual else "plain", "S_c": sc, "flops_ratio": round(ratio, 4)}
            for runtime, r in result.items():
                row[f"{runtime}_speedup"] = round(r["speedup"], 3)
                row[f"{runtime}_dense_img_s"] = round(args.batch / r["dense_s"], 1)
            rows.append(row)
            print(json.dumps(row))
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    header = "| variant | S_c | FLOPs ratio | " + " | ".join(f"{r} speedup" for r in args.runtime) + " |"
    lines = [header, "|" + " --- |" * (3 + len(args.runtime))]
    lines += [f"| {r['variant']} | {r['S_c']} | {r['flops_ratio']:.3f} | "
              + " | ".join(f"{r[f'{rt}_speedup']:.2f}x" for rt in args.runtime) + " |" for r in rows]
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")
    plot_sweep(rows, args)
    print(f"wrote {args.out / 'sweep.csv'}, sweep.md, sweep.png")


def plot_sweep(rows: list[dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_f) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, color in (("plain", "tab:blue"), ("prune-skip", "tab:red")):
        sel = [r for r in rows if r["variant"] == variant]
        sc = [r["S_c"] for r in sel]
        for runtime, style in zip(args.runtime, ("-o", "--s", "-.^", "-.v")):
            ax_s.plot(sc, [r[f"{runtime}_speedup"] for r in sel], style, color=color, label=f"{variant}, {runtime}")
        ax_s.plot(sc, [1 / r["flops_ratio"] for r in sel], ":", color=color, label=f"{variant}, FLOPs speedup")
        ax_f.plot(sc, [r["flops_ratio"] for r in sel], "-o", color=color, label=variant)
    ax_s.axhline(1.0, color="gray", lw=0.8)
    ax_s.set(xlabel="channel sparsity S_c", ylabel="throughput ÷ dense throughput",
             title=f"Chase speed, {args.arch} {args.size}px batch {args.batch}\n{where(args)}")
    ax_f.set(xlabel="channel sparsity S_c", ylabel="FLOPs ÷ dense FLOPs", title="FLOPs of the slim model")
    for ax in (ax_s, ax_f):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "sweep.png", dpi=120)


def run_checkpoint(args: argparse.Namespace) -> None:
    from lightning_sparse.models import ImageClassifier
    from lightning_sparse.slim import channel_config
    from lightning_sparse.utils.checkpoints import load_checkpoint

    hp = load_checkpoint(args.checkpoint)["hyper_parameters"]
    dense = ImageClassifier(hp["model_name"], num_classes=hp["num_classes"], in_chans=hp["in_chans"]).model.eval()
    slim = ImageClassifier.load_from_checkpoint(args.checkpoint, map_location="cpu").model.eval()
    if channel_config(slim) == channel_config(dense):
        raise SystemExit(f"{args.checkpoint} holds a dense {hp['model_name']} (no channels were slimmed).")
    size = args.checkpoint_size
    x = torch.randn(1, hp["in_chans"], size, size)
    ratio = count_flops(slim, x) / count_flops(dense, x)
    params = sum(p.numel() for p in slim.parameters()) / sum(p.numel() for p in dense.parameters())
    print(f"{args.checkpoint}: {hp['model_name']} {size}px batch {args.batch}, params ratio {params:.3f}")
    report("trained Chase checkpoint", ratio, measure(dense, slim, args, (args.batch, hp["in_chans"], size, size)), args.batch)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--residual-channels", action="store_true", help="prune-skip: residual streams are candidates too")
    p.add_argument("--sparsity", type=float, default=None,
                   help="S_c (default: 0.4; with --residual-channels the S_c giving ~0.5x FLOPs)")
    p.add_argument("--beta", type=float, default=0.2, help="minimum_ratio for the per-group floor")
    p.add_argument("--density", type=float, default=0.1, help="ERK mask density D")
    p.add_argument("--score", default="umm", choices=["umm", "maskwise"])
    p.add_argument("--schedule-steps", type=int, default=8)
    p.add_argument("--round-to", type=int, default=8,
                   help="keep slim channel counts multiples of this (onnxruntime's blocked conv layout wants 8); 0 = exact")
    p.add_argument("--runtime", nargs="+", default=list(CPU_RUNTIMES), choices=RUNTIMES,
                   help="default: the CPU runtimes; 'cuda' times PyTorch on the GPU")
    p.add_argument("--dtype", default="float16", choices=list(GPU_DTYPES), help="GPU runtimes only (CPU runs fp32)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--per-layer", action="store_true", help="also print the per-conv profile (always when a goal is missed)")
    p.add_argument("--sweep", type=float, nargs="+", help="S_c values: both variants, table + PNG in --out")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/chase_speed"))
    p.add_argument("--checkpoint", type=Path, help="time a trained Chase checkpoint's slim model instead")
    p.add_argument("--checkpoint-size", type=int, default=32, help="image size for --checkpoint")
    p.add_argument("--seed", type=int, default=17)
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    args.round_to = args.round_to or None
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = [r for r in args.runtime if r in CUDA_RUNTIMES]
    if gpu and not torch.cuda.is_available():
        p.error(f"--runtime {' '.join(gpu)} needs a CUDA GPU and torch.cuda.is_available() is False; "
                f"the CPU runtimes are {' '.join(CPU_RUNTIMES)}")
    torch.backends.cudnn.benchmark = True  # as a GPU deployment runs convs (no effect on CPU)
    if args.checkpoint is not None:
        if not args.checkpoint.is_file():
            raise SystemExit(f"--checkpoint {args.checkpoint}: no such file")
        run_checkpoint(args)
        return
    torch.manual_seed(args.seed)
    dense = timm.create_model(args.arch, pretrained=False, num_classes=1000).eval()
    if args.sweep:
        run_sweep(dense, args)
    else:
        run_single(dense, args)


if __name__ == "__main__":
    main()
