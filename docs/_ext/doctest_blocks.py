"""Griffe extension for the API reference: doctest examples in docstrings render as code blocks.

The docstrings write their examples under ``Example:`` (a Google-style admonition, whose text is Markdown),
so a ``>>>`` session would otherwise be read as a quote with link references in it. Every run of lines that
starts with a ``>>>`` prompt and ends at the next blank line becomes a fenced ``pycon`` block.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

PROMPT = re.compile(r"^(\s*)>>> ")


def fence_doctests(text: str) -> str:
    """``text`` with every doctest session fenced as a ``pycon`` code block, at the session's indentation."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        prompt = PROMPT.match(lines[i])
        if prompt is None:
            out.append(lines[i])
            i += 1
            continue
        indent = prompt.group(1)
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Fences the doctest sessions of every docstring the API reference loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None and "```pycon" not in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
