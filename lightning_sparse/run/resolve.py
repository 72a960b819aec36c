"""Resolving what a run names: class paths, its ``config.yaml`` and the input image size."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lightning_sparse.utils.errors import InputError

__all__ = ["UnknownImageSize", "config_image_size", "find_config", "resolve_class", "resolve_image_size"]


class UnknownImageSize(InputError):
    """Nothing a run holds tells its input image size, and none was given."""


def resolve_class(class_path: str) -> type:
    """The class a ``module.Name`` path (a config's ``class_path``) names.

    Example:
        >>> resolve_class("collections.OrderedDict").__name__
        'OrderedDict'

    Raises:
        ValueError: a path that is not ``module.Name`` or names nothing importable (the message names it).
    """
    module, _, name = str(class_path).rpartition(".")
    if not module or not name:
        raise InputError(f"class_path={class_path!r} is not a dotted path 'module.Name'.")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise InputError(
            f"class_path={class_path!r} names no importable class ({type(err).__name__}: {err})."
        ) from None


def find_config(path: Path) -> dict[str, Any] | None:
    """The ``config.yaml`` of the run a checkpoint belongs to (next to it, or one folder up), parsed."""
    for folder in (path.parent, path.parent.parent):
        cfg = folder / "config.yaml"
        if cfg.is_file():
            return yaml.safe_load(cfg.read_text()) or {}
    return None


def config_image_size(config: Mapping[str, Any] | None) -> int | None:
    """``data.init_args.image_size`` of a run config, else the DataModule's default (argument or attribute)."""
    data = (config or {}).get("data") or {}
    size = (data.get("init_args") or {}).get("image_size")
    if size is None and data.get("class_path"):
        try:
            cls = resolve_class(data["class_path"])
        except ValueError:
            return None
        param = inspect.signature(cls.__init__).parameters.get("image_size")
        size = getattr(cls, "image_size", None) if param is None else param.default
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def resolve_image_size(override: int | None, found: Iterable[Any], what: str, where: str) -> int:
    """``override`` (checked), else the first int in ``found``.

    Args:
        override: the size a user passed (``--image_size``), or None.
        found: candidate sizes, best first (None or non-ints are skipped).
        what: the run or file, for the error.
        where: the places that were searched, for the error.

    Raises:
        ValueError: ``override`` is not a positive int.
        UnknownImageSize: no override and no candidate.
    """
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, int) or override < 1:
            raise InputError(f"image_size must be a positive int, got image_size={override!r}.")
        return override
    size = next((int(s) for s in found if isinstance(s, int) and not isinstance(s, bool)), None)
    if size is None:
        raise UnknownImageSize(f"cannot tell the input size of {what}: {where}. Pass --image_size.")
    return size
