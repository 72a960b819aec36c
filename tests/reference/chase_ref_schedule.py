"""Schedules, ERK and step timing of luuyin/chase (part of :mod:`reference.chase_ref`; same source and
commit: Imagenet/core.py ``CosineDecay``, ``gradual_pruning_rate``, ``init('ERK')``, Imagenet/main.py)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch


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
                        erk_power_scale: float = 1.0) -> dict[str, float]:
    """ERK loop of Masking.init('ERK') / update_erk_dic: n_ones = N*density (NOT floored, unlike RigL),
    raw = (sum(shape)/prod(shape))**power, every layer tied at the max raw prob made dense (1.0)."""
    dense: set = set()
    while True:
        divisor = 0.0
        rhs = 0.0
        raw: dict[str, float] = {}
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
    mask_update: str | None  # None | 'mest' (prune+grow, phase 1) | 'mest_dst' / 'dst' (truncate_weights)
    mask_update_rate: float | None


def step_events(steps_before: int, *, steps_per_epoch: int, total_epochs: int, stop_dst_epochs: int,
                stop_gmp_epochs: float, update_frequency: int | None, layer_interval_epochs: float,
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
    mu: str | None = None
    rate: float | None = None
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
