"""One-line errors for ``train.py``: a bad value at the command line or in a YAML file, whatever class it
belongs to, ends the run with ONE line that names the option path, the value and what is allowed
(exit code 2, no traceback), e.g.::

    train.py fit: error: trainer.callbacks[0].init_args.n=5 (lightning_sparse.callbacks.NMSparsity): `n` must be < `m` for N:M
        sparsity, got n=5, m=4.
    train.py fit: error: model.init_args.lr=abc: expected float (lightning_sparse.models.ImageClassifier; ...)

Four sources, each through what the libraries document:

- jsonargparse's :class:`~jsonargparse.ArgumentError` while parsing: :mod:`lightning_sparse.cli.parse_errors`;
- a constructor refusing its arguments: the parser's instantiators raise
  :class:`~lightning_sparse.cli.parser.RefusedArguments` (class and arguments), located in the config;
- ``Trainer(**config)`` raising ``ValueError``/``MisconfigurationException``;
- a configured object refusing its input before any batch runs (a callback's ``setup`` refusing its
  schedule, a missing data directory): :class:`LoopsStarted` tells whether a batch had run; the object
  is the first configured one (``sparsity``, ``trainer.callbacks``, ``model``, ``data``) whose argument the
  message names as `` `name` `` or ``name=`` (the project's message format, STYLE.md).

``JSONARGPARSE_DEBUG=true`` shows the full traceback instead. The line itself (:func:`fail`, :class:`BadValue`,
:func:`debug`) is :mod:`lightning_sparse.utils.errors`'s, shared with the module commands
(:mod:`lightning_sparse.cli.commands`).
"""

from __future__ import annotations

import argparse
from typing import Any

import pytorch_lightning as pl
from typing_extensions import override

from lightning_sparse.cli.parser import INPUT_ERRORS, RefusedArguments
from lightning_sparse.run.resolve import resolve_class
from lightning_sparse.utils.errors import BadValue, debug, fail

__all__ = ["BadValue", "LoopsStarted", "class_nodes", "debug", "fail", "hook_error_line", "instances_of",
           "mentioned_argument", "option_path_of", "refused_line", "trainer_error_line"]


class LoopsStarted(pl.Callback):
    """Whether a batch has run: an error raised after that is a bug or a numerical problem and keeps its
    traceback; one raised before (``setup``, ``prepare_data``, ``on_train_start``) is an input error. The
    sanity check's batches count until it ends; reset at ``teardown``."""

    def __init__(self) -> None:
        self.started = False

    def _start(self, *args: Any, **kwargs: Any) -> None:
        self.started = True

    def _stop(self, *args: Any, **kwargs: Any) -> None:
        self.started = False

    on_train_batch_start = on_validation_batch_start = override(_start)
    on_test_batch_start = on_predict_batch_start = override(_start)
    on_sanity_check_end = teardown = override(_stop)


def _resolve(class_path: Any) -> Any:
    try:
        return resolve_class(class_path)
    except ValueError:
        return None


def _as_dict(node: Any) -> Any:
    return vars(node) if isinstance(node, argparse.Namespace) else node


def class_nodes(config: Any, prefix: str = "") -> list[tuple[str, dict]]:
    """``(option path, node)`` of every ``class_path`` entry of ``config``, outermost first."""
    config = _as_dict(config)
    out: list[tuple[str, dict]] = []
    if isinstance(config, dict):
        if "class_path" in config:
            out.append((prefix, config))
        for key, value in config.items():
            out += class_nodes(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            out += class_nodes(value, f"{prefix}[{i}]")
    return out


def _init_args(node: dict) -> dict[str, Any]:
    return dict(_as_dict(node.get("init_args")) or {})


def option_path_of(config: Any, cls: type, kwargs: dict[str, Any] | None = None) -> tuple[str, dict] | None:
    """``(option path, node)`` of the ``class_path`` entry of ``cls`` in ``config``; with several, the one
    whose ``init_args`` agree most with ``kwargs``."""
    found = [(path, node) for path, node in class_nodes(config) if _resolve(node["class_path"]) is cls]
    if not found:
        return None
    kwargs = kwargs or {}
    agree = lambda node: sum(_init_args(node).get(k, object()) == v for k, v in kwargs.items())  # noqa: E731
    return max(found, key=lambda item: agree(item[1]))


def mentioned_argument(text: str, names: list[str]) -> str | None:
    """The argument of ``names`` that ``text`` names first, as `` `name` `` or ``name=``."""
    hits = []
    for name in names:
        for form in (f"`{name}`", f"{name}="):
            at = text.find(form)
            while form[0] != "`" and at > 0 and (text[at - 1].isalnum() or text[at - 1] == "_"):
                at = text.find(form, at + 1)  # ``max_epochs=`` does not name ``epochs``
            if at >= 0:
                hits.append((at, name))
    return min(hits)[1] if hits else None


def _line(path: str, node: dict, text: str) -> str:
    args = _init_args(node)
    name = mentioned_argument(text, list(args))
    shown = f"{path}.init_args.{name}={args[name]!r}" if name else path
    return f"{shown} ({node.get('class_path')}): {text}"


def _text(err: BaseException) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def refused_line(refused: RefusedArguments, config: Any) -> str:
    """One line for a constructor that refused its arguments, at the option path of its class."""
    found = option_path_of(config, refused.class_type, refused.kwargs)
    cls = refused.class_type
    path, node = found or (cls.__name__, {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                                          "init_args": refused.kwargs})
    return _line(path, node, _text(refused.error))


def instances_of(config_init: Any, prefix: str = "") -> dict[str, Any]:
    """``{option path: object}`` of the instantiated classes in a LightningCLI ``config_init``."""
    config_init = _as_dict(config_init)
    out: dict[str, Any] = {}
    if isinstance(config_init, dict):
        for key, value in config_init.items():
            out.update(instances_of(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(config_init, (list, tuple)):
        for i, value in enumerate(config_init):
            out.update(instances_of(value, f"{prefix}[{i}]"))
    elif config_init is not None and not isinstance(config_init, (str, int, float, bool)):
        out[prefix] = config_init
    return out


def hook_error_line(err: BaseException, config: Any, instances: dict[str, Any]) -> str | None:
    """One line for an input error a configured object raised before any batch ran, or None when no
    configured object's argument is named in the message."""
    if not isinstance(err, INPUT_ERRORS):
        return None
    text = _text(err)
    order = ("sparsity", "trainer.callbacks", "model", "data")
    ranked = sorted(instances.items(), key=lambda item: next(
        (i for i, p in enumerate(order) if item[0] == p or item[0].startswith(p + "[")), len(order)))
    for path, obj in ranked:
        node = next((n for p, n in class_nodes(config) if p == path), None)
        if node is None and obj is not None:
            found = option_path_of(config, type(obj))
            node = found[1] if found else None
        if node is not None and mentioned_argument(text, list(_init_args(node))):
            return _line(path, node, text)
    return None


def trainer_error_line(err: BaseException, trainer_config: dict[str, Any]) -> str:
    """One line for an error ``Trainer(**config)`` raised, naming the ``trainer.*`` option it mentions."""
    text = str(err)
    name = mentioned_argument(text, [k for k in trainer_config if not k.startswith("_")])
    return f"trainer.{name}={trainer_config[name]!r}: {text}" if name else f"trainer: {text}"


__all__ += ["INPUT_ERRORS", "RefusedArguments"]
