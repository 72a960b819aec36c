"""``export_checkpoint``: a run's checkpoint -> a deployment folder (model.pt, model_sparse.pt, model.onnx,
report.md/json)."""

from __future__ import annotations

import copy
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from lightning_sparse.export.compact import save_compact
from lightning_sparse.export.contents import baked_contents
from lightning_sparse.export.fold import fold_batchnorm
from lightning_sparse.export.onnx_export import PARITY_ATOL, export_onnx, onnx_parity
from lightning_sparse.export.report import model_costs, timing_rows, write_report
from lightning_sparse.export.runners import eager_runner, onnxruntime_runner
from lightning_sparse.run import RunModel, load_run_model
from lightning_sparse.slim import export_slim
from lightning_sparse.utils.errors import InputError
from lightning_sparse.utils.timing import interleaved_times

__all__ = ["export_checkpoint"]

PARITY_BATCH = 4
FILES = ("model.pt", "model_sparse.pt", "model.onnx")


def _storage(model: torch.nn.Module) -> dict[str, int]:
    """What ``model.pt`` stores: every state_dict tensor dense (zeros included); how many of those are nonzero."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return {"values": sum(t.numel() for t in tensors), "nonzero": sum(int(t.count_nonzero()) for t in tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors)}


def _positive(**values: Any) -> None:
    for name, v in values.items():
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise InputError(f"{name} must be a positive int, got {name}={v!r}.")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"out={str(out)!r} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"out={str(out)!r} exists and is not empty; pass --overwrite true to replace it.")


def _benchmark(src: RunModel, folded: torch.nn.Module, onnx_path: Path, work: Path, batch_size: int,
               threads: int, reps: int, warmup: int) -> dict[str, Any]:
    """Dense vs exported, eager (channels_last) and onnxruntime, batch 1 and ``batch_size``, all interleaved."""
    x = src.example_inputs(PARITY_BATCH, seed=1)
    dense_folded = fold_batchnorm(src.dense(), x[:1], strict=False)
    dense_onnx = export_onnx(dense_folded, x, work / "dense.onnx")
    fns, keys = [], []
    for batch in (1, batch_size):
        xb = src.example_inputs(batch, seed=2)
        for model, net, path in (("dense", dense_folded, dense_onnx), ("exported", folded, onnx_path)):
            fns.append(eager_runner(copy.deepcopy(net), xb, threads))
            keys.append(("eager", model, batch))
            fns.append(onnxruntime_runner(path, xb, threads))
            keys.append(("onnxruntime", model, batch))
    times = interleaved_times(fns, warmup, reps, "cpu")
    by_key = dict(zip(keys, times))
    return {"batch_size": batch_size, "threads": threads, "reps": reps, "warmup": warmup,
            "rows": timing_rows(by_key, batch_size),
            "median_ms": {f"{r}/{m}/batch{b}": t.host_ms for (r, m, b), t in by_key.items()}}


def export_checkpoint(
    checkpoint: str,
    *,
    out: str,
    batch_size: int = 32,
    image_size: int | None = None,
    threads: int | None = None,
    reps: int = 20,
    warmup: int = 3,
    no_bench: bool = False,
    overwrite: bool = False,
    atol: float = PARITY_ATOL,
) -> Path:
    """Export a run for deployment: the network its forward used, to PyTorch and ONNX, with a report.

    Writes into ``out``:

    * ``model.pt``: the slim network (BatchNorm not folded; N:M masks baked where the run had them) as a
      slim export file: timm architecture, channel configuration, weights (every tensor dense, zeros
      included) and ``meta`` (``preprocessing``: what the model expects of a raw image; ``baked``: N:M masks,
      unstructured masks and slimmed channels, each only where the model has it; ``nm``, ``masked``); loads
      with :func:`lightning_sparse.slim.load_slim`, or with torch and timm only
      (:data:`lightning_sparse.export.LOAD_SNIPPET`);
    * ``model_sparse.pt``: the same file with its sparse tensors stored as values + bitmask
      (:func:`~lightning_sparse.export.save_compact`); :func:`~lightning_sparse.export.load_compact` rebuilds
      the same model, bitwise;
    * ``model.onnx``: the same network with BatchNorm folded into the convs, dynamic batch, checked with
      ``onnx.checker`` and run in onnxruntime (CPU): max |Δlogits| against the PyTorch model must be
      ``<= atol``, else nothing is written;
    * ``report.json`` / ``report.md``: what was baked, the preprocessing, the file sizes, params, nonzero
      params, FLOPs of dense vs exported, and unless
      ``no_bench`` the measured latency (batch 1) and throughput (batch ``batch_size``) of the dense model of
      the same architecture (BatchNorm folded) vs the exported one in PyTorch eager (channels_last) and
      onnxruntime CPU, all interleaved in one run, with the speedups.

    The folder is written next to ``out`` under a temporary name and renamed when complete, so ``out``
    never holds a partial export.

    Args:
        checkpoint: a Lightning checkpoint of an ImageClassifier run (Chase, DynamicSparsity, NMSparsity
            or dense; Chase→N:M fine-tunes included) or a slim export file.
        out: the output folder (must not exist or be empty, unless ``overwrite``).
        batch_size: batch size of the throughput measurement.
        image_size: input height/width; default from the checkpoint or its run's ``config.yaml``.
        threads: CPU threads for both runtimes; default ``torch.get_num_threads()``.
        reps: timed repetitions (medians are reported).
        warmup: untimed repetitions first.
        no_bench: skip the timing.
        overwrite: replace an existing non-empty ``out``.
        atol: ONNX parity tolerance on the logits.

    Returns:
        ``out``.

    Raises:
        InputError: (a ``ValueError``) bad arguments, a missing/unreadable/unsupported checkpoint, or a non-empty
            ``out``.
        ParityError: onnxruntime's logits differ from PyTorch's by more than ``atol``.
    """
    _positive(batch_size=batch_size, image_size=image_size, threads=threads, reps=reps)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise InputError(f"warmup must be an int >= 0, got warmup={warmup!r}.")
    if not atol > 0:
        raise InputError(f"atol must be > 0, got atol={atol!r}.")
    out_path = Path(out)
    _check_out(out_path, overwrite)
    src = load_run_model(checkpoint, image_size)
    threads = threads or torch.get_num_threads()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent))
    try:
        x = src.example_inputs(PARITY_BATCH)
        dense = src.dense()
        baked = baked_contents(src, dense)
        export_slim(src.model, tmp / "model.pt", example_inputs=x[:2], arch=src.arch, num_classes=src.num_classes,
                    in_chans=src.in_chans, model_kwargs=src.model_kwargs, image_size=src.image_size,
                    source=str(checkpoint), nm=src.nm_text(), masked=list(src.masked),
                    preprocessing=src.preprocessing, baked=baked)
        save_compact(tmp / "model.pt", tmp / "model_sparse.pt")
        folded = fold_batchnorm(src.model, x[:1], strict=False)
        onnx_path = export_onnx(folded, x, tmp / "model.onnx", atol=atol, reference=src.model)
        report: dict[str, Any] = {
            "source": {"path": str(checkpoint), "kind": src.kind, "arch": src.arch, "num_classes": src.num_classes,
                       "in_chans": src.in_chans, "image_size": src.image_size, "nm": src.nm_text(), "notes": src.notes},
            "baked": baked,
            "preprocessing": src.preprocessing,
            "files": {"bytes": {name: (tmp / name).stat().st_size for name in FILES},
                      "model.pt stores": _storage(src.model)},
            "onnx": {"max_abs_diff": onnx_parity(onnx_path, src.model, x), "atol": atol,
                     "folded_batchnorm": len(folded.folded_batchnorm.folds),
                     "unfolded_batchnorm": folded.folded_batchnorm.unfoldable,
                     "torch": torch.__version__},
            "costs": model_costs(src, dense),
        }
        if not no_bench:
            with tempfile.TemporaryDirectory() as work:
                report["benchmark"] = _benchmark(src, folded, onnx_path, Path(work), batch_size, threads, reps, warmup)
        write_report(tmp, report)
        _replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_path


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` folder to ``out`` (an existing ``out`` is removed only after that)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

