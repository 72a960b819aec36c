"""One line for arguments jsonargparse refused while parsing (unknown option, wrong type, bad class path,
missing config file), found without reading jsonargparse's message.

jsonargparse raises :class:`~jsonargparse.ArgumentError` (the parser has ``exit_on_error=False``). Which
argument it refused is found by parsing again without each one in turn (a config file's entries are tried
one by one as the equivalent ``--key=value`` options); what is wrong with it is read from the parsed rest:
the option's class (its ``class_path``, or the class of a section such as ``trainer``), that class's
signature, and the annotation of the argument. A module command's own options (``python -m
lightning_sparse.export --batch_size x``) are explained from :class:`Options`: the names each answers to and
what it accepts. When no single argument is to blame, the line is jsonargparse's own message on one line.
"""

from __future__ import annotations

import difflib
import inspect
import json
import types
import typing
from argparse import Namespace
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError

__all__ = ["Options", "describe_type", "option_groups", "parse_error_line"]

Parse = Callable[[list[str]], Any]
_ALWAYS_SKIPPED = ("--print_config", "--help", "-h")


def option_groups(argv: list[str], subcommands: tuple[str, ...]) -> tuple[list[str], list[list[str]]]:
    """``(leading subcommand, options)``: each option with the values that follow it, e.g.
    ``["--config", "a.yaml"]``; a stray word is an option of its own."""
    lead = argv[:1] if argv and argv[0] in subcommands else []
    groups: list[list[str]] = []
    for token in argv[len(lead):]:
        prev = groups[-1] if groups else None
        if not token.startswith("-") and prev and prev[0].startswith("-") and "=" not in prev[0] and len(prev) == 1:
            prev.append(token)
        else:
            groups.append([token])
    return lead, groups


def _key_value(group: list[str]) -> tuple[str, str | None]:
    key, eq, value = group[0].lstrip("-").partition("=")
    return key, value if eq else (" ".join(group[1:]) if len(group) > 1 else None)


def _skipped(group: list[str]) -> bool:
    key = group[0].partition("=")[0]
    return key in _ALWAYS_SKIPPED or key.endswith(".help")


def _is_config(group: list[str]) -> bool:
    return _key_value(group)[0] in ("config", "c")


def _parses(parse: Parse, lead: list[str], groups: list[list[str]]) -> Any | None:
    try:
        return parse([*lead, *(t for g in groups for t in g)])
    except ArgumentError:
        return None


def _leave_one_out(parse: Parse, lead: list[str], groups: list[list[str]], among: range) -> tuple[int, Any] | None:
    """The first ``groups[i]`` (``i`` in ``among``) without which the rest parses, and that parse."""
    for i in among:
        parsed = _parses(parse, lead, groups[:i] + groups[i + 1:])
        if parsed is not None:
            return i, parsed
    return None


def _leaves(node: Any, prefix: str) -> list[list[str]]:
    """A config file's entries as ``--key=value`` options (class paths first; a list of classes, such as
    ``trainer.callbacks``, as one ``--key+=class_path`` per item followed by its arguments; other lists whole)."""
    if (isinstance(node, list) and prefix and node
            and all(isinstance(item, dict) and "class_path" in item for item in node)):
        out = []
        for item in node:
            out.append([f"--{prefix}+={item['class_path']}"])
            for key, value in (item.get("init_args") or {}).items():
                out += _leaves(value, f"{prefix}.init_args.{key}")
        return out
    if isinstance(node, dict) and prefix and "class_path" in node:
        out = [[f"--{prefix}={node['class_path']}"]]
        for key, value in (node.get("init_args") or {}).items():
            out += _leaves(value, f"{prefix}.init_args.{key}")
        return out
    if isinstance(node, dict) and node:
        return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}.{key}" if prefix else key)]
    shown = node if isinstance(node, str) else json.dumps(node)
    return [[f"--{prefix}={shown}"]] if prefix else []


def _missing_config(groups: list[list[str]]) -> str | None:
    for group in groups:
        key, value = _key_value(group)
        if key in ("config", "c") and value is not None and not Path(value).is_file():
            try:
                inline = isinstance(yaml.safe_load(value), dict)
            except yaml.YAMLError:
                inline = False
            if not inline:
                return f"--config={value}: no such file ({Path(value).absolute()})"
    return None


