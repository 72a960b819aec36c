"""``python -m lightning_sparse.compare <run dirs or globs> --out <dir> [--wandb]`` (see the package docstring).

The parser is jsonargparse's, built from :func:`lightning_sparse.compare.compare`'s signature and docstring,
so every option is typed and documented in ``--help``. An option is never matched by a prefix.

Bad input (an unknown option, a value of the wrong type, a path that is not a run, a run whose checkpoint
cannot be read, an ``--out`` that is a file) ends with one line, ``python -m lightning_sparse.compare: error:
...``, and exit code 2 (:mod:`lightning_sparse.cli.commands`).
"""

from __future__ import annotations

import sys

from jsonargparse import ActionYesNo

from lightning_sparse.cli.commands import command_options, command_parser, run_command
from lightning_sparse.compare import compare

PROG = "python -m lightning_sparse.compare"


def main(args: list[str] | None = None) -> None:
    parser = command_parser(PROG, compare.__doc__.split("\n")[0])
    actions = [
        parser.add_argument("runs", nargs="+", help="run directories (runs/<name>/version_N, or runs/<name> for the "
                                                     "latest) or glob patterns"),
        parser.add_argument("--wandb", action=ActionYesNo, default=False,
                            help="also log the table and figures to W&B (offline by default)"),
        parser.add_argument("--timing", action=ActionYesNo, default=True,
                            help="measure CPU latency/throughput (--no_timing: skip)"),
    ]
    parser.add_function_arguments(compare, skip={"runs", "wandb", "timing"})
    options = command_options(actions, compare, skip={"runs", "wandb", "timing"})
    argv = list(sys.argv[1:] if args is None else args)
    run_command(PROG, parser, argv, lambda cfg: compare(**cfg.as_dict()), options)


if __name__ == "__main__":
    main()
