"""The one-line error every command ends with on bad input, and the exception that marks bad input.

``train.py``, ``python -m lightning_sparse.export``, ``.compare`` and ``.benchmark`` all answer bad input with
ONE line on stderr, ``<prog>: error: <what is wrong, the value, what is allowed>``, and exit code 2 (the
usage-error code of argparse and jsonargparse). A bug keeps its traceback: only what a check raised as
:class:`InputError` (or, in ``train.py``, a configured object's input error located in the config) is shortened.
``JSONARGPARSE_DEBUG=true`` shows the full traceback of an input error too.
"""

from __future__ import annotations

import os
import sys

__all__ = ["BadValue", "InputError", "debug", "fail"]


class InputError(ValueError):
    """A command's input is wrong (a missing or foreign checkpoint, a folder that is not a run, an argument
    out of range): the message names the value and what is allowed. A ``ValueError``, so library callers
    catch it as before; the command-line tools print it as one line (exit code 2)."""


class BadValue(SystemExit):
    """Exit code 2 after one printed line (the CLI's usage-error code, as jsonargparse uses)."""


def debug() -> bool:
    """``JSONARGPARSE_DEBUG`` is set: show tracebacks, not one line."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false")


def fail(prog: str, line: str) -> BadValue:
    """Print ``<prog>: error: <line>`` on stderr and return the exit-code-2 exception to raise."""
    sys.stderr.write(f"{prog}: error: {' '.join(str(line).split())}\n")
    sys.stderr.flush()
    return BadValue(2)
