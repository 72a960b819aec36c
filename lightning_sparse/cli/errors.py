"""One-line errors for ``train.py``: a bad value at the command line or in a YAML file, whatever class it
belongs to, ends the run with ONE line that names the option path, the value and what is allowed
(exit code 2, no traceback), e.g.::

    train.py fit: error: trainer.callbacks[0].init_args.n=5 (lightning_sparse.callbacks.NMSparsity): `n` must be < `m` for N:M sparsity, got n=5, m=4.
    train.py fit: error: model.init_args.lr='abc': expected a float (lightning_sparse.models.ImageClassifier).

Three sources are covered: jsonargparse's parse errors (their nested multi-line text is condensed),
errors a class raises while LightningCLI instantiates it (the class is located in the config to name the
option path), and input errors raised before training runs (a callback's ``setup`` refusing its schedule,
a missing data directory). ``JSONARGPARSE_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import re
import traceback
from collections.abc import Iterator
from typing import Any

__all__ = ["condense", "instances_of", "located_error", "option_path_of"]

_STEP_FRAMES = {"training_step", "validation_step", "test_step", "predict_step", "forward", "backward",
                "optimizer_step", "on_train_batch_end", "on_before_optimizer_step", "on_after_backward"}
_NONE = "Expected a <class 'NoneType'>"
_BASE_CLASSES = ("'pytorch_lightning.Callback'", "'pytorch_lightning.callbacks.Callback'",
                 "'pytorch_lightning.LightningModule'", "'pytorch_lightning.LightningDataModule'")


def _flat(text: str) -> str:
    return " ".join(text.split())


def _type_name(text: str) -> str:
    """``Expected a <class 'float'>`` -> ``a float``; ``typing.Literal[1, 2]`` -> ``one of [1, 2]``."""
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text).replace("Expected a ", "Expected ")
    return re.sub(r"typing\.Literal\[(.*)\]", r"one of [\1]", text)


def _items(lines: list[str]) -> list[list[str]]:
    """The ``- ...`` items of a jsonargparse ``Errors:`` block (each with its indented continuation)."""
    items: list[list[str]] = []
    indent = None
    for line in lines:
        stripped = line.lstrip()
        if stripped.startswith("- ") and (indent is None or len(line) - len(stripped) == indent):
            indent = len(line) - len(stripped)
            items.append([stripped[2:]])
        elif items:
            items[-1].append(stripped)
    return items


def _given(message: str) -> tuple[str | None, str | None]:
    """``(nested key, value)`` of jsonargparse's ``Given value:`` line."""
    m = re.search(r"^\s*Given value: (.*)$", message, re.M)
    if not m:
        return None, None
    nested = re.match(r"NestedArg\(key='([^']*)', val=(.*)\)$", m.group(1))
    if nested:
        return nested.group(1), nested.group(2)
    return None, m.group(1) if not m.group(1).startswith("Namespace(") else None


def condense(message: str) -> str:
    """jsonargparse's (possibly nested, multi-line) parse error as one line naming path, value and rule."""
    lines = [line for line in message.splitlines() if line.strip()]
    head = re.match(r'Parser key "([^"]+)":\s*(.*)', lines[0]) if lines else None
    if head is None:
        return _flat(message)
    if len(lines) == 1:
        return _flat(f"{head.group(1)}: {head.group(2)}")
    key = head.group(1)
    if "Errors:" not in message:
        return _flat(f"{key}: {' '.join(lines[1:]) or head.group(2)}")
    start = next(i for i, line in enumerate(lines) if line.strip() == "Errors:")
    end = next((i for i, line in enumerate(lines) if line.strip().startswith("Given value type:")), len(lines))
    items = [i for i in _items(lines[start + 1:end]) if i[0] != _NONE]
    if len(items) > 1:
        items = [i for i in items if not any(b in i[0] for b in _BASE_CLASSES)] or items
    nested_key, value = _given(message)
    reasons, path, cls = [], key, None
    for item in items:
        m = re.match(r"Problem with given class_path '([^']+)':", item[0])
        if m:
            cls = m.group(1)
            inner = [x for x in item[1:] if x]
            subkeys = [re.match(r'Parser key "([^"]+)":', x).group(1) for x in inner if x.startswith("Parser key")]
            rest = [x for x in inner if not x.startswith("Parser key")]
            if subkeys:
                path = f"{key}.init_args.{subkeys[-1]}"
            elif nested_key:
                path = f"{key}.init_args.{nested_key}" if nested_key != "class_path" else f"{key}.class_path"
            reasons.append(_type_name(" ".join(rest)))
        else:
            reasons.append(_type_name(" ".join(item)))
    got = re.search(r"\. Got value: (.*)$", reasons[0]) if reasons else None
    if got:
        value, reasons = got.group(1), [reasons[0][: got.start()]]
    if all(r.startswith("Expected ") for r in reasons) and len(reasons) > 1:
        reason = "expected " + " or ".join(r[len("Expected "):] for r in reasons)
    else:
        reason = "; ".join(r[0].lower() + r[1:] if r.startswith("Expected ") else r for r in reasons)
    shown = f"{path}={value}" if value is not None else path
    where = f" ({cls}; its arguments: --{key}.help {cls})" if cls else ""
    return _flat(f"{shown}: {reason}{where}")


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _frames(err: BaseException) -> list[Any]:
    return [frame for frame, _ in traceback.walk_tb(err.__traceback__)]


