"""Sanity tests of the reference transcriptions themselves, on tiny hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import autograd

from tests.reference import chase_ref as C
from tests.reference import nm_ref as N
from tests.reference import rigl_ref as R

W6 = torch.tensor([[0.5, -0.1, 0.4, 0.3, -0.2, -0.8]])  # positions 2 and 4 inactive (values ignored)
M6 = torch.tensor([[1.0, 1.0, 0.0, 1.0, 0.0, 1.0]])
G6 = torch.tensor([[0.9, -0.2, 0.7, 0.05, -0.1, 0.3]])


# ----------------------------------------------------------------------------- RigL
def test_rigl_hand_1x6() -> None:
    mom = torch.arange(1.0, 7.0).reshape(1, 6)
    masks, weights, state = R.rigl_update({"l": W6}, {"l": M6}, {"l": G6}, 0.5, opt_state={"l": mom})
    # n_ones=4, n_prune=int(4*0.5)=2, keep top-2 |w*m| = {5, 0}; grow top-2 |g| among the rest = {2, 1}
    assert masks["l"].tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 1.0]]
    # 2 is new (inactive before) -> weight 0, momentum 0; 1 dropped & regrown keeps -0.1 and its state;
    # 3 dropped keeps its stale value 0.3 in the variable (only the mask hides it)
    assert weights["l"][0].tolist() == pytest.approx([0.5, -0.1, 0.0, 0.3, -0.2, -0.8])
    assert state["l"].tolist() == [[1.0, 2.0, 0.0, 4.0, 5.0, 6.0]]


def test_rigl_set_random_scores_and_acc_scale() -> None:
    rand = torch.tensor([[0.0, 0.1, 0.2, 0.9, 0.8, 0.3]])
    masks, _, _ = R.rigl_update({"l": W6}, {"l": M6}, None, 0.5, growth="random", rand={"l": rand})
    assert masks["l"].tolist() == [[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]]  # grows 3 and 4
    mom = torch.ones(1, 6)
    _, _, st = R.rigl_update({"l": W6}, {"l": M6}, {"l": G6}, 0.5, opt_state={"l": {"momentum": mom}},
                             initial_acc_scale=2.0)
    assert st["l"]["momentum"][0, 2].item() == pytest.approx(1.4)  # 2 * grad


def test_rigl_n_prune_is_float32_floor() -> None:
    w = torch.linspace(1.0, 2.0, 100)
    m = torch.ones(100)
    m[90:] = 0
    masks, _, _ = R.rigl_update({"l": w}, {"l": m}, {"l": torch.zeros(100)}, 0.7)
    # float32(90) * float32(0.7) = 63.0 (float64 90*0.7 = 62.999... would give 62)
    kept = int(masks["l"][:90][w[:90] > w[62]].sum().item())
    assert kept == 90 - 63 and masks["l"].sum().item() == 90
    assert int(90 * 0.7) == 62


def test_rigl_schedules() -> None:
    assert R.rigl_drop_fraction(0, 0, 100, 0.3) == pytest.approx(0.3)
    assert R.rigl_drop_fraction(50, 0, 100, 0.3) == pytest.approx(0.15, abs=1e-7)
    assert R.rigl_drop_fraction(150, 0, 100, 0.3) == pytest.approx(0.0, abs=1e-7)
    # raw global step, not step - begin: at step == begin == end - begin the fraction is already 0
    assert R.rigl_drop_fraction(10, 10, 20, 0.3) == pytest.approx(0.0, abs=1e-7)
    assert R.rigl_drop_fraction(5, 0, 10, 0.5, "exponential_2") == pytest.approx(0.125)
    assert R.is_update_iter(0, 0, 10, 3)  # last_update initialised to -frequency
    assert not R.is_update_iter(2, 0, 10, 3, last_update=0) and R.is_update_iter(3, 0, 10, 3, last_update=0)
    assert R.is_update_iter(10, 0, 10, 3, last_update=7) and not R.is_update_iter(11, 0, 10, 3, last_update=7)
    assert R.is_update_iter(99, 0, -1, 3, last_update=96)
    s = R.rigl_step_semantics("rigl", 5, 0, 10, 5, last_update=0)
    assert s["mask_update"] and not s["optimizer_step"] and s["next_global_step"] == 5
    s = R.rigl_step_semantics("set", 4, 0, 10, 5, last_update=0)
    assert s["mask_update"] and s["optimizer_step"] and s["step_seen"] == 5


def test_erk_budget_and_dense_layers() -> None:
    shapes = {"stem": (8, 3, 3, 3), "c1": (16, 8, 3, 3), "c2": (32, 16, 3, 3), "fc": (10, 32)}
    for density in (0.05, 0.1, 0.3, 0.8):
        d = R.erk_densities(shapes, density)
        s = 1.0 - density
        budget = sum(math.prod(v) - math.floor(s * math.prod(v)) for v in shapes.values())
        assert sum(d[k] * math.prod(v) for k, v in shapes.items()) == pytest.approx(budget, rel=1e-9)
        assert all(0 < x <= 1.0 for x in d.values())
    d = R.erk_densities(shapes, 0.8)
    assert d["stem"] == 1.0  # raw prob is largest for the stem -> made dense
    counts = R.erk_mask_counts(shapes, 0.1)
    assert counts["stem"] == 216 - math.floor(R.erk_sparsities(shapes, 0.1)["stem"] * 216)


# ----------------------------------------------------------------------------- Chase
def test_cosine_decay_closed_form_matches_torch() -> None:
    for base, T, eta in ((0.15, 50, 0.105), (0.5, 37, 0.005), (1.0, 7, 0.0)):
        dec = C.CosineDecay(base, T, eta)
        for t in range(1, 2 * T + 3):
            dec.step()
            assert abs(dec.get_dr() - C.cosine_decay_closed(t, base, T, eta)) < 1e-9


def test_gradual_pruning_rate() -> None:
    assert C.gradual_pruning_rate(0, 0.0, 0.4, 0, 100) == 0.0
    assert C.gradual_pruning_rate(50, 0.0, 0.4, 0, 100) == pytest.approx(0.4 - 0.4 * 0.125)
    assert C.gradual_pruning_rate(100, 0.0, 0.4, 0, 100) == pytest.approx(0.4)
    assert C.gradual_pruning_rate(101, 0.0, 0.4, 0, 100) == 0.4


def test_magnitude_death_ceil_and_strict() -> None:
    w = W6 * M6
    assert C.ChaseRef.magnitude_death(M6, w, 0.5).float().tolist() == [[1, 0, 0, 0, 0, 1]]
    assert C.ChaseRef.magnitude_death(M6, w, 0.3).float().tolist() == [[1, 0, 0, 0, 0, 1]]  # ceil(1.2) = 2
    assert C.ChaseRef.magnitude_death(M6, w, 0.01).float().tolist() == [[1, 0, 0, 1, 0, 1]]  # ceil(0.04) = 1
    assert C.ChaseRef.magnitude_death(M6, w, 0.0).float().tolist() == [[1, 1, 0, 1, 0, 1]]  # weight != 0


def _ref6(**kw: object) -> C.ChaseRef:
    m = torch.tensor([[1.0, 0, 0, 0, 0, 1]])
    r = C.ChaseRef(weights={"l": W6 * m}, masks={"l": m}, grads={"l": G6.clone()}, **kw)  # type: ignore[arg-type]
    r.density_dict = {"l": 0.5}
    r.temp_mask = {"l": m.clone()}
    return r


def test_gradient_growth_strict_vs_exact() -> None:
    r = _ref6()
    # remain = [0, .2, .7, .05, .1, 0]; 2nd largest = .2; strict > grows only index 2 (one fewer)
    assert r.gradient_growth("l", r.masks["l"].bool(), 2).tolist() == [[1, 0, 1, 0, 0, 1]]
    r = _ref6(exact_count=True)
    assert r.gradient_growth("l", r.masks["l"].bool(), 2).tolist() == [[1, 1, 1, 0, 0, 1]]
    r = _ref6()
    assert r.gradient_growth("l", r.masks["l"].bool(), 0).tolist() == [[1, 0, 0, 0, 0, 1]]
    with pytest.raises(IndexError):
        _ref6(strict_errors=True).gradient_growth("l", torch.ones(1, 6).bool(), 0)
    r.density_dict["l"] = 1.0
    assert r.gradient_growth("l", r.masks["l"].bool(), 1).sum().item() == 6


def test_global_gradient_growth_strict_vs_exact() -> None:
    r = _ref6()
    r.global_gradient_growth(3.7)  # int -> 3; 3rd largest = .1; > .1 grows {2, 1}
    assert r.masks["l"].tolist() == [[1, 1, 1, 0, 0, 1]]
    r = _ref6(exact_count=True)
    r.global_gradient_growth(3.7)
    assert r.masks["l"].tolist() == [[1, 1, 1, 0, 1, 1]]
    r = _ref6(exact_count=True)
    r.global_gradient_growth(10)  # clamped to the 4 nonzero scores
    assert r.masks["l"].sum().item() == 6


def test_global_magnitude_death_quirks() -> None:
    m = M6.clone()
    r = C.ChaseRef(weights={"l": W6 * m}, masks={"l": m})
    r.gather_statistics()
    assert r.total_nonzero == 4 and r.total_zero == 2
    r.global_magnitude_death(2.5)  # k = int(4.5) = 4 -> thr .3, keep >= .3 -> only ONE active removed
    assert r.masks["l"].tolist() == [[1, 0, 0, 1, 0, 1]]
    r = C.ChaseRef(weights={"l": W6 * m}, masks={"l": m})
    r.gather_statistics()
    r.global_magnitude_death(0.5)  # k = int(2.5) = 2 -> thr 0 -> everything becomes active
    assert r.masks["l"].sum().item() == 6
    r = C.ChaseRef(weights={"l": W6 * m}, masks={"l": m}, exact_count=True)
    r.gather_statistics()
    r.global_magnitude_death(2.5)
    assert r.masks["l"].tolist() == [[1, 0, 0, 0, 0, 1]]


def test_phase1_prune_and_grow() -> None:
    m = M6.clone()
    r = C.ChaseRef(weights={"l": W6 * m}, masks={"l": m}, grads={"l": G6.clone()})
    r.total_params, r.baseline_nonzero = 6, 2.0
    r.density_dict, r.temp_mask = {"l": 2 / 6}, {"l": m.clone()}
    r.truncate_weights_prune()  # tokill = 4 - 2 = 2 -> rate 0.5 -> ceil(2) removed
    assert r.masks["l"].tolist() == [[1, 0, 0, 0, 0, 1]]
    assert r.weights["l"][0].tolist() == pytest.approx([0.5, 0, 0, 0, 0, -0.8])
    r.truncate_weights_grow(0.5)  # togrow = 6*0.5 - 2 = 1; grow_ratio = 0.5 -> int(2*0.5) = 1 -> strict: 0
    assert r.masks["l"].sum().item() == 2
    r.truncate_weights_grow(5 / 6)  # togrow = 3, ratio 1.5 -> to_grow 3; strict > 3rd largest (.1) -> 2 grown
    assert r.masks["l"].tolist() == [[1, 1, 1, 0, 0, 1]]


def test_phase2_truncate_weights_guard() -> None:
    m = M6.clone()
    r = C.ChaseRef(weights={"l": W6 * m}, masks={"l": m}, grads={"l": G6.clone()})
    r.density_dict, r.temp_mask, r.baseline_nonzero = {"l": 4 / 6}, {"l": m.clone()}, 4.0
    r.truncate_weights(0.25)  # removes ceil(1) = 1 (-0.1); to grow int(4 - 3) = 1 -> '> 1' guard: none
    assert r.pruning_rate["l"] == 1 and r.masks["l"].sum().item() == 3
    r = C.ChaseRef(weights={"l": W6 * m}, masks={"l": m}, grads={"l": G6.clone()})
    r.density_dict, r.temp_mask = {"l": 4 / 6}, {"l": m.clone()}
    r.truncate_weights(0.5)  # removes 2; grow 2; strict -> 1 (index 2, |g|=.7 > .2)
    assert r.masks["l"].tolist() == [[1, 0, 1, 0, 0, 1]]


def _channel_ref() -> C.ChaseRef:
    wa = torch.tensor([0.1, 0.2, 0.9, 1.0]).reshape(4, 1, 1, 1)
    wb = torch.tensor([0.3, 0.4, 0.5, 0.6]).reshape(4, 1, 1, 1)
    weights = {"a": wa, "ap": torch.ones(1, 4, 1, 1), "b": wb, "bp": torch.ones(1, 4, 1, 1)}
    masks = {k: torch.ones_like(v) for k, v in weights.items()}
    return C.ChaseRef(weights=weights, masks=masks, momentum={k: torch.ones_like(v) for k, v in weights.items()},
                      pairs={"a": "ap", "b": "bp"}, alive={"a": torch.ones(4), "b": torch.ones(4)})


def test_del_layer_floor_and_residual() -> None:
    r = _channel_ref()
    removed = r.del_layer(0.5, 8, {"a": 3, "b": 0})
    # round 1: thr = 0.5 -> a wants {0,1} but floor 3 keeps only the lowest {0}; b removes {0,1}
    # round 2 (b only): to prune 1 -> thr = sorted([.5,.6])[-1] = .6 -> removes {2}
    assert removed == {"a": [0], "b": [0, 1, 2]}
    assert r.alive["a"].tolist() == [0, 1, 1, 1] and r.alive["b"].tolist() == [0, 0, 0, 1]
    assert r.masks["bp"].flatten().tolist() == [0, 0, 0, 1] and r.weights["ap"].flatten().tolist() == [0, 1, 1, 1]
    assert r.momentum["a"].flatten().tolist() == [0, 1, 1, 1]
    assert r.prune_score(["a", "b"], 0.0) == pytest.approx(0.2)  # index -len -> min score


def test_update_erk_dic_on_remaining_shapes() -> None:
    wa, wp = torch.ones(4, 2, 1, 1), torch.ones(3, 4, 1, 1)
    r = C.ChaseRef(weights={"a": wa, "p": wp}, masks={"a": torch.ones_like(wa), "p": torch.ones_like(wp)},
                   pairs={"a": "p"}, alive={"a": torch.tensor([1.0, 0.0, 1.0, 1.0])})
    r.apply_mask()
    r.baseline_nonzero = 7.5
    r.update_erk_dic()
    assert tuple(r.temp_mask["a"].shape) == (3, 2, 1, 1) and tuple(r.temp_mask["p"].shape) == (3, 3, 1, 1)
    assert sum(r.density_dict[k] * r.temp_mask[k].numel() for k in r.density_dict) == pytest.approx(7.5)
    assert r.density_dict == pytest.approx(C.chase_erk_densities({"a": (3, 2, 1, 1), "p": (3, 3, 1, 1)}, 7.5 / 15))


def test_chase_erk_budget() -> None:
    shapes = {"stem": (8, 3, 3, 3), "c1": (16, 8, 3, 3), "fc": (10, 16)}
    d = C.chase_erk_densities(shapes, 0.1)
    assert sum(d[k] * math.prod(v) for k, v in shapes.items()) == pytest.approx(0.1 * sum(math.prod(v) for v in shapes.values()))


def test_step_events_timing() -> None:
    kw = dict(steps_per_epoch=10, total_epochs=10, stop_dst_epochs=2, stop_gmp_epochs=5, update_frequency=4,
              layer_interval_epochs=1, start_layer_rate=0.4, prune_rate=0.05, density=0.1)
    evs = [C.step_events(s, **kw) for s in range(100)]  # type: ignore[arg-type]
    assert [e.steps_after for e in evs if e.channel_removal] == [8, 18, 28, 38, 48]  # (steps + 2) % 10 == 0, < 50
    assert [e.steps_after for e in evs if e.mask_update == "mest"] == list(range(4, 80, 4))
    assert [e.steps_after for e in evs if e.mask_update == "mest_dst"] == [80, 84, 88, 92, 96, 100]
    e = evs[7]
    assert e.layer_rate == pytest.approx(C.gradual_pruning_rate(7, 0.0, 0.4, 0.0, 50))
    assert e.prune_rate == pytest.approx(C.cosine_decay_closed(8, 0.15, 80, 0.105))
    odd = dict(kw, update_frequency=5)
    assert not any(C.step_events(s, **odd).channel_removal for s in range(100))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- N:M
class _RefSparse(autograd.Function):
    """Verbatim copy of NM-sparsity's Sparse (CPU), to check the transcription against it."""

    @staticmethod
    def forward(ctx, weight, N, M, decay=0.0002):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(weight)
        output = weight.clone()
        length = weight.numel()
        group = int(length / M)
        weight_temp = weight.detach().abs().reshape(group, M)
        index = torch.argsort(weight_temp, dim=1)[:, :int(M - N)]
        w_b = torch.ones(weight_temp.shape, device=weight_temp.device)
        w_b = w_b.scatter_(dim=1, index=index, value=0).reshape(weight.shape)
        ctx.mask = w_b
        ctx.decay = decay
        return output * w_b

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[no-untyped-def]
        weight, = ctx.saved_tensors
        return grad_output + ctx.decay * (1 - ctx.mask) * weight, None, None


