"""``python -m lightning_sparse.benchmark``: forwards to the 2:4 benchmark command,
:mod:`lightning_sparse.semi_structured.__main__`."""

import sys

from lightning_sparse.semi_structured.__main__ import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
