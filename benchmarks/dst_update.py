"""Time of one RigL update (drop + gradient growth over every layer) on timm resnet50, CPU.

    python benchmarks/dst_update.py [--model resnet50] [--density 0.1] [--reps 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from lightning_sparse.sparsity.distributions import layer_counts, layer_densities
from lightning_sparse.sparsity.dst import drop_grow
from lightning_sparse.sparsity.masks import random_mask
from lightning_sparse.sparsity.targets import select_targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--drop-fraction", type=float, default=0.3)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    model = timm.create_model(args.model)
    params = dict(model.named_parameters())
    names = select_targets(model).names  # stem conv and classifier stay dense
    shapes = {n: tuple(params[n].shape) for n in names}
    total = sum(params[n].numel() for n in names)
    counts = layer_counts(layer_densities(shapes, args.density, "erk"), shapes, round(args.density * total))
    gen = torch.Generator().manual_seed(0)
    masks = {n: random_mask(shapes[n], counts[n], gen) for n in names}
    for n in names:
        params[n].grad = torch.randn_like(params[n])
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for n in names:
            masks[n] = drop_grow(params[n], masks[n], int(args.drop_fraction * counts[n]), "gradient", params[n].grad)
        times.append(time.perf_counter() - t0)
    print(f"{args.model}: {len(names)} sparse layers, {total / 1e6:.1f} M weights, {torch.get_num_threads()} threads")
    print(f"one RigL update (drop {args.drop_fraction:.0%} of active + gradient growth): "
          f"median {statistics.median(times) * 1e3:.0f} ms over {args.reps} reps")


if __name__ == "__main__":
    main()