class _RefSparseNHWC(_RefSparse):
    @staticmethod
    def forward(ctx, weight, N, M, decay=0.0002):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(weight)
        output = weight.clone()
        length = weight.numel()
        group = int(length / M)
        weight_temp = weight.detach().abs().permute(0, 2, 3, 1).reshape(group, M)
        index = torch.argsort(weight_temp, dim=1)[:, :int(M - N)]
        w_b = torch.ones(weight_temp.shape, device=weight_temp.device)
        w_b = w_b.scatter_(dim=1, index=index, value=0).reshape(weight.permute(0, 2, 3, 1).shape)
        w_b = w_b.permute(0, 3, 1, 2)
        ctx.mask = w_b
        ctx.decay = decay
        return output * w_b


def test_nm_mask_linear_hand() -> None:
    w = torch.tensor([[0.1, -0.9, 0.3, 0.2, 5.0, 4.0, -3.0, 0.0]])
    assert N.nm_mask_ref(w, 2, 4).tolist() == [[0, 1, 1, 0, 1, 1, 0, 0]]


def test_nm_mask_conv_groups_input_channels_and_matches_reference() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, 2, 2, generator=g)
    m = N.nm_mask_ref(w, 2, 4)
    grp = m.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.all(grp.sum(1) == 2)
    top = w.abs().permute(0, 2, 3, 1).reshape(-1, 4).topk(2, dim=1).indices
    assert torch.all(grp.gather(1, top) == 1)
    wr = w.clone().requires_grad_(True)
    out = _RefSparseNHWC.apply(wr, 2, 4)
    assert torch.equal(out.detach(), w * m)
    go = torch.randn(w.shape, generator=g)
    out.backward(go)
    assert torch.allclose(wr.grad, N.srste_backward_ref(go, w, m))
    stem = torch.randn(2, 3, 1, 4, generator=g)  # C_in = 3 < M: groups straddle kernel positions
    ms = N.nm_mask_ref(stem, 2, 4)
    assert torch.all(ms.permute(0, 2, 3, 1).reshape(-1, 4).sum(1) == 2)
    assert torch.equal(_RefSparseNHWC.apply(stem, 2, 4), stem * ms)


