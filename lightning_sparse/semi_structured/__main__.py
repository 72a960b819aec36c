"""2:4 semi-structured inference benchmark from the command line (needs only torch + timm).

``python -m lightning_sparse.benchmark`` (or ``python -m lightning_sparse.semi_structured``) runs :func:`main`.

Its parser is jsonargparse's, set up as every other command's (:mod:`lightning_sparse.cli.commands`: no option
matched by a prefix, bad input answered with one line). It needs torch, timm and jsonargparse (a small,
pure-Python dependency of the project) only: not the training CLI, W&B or Torch-Pruning, so it runs on a GPU
machine with a bare install of those.

Commands (an NVIDIA GPU: cuSPARSELt needs compute capability >= 8.0, CUTLASS 8.x)::

    # where 2:4 wins: large square linears at batch 4096, kernel time (CUDA-graph replay)
    python -m lightning_sparse.benchmark --linear 4096x4096 8192x8192 16384x16384 --batch-size 4096 \\
        --dtype float16 bfloat16 --runner cuda-graph

    # end to end, a randomly initialised timm model (nothing is downloaded)
    python -m lightning_sparse.benchmark --model vit_base_patch16_224 --random-init \\
        --dtype float16 --batch-size 64 256 --runner eager cuda-graph

    # a trained ImageClassifier checkpoint (2:4 masks are baked by magnitude into every eligible linear)
    python -m lightning_sparse.benchmark --checkpoint runs/<name>/version_0/checkpoints/last.ckpt

Inputs are checked first: an unknown option, a bad value, a missing or foreign checkpoint or an unknown timm
model ends with one line, ``python -m lightning_sparse.benchmark: error: ...``, and exit code 2. The
per-layer eligibility table (which ``nn.Linear`` can hold a 2:4 weight, and why the others cannot) does not
depend on the device and is printed everywhere, CPU included. On a machine without a suitable GPU, or a model
where no layer converts, it says why it skipped and exits 0; on CPU it ends with the command to run and the
GPU it needs. A failed parity check (sparse outputs differ from the dense masked model) names the worst layer
and exits 1.
"""

from __future__ import annotations

import argparse
import difflib
import json
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from jsonargparse import ArgumentParser, Namespace
from torch import nn

from lightning_sparse.cli.commands import command_options, command_parser, run_command
from lightning_sparse.cli.parse_errors import Options
from lightning_sparse.semi_structured import (
    BACKEND_CAPABILITY,
    BACKENDS,
    DTYPES,
    MIN_RUNS,
    RUNNERS,
    NothingConverted,
    benchmark_semi_structured,
    format_report,
    semi_structured_eligibility,
    skip_reason,
)
from lightning_sparse.utils.errors import InputError
from lightning_sparse.utils.tables import text_table

PROG = "python -m lightning_sparse.benchmark"


def _linear_shape(text: str | tuple[int, int]) -> tuple[int, int]:
    if isinstance(text, tuple):  # jsonargparse checks a parsed value again with the same type
        return text
    try:
        a, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--linear must look like INxOUT, e.g. 8192x8192, got {text!r}") from None
    if a < 1 or b < 1:
        raise argparse.ArgumentTypeError(f"--linear sizes must be >= 1, got {text!r}")
    return a, b


def build_parser() -> tuple[ArgumentParser, Options]:
    """The parser and what its options accept (for the one-line errors)."""
    p = command_parser(PROG, "Dense 2:4-masked vs torch.sparse semi-structured (2:4) inference: CUDA-event and host "
                             "medians.")
    src = p.add_mutually_exclusive_group(required=True)
    sources = [
        src.add_argument("--checkpoint", help="Lightning checkpoint of lightning_sparse.models.ImageClassifier"),
        src.add_argument("--model", help="timm model name (use with --random-init)"),
        src.add_argument("--linear", type=_linear_shape, nargs="+", metavar="INxOUT",
                         help="one or more single nn.Linear(IN, OUT) layers, input (batch, IN)"),
    ]
    actions = [
        *sources,
        p.add_argument("--random-init", action="store_true", help="random weights for --model (no downloads)"),
        p.add_argument("--num-classes", type=int, default=1000, help="classifier size for --model"),
        p.add_argument("--image-size", type=int, default=None,
                       help="input H=W (default: the model's own; ViTs are built for this size)"),
        p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float16"]),
        p.add_argument("--batch-size", nargs="+", type=int, default=[64]),
        p.add_argument("--backend", choices=list(BACKENDS), default="cusparselt"),
        p.add_argument("--runner", nargs="+", choices=list(RUNNERS), default=["eager"],
                       help="eager (host overhead included), cuda-graph (kernel time), compile (torch.compile)"),
        p.add_argument("--device", default=None, help="CUDA device, e.g. cuda:1 (default: the current one)"),
        p.add_argument("--search", action="store_true", help="cuSPARSELt algorithm search per layer"),
        p.add_argument("--kernel-layout", action="store_true",
                       help="leave each sparse linear's output in the layout the kernel returned (times the kernel "
                            "alone; by default outputs are made row-major, as the next layer of a model needs)"),
        p.add_argument("--warmup", type=int, default=10),
        p.add_argument("--runs", type=int, default=100, help=f"timed runs (>= {MIN_RUNS}); medians are reported"),
        p.add_argument("--no-layers", action="store_true", help="skip the per-layer table"),
        p.add_argument("--json", default=None, help="also write all reports to this JSON file"),
    ]
    ints = {"num_classes": "int", "image_size": "int", "batch_size": "int (one or more)", "warmup": "int",
            "runs": "int"}
    return p, command_options(actions, expected=ints, exclusive=[sources])


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


