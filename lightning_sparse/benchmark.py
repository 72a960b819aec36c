"""2:4 semi-structured inference benchmark from the command line (needs only torch + timm).

It uses the standard library's argparse rather than LightningCLI on purpose: GPU machines often carry a bare
torch + timm install, and this entry point must run there without the project's optional dependencies.

Commands (an NVIDIA GPU: cuSPARSELt needs compute capability >= 8.0, CUTLASS 8.x)::

    # where 2:4 wins: large square linears at batch 4096, kernel time (CUDA-graph replay)
    python -m lightning_sparse.benchmark --linear 4096x4096 8192x8192 16384x16384 --batch-size 4096 \\
        --dtype float16 bfloat16 --runner cuda-graph

    # end to end, a randomly initialised timm model (nothing is downloaded)
    python -m lightning_sparse.benchmark --model vit_base_patch16_224 --random-init \\
        --dtype float16 --batch-size 64 256 --runner eager cuda-graph

    # a trained ImageClassifier checkpoint (2:4 masks are baked by magnitude into every eligible linear)
    python -m lightning_sparse.benchmark --checkpoint runs/<name>/version_0/checkpoints/last.ckpt

On a machine without a suitable GPU, or a model where no layer converts, it prints why it skipped and exits 0.
A failed parity check (sparse outputs differ from the dense masked model) names the worst layer and exits 1.
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
    RUNNERS,
    NothingConverted,
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
        description="Dense 2:4-masked vs torch.sparse semi-structured (2:4) inference: CUDA-event and host medians.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="Lightning checkpoint of lightning_sparse.models.ImageClassifier")
    src.add_argument("--model", help="timm model name (use with --random-init)")
    src.add_argument("--linear", type=_linear_shape, nargs="+", metavar="INxOUT",
                     help="one or more single nn.Linear(IN, OUT) layers, input (batch, IN)")
    p.add_argument("--random-init", action="store_true", help="random weights for --model (no downloads)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier size for --model")
    p.add_argument("--image-size", type=int, default=None,
                   help="input H=W (default: the model's own; ViTs are built for this size)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float16"])
    p.add_argument("--batch-size", nargs="+", type=int, default=[64])
    p.add_argument("--backend", choices=list(BACKENDS), default="cusparselt")
    p.add_argument("--runner", nargs="+", choices=list(RUNNERS), default=["eager"],
                   help="eager (host overhead included), cuda-graph (kernel time), compile (torch.compile)")
    p.add_argument("--device", default=None, help="CUDA device, e.g. cuda:1 (default: the current one)")
    p.add_argument("--search", action="store_true", help="cuSPARSELt algorithm search per layer")
    p.add_argument("--kernel-layout", action="store_true",
                   help="leave each sparse linear's output in the layout the kernel returned (times the kernel "
                        "alone; by default outputs are made row-major, as the next layer of a model needs)")
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


def _create_timm(name: str, num_classes: int, image_size: int | None) -> nn.Module:
    """A random-init timm model; models with a fixed input size (ViTs) are built for ``image_size``."""
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if image_size is not None and size is not None and tuple(size) != (image_size, image_size):
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=image_size)
    return model


def build_models(args: argparse.Namespace) -> list[tuple[nn.Module, tuple[int, ...], str, bool]]:
    """``[(model, one sample's input shape, description, per-layer table?)]`` from the parsed arguments."""
    if args.linear is not None:
        return [(nn.Sequential(nn.Linear(a, b)), (a,), f"nn.Linear({a}, {b})", False) for a, b in args.linear]
    if args.checkpoint is not None:
        from lightning_sparse.models import ImageClassifier

        module = ImageClassifier.load_from_checkpoint(args.checkpoint, map_location="cpu")
        in_chans = int(module.hparams.get("in_chans", 3))
        shape = _timm_input_shape(module.model, in_chans, args.image_size)
        return [(module.model, shape, f"{module.hparams.get('model_name')} from {args.checkpoint}", True)]
    model = _create_timm(args.model, args.num_classes, args.image_size)
    return [(model, _timm_input_shape(model, 3, args.image_size), f"{args.model} (random init)", True)]


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
    if args.search and args.backend != "cusparselt":
        parser.error(f"--search needs --backend cusparselt, got {args.backend}")
    reason = skip_reason(None, args.dtype[0], args.backend, args.device)
    if reason is not None:  # before building anything: a CPU machine exits here
        print(f"2:4 semi-structured benchmark skipped: {reason}.")
        return 0
    reports, failed = [], []
    for model, input_shape, what, layers in build_models(args):
        for dtype in args.dtype:
            reason = skip_reason(model, dtype, args.backend, args.device)
            if reason is not None:
                print(f"2:4 semi-structured benchmark ({what}, {dtype}) skipped: {reason}.")
                continue
            try:
                for runner in args.runner:
                    for batch_size in args.batch_size:
                        report = benchmark_semi_structured(
                            model, input_shape, dtype, args.backend, batch_size, args.warmup, args.runs,
                            layers=layers and not args.no_layers, device=args.device, runner=runner,
                            search=args.search, row_major_outputs=not args.kernel_layout,
                        )
                        print(f"\n== {what}, input {input_shape} ==\n{format_report(report)}", flush=True)
                        reports.append((what, report))
                        if not report.parity_ok:
                            failed.append((what, report))
                        torch.cuda.empty_cache()
            except NothingConverted as err:  # the same for every runner and batch size
                print(f"2:4 semi-structured benchmark ({what}, {dtype}) skipped: {err}.")
    if args.json and reports:
        rows = [asdict(r) | {"what": what, "speedup_e2e": r.speedup_e2e, "dense_img_s": r.dense_images_per_s,
                             "sparse_img_s": r.sparse_images_per_s, "parity_ok": r.parity_ok,
                             "host_bound": r.host_bound} for what, r in reports]
        with open(args.json, "w") as fh:
            json.dump({"reports": rows}, fh, indent=2, default=str)
    for what, r in failed:
        worst = r.worst_layer
        layer = f"; worst layer {worst[0]} {worst[1]:.2e}" if worst else ""
        print(f"parity FAILED for {what} ({r.dtype}, {r.runner}, batch {r.batch_size}): end-to-end max rel err "
              f"{r.parity_max_rel_err:.2e}{layer} (tolerance {r.parity_tolerance:.0e})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