def test_nm_linear_matches_reference_and_effective_decay() -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 16, generator=g)
    m = N.nm_mask_ref(w, 1, 4)
    assert torch.all(m.reshape(-1, 4).sum(1) == 1)
    wr = w.clone().requires_grad_(True)
    out = _RefSparse.apply(wr, 1, 4)
    assert torch.equal(out.detach(), w * m)
    grads = [torch.randn(w.shape, generator=g) for _ in range(4)]
    total = N.allreduced_grad_ref(grads, w, m, decay=0.01)
    expect = torch.stack(grads).mean(0) + N.effective_decay(4, 0.01) * (1 - m) * w
    assert torch.allclose(total, expect, atol=1e-6)
    assert N.effective_decay(8) == pytest.approx(8 * 0.0002)


def test_prune_score_fractional_and_after_optimizer_step_smoke() -> None:
    r = _channel_ref()
    thr = r.prune_score(["a", "b"], 2.5)  # K = int(5.5) = 5 -> sorted[-5] = 4th smallest (.4): 3 below = ceil(2.5)
    assert thr == pytest.approx(0.4)
    g = torch.Generator().manual_seed(0)
    ws = {"a": torch.randn(8, 4, 3, 3, generator=g), "p": torch.randn(6, 8, 3, 3, generator=g)}
    ms = {k: (torch.rand(v.shape, generator=g) < 0.3).float() for k, v in ws.items()}
    ref = C.ChaseRef.from_erk(ws, ms, 0.3, grads={k: torch.randn(v.shape, generator=g) for k, v in ws.items()},
                              pairs={"a": "p"}, alive={"a": torch.ones(8)})
    kw = dict(steps_per_epoch=4, total_epochs=4, stop_dst_epochs=1, stop_gmp_epochs=2, update_frequency=2,
              layer_interval_epochs=0.5, start_layer_rate=0.25, prune_rate=0.05, density=0.3)
    for s in range(16):
        ev = C.step_events(s, **kw)  # type: ignore[arg-type]
        ref.after_optimizer_step(ev, baseline_filter_num=8, minimum_layer={"a": C.minimum_layer(8, 0.25, 0.5)})
        assert torch.all(ref.masks["p"][:, ~ref.alive["a"].bool()] == 0)
    assert ref.alive["a"].sum().item() < 8