def _resolve(class_path: str) -> Any:
    from lightning_sparse.run.resolve import resolve_class  # on first use: the module commands parse without it

    return resolve_class(class_path)


def _child(node: Any, key: str) -> Any:
    return vars(node).get(key) if isinstance(node, Namespace) else None


def describe_type(hint: Any) -> str:
    """``float`` -> ``float``; ``Optional[int]`` -> ``int or None``; ``Literal['a', 'b']`` -> ``one of ['a', 'b']``."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return f"one of {list(typing.get_args(hint))}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_type(a) for a in typing.get_args(hint)))
    if hint is type(None) or hint is None:
        return "None"
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: take the signature's as written
        return {n: p.annotation for n, p in inspect.signature(cls).parameters.items()}


def _explain(key: str, value: str | None, parsed: Any, sections: dict[str, type], bases: dict[str, type],
             prog: str, subcommands: tuple[str, ...] = (), positional: bool = False,
             options: Options | None = None) -> str:
    """What is wrong with ``--key=value``, from the class that the rest of the arguments configure (or, for a
    module command's own options, from ``options``)."""
    if options is not None and not positional and "." not in key:
        return _explain_option(key, value, prog, options)
    parts, node, cls, at = key.split("."), parsed, None, 0
    for i, part in enumerate(parts):  # the deepest class on the key's path
        node = _child(node, part)
        if isinstance(node, list) and node:  # a list of classes: an option applies to its last item (``+=``)
            node = node[-1]
        if node is None:
            break
        class_path = _child(node, "class_path")
        if isinstance(class_path, str):
            cls, at = class_path, i + 1
            node = _child(node, "init_args") if parts[i + 1:i + 2] != ["init_args"] else node
        elif ".".join(parts[:i + 1]) in sections:
            cls, at = sections[".".join(parts[:i + 1])], i + 1
    rest = [p for p in parts[at:] if p != "init_args"] if cls is not None else parts
    section = ".".join(parts[:at])
    shown = lambda path: f"{path}={value}" if value is not None else path  # noqa: E731
    if positional and not subcommands:
        return f"{key}: unexpected argument (options: {prog} --help)"
    if positional:
        return f"{key}: unknown subcommand or argument (subcommands: {', '.join(subcommands)}; options: {prog} --help)"
    if cls is None and key in bases and value is not None:
        cls, at, rest, section = None, len(parts), [], key
    elif cls is None:
        known = [k for k in vars(parsed) if not k.startswith("_")] if isinstance(parsed, Namespace) else []
        if parts[0] not in known:
            close = difflib.get_close_matches(parts[0], known, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            return f"--{key}: unknown option{hint} (options: {prog} --help)"
        return f"{shown(key)}: not accepted (options: {prog} --help)"
    if not rest and value is not None:  # a class path
        base = bases.get(section)
        try:
            chosen = _resolve(value)
        except (ImportError, AttributeError, ValueError) as err:
            return f"{shown(section)}: cannot import it ({err})"
        what = f"a subclass of {base.__module__}.{base.__qualname__}" if base is not None else "a class"
        if not isinstance(chosen, type) or (base is not None and not issubclass(chosen, base)):
            return f"{shown(section)}: not {what}"
        return f"{shown(section)}: refused (options: {prog} --help)"
    klass = _resolve(cls) if isinstance(cls, str) else cls
    name = f"{klass.__module__}.{klass.__qualname__}"
    path = f"{section}.init_args.{'.'.join(rest)}" if isinstance(cls, str) else f"{section}.{'.'.join(rest)}"
    params = inspect.signature(klass).parameters
    more = f"its arguments: --{section}.help {name}" if isinstance(cls, str) else f"options: {prog} --help"
    if rest[0] not in params:
        close = difflib.get_close_matches(rest[0], list(params), n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        return f"{shown(path)}: {klass.__name__} has no argument `{rest[0]}`{hint} ({more})"
    hint = _hints(klass).get(rest[0], params[rest[0]].annotation)
    expected = describe_type(hint) if hint is not inspect.Parameter.empty else "another value"
    return f"{shown(path)}: expected {expected} ({name}; {more})"


@dataclass(frozen=True)
class Options:
    """A module command's own options (``python -m lightning_sparse.export --batch_size 8``).

    Attributes:
        expected: ``{dest: what it accepts}``, e.g. ``{"batch_size": "int"}``.
        spelled: ``{option name without dashes: dest}`` for every name an option answers to
            (``{"batch-size": "batch_size", "batch_size": "batch_size"}``); the first name of a dest is shown.
        exclusive: the dests of each mutually exclusive group.
    """

    expected: Mapping[str, str]
    spelled: Mapping[str, str]
    exclusive: tuple[tuple[str, ...], ...] = ()

    def shown(self, dest: str) -> str:
        return "--" + next((name for name, d in self.spelled.items() if d == dest), dest)


def _explain_option(key: str, value: str | None, prog: str, options: Options) -> str:
    dest = options.spelled.get(key)
    if dest is None:
        close = difflib.get_close_matches(key, list(options.spelled), n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        return f"--{key}: unknown option{hint} (options: {prog} --help)"
    shown = f"--{key}={value}" if value is not None else f"--{key}"
    if dest in options.expected:
        return f"{shown}: expected {options.expected[dest]} (options: {prog} --help)"
    return f"{shown}: not accepted (options: {prog} --help)"


def _exclusive(groups: list[list[str]], prog: str, options: Options) -> str | None:
    """Two options of one mutually exclusive group: the line naming them."""
    for dests in options.exclusive:
        given = [g[0].partition("=")[0] for g in groups if options.spelled.get(_key_value(g)[0]) in dests]
        if len(given) > 1:
            allowed = ", ".join(options.shown(d) for d in dests)
            return f"{', '.join(given)}: give only one of {allowed} (options: {prog} --help)"
    return None


def parse_error_line(parse: Parse, argv: list[str], message: str, subcommands: tuple[str, ...],
                     sections: dict[str, type], bases: dict[str, type], prog: str,
                     options: Options | None = None) -> str:
    """One line for the arguments ``argv`` that ``parse`` refused with ``message``.

    Args:
        parse: parses a list of arguments (raises :class:`~jsonargparse.ArgumentError`).
        argv: the command line, without the program name.
        message: jsonargparse's message, shown (on one line) when no single argument is to blame.
        subcommands: the subcommand names (a leading one is kept in every retry).
        sections: ``{option: class}`` of class groups without a ``class_path`` (``trainer``, ...).
        bases: ``{option: base class}`` of the options that take a ``class_path``.
        prog: the program name for the ``--help`` hint.
        options: a module command's own options: what each accepts and the names it answers to.
    """
    lead, groups = option_groups(argv, subcommands)
    missing = _missing_config(groups)
    if missing:
        return missing
    groups = [g for g in groups if not _skipped(g)]
    conflict = _exclusive(groups, prog, options) if options is not None else None
    if conflict:
        return conflict
    sub = lead[0] if lead else None
    part = (lambda parsed: parsed[sub]) if sub else (lambda parsed: parsed)
    found = _leave_one_out(parse, lead, groups, range(len(groups)))
    if found is not None and not _is_config(groups[found[0]]):
        key, value = _key_value(groups[found[0]])
        positional = not groups[found[0]][0].startswith("-")
        return _explain(key, value, part(found[1]), sections, bases, prog, subcommands, positional, options)
    for i, group in enumerate(groups):  # an entry of a config file
        key, value = _key_value(group)
        if not _is_config(group) or value is None or not Path(value).is_file():
            continue
        leaves = _leaves(yaml.safe_load(Path(value).read_text()), "")
        expanded = groups[:i] + leaves + groups[i + 1:]
        found = _leave_one_out(parse, lead, expanded, range(i, i + len(leaves)))
        if found is not None:
            key, shown = _key_value(expanded[found[0]])
            return f"{_explain(key, shown, part(found[1]), sections, bases, prog)} [in {value}]"
    return f"{' '.join(message.split())} (options: {prog} --help)"
