"""What an export writes next to the model: costs, timings and ``report.md`` / ``report.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from lightning_sparse.export.contents import describe_baked
from lightning_sparse.run import RunModel, measure_costs
from lightning_sparse.slim import count_flops
from lightning_sparse.utils.inputs import example_inputs
from lightning_sparse.utils.timing import Timing

__all__ = ["LOAD_SNIPPET", "describe_preprocessing", "model_costs", "timing_rows", "write_report"]

# How to load model.pt with torch and timm only (README "Export for deployment" shows the same text).
LOAD_SNIPPET = '''\
import timm, torch

ckpt = torch.load("export/model.pt", weights_only=True)
model = timm.create_model(ckpt["arch"], num_classes=ckpt["num_classes"], in_chans=ckpt["in_chans"],
                          **ckpt["model_kwargs"])
for name, counts in ckpt["channel_config"].items():  # the slim channel counts (Conv2d, Linear, BatchNorm)
    module = model.get_submodule(name)
    for attr, value in counts.items():
        setattr(module, attr, value)
for key, value in ckpt["state_dict"].items():  # give every tensor its slim shape, then load strictly
    owner, _, leaf = key.rpartition(".")
    getattr(model.get_submodule(owner), leaf).data = torch.empty_like(value)
model.load_state_dict(ckpt["state_dict"])
model.eval()
'''


def model_costs(src: RunModel, dense: nn.Module) -> dict[str, Any]:
    """Params, nonzero params and FLOPs (batch 1, ``torch.utils.flop_counter``) of dense vs exported.

    ``params``/``flops`` count the stored (dense-shaped) tensors of each model; ``*_nm`` count N:M weights
    at N/M of their size (what a sparse tensor-core kernel stores and computes); ``flops_nonzero`` scales
    every Conv/Linear by its fraction of nonzero weights (see :func:`lightning_sparse.run.measure_costs`).
    """
    shape = src.input_shape
    c = measure_costs(src, dense)
    stored = sum(p.numel() for p in src.model.parameters())
    dense_nonzero = sum(int(p.count_nonzero()) for p in dense.parameters())
    exported = {
        "params": stored, "params_nm": c["params"], "nonzero_params": c["nonzero_params"],
        "flops": count_flops(src.model, example_inputs(shape, seed=0)),
        "flops_nm": c["flops"], "flops_nonzero": c["flops_nonzero"],
    }
    dense_row = {"params": c["dense_params"], "params_nm": c["dense_params"], "nonzero_params": dense_nonzero,
                 "flops": c["dense_flops"], "flops_nm": c["dense_flops"], "flops_nonzero": c["dense_flops"]}
    return {"dense": dense_row, "exported": exported,
            "ratio": {k: exported[k] / max(1, dense_row[k]) for k in exported}}


def timing_rows(timings: dict[tuple[str, str, int], Timing], batch_size: int) -> list[dict[str, Any]]:
    """One row per runtime and model: latency (batch 1, ms), throughput (images/s at ``batch_size``), and
    for the exported model its speedups over dense in the same runtime (dense time / exported time)."""
    rows = []
    for runtime in dict.fromkeys(k[0] for k in timings):
        base = None
        for model in ("dense", "exported"):
            lat, big = timings[(runtime, model, 1)].host_ms, timings[(runtime, model, batch_size)].host_ms
            row = {"runtime": runtime, "model": model, "latency_ms": lat, "throughput": 1e3 * batch_size / big}
            if base is None:
                base = row
            else:
                row["latency_speedup"] = base["latency_ms"] / lat
                row["throughput_speedup"] = row["throughput"] / base["throughput"]
            rows.append(row)
    return rows


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def describe_preprocessing(pre: dict[str, Any] | None) -> str:
    """The preprocessing record (:func:`lightning_sparse.run.run_preprocessing`) as one sentence.

    Example:
        >>> from lightning_sparse.data import ImageFolderDataModule
        >>> for step in describe_preprocessing(ImageFolderDataModule(image_size=224).preprocessing()).split("; "):
        ...     print(step)
        From lightning_sparse.data.ImageFolderDataModule: RGB image
        pixel values / 255
        resize (shorter side) to 256, bilinear
        centre crop to 224
        then (x - mean) / std per channel with mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]
        model input 3x224x224.
    """
    if not pre or pre.get("missing") or not pre.get("source"):
        return f"Not recorded: {(pre or {}).get('missing') or 'the run was not looked up'}."
    steps = [f"{pre['channel_order']} image"]
    if pre.get("scale"):
        steps.append(f"pixel values / {pre['scale']:g}")
    if pre.get("resize"):
        steps.append(f"resize (shorter side) to {pre['resize']}, {pre['interpolation']}")
    if pre.get("crop"):
        steps.append(f"centre crop to {pre['crop']}")
    mean, std = ([round(v, 6) for v in pre[k]] for k in ("mean", "std"))
    steps.append(f"then (x - mean) / std per channel with mean {mean}, std {std}")
    return f"From {pre['source']}: " + "; ".join(steps) + "; model input " + "x".join(map(str, pre["input_size"])) + "."


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def write_report(folder: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` (everything) and ``report.md`` (tables and the loading snippet) into ``folder``."""
    (folder / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    src, costs = report["source"], report["costs"]
    lines = [
        f"# Export of `{src['path']}`",
        "",
        f"{src['kind']}: timm `{src['arch']}`, {src['in_chans']}x{src['image_size']}x{src['image_size']} inputs, "
        f"{src['num_classes']} classes. BatchNorm folded into {report['onnx']['folded_batchnorm']} convs "
        f"({len(report['onnx']['unfolded_batchnorm'])} left). ONNX parity: max |Δlogits| = "
        f"{report['onnx']['max_abs_diff']:.2e} (allowed {report['onnx']['atol']:g}).",
        "",
        "## Baked into the weights",
        "",
        *[f"- {line}" for line in describe_baked(report["baked"])],
        "",
        "## Preprocessing",
        "",
        describe_preprocessing(report.get("preprocessing")),
        "",
        "## Loading notes",
        "",
        *[f"- {note}" for note in src["notes"]],
        "",
        "## Costs",
        "",
        "| | params | params (N:M at N/M) | nonzero params | FLOPs | FLOPs (N:M at N/M) | FLOPs (nonzero) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = ("params", "params_nm", "nonzero_params", "flops", "flops_nm", "flops_nonzero")
    for name in ("dense", "exported"):
        lines.append(f"| {name} | " + " | ".join(_human(costs[name][k]) for k in keys) + " |")
    lines.append("| ratio | " + " | ".join(f"{costs['ratio'][k]:.3f}" for k in keys) + " |")
    lines += ["", "FLOPs per image (batch 1), 2 per multiply-add.", ""]
    bench = report.get("benchmark")
    if bench:
        lines += [
            f"Measured on CPU (threads: {bench['threads']}), medians of {bench['reps']} interleaved repetitions "
            f"(warm-up {bench['warmup']}); latency at batch 1, throughput at batch {bench['batch_size']}; "
            "dense = the same timm architecture, dense, BatchNorm folded.",
            "",
            "| runtime | model | latency (ms) | throughput (img/s) | latency speedup | throughput speedup |",
            "|---|---|---|---|---|---|",
        ]
        for r in bench["rows"]:
            speed = (f"{r['latency_speedup']:.2f}x | {r['throughput_speedup']:.2f}x" if "latency_speedup" in r
                     else "1.00x | 1.00x")
            lines.append(f"| {r['runtime']} | {r['model']} | {r['latency_ms']:.2f} | {r['throughput']:.1f} | {speed} |")
        lines.append("")
    else:
        lines += ["Timing skipped (--no_bench).", ""]
    sizes, stored = report["files"]["bytes"], report["files"]["model.pt stores"]
    lines += [
        "## Files",
        "",
        "| file | size | what it stores |",
        "|---|---|---|",
        f"| `model.pt` | {_mb(sizes['model.pt'])} | every tensor dense, zeros included: {stored['values']:,} values "
        f"({_mb(stored['bytes'])}), {stored['nonzero']:,} of them nonzero |",
        f"| `model_sparse.pt` | {_mb(sizes['model_sparse.pt'])} ({sizes['model_sparse.pt'] / sizes['model.pt']:.2f}x) "
        "| the same, sparse tensors as nonzero values + a 1-bit mask |",
        f"| `model.onnx` | {_mb(sizes['model.onnx'])} | BatchNorm folded, dense tensors |",
        "",
        "- `model.pt`: the slim network (BatchNorm not folded) as a slim export "
        "(`lightning_sparse.slim.load_slim`), with the preprocessing and what was baked in its `meta`; "
        "loadable with torch and timm only:",
        "",
        "```python",
        LOAD_SNIPPET.replace("export/model.pt", "model.pt").rstrip(),
        "```",
        "",
        "- `model_sparse.pt`: the same model, compact; `lightning_sparse.export.load_compact(\"model_sparse.pt\")` "
        "rebuilds it (bitwise the weights of `model.pt`).",
        "- `model.onnx`: the same network with BatchNorm folded; input `input` (N, C, H, W) float32 with a "
        "dynamic batch, output `logits`.",
        "- `report.json`: everything above, machine-readable.",
        "",
    ]
    (folder / "report.md").write_text("\n".join(lines))
