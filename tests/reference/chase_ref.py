"""Independent PyTorch transcription of luuyin/chase ImageNet ``Masking`` update math (CPU, no cuda).

Source: luuyin/chase @ 6190eb8fcb79d87b3972b123eb25933790328622
  Imagenet/core.py  Masking.{step, apply_mask, update_filter_mask, gather_statistics, update_erk_dic,
                    magnitude_death, global_magnitude_death, gradient_growth, global_gradient_growth,
                    truncate_weights_prune, truncate_weights_grow, truncate_weights, prune_score,
                    del_layer, del_func, gradual_pruning_rate, init('ERK')}, CosineDecay
  Imagenet/main.py  CosineDecay(prune_rate + density, len(loader)*(total_epochs-stop_dst_epochs), density+0.005)

State is keyed by parameter name. Channel structure: ``pairs`` maps an ACTIVE layer (whose output
channels / filters are removed, the reference's ``layer2split``) to its PASSIVE layer (whose input
channels are removed, ``next_layers[active][0]``); ``alive[active]`` is the reference's
``filter_names[active]`` (which is the very same tensor object as ``passive_names[passive]``).
Quirks are kept unless a flag says otherwise; see tests/reference/README.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .chase_ref_channels import ChannelRemovalRef
from .chase_ref_schedule import (
    CosineDecay,
    StepEvents,
    chase_erk_densities,
    cosine_decay_closed,
    gradual_pruning_rate,
    minimum_layer,
    step_events,
)

__all__ = [
    "ChaseRef",
    "CosineDecay",
    "cosine_decay_closed",
    "gradual_pruning_rate",
    "minimum_layer",
    "chase_erk_densities",
    "StepEvents",
    "step_events",
]


# ----------------------------------------------------------------------------- Masking math
@dataclass
class ChaseRef(ChannelRemovalRef):
    """State + update math of Imagenet/core.py ``Masking`` (one model, CPU tensors, keyed by name).

    weights / masks / grads / momentum: masked layers only (the reference removes biases and BN).
    pairs: active -> passive layer name; alive: active -> 0/1 float vector over its out channels.
    exact_count: gradient_growth / global_gradient_growth grow exactly the requested number (topk
    indices, ties -> lower flat index) instead of the reference's strict ``> threshold`` (one fewer).
    strict_errors: raise where the reference would crash (topk(k=0)[-1]) instead of a no-op.
    """

    weights: dict[str, Tensor]
    masks: dict[str, Tensor]
    grads: dict[str, Tensor] = field(default_factory=dict)
    momentum: dict[str, Tensor] = field(default_factory=dict)
    biases: dict[str, Tensor] = field(default_factory=dict)  # bias of an active layer (name = weight name)
    pairs: dict[str, str] = field(default_factory=dict)
    alive: dict[str, Tensor] = field(default_factory=dict)
    prune_mode: str = "magnitude"
    growth_mode: str = "gradients"
    baseline_nonzero: float = 0.0
    total_params: int = 0
    density_dict: dict[str, float] = field(default_factory=dict)
    temp_mask: dict[str, Tensor] = field(default_factory=dict)
    exact_count: bool = False
    strict_errors: bool = False
    # filled by gather_statistics
    name2nonzeros: dict[str, float] = field(default_factory=dict)
    name2zeros: dict[str, float] = field(default_factory=dict)
    total_nonzero: float = 0
    total_zero: float = 0.0
    pruning_rate: dict[str, int] = field(default_factory=dict)
    filter_masks: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.masks = {k: v.float().clone() for k, v in self.masks.items()}
        self.alive = {k: v.float().clone() for k, v in self.alive.items()}
        if self.pairs:
            self.update_filter_mask()

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def from_erk(cls, weights: dict[str, Tensor], masks: dict[str, Tensor], density: float,
                 **kw: object) -> ChaseRef:
        """Masking.init('ERK') bookkeeping for GIVEN masks: total_params = sum numel, density_dict from
        chase_erk_densities, baseline_nonzero = sum density*numel (a float), temp_mask = masks.
        (The reference draws masks as rand < density; pass masks drawn however you like.)"""
        ref = cls(weights=weights, masks=masks, **kw)  # type: ignore[arg-type]
        ref.total_params = int(sum(m.numel() for m in ref.masks.values()))
        ref.density_dict = chase_erk_densities({k: tuple(v.shape) for k, v in ref.masks.items()}, density)
        ref.baseline_nonzero = float(sum(ref.density_dict[k] * m.numel() for k, m in ref.masks.items()))
        ref.temp_mask = copy.deepcopy(ref.masks)
        return ref

    @property
    def passive_alive(self) -> dict[str, Tensor]:
        """passive_names: passive -> the alive vector of its active layer (same tensor in the reference)."""
        return {p: self.alive[a] for a, p in self.pairs.items()}

    # -- masks ----------------------------------------------------------------------------
    def update_filter_mask(self) -> None:
        """Masking.update_filter_mask (+ the identical block of add_module): active rows AND passive columns."""
        fm: dict[str, Tensor] = {}
        for a in self.pairs:
            t = torch.ones_like(self.weights[a], dtype=torch.float32)
            t[~self.alive[a].bool()] = 0
            fm[a] = t
        for a, p in self.pairs.items():
            t = fm[p] if p in fm else torch.ones_like(self.weights[p], dtype=torch.float32)
            t = t.transpose(0, 1)
            t[~self.alive[a].bool()] = 0
            t = t.transpose(0, 1)
            fm[p] = t
        self.filter_masks = fm

    def apply_mask(self) -> None:
        """Masking.apply_mask: masks &= filter_masks; weight *= mask; momentum_buffer *= mask; bias *= alive."""
        for name in list(self.masks):
            if name in self.filter_masks:
                self.masks[name] = torch.logical_and(self.filter_masks[name], self.masks[name]).float()
        for name in self.masks:
            self.weights[name] = self.weights[name] * self.masks[name]
            if name in self.momentum:
                self.momentum[name] = self.momentum[name] * self.masks[name]
        for name in list(self.biases):
            if name in self.alive:
                self.biases[name] = self.biases[name] * self.alive[name]

    def _region(self, name: str, t: Tensor) -> Tensor:
        """t restricted to the filter-mask region (boolean index -> 1D), or t itself."""
        return t[self.filter_masks[name].bool()] if name in self.filter_masks else t

    def gather_statistics(self) -> None:
        """Masking.gather_statistics: nonzeros / zeros counted inside the filter-mask region only."""
        self.name2nonzeros, self.name2zeros = {}, {}
        self.total_nonzero, self.total_zero = 0, 0.0
        for name in self.masks:
            m = self._region(name, self.masks[name])
            nz = m.sum().item()
            self.name2nonzeros[name] = nz
            self.name2zeros[name] = m.numel() - nz
            self.total_nonzero += nz
            self.total_zero += self.name2zeros[name]

    def update_erk_dic(self) -> None:
        """Masking.update_erk_dic: ERK density_dict over the REMAINING shapes (rows of removed filters
        and columns of removed input channels dropped, via temp_mask), density = baseline_nonzero /
        (params inside the filter-mask region). baseline_nonzero itself is NOT changed."""
        total = sum(self._region(n, w).numel() for n, w in self.masks.items())
        density = self.baseline_nonzero / total
        temp = copy.deepcopy(self.masks)
        for a in self.pairs:
            if a in temp:
                temp[a] = temp[a][self.alive[a].bool()]
        for a, p in self.pairs.items():
            if p in temp:
                temp[p] = temp[p].transpose(0, 1)[self.alive[a].bool()].transpose(0, 1)
        self.temp_mask = temp
        self.density_dict = chase_erk_densities({k: tuple(v.shape) for k, v in temp.items()}, density)

    # -- prune ----------------------------------------------------------------------------
    @staticmethod
    def magnitude_death(mask: Tensor, weight: Tensor, pruning_rate: float) -> Tensor:
        """Masking.magnitude_death: num_remove = ceil(rate * mask.sum()); if 0 -> (weight != 0);
        k = num_zeros(mask==0 over the FULL tensor) + num_remove; keep |w| > sorted(|w|)[k-1] (strict)."""
        num_zeros = int((mask == 0).sum().item())
        num_remove = math.ceil(pruning_rate * mask.sum().item())
        if num_remove == 0.0:
            return weight != 0.0
        x, _ = torch.sort(weight.abs().reshape(-1))
        k = math.ceil(num_zeros + num_remove)
        threshold = x[k - 1].item()
        return weight.abs() > threshold

    def global_magnitude_death(self, tokill: float) -> None:
        """Masking.global_magnitude_death: k = int(tokill + total_zero) smallest of |w| over the region
        (zeros of inactive weights included); keep |w| >= k-th smallest (so k-1 removed incl. zeros,
        i.e. floor(tokill)-1 active weights when values are distinct; if floor(tokill) == 0 the threshold
        is 0 and the whole region becomes active). ``exact_count``: remove exactly int(tokill) active
        weights (smallest |w| among active, ties -> lower index)."""
        names = list(self.masks)
        if self.exact_count:
            n = int(tokill)
            scores = []
            for name in names:
                act = self._region(name, self.masks[name]).bool()
                s = self._region(name, self.weights[name].abs())
                scores.append(torch.where(act, s, torch.full_like(s, float("inf"))))
            allv = torch.cat([s.flatten() for s in scores])
            order = torch.sort(allv, stable=True).indices[:n]
            kill = torch.zeros_like(allv, dtype=torch.bool)
            kill[order] = True
            off = 0
            for name, s in zip(names, scores):
                kl = kill[off:off + s.numel()]
                off += s.numel()
                full = torch.zeros_like(self.masks[name], dtype=torch.bool)
                if name in self.filter_masks:
                    full[self.filter_masks[name].bool()] = kl
                else:
                    full = kl.reshape(full.shape)
                self.masks[name] = (self.masks[name].bool() & ~full).float()
            return
        k = int(tokill + self.total_zero)
        allv = torch.cat([self._region(n, self.weights[n].abs()).flatten() for n in names])
        thr, _ = torch.topk(allv, k, largest=False, sorted=True)
        acceptable = thr[-1]
        for name in names:
            m = (self.weights[name].abs() >= acceptable).float()
            if name in self.filter_masks:
                m = torch.logical_and(self.filter_masks[name], m).float()
            self.masks[name] = m

    # -- grow -----------------------------------------------------------------------------
    def _topk_exact(self, scores: Tensor, k: int) -> Tensor:
        sel = torch.zeros(scores.numel(), dtype=torch.bool)
        sel[torch.sort(scores.flatten(), descending=True, stable=True).indices[:k]] = True
        return sel

    def gradient_growth(self, name: str, new_mask: Tensor, total_regrowth: int) -> Tensor:
        """Masking.gradient_growth: density_dict==1 -> whole (filter-region) layer active; else
        threshold = total_regrowth-th largest of |grad| on inactive region positions and grow
        |grad*(mask==0)| > threshold (STRICT: one fewer than asked when values are distinct; positions
        outside the region may pass and are removed by the next apply_mask)."""
        if self.density_dict[name] == 1.0:
            nm = torch.ones_like(new_mask, dtype=torch.float32)
            if name in self.filter_masks:
                nm = torch.logical_and(self.filter_masks[name], nm).float()
            return nm
        grad = self.grads[name] * (new_mask == 0).float()
        remain = self._region(name, (self.grads[name] * (self.masks[name] == 0)).abs()).float().flatten()
        if self.exact_count:  # exactly k among the INACTIVE region positions (largest |grad|, ties -> lower index)
            inactive = self._region(name, self.masks[name] == 0).flatten()
            k = max(0, min(int(total_regrowth), int(inactive.sum().item())))
            sel = self._topk_exact(torch.where(inactive, remain, torch.full_like(remain, -float("inf"))), k)
            grow = torch.zeros_like(new_mask, dtype=torch.bool)
            if name in self.filter_masks:
                grow[self.filter_masks[name].bool()] = sel
            else:
                grow = sel.reshape(grow.shape)
            return (new_mask.bool() | grow).float()
        if int(total_regrowth) <= 0:
            if self.strict_errors:
                raise IndexError("reference: topk(k=0)[-1] on an empty tensor")
            return new_mask.float()
        thr, _ = torch.topk(remain, int(total_regrowth), largest=True, sorted=True)
        acceptable = thr[-1]
        return (new_mask.bool() | (grad.abs() > acceptable)).float()

    def global_gradient_growth(self, total_regrowth: float) -> None:
        """Masking.global_gradient_growth: togrow = int(total_regrowth), clamped to the number of
        NONZERO scores |grad*(mask==0)| in the region; threshold = togrow-th largest; grow
        |grad*(mask==0)*filter_mask| > threshold (STRICT: one fewer). ``exact_count``: exactly togrow."""
        togrow = int(total_regrowth)
        names = list(self.masks)
        regs = [self._region(n, (self.grads[n] * (self.masks[n] == 0)).abs()) for n in names]
        allv = torch.cat([r.flatten() for r in regs])
        nnz = int(allv.bool().sum().item())
        if togrow > nnz:
            togrow = nnz
        if togrow <= 0:
            return
        if self.exact_count:
            sel = self._topk_exact(allv, togrow)
            off = 0
            for name, r in zip(names, regs):
                s = sel[off:off + r.numel()]
                off += r.numel()
                grow = torch.zeros_like(self.masks[name], dtype=torch.bool)
                if name in self.filter_masks:
                    grow[self.filter_masks[name].bool()] = s
                else:
                    grow = s.reshape(grow.shape)
                self.masks[name] = (self.masks[name].bool() | grow).float()
            return
        thr, _ = torch.topk(allv, togrow, largest=True, sorted=True)
        acceptable = thr[-1]
        for name in names:
            g = self.grads[name] * (self.masks[name] == 0).float()
            if name in self.filter_masks:
                g = g * self.filter_masks[name].float()
            m = (self.masks[name].bool() | (g.abs() > acceptable)).float()
            if name in self.filter_masks:
                m = torch.logical_and(self.filter_masks[name], m).float()
            self.masks[name] = m

    # -- the three update entry points ------------------------------------------------------
    def truncate_weights_prune(self, pruning_rate: float = 0.0) -> None:
        """Masking.truncate_weights_prune (phase 1): tokill = total_nonzero - baseline_nonzero; if > 0,
        global_magnitude_death(tokill) or per-layer magnitude_death at rate tokill/total_nonzero
        (ceil per layer). ``pruning_rate`` is unused, as in the reference. Ends with apply_mask."""
        self.gather_statistics()
        tokill = self.total_nonzero - self.baseline_nonzero
        if tokill > 0:
            if self.prune_mode == "global_magnitude":
                self.global_magnitude_death(tokill)
            elif self.prune_mode == "magnitude":
                rate = tokill / self.total_nonzero
                for name in self.masks:
                    self.masks[name] = self.magnitude_death(self.masks[name], self.weights[name], rate).float()
            else:
                raise NotImplementedError(self.prune_mode)
            self.apply_mask()

    def truncate_weights_grow(self, pruning_rate: float) -> None:
        """Masking.truncate_weights_grow (phase 1): togrow = total_params*r_t - total_nonzero
        (total_params = ORIGINAL parameter count, never updated after channel removal).
        global: global_gradient_growth(togrow). Per layer: real_d_num = active count of dense
        (density_dict==1) layers, d_num = their temp_mask numel, grow_ratio = (togrow - (d_num -
        real_d_num)) / (total_nonzero - real_d_num); if > 0 each layer grows int(nnz*grow_ratio),
        capped at temp_mask numel - nnz, via gradient_growth (dense layers: fully active). apply_mask."""
        self.gather_statistics()
        togrow = self.total_params * pruning_rate - self.total_nonzero
        if togrow > 0:
            if self.growth_mode == "global_gradients":
                self.global_gradient_growth(togrow)
            elif self.growth_mode == "gradients":
                real_d_num = sum(self.masks[n].sum().item() for n in self.masks if self.density_dict[n] == 1.0)
                d_num = sum(m.numel() for n, m in self.temp_mask.items() if self.density_dict[n] == 1.0)
                grow_ratio = (togrow - (d_num - real_d_num)) / (self.total_nonzero - real_d_num)
                if grow_ratio > 0:
                    for name in list(self.masks):
                        new_mask = self.masks[name].bool()
                        nnz = int(new_mask.sum().item())
                        to_grow = int(nnz * grow_ratio)
                        cap = int(self.temp_mask[name].numel())
                        if to_grow + nnz > cap:
                            to_grow = cap - nnz
                        self.pruning_rate[name] = to_grow
                        self.masks[name] = self.gradient_growth(name, new_mask, to_grow).float()
            else:
                raise NotImplementedError(self.growth_mode)
        self.apply_mask()

    def truncate_weights(self, pruning_rate: float) -> None:
        """Masking.truncate_weights (phase 2, constant density): prune then regrow.
        global_magnitude: to_kill = ceil(rate*total_nonzero) -> global_magnitude_death; magnitude: per
        layer magnitude_death(rate) and pruning_rate[name] = int(density_dict*temp_mask.numel - new nnz).
        apply_mask; gather_statistics; grow: global -> global_gradient_growth(baseline_nonzero -
        total_nonzero); per layer -> gradient_growth(pruning_rate[name]) only if pruning_rate[name] > 1
        (a layer short by exactly 1 grows nothing). apply_mask."""
        self.gather_statistics()
        if self.prune_mode == "global_magnitude":
            self.global_magnitude_death(math.ceil(pruning_rate * self.total_nonzero))
        elif self.prune_mode == "magnitude":
            for name in list(self.masks):
                nm = self.magnitude_death(self.masks[name], self.weights[name], pruning_rate)
                self.masks[name] = nm.float()
                self.pruning_rate[name] = int(self.density_dict[name] * self.temp_mask[name].numel() - nm.sum().item())
        else:
            raise NotImplementedError(self.prune_mode)
        self.apply_mask()
        self.gather_statistics()
        if self.growth_mode == "global_gradients":
            self.global_gradient_growth(self.baseline_nonzero - self.total_nonzero)
        elif self.growth_mode == "gradients":
            for name in list(self.masks):
                new_mask = self.masks[name].bool()
                if self.pruning_rate[name] > 1:
                    self.masks[name] = self.gradient_growth(name, new_mask, self.pruning_rate[name]).float()
        else:
            raise NotImplementedError(self.growth_mode)
        self.apply_mask()

    def after_optimizer_step(self, ev: StepEvents, baseline_filter_num: float = 0.0,
                             minimum_layer: Mapping[str, int] | None = None, score: str = "mag_wise") -> None:
        """The part of Masking.step after optimizer.step(), driven by ``step_events``: apply_mask;
        [del_layer(ev.layer_rate); update_erk_dic if growth is not global]; then the mask update
        ('mest': truncate_weights_prune + truncate_weights_grow(r_t); else truncate_weights(rate)).
        ``self.weights`` / ``self.grads`` must be the post-optimizer weights and that batch's gradients."""
        self.apply_mask()
        if ev.channel_removal:
            self.del_layer(ev.layer_rate, baseline_filter_num, minimum_layer or {}, score)
            if ev.update_erk:
                self.update_erk_dic()
        if ev.mask_update == "mest":
            assert ev.mask_update_rate is not None
            self.truncate_weights_prune(ev.mask_update_rate)
            self.truncate_weights_grow(ev.mask_update_rate)
        elif ev.mask_update in ("mest_dst", "dst"):
            assert ev.mask_update_rate is not None
            self.truncate_weights(ev.mask_update_rate)
