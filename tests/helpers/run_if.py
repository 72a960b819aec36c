"""``RunIf``: skip a test with a stated reason when the machine lacks what it needs."""

from __future__ import annotations

import pytest
import torch


def RunIf(min_gpus: int = 0, min_cuda_capability: tuple[int, int] | None = None) -> pytest.MarkDecorator:
    """Skip unless at least ``min_gpus`` CUDA GPUs (and, optionally, a minimum compute capability)."""
    reasons = []
    if min_gpus and torch.cuda.device_count() < min_gpus:
        reasons.append(f"needs {min_gpus} CUDA GPU(s), found {torch.cuda.device_count()}")
    elif min_cuda_capability and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        if cap < min_cuda_capability:
            reasons.append(f"needs compute capability >= {min_cuda_capability}, found {cap}")
    return pytest.mark.skipif(bool(reasons), reason="; ".join(reasons) or "requirements met")
