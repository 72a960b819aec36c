"""``python -m lightning_sparse.export <checkpoint> --out <dir> [options]`` (see :func:`export_checkpoint`).

Options are the arguments of :func:`~lightning_sparse.export.export_checkpoint` (jsonargparse):
``--out``, ``--batch_size``, ``--image_size``, ``--threads``, ``--reps``, ``--warmup``, ``--no_bench``,
``--overwrite``, ``--atol``. Dashes work too (``--batch-size``), and a flag given alone means true
(``--no-bench`` = ``--no_bench true``). An option is never matched by a prefix (``--batch`` is unknown).

Bad input (an unknown option, a value of the wrong type, a missing, unreadable or foreign checkpoint, a
non-empty ``--out``) ends with one line, ``python -m lightning_sparse.export: error: ...``, and exit code 2
(:mod:`lightning_sparse.cli.commands`).
"""

from __future__ import annotations

import inspect
import sys

from lightning_sparse.cli.commands import command_options, command_parser, run_command
from lightning_sparse.export.exporter import export_checkpoint

PROG = "python -m lightning_sparse.export"

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
    parser = command_parser(PROG, export_checkpoint.__doc__.split("\n")[0])
    parser.add_function_arguments(export_checkpoint, as_positional=True)
    options = command_options(function=export_checkpoint, skip={"checkpoint"})
    args = _normalise(list(sys.argv[1:] if argv is None else argv))
    path = run_command(PROG, parser, args, lambda cfg: export_checkpoint(**cfg.as_dict()), options)
    print(f"wrote {path}/model.pt, model_sparse.pt, model.onnx, report.md, report.json")
    print((path / "report.md").read_text())


if __name__ == "__main__":
    main()
