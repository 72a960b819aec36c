"""A self-contained slim model file: timm architecture, channel configuration and weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_sparse.slim.config import apply_channel_config, channel_config
from lightning_sparse.utils.checkpoints import load_checkpoint
from lightning_sparse.utils.errors import InputError
from lightning_sparse.utils.modules import device_inputs, eval_mode, first_conv

__all__ = ["SLIM_FORMAT", "build_slim", "export_slim", "load_slim"]

SLIM_FORMAT = "lightning_sparse.slim/1"


def export_slim(model: nn.Module, path: str | Path, example_inputs: torch.Tensor | None = None, **meta: Any) -> Path:
    """Save a slim timm model as one file that :func:`load_slim` rebuilds without any training code.

    The file (``torch.save`` of plain tensors/ints/strings, loadable with ``weights_only=True``) holds the
    timm architecture name, ``num_classes``, ``in_chans``, ``model_kwargs`` for ``timm.create_model``,
    the :func:`channel_config`, the ``state_dict`` and ``meta``. With ``example_inputs`` it also stores that
    batch and the eval-mode outputs, which :func:`load_slim` checks.

    Args:
        model: a timm model (or any model when ``arch=`` names a timm architecture that builds it).
        path: output file.
        example_inputs: optional batch for the round-trip check.
        **meta: ``arch``, ``num_classes``, ``in_chans``, ``model_kwargs`` override what is read from the
            model; anything else (plain Python values) is stored under ``meta``.

    Raises:
        ValueError: when the architecture name cannot be found (pass ``arch=``).
    """
    arch = meta.pop("arch", None) or (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not arch:
        raise ValueError(
            f"export_slim needs the timm architecture of {type(model).__name__}; pass arch='resnet50' (for example)."
        )
    num_classes = int(meta.pop("num_classes", getattr(model, "num_classes", 0)))
    in_chans = int(meta.pop("in_chans", first_conv(model).in_channels))
    payload: dict[str, Any] = {
        "format": SLIM_FORMAT,
        "arch": str(arch),
        "num_classes": num_classes,
        "in_chans": in_chans,
        "model_kwargs": dict(meta.pop("model_kwargs", {})),
        "channel_config": channel_config(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": meta,
    }
    if example_inputs is not None:
        with eval_mode(model), torch.no_grad():
            out = model(device_inputs(model, example_inputs))
        payload["example_inputs"] = example_inputs.detach().cpu().clone()
        payload["example_outputs"] = out.detach().cpu().clone()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def load_slim(path: str | Path, map_location: str | torch.device = "cpu", verify: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`export_slim` (eval mode).

    ``timm.create_model(arch, num_classes=..., in_chans=..., **model_kwargs)`` →
    :func:`apply_channel_config` → ``load_state_dict(strict=True)``. With ``verify`` and stored example
    inputs, the outputs are compared with the stored ones.

    Raises:
        InputError: (a ``ValueError``) not a slim export file; also a missing, unreadable or untrusted file
            (:func:`lightning_sparse.utils.checkpoints.load_checkpoint`).
        RuntimeError: the rebuilt model's outputs differ from the stored ones.
    """
    payload = load_checkpoint(path)
    if not isinstance(payload, dict) or payload.get("format") != SLIM_FORMAT:
        raise InputError(f"{path} is not a slim export (expected format {SLIM_FORMAT!r}).")
    return build_slim(payload, str(path), verify).to(map_location)


def build_slim(payload: dict[str, Any], name: str = "slim export", verify: bool = True) -> nn.Module:
    """The model a slim export's contents describe (what :func:`load_slim` does after reading the file).

    Args:
        payload: ``arch``, ``num_classes``, ``in_chans``, ``model_kwargs``, ``channel_config``, ``state_dict``,
            ``meta`` and optionally ``example_inputs``/``example_outputs`` (see :func:`export_slim`).
        name: what to call it in an error.
        verify: compare the outputs on the stored example inputs with the stored outputs.

    Raises:
        RuntimeError: the rebuilt model's outputs differ from the stored ones.
    """
    import timm

    model = timm.create_model(
        payload["arch"], pretrained=False, num_classes=payload["num_classes"], in_chans=payload["in_chans"],
        **payload["model_kwargs"],
    )
    example = payload.get("example_inputs")
    trace = example[:1] if example is not None else None
    apply_channel_config(model, payload["channel_config"], trace)
    model.load_state_dict(payload["state_dict"], strict=True)
    model.eval()
    if verify and example is not None:
        with torch.no_grad():
            out = model(example)
        ref = payload["example_outputs"]
        if not torch.allclose(out, ref, rtol=1e-4, atol=1e-5):
            raise RuntimeError(
                f"{name}: rebuilt model's outputs differ from the stored ones (max abs diff "
                f"{(out - ref).abs().max().item():.3g})."
            )
    model.slim_meta = dict(payload["meta"], arch=payload["arch"])  # type: ignore[assignment]
    return model
