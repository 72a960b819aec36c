"""Argument checks shared by every callback, with one message format.

- a choice: ``` `growth`='momentum' is not supported; choose one of ['gradient', 'random'].```
- a range:  ``` `density` must be in (0, 1), got density=1.5.```
- a bound:  ``` `update_interval` (ΔT, in steps) must be an int >= 1, got update_interval=0.```

The message names the argument, quotes the bad value and says what is allowed.

Example:
    >>> check_range("density", 0.5, 0, 1)
    >>> check_choice("growth", "momentum", ("gradient", "random"))
    Traceback (most recent call last):
    ...
    ValueError: `growth`='momentum' is not supported; choose one of ['gradient', 'random'].
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["check_choice", "check_range", "check_patterns"]


def _label(name: str, what: str | None) -> str:
    return f"`{name}` ({what})" if what else f"`{name}`"


def check_choice(name: str, value: Any, choices: Iterable[Any], hint: str | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``.

    Args:
        name: the argument's name as the user writes it.
        value: the value given.
        choices: the allowed values (listed in the message).
        hint: optional text appended in parentheses, e.g. what each choice means.
    """
    allowed = list(choices)
    if value not in allowed:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"`{name}`={value!r} is not supported; choose one of {allowed}{extra}.")


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
    integer: bool = False,
    what: str | None = None,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in the interval (a bool is never a number here).

    Args:
        name: the argument's name.
        value: the value given.
        low: lower bound (``None``: unbounded).
        high: upper bound (``None``: unbounded).
        low_inclusive: ``[low`` instead of ``(low``.
        high_inclusive: ``high]`` instead of ``high)``.
        integer: also require an ``int``.
        what: a short description shown after the name, e.g. ``"ΔT, in steps"``.

    Example:
        >>> check_range("minimum_ratio", 0.0, 0, 1, high_inclusive=True, what="β")
        Traceback (most recent call last):
        ...
        ValueError: `minimum_ratio` (β) must be in (0, 1], got minimum_ratio=0.0.
    """
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if ok and high is not None:
        ok = value <= high if high_inclusive else value < high
    if ok:
        return
    if low is not None and high is not None:
        rule = f"in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
    elif low is not None:
        rule = f"{'>=' if low_inclusive else '>'} {low:g}"
    elif high is not None:
        rule = f"{'<=' if high_inclusive else '<'} {high:g}"
    else:
        rule = "a number"
    prefix = "an int " if integer else ""
    raise ValueError(f"{_label(name, what)} must be {prefix}{rule}, got {name}={value!r}.")


def check_patterns(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``None`` or a list of fnmatch pattern strings."""
    if value is not None and (isinstance(value, str) or not all(isinstance(p, str) for p in value)):
        raise ValueError(f"`{name}` must be a list of fnmatch patterns (str) or None, got {name}={value!r}.")
