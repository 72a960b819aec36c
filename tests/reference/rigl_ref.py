"""Independent PyTorch transcription of google-research/rigl's mask update (TF1 code).

Source: google-research/rigl @ d39fc7d46505cb3196cb1edeb32ed0b6dd44c0f9
  rigl/sparse_optimizers_base.py  SparseSETOptimizerBase / SparseRigLOptimizerBase
  rigl/sparse_utils.py            get_sparsities_erdos_renyi, get_mask_random_numpy, get_n_zeros

Plain torch, CPU, deterministic. TF ``top_k`` breaks ties by the lower index first; that
is reproduced with a *stable* descending sort. See tests/reference/README.md for quirks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "rigl_update",
    "rigl_update_layer",
    "rigl_drop_fraction",
    "is_update_iter",
    "rigl_step_semantics",
    "erk_densities",
    "erk_sparsities",
    "erk_mask_counts",
    "get_n_zeros",
]

State = Mapping[str, Tensor | Mapping[str, Tensor]]


def _tf_top_k_order(score: Tensor) -> Tensor:
    """Indices of ``score`` (flat) sorted descending, ties -> lower index first (TF top_k)."""
    return torch.sort(score.reshape(-1), descending=True, stable=True).indices


def rigl_update_layer(
    weight: Tensor,
    mask: Tensor,
    score_grow: Tensor,
    drop_fraction: float,
    state: Mapping[str, Tensor] | None = None,
    drop_noise: Tensor | None = None,
    reinit_when_same: bool = False,
    new_state_value: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One layer of ``SparseSETOptimizerBase._get_update_op`` (+ ``generic_mask_update``'s drop score).

    score_drop = |mask * weight| (+ drop_noise, the reference adds N(0, 1e-5) noise; None = no noise).
    n_prune = int32(float32(n_ones) * float32(drop_fraction)) (truncation = floor), n_keep = n_ones - n_prune.
    mask1 = top n_keep of score_drop over ALL positions; score_grow of mask1 positions is lifted to
    min(score_grow) - 1; mask2 = top n_prune of that (so the just-dropped positions are candidates).
    new connections = mask2 & (old mask == 0) (or mask2 alone if reinit_when_same) -> weight 0
    ('zeros' grow_init) and every optimizer slot set to ``new_state_value`` (0 by default; RigL's
    reset_momentum writes masked_grad * initial_acc_scale there).
    Returns (new_mask [dtype of mask], new_weight, new_state).
    """
    shape = weight.shape
    mask_f = mask.to(torch.float32)
    score_drop = (mask_f * weight).abs()
    if drop_noise is not None:
        score_drop = score_drop + drop_noise
    n_total = score_drop.numel()
    n_ones = int(mask_f.sum().item())
    df32 = torch.tensor(drop_fraction, dtype=torch.float32)
    n_prune = int((torch.tensor(float(n_ones), dtype=torch.float32) * df32).item())  # cast to int32 truncates
    n_keep = n_ones - n_prune

    order = _tf_top_k_order(score_drop)
    mask1 = torch.zeros(n_total, dtype=torch.float32)
    mask1[order[:n_keep]] = 1.0

    sg = score_grow.reshape(-1)
    lifted = torch.where(mask1 == 1, torch.ones_like(sg) * (sg.min() - 1), sg)
    order2 = _tf_top_k_order(lifted)
    mask2 = torch.zeros(n_total, dtype=torch.float32)
    mask2[order2[:n_prune]] = 1.0
    assert float((mask1 * mask2).sum()) == 0.0, "masks not disjoint (reference Assert)"

    mask2r = mask2.reshape(shape)
    if reinit_when_same:
        new_conn = mask2r == 1
    else:
        new_conn = (mask2r == 1) & (mask_f == 0)
    new_weight = torch.where(new_conn, torch.zeros_like(weight), weight)  # grow_init='zeros'
    new_state: dict[str, Tensor] = {}
    for k, v in (state or {}).items():
        fill = torch.zeros_like(v) if new_state_value is None else new_state_value.to(v.dtype)
        new_state[k] = torch.where(new_conn, fill, v)
    new_mask = (mask1 + mask2).reshape(shape).to(mask.dtype)
    return new_mask, new_weight, new_state


