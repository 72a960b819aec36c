"""What an export baked into its weights: N:M masks, unstructured masks, slimmed channels — only what is true.

Read from the loaded run and its exported network, never from the method's name: N:M from the layers whose
masks the loader baked (:attr:`RunModel.nm`), unstructured masks from the weights a mask callback's state
masks (:attr:`RunModel.masked`, counted on the exported weights), slimmed channels by comparing every
conv's output channels with the dense architecture's.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_sparse.run import RunModel

__all__ = ["baked_contents", "describe_baked"]


def baked_contents(src: RunModel, dense: nn.Module) -> dict[str, Any]:
    """``{"nm": ..., "unstructured": ..., "slimmed": ...}``; each is ``None`` when the model has none of it.

    * ``nm``: ``{pattern: number of weights}``, e.g. ``{"2:4": 20}``;
    * ``unstructured``: ``{"weights", "numel", "nonzero"}`` over the masked weights of the exported network;
    * ``slimmed``: ``{"convs", "channels_removed", "channels_dense"}`` of the Conv2d output channels.

    Args:
        src: the loaded run (its ``model`` is the exported network).
        dense: a dense model of the same architecture (:meth:`RunModel.dense`).
    """
    nm: dict[str, int] = {}
    for pattern in src.nm.values():
        nm[str(pattern)] = nm.get(str(pattern), 0) + 1
    params = dict(src.model.named_parameters())
    masked = [params[name] for name in src.masked if name in params and name not in src.nm]
    unstructured = None
    if masked:
        unstructured = {"weights": len(masked), "numel": sum(p.numel() for p in masked),
                        "nonzero": sum(int(p.count_nonzero()) for p in masked)}
    slim_convs = {n: m for n, m in src.model.named_modules() if isinstance(m, nn.Conv2d)}
    removed, total = {}, 0
    for name, conv in dense.named_modules():
        if isinstance(conv, nn.Conv2d) and name in slim_convs:
            total += conv.out_channels
            if slim_convs[name].out_channels < conv.out_channels:
                removed[name] = conv.out_channels - slim_convs[name].out_channels
    slimmed = {"convs": len(removed), "channels_removed": sum(removed.values()), "channels_dense": total} if removed else None
    return {"nm": nm or None, "unstructured": unstructured, "slimmed": slimmed}


def describe_baked(baked: dict[str, Any]) -> list[str]:
    """One line per thing baked (the report's list); a dense model gets one line saying nothing was.

    Example:
        >>> describe_baked({"nm": {"2:4": 20}, "unstructured": None, "slimmed": None})
        ['N:M masks: 2:4 in 20 weights (exact zeros in the stored weights).']
        >>> describe_baked({"nm": None, "unstructured": None, "slimmed": None})
        ['Nothing baked: dense weights, every channel kept.']
    """
    lines = []
    if baked.get("nm"):
        patterns = ", ".join(f"{p} in {k} weights" for p, k in baked["nm"].items())
        lines.append(f"N:M masks: {patterns} (exact zeros in the stored weights).")
    if baked.get("unstructured"):
        u = baked["unstructured"]
        lines.append(f"Unstructured masks: {u['weights']} weights, {u['nonzero']:,} of {u['numel']:,} entries nonzero "
                     f"(density {u['nonzero'] / max(1, u['numel']):.3f}).")
    if baked.get("slimmed"):
        s = baked["slimmed"]
        lines.append(f"Slimmed channels: {s['channels_removed']:,} of {s['channels_dense']:,} conv output channels "
                     f"removed from {s['convs']} convs.")
    return lines or ["Nothing baked: dense weights, every channel kept."]
