"""``python -m lightning_sparse.export <checkpoint> --out <dir> [options]`` (see :func:`export_checkpoint`).

Options are the arguments of :func:`~lightning_sparse.export.export_checkpoint` (jsonargparse):
``--out``, ``--batch_size``, ``--image_size``, ``--threads``, ``--reps``, ``--warmup``, ``--no_bench``,
``--overwrite``, ``--atol``. Dashes work too (``--batch-size``), and a flag given alone means true
(``--no-bench`` = ``--no_bench true``).
"""

from __future__ import annotations

import inspect
import sys

from jsonargparse import auto_cli

from lightning_sparse.export.exporter import export_checkpoint

_FLAGS = ("no_bench", "overwrite")


def _normalise(argv: list[str]) -> list[str]:
    """``--batch-size 8`` -> ``--batch_size 8``; a bare ``--no-bench`` / ``--overwrite`` -> ``... true``."""
    known = set(inspect.signature(export_checkpoint).parameters)
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--") and not arg.startswith("---"):
            name, eq, value = arg[2:].partition("=")
            if name.replace("-", "_") in known:
                name = name.replace("-", "_")
                arg = f"--{name}{eq}{value}"
                following = argv[i + 1] if i + 1 < len(argv) else None
                if name in _FLAGS and not eq and (following is None or following.lower() not in ("true", "false")):
                    arg = f"--{name}=true"
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    path = auto_cli(export_checkpoint, args=_normalise(list(sys.argv[1:] if argv is None else argv)))
    print(f"wrote {path}/model.pt, model.onnx, report.md, report.json")
    print((path / "report.md").read_text())


if __name__ == "__main__":
    main()