def rigl_update(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    grads: Mapping[str, Tensor] | None,
    drop_fraction: float,
    growth: str = "gradient",
    rand: Mapping[str, Tensor] | None = None,
    opt_state: State | None = None,
    drop_noise: Mapping[str, Tensor] | None = None,
    initial_acc_scale: float = 0.0,
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, object]]:
    """ONE mask update of all layers, as ``cond_mask_update_op``'s ``mask_update_op`` runs it.

    growth='gradient' (SparseRigLOptimizerBase.generic_mask_update): score_grow = |grads[name]|, where
    grads must be the gradient w.r.t. the MASKED weight (dense; ``compute_gradients(var_list=masked_weights)``).
    New connections' slots := grads * initial_acc_scale (0 by default) -- RigL's reset_momentum.
    growth='random' (SET, SparseSETOptimizerBase.generic_mask_update): score_grow = rand[name] (the
    reference draws stateless U[0,1)); new connections' slots := 0.
    opt_state: name -> Tensor (a single slot, e.g. momentum) or name -> {slot_name: Tensor}; the
    returned state has the same structure. Layers are independent (no redistribution).
    """
    if growth not in ("gradient", "random"):
        raise ValueError(growth)
    new_masks: dict[str, Tensor] = {}
    new_weights: dict[str, Tensor] = {}
    new_state: dict[str, object] = {}
    for name, w in weights.items():
        m = masks[name]
        if growth == "gradient":
            assert grads is not None
            score_grow = grads[name].abs()
            fill = grads[name] * initial_acc_scale
        else:
            assert rand is not None, "SET growth needs a random score tensor per layer"
            score_grow = rand[name]
            fill = None
        st = None if opt_state is None else opt_state.get(name)
        single = isinstance(st, Tensor)
        slots = {"_": st} if single else (dict(st) if st is not None else {})
        nm, nw, ns = rigl_update_layer(
            w, m, score_grow, drop_fraction, slots,
            drop_noise=None if drop_noise is None else drop_noise.get(name),
            new_state_value=fill,
        )
        new_masks[name], new_weights[name] = nm, nw
        if st is not None:
            new_state[name] = ns["_"] if single else ns
    return new_masks, new_weights, new_state


def _extract_number(token: str) -> float:
    """sparse_optimizers_base.extract_number: trailing ``_<float>`` of a token, else 1."""
    m = re.compile(r".*_(\d*\.?\d*)$").search(token)
    return float(m.group(1)) if m else 1.0


def rigl_drop_fraction(step: int, begin: int, end: int, alpha: float, anneal: str = "cosine") -> float:
    """``SparseSETOptimizerBase.get_drop_fraction`` (value on an update iteration; else the op gives 0).

    alpha: the initial drop fraction. 'cosine' is TF's cosine_decay(alpha, global_step, end - begin)
    with TF alpha=0: alpha * 0.5 * (1 + cos(pi * min(step, d) / d)), d = end - begin -- NOTE the raw
    global_step is used, not step - begin. Computed in float32 like TF (may differ by ~1 ulp of cos).
    'constant': alpha. 'exponential[_p]': alpha * (1 - (step-begin)/(end-begin)) ** p (p from the name, default 1).
    """
    if anneal == "constant":
        return float(torch.tensor(alpha, dtype=torch.float32))
    if anneal == "cosine":
        f32 = torch.float32
        d = torch.tensor(float(end - begin), dtype=f32)
        gs = torch.minimum(torch.tensor(float(step), dtype=f32), d)
        frac = gs / d
        cosd = 0.5 * (1.0 + torch.cos(torch.tensor(math.pi, dtype=f32) * frac))
        decayed = (1 - 0.0) * cosd + 0.0
        return float(torch.tensor(alpha, dtype=f32) * decayed)
    if anneal.startswith("exponential"):
        p = _extract_number(anneal)
        power = float(step - begin) / float(end - begin)
        return float(torch.tensor(alpha, dtype=torch.float32) * torch.tensor((1 - power) ** p, dtype=torch.float32))
    raise ValueError(f"drop_fraction_anneal: {anneal} is not valid")


def is_update_iter(step: int, begin: int, end: int, frequency: int, last_update: int | None = None) -> bool:
    """``SparseSETOptimizerBase.is_mask_update_iter``.

    begin <= step and (step <= end or end < 0) and last_update + frequency <= step, where
    last_update is the step of the previous mask update, initialised to -frequency (None here).
    """
    if last_update is None:
        last_update = -frequency
    in_range = step >= begin and (step <= end or end < 0)
    return bool(in_range and last_update + frequency <= step)


