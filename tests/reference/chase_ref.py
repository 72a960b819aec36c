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
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

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


# ----------------------------------------------------------------------------- schedules
class CosineDecay:
    """core.CosineDecay: wraps torch CosineAnnealingLR on a dummy SGD; ``step()`` then ``get_dr()``."""

    def __init__(self, prune_rate: float, T_max: int, eta_min: float = 0.0, last_epoch: int = -1,
                 init_step: int = 0) -> None:
        self.sgd = torch.optim.SGD(torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(1))]), lr=prune_rate)
        self.cosine_stepper = torch.optim.lr_scheduler.CosineAnnealingLR(self.sgd, T_max, eta_min, last_epoch)
        for _ in range(init_step):
            self.step()

    def step(self) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.cosine_stepper.step()

    def get_dr(self) -> float:
        return float(self.sgd.param_groups[0]["lr"])


def cosine_decay_closed(t: int, base: float, T_max: int, eta_min: float = 0.0) -> float:
    """Value of CosineDecay after ``t`` calls to step(): eta_min + (base-eta_min)*(1+cos(pi*t/T_max))/2."""
    return eta_min + (base - eta_min) * (1.0 + math.cos(math.pi * t / T_max)) / 2.0


def gradual_pruning_rate(step: float, initial_threshold: float, final_threshold: float,
                         initial_time: float, final_time: float) -> float:
    """Masking.gradual_pruning_rate: cubic ramp initial -> final over (initial_time, final_time]."""
    if step <= initial_time:
        return initial_threshold
    if step > final_time:
        return final_threshold
    mul_coeff = 1 - (step - initial_time) / (final_time - initial_time)
    return final_threshold + (initial_threshold - final_threshold) * (mul_coeff ** 3)


def minimum_layer(out_channels: int, start_layer_rate: float, minumum_ratio: float) -> int:
    """Masking.init: per-layer filter floor int(out_channels * (1 - start_layer_rate) * minumum_ratio)."""
    return int(out_channels * (1 - start_layer_rate) * minumum_ratio)


# ----------------------------------------------------------------------------- ERK
def chase_erk_densities(shapes: Mapping[str, Sequence[int]], density: float,
                        erk_power_scale: float = 1.0) -> Dict[str, float]:
    """ERK loop of Masking.init('ERK') / update_erk_dic: n_ones = N*density (NOT floored, unlike RigL),
    raw = (sum(shape)/prod(shape))**power, every layer tied at the max raw prob made dense (1.0)."""
    dense: set = set()
    while True:
        divisor = 0.0
        rhs = 0.0
        raw: Dict[str, float] = {}
        for name, shp in shapes.items():
            n_param = float(np.prod(shp))
            if name in dense:
                rhs -= n_param * (1 - density)
            else:
                rhs += n_param * density
                raw[name] = (float(np.sum(shp)) / float(np.prod(shp))) ** erk_power_scale
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_prob = max(raw.values())
        if max_prob * eps > 1:
            for name, p in raw.items():
                if p == max_prob:
                    dense.add(name)
        else:
            break
    return {name: (1.0 if name in dense else eps * raw[name]) for name in shapes}


# ----------------------------------------------------------------------------- step timing
@dataclass
class StepEvents:
    """What one ``Masking.step()`` call does (see step_events)."""

    steps_after: int
    prune_rate: float  # r_t (mest decay), read after its step()
    dst_rate: float  # phase-2 rate (dst_decay), read after its step()
    layer_rate: float  # gradual_pruning_rate(steps_before, ...)
    channel_removal: bool  # del_layer() runs
    update_erk: bool  # update_erk_dic() runs after del_layer
    mask_update: Optional[str]  # None | 'mest' (prune+grow, phase 1) | 'mest_dst' / 'dst' (truncate_weights)
    mask_update_rate: Optional[float]


