"""Channel removal of luuyin/chase ``Masking`` (part of :mod:`reference.chase_ref`; same source and commit:
Imagenet/core.py ``prune_score``, ``del_layer``, ``del_func``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor


class ChannelRemovalRef:
    """The channel-removal methods of :class:`reference.chase_ref.ChaseRef` (its state: weights, masks, pairs,
    alive, biases, momentum ...)."""

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

    def filter_scores(self, name: str, score: str = "mag_wise") -> list[float]:
        """Per-filter score of the ALIVE filters of active layer ``name`` (prune_score's inner loop)."""
        sel = self.alive[name].bool()
        w, m = self.weights[name].abs()[sel], self.masks[name][sel]
        return [self._filter_score(fw, fm, score) for fw, fm in zip(w, m)]

    def prune_score(self, layers: Sequence[str], total_to_prune: float, score: str = "mag_wise") -> float:
        """Masking.prune_score: np.sort(scores)[-int(len - total_to_prune)] (literal numpy indexing:
        int() truncates; when it is 0 the index is 0 -> the MIN score -> nothing is strictly below)."""
        all_scores: list[float] = []
        for name in layers:
            all_scores.extend(self.filter_scores(name, score))
        return float(np.sort(np.array(all_scores))[-int(len(all_scores) - total_to_prune)])

    def del_layer(self, layer_rate: float, baseline_filter_num: float, minimum_layer: Mapping[str, int],
                  score: str = "mag_wise", max_rounds: int = 1000) -> dict[str, list[int]]:
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
        layer_prune: dict[str, list[int]] = {}
        if total_to_prune < 0:
            return layer_prune
        residual_layer: dict[str, float] = {}
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
                del_ind: list[int] = []
                mags: list[float] = []
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
