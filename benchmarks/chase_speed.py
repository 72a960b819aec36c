"""Chase speed: images/s of a dense vs a channel-slimmed timm ResNet-50, measured side by side.

The slim channel counts come from the real Chase code path: a random-init model gets random ERK masks
(density 0.1), candidate convs are scored by UMM (:func:`channel_scores`), and the cubic schedule with
global selection and per-layer floors (beta) removes channels until S_c of the candidate channels are
gone; then :func:`slim_model` deletes them (after zeroing, so logits are checked to be unchanged).

    PYTHONPATH=. python benchmarks/chase_speed.py                      # CPU, 224 px, batch 32, fp32
    PYTHONPATH=. python benchmarks/chase_speed.py --channels-last --fuse-bn --per-layer
    PYTHONPATH=. python benchmarks/chase_speed.py --device cuda --dtype float16 --channels-last

Prints the FLOPs ratio (slim / dense), the measured speedup (dense time / slim time, medians of
interleaved repetitions) and the speedup divided by the FLOPs speedup (1.0 = perfectly FLOPs-bound).
Paper reference (ImageNet ResNet-50, S_c = 0.4): GPU FLOPs 0.67x, 1.7x throughput headline.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from torch import nn

from lightning_sparse.slim import channel_candidates, slim_model, slim_report, zero_channels
from lightning_sparse.sparsity.channels import (
    channel_floor,
    channel_scores,
    channel_sparsity_schedule,
    n_channels_to_remove,
    select_channels_to_remove,
)
from lightning_sparse.sparsity.distributions import erk_densities, layer_counts


def random_erk_masks(model: nn.Module, density: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random masks with ERK per-layer counts over every Conv2d/Linear weight (module name -> mask)."""
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    shapes = {n: tuple(w.shape) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    counts = layer_counts(erk_densities(shapes, density), shapes, total=int(round(density * total)))
    masks = {}
    for n, w in weights.items():
        flat = torch.zeros(w.numel(), dtype=torch.bool)
        flat[torch.randperm(w.numel(), generator=gen)[: counts[n]]] = True
        masks[n] = flat.reshape(w.shape)
    return masks


def chase_channels(model: nn.Module, args: argparse.Namespace) -> dict[str, list[int]]:
    """Run Chase's channel schedule to the end on fixed weights/masks; return conv -> removed channels."""
    gen = torch.Generator().manual_seed(args.seed)
    groups = channel_candidates(model, torch.randn(1, 3, 64, 64))
    masks = random_erk_masks(model, args.density, gen)
    modules = dict(model.named_modules())
    scores = {n: channel_scores(modules[n].weight, masks[n], mode=args.score) for n in groups}
    active = {n: torch.ones(g.channels, dtype=torch.bool) for n, g in groups.items()}
    floors = {n: channel_floor(g.channels, args.sparsity, args.beta) for n, g in groups.items()}
    c_total = sum(g.channels for g in groups.values())
    order: dict[str, list[int]] = {n: [] for n in groups}
    for step in range(1, args.schedule_steps + 1):  # the gradual schedule, evaluated at its update points
        s_t = channel_sparsity_schedule(step, args.schedule_steps, args.sparsity)
        n = n_channels_to_remove(sum(int(a.sum()) for a in active.values()), c_total, s_t)
        for name, idx in select_channels_to_remove(scores, active, floors, n).items():
            active[name][idx] = False
            order[name].extend(idx.tolist())
    removed = sum(len(v) for v in order.values())
    print(f"candidates: {len(groups)} convs, {c_total} channels; removed {removed} "
          f"({removed / c_total:.1%}, target S_c={args.sparsity}, beta={args.beta})")
    for name, idx in order.items():
        zero_channels(model, groups[name], idx)
    return {n: v for n, v in order.items() if v}


def bench(models: dict[str, nn.Module], x: torch.Tensor, reps: int, warmup: int, device: str) -> dict[str, float]:
    """Median seconds per forward for each model, repetitions interleaved."""
    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        sync()
        for _ in range(reps):
            for k, m in models.items():
                sync()
                t0 = time.perf_counter()
                m(x)
                sync()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def per_layer(models: dict[str, nn.Module], x: torch.Tensor, top: int = 12) -> None:
    """Wall time per Conv2d (forward hooks, one pass each) dense vs slim: where the time goes."""
    res: dict[str, dict[str, float]] = {}
    for key, model in models.items():
        starts, acc = {}, {}
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                hooks.append(m.register_forward_pre_hook(lambda mod, inp, n=name: starts.__setitem__(n, time.perf_counter())))
                hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: acc.__setitem__(n, time.perf_counter() - starts[n])))
        with torch.inference_mode():
            model(x)
            t0 = time.perf_counter()
            model(x)
            acc["<whole forward>"] = time.perf_counter() - t0
        for h in hooks:
            h.remove()
        res[key] = acc
    dense, slim = res["dense"], res["slim"]
    whole = (dense.pop("<whole forward>"), slim.pop("<whole forward>"))
    print(f"\nper-conv wall time (top {top} dense), ms: dense / slim / ratio")
    for n in sorted(dense, key=dense.get, reverse=True)[:top]:
        print(f"  {n:28s} {dense[n] * 1e3:8.2f} {slim[n] * 1e3:8.2f} {slim[n] / dense[n]:6.2f}")
    print(f"  {'all convs':28s} {sum(dense.values()) * 1e3:8.2f} {sum(slim.values()) * 1e3:8.2f} "
          f"{sum(slim.values()) / sum(dense.values()):6.2f}")
    rest = (whole[0] - sum(dense.values()), whole[1] - sum(slim.values()))
    print(f"  {'non-conv (BN, act, add, pool)':28s} {rest[0] * 1e3:8.2f} {rest[1] * 1e3:8.2f} {rest[1] / rest[0]:6.2f}")
    print(f"  {'whole forward':28s} {whole[0] * 1e3:8.2f} {whole[1] * 1e3:8.2f} {whole[1] / whole[0]:6.2f}")
    small = [n for n in slim if n in dense and slim[n] / dense[n] > 0.9 and "conv3" not in n and "downsample" not in n]
    print(f"  convs not shrinking (excl. conv3/downsample): {len(small)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.4, help="S_c, final channel sparsity")
    p.add_argument("--beta", type=float, default=0.2, help="minimum_ratio for the per-layer floor")
    p.add_argument("--density", type=float, default=0.1, help="ERK mask density D")
    p.add_argument("--score", default="umm", choices=["umm", "maskwise"])
    p.add_argument("--schedule-steps", type=int, default=8)
    p.add_argument("--round-to", type=int, default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--per-layer", action="store_true", help="also print per-conv times")
    p.add_argument("--fuse-bn", action="store_true",
                   help="fold eval BatchNorm into the convs (torch.fx) for both models, as deployment would")
    p.add_argument("--seed", type=int, default=17)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here.")
    torch.manual_seed(args.seed)

    dense = timm.create_model(args.arch, pretrained=False, num_classes=1000).eval()
    slim = copy.deepcopy(dense)
    removed = chase_channels(slim, args)
    check = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = slim(check)
    slim_model(slim, removed, check[:1], round_to=args.round_to)
    with torch.no_grad():
        diff = (slim(check) - ref).abs().max().item()
    print(f"slimming changed logits by at most {diff:.2e} (removed channels were zeroed first)")
    rep = slim_report(dense, slim, (1, 3, args.size, args.size))
    flops_ratio = rep["flops"]["ratio"]

    if args.fuse_bn:
        from torch.fx.experimental.optimization import fuse

        dense, slim = fuse(dense), fuse(slim)
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    models = {k: m.to(device=args.device, dtype=dtype, memory_format=fmt) for k, m in (("dense", dense), ("slim", slim))}
    x = torch.randn(args.batch, 3, args.size, args.size, device=args.device, dtype=dtype).to(memory_format=fmt)
    t = bench(models, x, args.reps, args.warmup, args.device)
    speedup = t["dense"] / t["slim"]
    flops_speedup = 1.0 / flops_ratio
    print(f"\n{args.arch} {args.size}px batch {args.batch} {args.device} {args.dtype} "
          f"channels_last={args.channels_last} fuse_bn={args.fuse_bn} round_to={args.round_to} threads={torch.get_num_threads()}")
    print(f"params  dense {rep['params']['dense'] / 1e6:.2f}M  slim {rep['params']['slim'] / 1e6:.2f}M  "
          f"ratio {rep['params']['ratio']:.3f}")
    print(f"GFLOPs/img dense {rep['flops']['dense'] / 1e9:.2f}  slim {rep['flops']['slim'] / 1e9:.2f}")
    print(f"images/s dense {args.batch / t['dense']:.1f}  slim {args.batch / t['slim']:.1f}  (medians of {args.reps})")
    print(f"FLOPs ratio (slim/dense)          {flops_ratio:.3f}   (FLOPs speedup {flops_speedup:.2f}x)")
    print(f"measured speedup                  {speedup:.2f}x")
    print(f"speedup / FLOPs speedup           {speedup / flops_speedup:.2f}")
    ok = speedup >= 1.4 and speedup >= 0.85 * flops_speedup
    print(f"goal (>= 1.4x and >= 0.85 x FLOPs speedup): {'met' if ok else 'MISSED'}")
    if args.per_layer or not ok:
        per_layer(models, x)


if __name__ == "__main__":
    main()
