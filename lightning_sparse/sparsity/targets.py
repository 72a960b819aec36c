"""Which weights a sparsity method acts on: one selection function and one error format for all of them.

A *candidate* is a Parameter with >= 2 dims that a matmul or a convolution consumes: the ``weight`` of
every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (timm's ``Conv2dSame``/``StdConv2d`` and ViT ``qkv``/``proj``/
``fc1``/``fc2`` included), and the projections ``nn.MultiheadAttention`` holds as plain Parameters
(``in_proj_weight``, or ``q/k/v_proj_weight``) — ``out_proj`` is an ``nn.Linear``. Embeddings, position
embeddings, class tokens and norms are not candidates by default; an ``include`` pattern can add any
other Parameter with >= 2 dims (e.g. ``"*embed*"``) where that makes sense for the method.

Patterns are fnmatch patterns over ``named_parameters()`` names (``*`` also matches dots). A pattern
that matches nothing is an error naming it and listing candidates; an ``exclude`` pattern that matches only
weights the first/last rule already keeps dense changes nothing and is reported in an info line.

Example:
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Embedding(10, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 4))
    >>> candidate_weights(net)
    ['1.in_proj_weight', '1.out_proj.weight', '2.weight']
    >>> select_targets(net).names  # first and last candidate stay dense by default
    ['1.out_proj.weight']
    >>> select_targets(net, include=["0.*", "2.*"]).names
    ['0.weight', '2.weight']
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

__all__ = ["MATMUL_MODULES", "candidate_weights", "select_targets", "Selection"]

MATMUL_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
_log = logging.getLogger(__name__)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def candidate_weights(module: nn.Module) -> list[str]:
    """Names of every matmul/conv weight of ``module``, in ``named_parameters()`` order."""
    found = set()
    for mod_name, mod in module.named_modules():
        if isinstance(mod, MATMUL_MODULES) and isinstance(getattr(mod, "weight", None), nn.Parameter):
            found.add(_join(mod_name, "weight"))
        elif isinstance(mod, nn.MultiheadAttention):
            found.update(_join(mod_name, a) for a in _ATTENTION_WEIGHTS if isinstance(getattr(mod, a, None), nn.Parameter))
    return [n for n, p in module.named_parameters() if n in found and p.dim() >= 2]


@dataclass
class Selection:
    """The outcome of :func:`select_targets`: chosen names and why others were left out."""

    names: list[str]
    excluded_first_last: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the log: how many weights, the ones the first/last rule kept dense, and notes."""
        text = f"{len(self.names)} weights"
        if self.excluded_first_last:
            text += f" (kept dense as first/last: {', '.join(self.excluded_first_last)})"
        return "; ".join([text, *self.notes])


def _shown(names: Sequence[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in total)" if len(names) > limit else "")


def select_targets(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    *,
    first_last: bool = True,
    owner: str = "sparsity",
) -> Selection:
    """Pick the weights a sparsity method acts on.

    Args:
        module: the model (any ``nn.Module``; a LightningModule's names are what its checkpoint uses).
        include: fnmatch patterns; when given, the targets are the candidates **and any other Parameter
            with >= 2 dims** that match one (the first/last rule is then off).
        exclude: fnmatch patterns removing names from the selection.
        first_last: without ``include``, keep the first and the last candidate (in registration order:
            for timm CNNs the stem conv and the classifier) dense when there are more than two.
        owner: the callback's name, for messages.

    An ``exclude`` pattern that matches only the weights the first/last rule keeps dense is a no-op; the
    returned :class:`Selection` says so in ``notes`` (also logged at INFO).

    Raises:
        ValueError: no candidate at all, or an include/exclude pattern that matches no parameter.
    """
    candidates = candidate_weights(module)
    if not candidates:
        raise ValueError(
            f"{type(module).__name__} has no Conv/Linear/attention weight to make sparse; {owner} needs at least one."
        )
    matrices = [n for n, p in module.named_parameters() if p.dim() >= 2]
    for arg, patterns, pool in (("include", include, matrices), ("exclude", exclude, matrices)):
        missing = [p for p in patterns or [] if not fnmatch.filter(pool, p)]
        if missing:
            raise ValueError(
                f"{owner}: `{arg}` pattern(s) {missing} match no weight with >= 2 dims; "
                f"candidates are: {_shown(candidates)}."
            )
    excluded: list[str] = []
    if include is not None:
        names = [n for n in matrices if any(fnmatch.fnmatchcase(n, p) for p in include)]
    elif first_last and len(candidates) > 2:
        names, excluded = candidates[1:-1], [candidates[0], candidates[-1]]
    else:
        names = list(candidates)
    names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude or [])]
    notes = []
    redundant = [p for p in exclude or [] if set(fnmatch.filter(matrices, p)) <= set(excluded)]
    if redundant:  # e.g. exclude=["*.fc.weight"] while the classifier is already the dense last layer
        notes.append(f"{owner}: `exclude` pattern(s) {redundant} match only weights the first/last rule already "
                     f"keeps dense ({_shown(excluded)}); nothing more is excluded")
        _log.info(notes[-1])
    return Selection(names, excluded, notes)
