"""The front the module commands share: ``python -m lightning_sparse.export``, ``.compare`` and ``.benchmark``.

Each builds its parser with :func:`command_parser` (jsonargparse, as ``train.py``'s: ``exit_on_error=False``
so a refused argument is raised, ``allow_abbrev=False`` so no option is matched by a prefix) and runs with
:func:`run_command`, which answers bad input as ``train.py`` does: ONE line on stderr,
``<prog>: error: ...`` (:func:`lightning_sparse.utils.errors.fail`), exit code 2.

- an argument the parser refused (unknown or abbreviated option, a value of the wrong type, a missing one):
  the line names the option and what it accepts (:func:`lightning_sparse.cli.parse_errors.parse_error_line`,
  the code that explains ``train.py``'s);
- an :class:`~lightning_sparse.utils.errors.InputError` raised while the command runs (a missing, unreadable
  or foreign checkpoint, a folder that is not a run, an ``--out`` that would be overwritten): its message;
- anything else is a bug and keeps its traceback; ``JSONARGPARSE_DEBUG=true`` shows tracebacks for input errors too.
"""

from __future__ import annotations

import inspect
import typing
from argparse import Action
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from jsonargparse import ArgumentError, ArgumentParser, Namespace

from lightning_sparse.cli.parse_errors import Options, describe_type, parse_error_line
from lightning_sparse.utils.errors import InputError, debug, fail

__all__ = ["command_options", "command_parser", "run_command"]

T = TypeVar("T")


def command_parser(prog: str, description: str) -> ArgumentParser:
    """A jsonargparse parser with the project's settings (module docstring)."""
    return ArgumentParser(prog=prog, description=description, exit_on_error=False, allow_abbrev=False)


def command_options(actions: Iterable[Action] = (), function: Callable[..., Any] | None = None,
                    skip: Iterable[str] = (), expected: Mapping[str, str] | None = None,
                    exclusive: Iterable[Iterable[Action]] = ()) -> Options:
    """What a command's options accept and the names they answer to, for its one-line errors.

    Args:
        actions: the ``Action`` each ``add_argument`` returned; what one accepts is its ``choices``, else its
            ``type``, else its ``metavar``.
        function: a function added with ``add_function_arguments``: one option per argument, what it accepts
            from the annotation (``int``, ``float or None``, ...).
        skip: arguments of ``function`` that are not options (positionals, options added as actions).
        expected: ``{dest: what it accepts}`` where the above cannot tell (jsonargparse turns ``type=int`` into
            a type hint an ``Action`` does not show).
        exclusive: the actions of each mutually exclusive group (two of one group: one line naming them).
    """
    overrides = dict(expected or {})
    expected = {}
    spelled: dict[str, str] = {}
    if function is not None:
        hints = typing.get_type_hints(function)
        for name in inspect.signature(function).parameters:
            if name not in set(skip):
                spelled[name] = name
                if name in hints:
                    expected[name] = describe_type(hints[name])
    for action in actions:
        for option in action.option_strings:
            spelled[option.lstrip("-")] = action.dest
        if not action.option_strings:
            continue
        many = " (one or more)" if action.nargs == "+" else ""
        if action.choices is not None:
            expected[action.dest] = f"one of {list(action.choices)}{many}"
        elif isinstance(action.type, type):
            expected[action.dest] = f"{action.type.__name__}{many}"
        elif isinstance(action.metavar, str):
            expected[action.dest] = f"{action.metavar}{many}"
    return Options(expected={**expected, **overrides}, spelled=spelled,
                   exclusive=tuple(tuple(a.dest for a in group) for group in exclusive))


def run_command(prog: str, parser: ArgumentParser, argv: list[str], body: Callable[[Namespace], T],
                options: Options) -> T:
    """Parse ``argv`` and call ``body`` with the result; bad input ends with one line and exit code 2.

    Raises:
        BadValue: (``SystemExit(2)``) after printing the line.
    """
    try:
        cfg = parser.parse_args(argv)
    except ArgumentError as err:
        if debug():
            raise
        raise fail(prog, parse_error_line(parser.parse_args, argv, str(err), (), {}, {}, prog, options)) from None
    try:
        return body(cfg)
    except InputError as err:
        if debug():
            raise
        raise fail(prog, str(err)) from None