def rigl_step_semantics(method: str, step: int, begin: int, end: int, frequency: int,
                        last_update: int | None = None) -> dict[str, object]:
    """What one ``apply_gradients(global_step=gs)`` call does (SparseSET/SparseRigLOptimizerBase).

    RigL: the condition reads the pre-increment global step; on an update iteration ONLY the masks
    change (no optimizer step, global_step NOT incremented -- that batch's gradient is used only as
    the grow score); otherwise the wrapped optimizer steps and global_step += 1.
    SET: the wrapped optimizer steps first (global_step += 1), then the condition reads the
    POST-increment step and the mask update (if any) follows the weight update.
    Returns dict(step_seen, mask_update, optimizer_step, next_global_step, drop_fraction_step).
    """
    if method == "rigl":
        upd = is_update_iter(step, begin, end, frequency, last_update)
        return dict(step_seen=step, mask_update=upd, optimizer_step=not upd,
                    next_global_step=step if upd else step + 1, drop_fraction_step=step)
    if method == "set":
        seen = step + 1
        upd = is_update_iter(seen, begin, end, frequency, last_update)
        return dict(step_seen=seen, mask_update=upd, optimizer_step=True,
                    next_global_step=seen, drop_fraction_step=seen)
    raise ValueError(method)


def get_n_zeros(size: int, sparsity: float) -> int:
    """sparse_utils.get_n_zeros: int(floor(sparsity * size))."""
    return int(math.floor(sparsity * size))


def erk_sparsities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    include_kernel: bool = True,
    erk_power_scale: float = 1.0,
    sparsity: float | None = None,
) -> dict[str, float]:
    """``sparse_utils.get_sparsities_erdos_renyi`` (no custom map): per-layer SPARSITY as the reference returns it.

    default_sparsity = 1 - density unless ``sparsity`` is given (the reference's flag is a sparsity).
    Budget per layer n_ones = N - floor(s * N). raw prob = (sum(shape)/prod(shape)) ** power
    (include_kernel=True, 'erdos_renyi_kernel'); include_kernel=False uses shape[-2:] as
    (n_in, n_out) -- TF kernel layout [.., in, out]. Each round, EVERY layer whose raw prob equals
    the max is made dense when eps * max > 1.
    """
    s = (1.0 - density) if sparsity is None else sparsity
    dense: set = set()
    while True:
        divisor = 0.0
        rhs = 0.0
        raw: dict[str, float] = {}
        for name, shp in shapes.items():
            n_param = int(math.prod(shp))
            n_zeros = get_n_zeros(n_param, s)
            if name in dense:
                rhs -= n_zeros
            else:
                rhs += n_param - n_zeros
                if include_kernel:
                    raw[name] = (float(sum(shp)) / float(n_param)) ** erk_power_scale
                else:
                    n_in, n_out = shp[-2:]
                    raw[name] = (n_in + n_out) / (n_in * n_out)
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            for name, p in raw.items():
                if p == max_prob:
                    dense.add(name)
        else:
            break
    out: dict[str, float] = {}
    for name in shapes:
        out[name] = 0.0 if name in dense else 1.0 - eps * raw[name]
    return out


def erk_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    include_kernel: bool = True,
    erk_power_scale: float = 1.0,
    sparsity: float | None = None,
) -> dict[str, float]:
    """Densities of ``get_sparsities_erdos_renyi``: 1 - sparsity (1.0 for layers made dense), see erk_sparsities."""
    sp = erk_sparsities(shapes, density, include_kernel, erk_power_scale, sparsity)
    return {k: (1.0 if v == 0.0 else 1.0 - v) for k, v in sp.items()}


def erk_mask_counts(shapes: Mapping[str, Sequence[int]], density: float, **kw: object) -> dict[str, int]:
    """Active count per layer of a mask made by ``get_mask_random_numpy`` with the ERK sparsities:
    n_ones = N - floor(layer_sparsity * N), layer_sparsity = 1 - eps * raw_prob (exactly as computed)."""
    sp = erk_sparsities(shapes, density, **kw)  # type: ignore[arg-type]
    return {name: int(math.prod(shp)) - get_n_zeros(int(math.prod(shp)), sp[name]) for name, shp in shapes.items()}
