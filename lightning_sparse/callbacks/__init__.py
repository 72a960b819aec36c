"""Lightning Callbacks that do all mask work. Each works on any LightningModule.

Callbacks are imported on first use, so ``from lightning_sparse.callbacks import NMSparsity`` does not
pull in the optional dependencies of the others (Chase needs Torch-Pruning; the 2:4 benchmark needs
only torch and runs on machines that have nothing else installed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_sparse.callbacks._base import MaskProvider, MaskSource, MaskSourceInfo

if TYPE_CHECKING:  # pragma: no cover
    from lightning_sparse.callbacks.chase import Chase
    from lightning_sparse.callbacks.dst import DynamicSparsity
    from lightning_sparse.callbacks.gmp import GradualMagnitudePruning
    from lightning_sparse.callbacks.nm import NMSparsity
    from lightning_sparse.callbacks.one_shot import OneShotPruning
    from lightning_sparse.callbacks.sad import SADTracker
    from lightning_sparse.callbacks.semi_structured import SemiStructuredBenchmark

_MODULES = {
    "Chase": "chase",
    "DynamicSparsity": "dst",
    "GradualMagnitudePruning": "gmp",
    "NMSparsity": "nm",
    "OneShotPruning": "one_shot",
    "SADTracker": "sad",
    "SemiStructuredBenchmark": "semi_structured",
}

__all__ = ["MaskProvider", "MaskSource", "MaskSourceInfo", *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