def _resolve(class_path: Any) -> Any:
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def option_path_of(config: Any, match: Any, prefix: str = "") -> tuple[str, Any] | None:
    """``(option path, node)`` of the first ``class_path`` entry of ``config`` for which ``match(class, node)``."""
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    if isinstance(config, dict):
        if "class_path" in config and match(_resolve(config["class_path"]), config):
            return prefix, config
        for key, value in config.items():
            found = option_path_of(value, match, f"{prefix}.{key}" if prefix else str(key))
            if found:
                return found
    elif isinstance(config, (list, tuple)):
        for i, value in enumerate(config):
            found = option_path_of(value, match, f"{prefix}[{i}]")
            if found:
                return found
    return None


def _argument(message: str, args: dict[str, Any]) -> str | None:
    """The first init argument the message names (as `` `name` `` or ``name=``)."""
    hits = [(m.start(), name) for name in args for m in re.finditer(rf"(`{re.escape(name)}`|\b{re.escape(name)}=)", message)]
    return min(hits)[1] if hits else None


def located_error(err: BaseException, config: Any, instances: dict[str, Any] | None = None) -> str | None:
    """One line for an error a configured class raised (while instantiated, or in a hook before training),
    naming its option path and the argument the message mentions; None if the error is not one of those.

    Args:
        err: the exception (jsonargparse's wrapper or the class's own error).
        config: the subcommand's parsed config (dict or Namespace), to locate the class.
        instances: ``{option path: object}`` of what was instantiated (model, data, callbacks), to locate
            an error raised by an object's method.
    """
    root = list(_causes(err))[-1]
    if not isinstance(root, (ValueError, TypeError, FileNotFoundError, KeyError)) or isinstance(root, KeyboardInterrupt):
        return None
    frames = _frames(root)
    if any(f.f_code.co_name in _STEP_FRAMES for f in frames):
        return None  # raised inside a training/evaluation step: a bug or a numerical problem, keep the traceback
    text = str(root.args[0]) if isinstance(root, KeyError) and root.args else str(root)
    found = None
    for frame in reversed(frames):  # the class being instantiated (jsonargparse's / Lightning's instantiator)
        cls = frame.f_locals.get("class_type")
        if isinstance(cls, type):
            found = option_path_of(config, lambda c, node, cls=cls: c is cls)
            if found:
                break
    if found is None and instances:
        for frame in reversed(frames):  # a method of a configured object (``setup``, ``prepare_data``, ...)
            obj = frame.f_locals.get("self")
            path = next((p for p, o in instances.items() if o is obj), None)
            if path is not None:
                node = option_path_of(config, lambda c, node, obj=obj: c is type(obj))
                found = (path, node[1] if node else {"class_path": f"{type(obj).__module__}.{type(obj).__name__}"})
                break
    if found is None:  # a method of a configured object not yet handed out (a property read by an argument link)
        for frame in reversed(frames):
            obj = frame.f_locals.get("self")
            found = option_path_of(config, lambda c, node, obj=obj: c is type(obj)) if obj is not None else None
            if found:
                break
    if found is None:
        return None
    path, node = found
    args = node.get("init_args") or {}
    args = vars(args) if isinstance(args, argparse.Namespace) else args
    name = _argument(text, args)
    shown = f"{path}.init_args.{name}={args[name]!r}" if name else path
    return _flat(f"{shown} ({node.get('class_path')}): {text}")


def instances_of(config_init: Any, prefix: str = "") -> dict[str, Any]:
    """``{option path: object}`` of the instantiated classes in a LightningCLI ``config_init``."""
    if isinstance(config_init, argparse.Namespace):
        config_init = vars(config_init)
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


def trainer_error(err: BaseException, trainer_config: dict[str, Any]) -> str:
    """One line for an error ``Trainer(**config)`` raised, naming the ``trainer.*`` option it mentions."""
    text = str(err)
    name = _argument(text, {k: v for k, v in trainer_config.items() if not k.startswith("_")})
    return _flat(f"trainer.{name}={trainer_config[name]!r}: {text}" if name else f"trainer: {text}")