def step_events(steps_before: int, *, steps_per_epoch: int, total_epochs: int, stop_dst_epochs: int,
                stop_gmp_epochs: float, update_frequency: Optional[int], layer_interval_epochs: float,
                start_layer_rate: float, prune_rate: float, density: float, filter_dst: bool = True,
                mest: bool = True, mest_dst: bool = True, dst: bool = False, growth: str = "gradients",
                init_step: int = 0) -> StepEvents:
    """Pure model of ``Masking.step`` (fresh run: Masking(step=0), decays with init_step=0).

    Order in the reference: optimizer.step(); apply_mask(); prune_rate_decay.step() and read;
    layer_rate = gradual_pruning_rate(self.steps [BEFORE increment], 0, start_layer_rate, 0,
    floor(stop_gmp_epochs*len)); dst_decay.step() and read; steps += 1; then channel removal if
    filter_dst and 0 <= steps < final_prune_time and (steps + k/2) % layer_interval == 0 (k/2 is a
    float division, so an odd k never fires); then (mest) if steps < len*(total-stop_dst) and
    steps % k == 0: prune+grow with prune_rate, elif mest_dst and steps % k == 0: truncate_weights(dst_rate);
    or (dst, without mest) steps % k == 0: truncate_weights(dst_rate). ``update_frequency=None`` is --fix.
    layer_interval = int(layer_interval_epochs * len). Decays are stepped once per call, so after
    the call with steps_before = s they have been stepped s + 1 (+ init_step) times.
    """
    L = steps_per_epoch
    t = steps_before + 1 + init_step
    pr = cosine_decay_closed(t, prune_rate + density, L * (total_epochs - stop_dst_epochs), density + 0.005)
    dr = cosine_decay_closed(t, 0.5, math.floor(total_epochs * L), 0.005)
    final_prune_time = math.floor(stop_gmp_epochs * L)
    layer_rate = gradual_pruning_rate(steps_before, 0.0, start_layer_rate, 0.0, final_prune_time)
    steps = steps_before + 1
    k = update_frequency
    layer_interval = int(layer_interval_epochs * L)
    removal = False
    if filter_dst and k is not None:
        if steps >= 0.0 and steps < final_prune_time:
            if (steps + (k / 2)) % layer_interval == 0:
                removal = True
    mu: Optional[str] = None
    rate: Optional[float] = None
    if mest:
        if steps < L * (total_epochs - stop_dst_epochs):
            if k is not None and steps % k == 0:
                mu, rate = "mest", pr
        elif mest_dst:
            if k is not None and steps % k == 0:
                mu, rate = "mest_dst", dr
    elif dst:
        if k is not None and steps % k == 0:
            mu, rate = "dst", dr
    return StepEvents(steps, pr, dr, layer_rate, removal, removal and "global" not in growth, mu, rate)