def build_models(args: Namespace) -> list[tuple[nn.Module, tuple[int, ...], str, bool]]:
    """``[(model, one sample's input shape, description, per-layer table?)]`` from the parsed arguments."""
    if args.linear is not None:
        return [(nn.Sequential(nn.Linear(a, b)), (a,), f"nn.Linear({a}, {b})", False) for a, b in args.linear]
    if args.checkpoint is not None:
        from lightning_sparse.run import load_run_model

        run = load_run_model(args.checkpoint, args.image_size, model_default_size=True)
        return [(run.model, run.input_shape, f"{run.arch} from {args.checkpoint}", True)]
    model = _create_timm(args.model, args.num_classes, args.image_size)
    return [(model, _timm_input_shape(model, 3, args.image_size), f"{args.model} (random init)", True)]


def _check_inputs(args: Namespace) -> None:
    """Usage errors (one line, exit 2) for everything that can be checked without a GPU.

    Raises:
        InputError: the first problem found.
    """
    if args.runs < MIN_RUNS:
        raise InputError(f"--runs must be >= {MIN_RUNS}, got {args.runs}")
    if any(b < 1 for b in args.batch_size):
        raise InputError(f"--batch-size values must be >= 1, got {args.batch_size}")
    if args.random_init and args.model is None:
        raise InputError("--random-init only applies to --model")
    if args.model is not None and not args.random_init:
        raise InputError("--model needs --random-init (pretrained weights are never downloaded), or use --checkpoint")
    if args.search and args.backend != "cusparselt":
        raise InputError(f"--search needs --backend cusparselt, got {args.backend}")
    if args.image_size is not None and args.image_size < 1:
        raise InputError(f"--image-size must be >= 1, got {args.image_size}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise InputError(f"--checkpoint {args.checkpoint}: no such file (give the path of a Lightning .ckpt of "
                     "lightning_sparse.models.ImageClassifier, e.g. runs/<name>/version_0/checkpoints/last.ckpt)")
    if args.model is not None:
        import timm

        if not timm.is_model(args.model):
            close = difflib.get_close_matches(args.model, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (see timm.list_models())"
            raise InputError(f"--model {args.model}: not a timm model name{hint}")
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise InputError(f"--json {args.json}: the folder {Path(args.json).resolve().parent} does not exist")


def print_eligibility(model: nn.Module, what: str, dtypes: Sequence[str], backend: str, table: bool) -> int:
    """Print which layers can hold a 2:4 weight (per dtype where it differs); return the eligible count."""
    eligible = 0
    groups: dict[tuple, list[str]] = {}  # float16 and bfloat16 share their shape constraints: one table
    for dtype in dtypes:
        rows = semi_structured_eligibility(model, dtype, backend)
        key = tuple((r.name, r.eligible, r.reason.replace(dtype, "")) for r in rows)
        groups.setdefault(key, []).append(dtype)
    for same in groups.values():
        rows = semi_structured_eligibility(model, same[0], backend)
        ok = [r for r in rows if r.eligible]
        linears = [r for r in rows if r.eligible or "nn.Linear" not in r.reason]
        weights = sum(_numel(r.shape) for r in ok)
        total = sum(_numel(r.shape) for r in rows)
        eligible = max(eligible, len(ok))
        print(f"\n== 2:4 eligibility of {what} ({backend}, {', '.join(same)}) ==")
        if table:
            print(text_table(("layer", "weight", "eligible", "reason"),
                         [(r.name or "(model)", "x".join(map(str, r.shape)), "yes" if r.eligible else "no", r.reason)
                          for r in rows]))
        print(f"{len(ok)} of {len(linears)} nn.Linear layer(s) eligible ({len(rows) - len(linears)} conv(s) stay "
              f"dense); {weights:,} of {total:,} conv/linear weights ({weights / max(1, total):.1%}) can be 2:4")
    return eligible


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _where_to_run(argv: Sequence[str], backend: str, any_eligible: bool) -> str:
    low, high = BACKEND_CAPABILITY[backend]
    cap = f"{low[0]}.x (A100, RTX 30xx/40xx)" if high is not None else f">= {low[0]}.{low[1]} (A100, RTX 30xx/40xx, H100)"
    if not any_eligible:
        return ("No layer is eligible, so a GPU would skip this input too. Inputs with eligible layers: "
                "--linear 8192x8192, --model vit_base_patch16_224 --random-init, or a checkpoint of a model "
                "with nn.Linear layers (a ViT, an MLP-Mixer).")
    return (f"To time it, run this on an NVIDIA GPU with compute capability {cap}:\n"
            f"    python -m lightning_sparse.benchmark {shlex.join(argv)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the exit status (0: done or skipped, 1: a parity check failed).

    Raises:
        BadValue: (``SystemExit(2)``) bad input, after one line on stderr.
    """
    parser, options = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(PROG, parser, argv, lambda args: _run(args, argv), options)


def _run(args: Namespace, argv: list[str]) -> int:
    _check_inputs(args)
    models = build_models(args)
    any_eligible = False
    for model, _, what, _layers in models:
        any_eligible |= print_eligibility(model, what, args.dtype, args.backend, not args.no_layers) > 0
    reason = skip_reason(None, args.dtype[0], args.backend, args.device)
    if reason is not None:
        print(f"\n2:4 semi-structured benchmark skipped: {reason}.")
        print(_where_to_run(argv, args.backend, any_eligible))
        return 0
    reports, failed = [], []
    for model, input_shape, what, layers in models:
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
