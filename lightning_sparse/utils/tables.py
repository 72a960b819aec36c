"""Plain-text tables: aligned columns under a header and a dashed rule."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["text_table"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Columns padded to their widest cell, a dashed rule under the header, trailing spaces stripped.

    Example:
        >>> print(text_table(("layer", "eligible"), [("fc", "yes"), ("head.proj", "no")]))
        layer      eligible
        ---------  --------
        fc         yes
        head.proj  no
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
