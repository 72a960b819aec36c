"""What a run's model expects of a raw image: its DataModule's ``preprocessing()``, else timm's data config.

The record is plain values (JSON- and ``weights_only``-safe): ``input_size`` ``[C, H, W]``, ``channel_order``,
``scale`` (pixel values are divided by it), ``resize`` (shorter side), ``interpolation``, ``crop`` (centre crop),
``mean``/``std`` per channel, and ``source`` (where it was read). When nothing tells it, every field is
``None`` and ``missing`` says why; nothing is guessed silently.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_sparse.run.resolve import find_config, resolve_class

__all__ = ["PREPROCESSING_KEYS", "run_preprocessing"]

PREPROCESSING_KEYS = ("input_size", "channel_order", "scale", "resize", "interpolation", "crop", "mean", "std")


def _missing(why: str) -> dict[str, Any]:
    return {"source": None, **dict.fromkeys(PREPROCESSING_KEYS), "missing": why}


def _from_datamodule(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``preprocessing()`` of the DataModule a config's ``data`` section builds (no data is read)."""
    class_path = str(spec["class_path"])
    try:
        cls = resolve_class(class_path)
        accepted = inspect.signature(cls).parameters
        kwargs = dict(spec.get("init_args") or {})
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        datamodule = cls(**kwargs)
    except (ValueError, TypeError) as err:
        return _missing(f"the run's DataModule {class_path} could not be built ({err})")
    if not callable(getattr(datamodule, "preprocessing", None)):
        return _missing(f"the run's DataModule {class_path} has no preprocessing() method")
    record = dict(datamodule.preprocessing())
    record["source"] = f"{record.get('source') or class_path} (the run's config.yaml)"
    return record


def _from_timm(model: nn.Module, input_shape: tuple[int, int, int], arch: str) -> dict[str, Any]:
    """timm's data config of the architecture, at the export's input size; only when its channels fit."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    c, h, w = input_shape
    if len(cfg["mean"]) != c:
        return _missing(f"the run names no DataModule (no config.yaml next to it) and timm's data config of "
                        f"{arch!r} is for {len(cfg['mean'])} channels, the model takes {c}")
    crop_pct = float(cfg.get("crop_pct") or 1.0)
    center = cfg.get("crop_mode", "center") == "center" and crop_pct < 1.0
    return {"source": f"timm's data config of {arch!r} (the run names no DataModule; input size: the export's)",
            "input_size": [c, h, w], "channel_order": "RGB" if c == 3 else f"{c} channels", "scale": 255.0,
            "resize": int(round(min(h, w) / crop_pct)) if center else min(h, w),
            "interpolation": str(cfg["interpolation"]), "crop": min(h, w) if center else None,
            "mean": [float(v) for v in cfg["mean"]], "std": [float(v) for v in cfg["std"]]}


def run_preprocessing(path: Path, payload: Mapping[str, Any], model: nn.Module, input_shape: tuple[int, int, int],
                      arch: str) -> dict[str, Any]:
    """The preprocessing a run trained with, best source first.

    1. a slim export's ``meta["preprocessing"]`` (an earlier export recorded it);
    2. the run's ``config.yaml`` ``data`` section: that DataModule's ``preprocessing()``;
    3. timm's data config of the architecture (``timm.data.resolve_model_data_config``), when its channel
       count is the model's;
    4. else a record of ``None`` values whose ``missing`` says why.
    """
    stored = (payload.get("meta") or {}).get("preprocessing")
    if isinstance(stored, Mapping):
        return dict(stored)
    data = (find_config(path) or {}).get("data")
    if isinstance(data, Mapping) and data.get("class_path"):
        return _from_datamodule(data)
    return _from_timm(model, input_shape, arch)