# ----------------------------------------------------------------------------- Masking math
@dataclass
class ChaseRef:
    """State + update math of Imagenet/core.py ``Masking`` (one model, CPU tensors, keyed by name).

    weights / masks / grads / momentum: masked layers only (the reference removes biases and BN).
    pairs: active -> passive layer name; alive: active -> 0/1 float vector over its out channels.
    exact_count: gradient_growth / global_gradient_growth grow exactly the requested number (topk
    indices, ties -> lower flat index) instead of the reference's strict ``> threshold`` (one fewer).
    strict_errors: raise where the reference would crash (topk(k=0)[-1]) instead of a no-op.
    """

    weights: Dict[str, Tensor]
    masks: Dict[str, Tensor]
    grads: Dict[str, Tensor] = field(default_factory=dict)
    momentum: Dict[str, Tensor] = field(default_factory=dict)
    biases: Dict[str, Tensor] = field(default_factory=dict)  # bias of an active layer (name = weight name)
    pairs: Dict[str, str] = field(default_factory=dict)
    alive: Dict[str, Tensor] = field(default_factory=dict)
    prune_mode: str = "magnitude"
    growth_mode: str = "gradients"
    baseline_nonzero: float = 0.0
    total_params: int = 0
    density_dict: Dict[str, float] = field(default_factory=dict)
    temp_mask: Dict[str, Tensor] = field(default_factory=dict)
    exact_count: bool = False
    strict_errors: bool = False
    # filled by gather_statistics
    name2nonzeros: Dict[str, float] = field(default_factory=dict)
    name2zeros: Dict[str, float] = field(default_factory=dict)
    total_nonzero: float = 0
    total_zero: float = 0.0
    pruning_rate: Dict[str, int] = field(default_factory=dict)
    filter_masks: Dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.masks = {k: v.float().clone() for k, v in self.masks.items()}
        self.alive = {k: v.float().clone() for k, v in self.alive.items()}
        if self.pairs:
            self.update_filter_mask()

    # -- construction helpers -------------------------------------------------------------
    @classmethod
    def from_erk(cls, weights: Dict[str, Tensor], masks: Dict[str, Tensor], density: float,
                 **kw: object) -> "ChaseRef":
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
    def passive_alive(self) -> Dict[str, Tensor]:
        """passive_names: passive -> the alive vector of its active layer (same tensor in the reference)."""
        return {p: self.alive[a] for a, p in self.pairs.items()}

    # -- masks ----------------------------------------------------------------------------
    def update_filter_mask(self) -> None:
        """Masking.update_filter_mask (+ the identical block of add_module): active rows AND passive columns."""
        fm: Dict[str, Tensor] = {}
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
            scores, owners = [], []
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
                             minimum_layer: Optional[Mapping[str, int]] = None, score: str = "mag_wise") -> None:
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

    # -- channel removal ------------------------------------------------------------------
    def _filter_score(self, w_filter: Tensor, m_filter: Tensor, score: str) -> float:
        if score == "mask_wise":  # mean |w| over the filter's ACTIVE connections (empty -> nan, kept)
            return w_filter.abs()[m_filter.bool()].mean().item()
        if score == "mag_wise":  # "UMM": mean |w| over the whole filter (zeros and removed inputs included)
            return w_filter.abs().mean().item()
        if score == "kernal_wise":
            v = w_filter.reshape(w_filter.size(0), -1).sum(dim=1)
            return (v != 0).sum().int().item() / v.numel()
        if score == "connection_wise":
            return (w_filter != 0).sum().int().item() / w_filter.numel()
        raise ValueError(score)

    def filter_scores(self, name: str, score: str = "mag_wise") -> List[float]:
        """Per-filter score of the ALIVE filters of active layer ``name`` (prune_score's inner loop)."""
        sel = self.alive[name].bool()
        w, m = self.weights[name].abs()[sel], self.masks[name][sel]
        return [self._filter_score(fw, fm, score) for fw, fm in zip(w, m)]

    def prune_score(self, layers: Sequence[str], total_to_prune: float, score: str = "mag_wise") -> float:
        """Masking.prune_score: np.sort(scores)[-int(len - total_to_prune)] (literal numpy indexing:
        int() truncates; when it is 0 the index is 0 -> the MIN score -> nothing is strictly below)."""
        all_scores: List[float] = []
        for name in layers:
            all_scores.extend(self.filter_scores(name, score))
        return float(np.sort(np.array(all_scores))[-int(len(all_scores) - total_to_prune)])

    def del_layer(self, layer_rate: float, baseline_filter_num: float, minimum_layer: Mapping[str, int],
                  score: str = "mag_wise", max_rounds: int = 1000) -> Dict[str, List[int]]:
        """Masking.del_layer: keep baseline_filter_num*(1-layer_rate) filters over all active layers.

        Each round: acceptable = prune_score(non-floored layers, to_prune - already pruned); per
        non-floored layer, filters with score < acceptable (STRICT) are candidates; if removing them
        leaves fewer than minimum_layer[l] (= int(out*(1-start_layer_rate)*minumum_ratio)), only the
        int(current - minimum) lowest (stable argsort) are removed and the layer is floored and the
        shortfall carried to the next round (residual). Removal is applied (alive -> 0, filter masks,
        apply_mask) after every round. The reference's loop counter is never incremented; here
        ``max_rounds`` raises RuntimeError instead of looping forever. Returns removed indices per layer.
        """
        rate = 1 - layer_rate
        filter_numer = sum(v.sum().item() for v in self.alive.values())
        total_to_prune = filter_numer - baseline_filter_num * rate
        layer_prune: Dict[str, List[int]] = {}
        if total_to_prune < 0:
            return layer_prune
        residual_layer: Dict[str, float] = {}
        residual = 9999.0
        rounds = 0
        while residual > 0:
            rounds += 1
            if rounds > max_rounds:
                raise RuntimeError("del_layer residual loop did not terminate")
            residual = 0.0
            layers = [a for a in self.pairs if a not in residual_layer]
            pruned = sum(len(v) for v in layer_prune.values())
            ttp = filter_numer - baseline_filter_num * rate - pruned
            acceptable = self.prune_score(layers, ttp, score)
            for a in self.pairs:
                if a in residual_layer:
                    continue
                del_ind: List[int] = []
                mags: List[float] = []
                w, m = self.weights[a].abs(), self.masks[a]
                for fi in range(w.shape[0]):
                    if self.alive[a][fi].item() == 1.0:
                        s = self._filter_score(w[fi], m[fi], score)
                        if s < acceptable:
                            del_ind.append(fi)
                            mags.append(s)
                current = self.alive[a].sum().item()
                single_residual = minimum_layer[a] - (current - len(del_ind))
                layer_prune.setdefault(a, [])
                if single_residual > 0:
                    residual += single_residual
                    n_keep_del = int(current - minimum_layer[a])
                    order = np.argsort(np.array(mags), kind="stable")[:n_keep_del]
                    layer_prune[a].extend(int(i) for i in np.array(del_ind, dtype=np.int64)[order])
                    residual_layer[a] = single_residual
                else:
                    layer_prune[a].extend(del_ind)
            for a in self.pairs:
                self.del_func(layer_prune[a], a)
        for a in self.pairs:  # the reference repeats the (idempotent) removal after the loop
            self.del_func(layer_prune[a], a)
        return layer_prune

    def del_func(self, del_ind: Sequence[int], active: str) -> None:
        """Masking.del_func: alive[active][del_ind] = 0 (= passive_names too), update_filter_mask, apply_mask."""
        if len(del_ind):
            self.alive[active][torch.as_tensor(list(del_ind), dtype=torch.long)] = 0
        self.update_filter_mask()
        self.apply_mask()
