"""Read an offline W&B transaction log (``run-*.wandb``) once W&B's service has written it.

``run.finish()`` returns before the service has necessarily completed the file (on a loaded machine it was
once only its 7-byte header), so a test that reads it in the same process waits for what it expects, up to
a limit, and then fails with what the file held.
"""

from __future__ import annotations

import time
from pathlib import Path


def wandb_record(path: Path, *expected: bytes, timeout: float = 60.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        data = path.read_bytes()
        if all(e in data for e in expected) or time.monotonic() > deadline:
            return data
        time.sleep(0.2)
