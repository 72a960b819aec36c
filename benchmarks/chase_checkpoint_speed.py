"""Throughput of a trained Chase model (slim) vs the same architecture dense, from a Lightning checkpoint.

    python benchmarks/chase_checkpoint_speed.py runs/quickstart_chase/version_0/checkpoints/last.ckpt

The slim model is loaded with ``ImageClassifier.load_from_checkpoint`` (which rebuilds the channel
configuration stored in the checkpoint before its weights load); the dense model is the same architecture
built from the checkpoint's hyper-parameters. Both are timed side by side (interleaved repetitions,
median) on random inputs of the training shape.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_sparse.models import ImageClassifier
from lightning_sparse.slim import channel_config, count_flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    hp = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    x = torch.randn(args.batch, hp["in_chans"], args.image_size, args.image_size)
    dense = ImageClassifier(hp["model_name"], num_classes=hp["num_classes"], in_chans=hp["in_chans"]).eval()
    slim = ImageClassifier.load_from_checkpoint(args.checkpoint, map_location="cpu").eval()
    if channel_config(slim) == channel_config(dense):
        raise SystemExit(f"{args.checkpoint} holds a dense {hp['model_name']} (no channels were slimmed).")
    times: dict[str, list[float]] = {"dense": [], "slim": []}
    with torch.inference_mode():
        for _ in range(3):
            dense(x), slim(x)
        for _ in range(args.reps):
            for name, model in (("dense", dense), ("slim", slim)):
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    d, s = statistics.median(times["dense"]), statistics.median(times["slim"])
    fd, fs = count_flops(dense, x[:1]), count_flops(slim, x[:1])
    pd, ps = sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in slim.parameters())
    print(f"{hp['model_name']} {args.image_size}px batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"params   slim/dense = {ps / pd:.3f}  ({ps / 1e6:.2f} M / {pd / 1e6:.2f} M)")
    print(f"FLOPs    slim/dense = {fs / fd:.3f}")
    print(f"images/s dense {args.batch / d:.0f}, slim {args.batch / s:.0f}: measured speedup {d / s:.2f}x "
          f"(FLOPs speedup {fd / fs:.2f}x)")


if __name__ == "__main__":
    main()
