"""``python -m lightning_sparse.compare <run dirs or globs> --out <dir> [--wandb]`` (see the package docstring).

The parser is jsonargparse's, built from :func:`lightning_sparse.compare.compare`'s signature and docstring,
so every option is typed, documented in ``--help`` and can also come from ``--config file.yaml``.
"""

from __future__ import annotations

from jsonargparse import ActionYesNo, ArgumentParser

from lightning_sparse.compare import compare


def main(args: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m lightning_sparse.compare", description=compare.__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+",
                        help="run directories (runs/<name>/version_N, or runs/<name> for the latest) or glob patterns")
    parser.add_function_arguments(compare, skip={"runs", "wandb", "timing"})
    parser.add_argument("--wandb", action=ActionYesNo, default=False,
                        help="also log the table and figures to W&B (offline by default)")
    parser.add_argument("--timing", action=ActionYesNo, default=True, help="measure CPU latency/throughput (--no_timing: skip)")
    cfg = parser.parse_args(args)
    try:
        compare(**cfg.as_dict())
    except ValueError as err:  # bad input (no runs, a path that is not a run): one line, exit code 2
        parser.error(str(err))


if __name__ == "__main__":
    main()
