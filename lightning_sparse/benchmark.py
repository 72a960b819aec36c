"""2:4 semi-structured inference benchmark from the command line (plain argparse; needs only torch + timm).

Commands (an NVIDIA GPU with compute capability >= 8.0: A100, RTX 30xx/40xx, H100)::

    # a trained ImageClassifier checkpoint (2:4 masks are baked by magnitude into every eligible linear)
    python -m lightning_sparse.benchmark --checkpoint runs/last.ckpt --dtype float16 --batch-size 64 256

    # pure speed on a randomly initialised timm model (nothing is downloaded)
    python -m lightning_sparse.benchmark --model vit_base_patch16_224 --random-init \\
        --dtype float16 bfloat16 --batch-size 64 256

    # one large linear: in_features x out_features, input (batch, in_features)
    python -m lightning_sparse.benchmark --linear 8192x8192 --batch-size 4096 --dtype float16 bfloat16

    # the CUTLASS kernels instead of cuSPARSELt
    python -m lightning_sparse.benchmark --model vit_base_patch16_224 --random-init --backend cutlass

On a machine without a suitable GPU it prints why it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

import torch
from torch import nn

from lightning_sparse.semi_structured import (
    BACKENDS,
    DTYPES,
    MIN_RUNS,
    benchmark_semi_structured,
    format_report,
    skip_reason,
)


def _linear_shape(text: str) -> tuple[int, int]:
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--linear must look like INxOUT, e.g. 8192x8192, got {text!r}") from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"--linear sizes must be >= 1, got {text!r}")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lightning_sparse.benchmark",
        description="Dense 2:4-masked vs torch.sparse semi-structured (2:4) inference: CUDA-event medians.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Lightning checkpoint of lightning_sparse.models.ImageClassifier")
    src.add_argument("--model", help="timm model name (use with --random-init)")
    src.add_argument("--linear", type=_linear_shape, metavar="INxOUT", help="a single nn.Linear(IN, OUT)")
    p.add_argument("--random-init", action="store_true", help="random weights for --model (no downloads)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size for --model")
    p.add_argument("--image-size", type=int, default=None, help="input H=W (default: the model's own)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float16"])
    p.add_argument("--batch-size", nargs="+", type=int, default=[64])
    p.add_argument("--backend", choices=list(BACKENDS), default="cusparselt")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=100, help=f"timed runs (>= {MIN_RUNS}); medians are reported")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    p.add_argument("--json", default=None, help="also write all reports to this JSON file")
    return p


def _timm_input_shape(backbone: nn.Module, in_chans: int, image_size: int | None) -> tuple[int, ...]:
    if image_size is not None:
        return (in_chans, image_size, image_size)
    patch_embed = getattr(backbone, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None:  # ViT-style models are built for one image size
        return (in_chans, *tuple(size))
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    _, h, w = cfg.get("input_size", (in_chans, 224, 224))
    return (in_chans, h, w)


def build_model(args: argparse.Namespace) -> tuple[nn.Module, tuple[int, ...], str]:
    """``(model, one sample's input shape, description)`` from the parsed arguments."""
    if args.linear is not None:
        fan_in, fan_out = args.linear
        return nn.Sequential(nn.Linear(fan_in, fan_out)), (fan_in,), f"nn.Linear({fan_in}, {fan_out})"
    if args.checkpoint is not None:
        from lightning_sparse.models import ImageClassifier

        module = ImageClassifier.load_from_checkpoint(args.checkpoint, map_location="cpu")
        in_chans = int(module.hparams.get("in_chans", 3))
        shape = _timm_input_shape(module.model, in_chans, args.image_size)
        return module.model, shape, f"{module.hparams.get('model_name')} from {args.checkpoint}"
    import timm

    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    return model, _timm_input_shape(model, 3, args.image_size), f"{args.model} (random init)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be >= {MIN_RUNS}, got {args.runs}")
    if any(b < 1 for b in args.batch_size):
        parser.error(f"--batch-size values must be >= 1, got {args.batch_size}")
    if args.random_init and args.model is None:
        parser.error("--random-init only applies to --model")
    if args.model is not None and not args.random_init:
        parser.error("--model needs --random-init (pretrained weights are never downloaded), or use --checkpoint")
    reason = skip_reason(None, args.dtype[0], args.backend)
    if reason is not None:  # before building anything: a CPU machine exits here
        print(f"2:4 semi-structured benchmark skipped: {reason}.")
        return 0
    model, input_shape, what = build_model(args)
    reports = []
    for dtype in args.dtype:
        reason = skip_reason(model, dtype, args.backend)
        if reason is not None:
            print(f"2:4 semi-structured benchmark ({what}, {dtype}) skipped: {reason}.")
            continue
        for batch_size in args.batch_size:
            report = benchmark_semi_structured(
                model, input_shape, dtype, args.backend, batch_size, args.warmup, args.runs,
                layers=not args.no_layers and args.linear is None,
            )
            print(f"\n== {what}, input {input_shape} ==\n{format_report(report)}", flush=True)
            reports.append(report)
            torch.cuda.empty_cache()
    if args.json and reports:
        rows = [asdict(r) | {"speedup_e2e": r.speedup_e2e, "dense_img_s": r.dense_images_per_s,
                             "sparse_img_s": r.sparse_images_per_s, "parity_ok": r.parity_ok} for r in reports]
        with open(args.json, "w") as fh:
            json.dump({"what": what, "reports": rows}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
