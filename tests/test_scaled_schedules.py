"""Schedules given as fractions of training scale with ``max_epochs`` (and ``max_steps``); epoch schedules stay
fixed and fail clearly when they do not fit. Every quick config fits a ``--trainer.max_epochs`` override alone.

The schedule is read back from the callbacks after a real fit and compared with the arithmetic of the
arguments (``floor(fraction × optimizer steps)``), and a fraction schedule is checked against the epoch schedule
it equals step for step.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from conftest import TinyNet
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.training import fixed_loader, trainer
from lightning_sparse.callbacks import Chase, DynamicSparsity, GradualMagnitudePruning
from lightning_sparse.sparsity.chase import REFERENCE_FRACTIONS, ChaseSchedule, resolve_spans

ROOT = Path(__file__).resolve().parents[1]
QUICK = sorted(p.name for p in (ROOT / "configs").glob("quickstart*.yaml"))
SPE = 6  # fixed_loader(): 96 images in batches of 16
RATES = dict(channel_sparsity=0.4, density=0.1, drop_fraction=0.05, phase2_drop_fraction=(0.5, 0.005))


def _events(s: ChaseSchedule) -> list[tuple]:
    return [(s.is_channel_step(t), s.is_update_step(t), s.in_phase2(t), round(s.channel_target(t), 12),
             round(s.phase1_fraction(t), 12)) for t in range(1, s.total_steps)]


# ------------------------------------------------------------------------------------ pure resolution
@pytest.mark.parametrize(("spe", "epochs", "dt"), [(23, 12, 20), (2502, 100, 1000), (6, 3, 2)])
def test_fractions_equal_to_epoch_ratios_give_the_same_schedule_step_for_step(spe, epochs, dt):
    """k/E of E epochs is exactly the epoch schedule (the quick config's 1/12, the ImageNet 80/20/2 of 100)."""
    gmp, dst, interval = round(0.8 * epochs) or 1, round(0.2 * epochs), max(1, round(0.02 * epochs))
    args = {**RATES, "update_interval": dt}
    by_epochs = ChaseSchedule.for_training({**args, "stop_gmp_epochs": gmp, "stop_dst_epochs": dst,
                                            "channel_interval_epochs": interval}, epochs * spe, spe)
    by_fraction = ChaseSchedule.for_training({**args, "stop_gmp_fraction": gmp / epochs, "stop_dst_fraction": dst / epochs,
                                              "channel_interval_fraction": interval / epochs}, epochs * spe)
    assert by_fraction == by_epochs
    assert (by_epochs.channel_stop, by_epochs.phase2_steps, by_epochs.channel_interval) == (gmp * spe, dst * spe,
                                                                                           interval * spe)
    if epochs * spe < 5000:
        assert _events(by_fraction) == _events(by_epochs)


def test_neither_form_gives_the_reference_ratios():
    """CHASE.md §4 (ImageNet ResNet-50): channel schedule until epoch 80, phase 2 the last 20, removals every 2."""
    assert REFERENCE_FRACTIONS == {"stop_gmp": 0.8, "stop_dst": 0.2, "channel_interval": 0.02}
    spe = 2502  # 1.28M images / (4 GPUs x 128)
    default = ChaseSchedule.for_training(RATES, 100 * spe)
    assert (default.channel_stop, default.phase2_start, default.channel_interval) == (80 * spe, 80 * spe, 2 * spe)
    assert Chase().stop_gmp_epochs is None and Chase().stop_gmp_fraction is None


@settings(max_examples=200, deadline=None)
@given(total=st.integers(2, 10**7), gmp=st.floats(0.01, 1.0), dst=st.floats(0.0, 0.99), interval=st.floats(0.001, 1.0))
def test_fraction_spans_are_floor_of_fraction_times_steps(total, gmp, dst, interval):
    a = {"stop_gmp_fraction": gmp, "stop_dst_fraction": dst, "channel_interval_fraction": interval, **RATES}
    want_stop, want_p2 = math.floor(gmp * total + 1e-9), math.floor(dst * total + 1e-9)
    want_interval = max(1, math.floor(interval * total + 1e-9))
    if want_stop < 1 or want_p2 >= total or want_interval > want_stop:
        with pytest.raises(ValueError, match="Chase schedule does not fit|Conflicting channel schedule"):
            resolve_spans(a, total, None, f"max_steps={total}")
        return
    spans = resolve_spans(a, total, None, f"max_steps={total}")
    assert (spans.channel_stop, spans.phase2_steps, spans.channel_interval) == (want_stop, want_p2, want_interval)
    assert 1 <= spans.channel_stop <= total and 0 <= spans.phase2_steps < total


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stop_gmp_epochs": 8, "stop_gmp_fraction": 0.8},
         r"Give `stop_gmp_epochs` \(an int of epochs\) or `stop_gmp_fraction` \(a fraction of training\), not both, "
         r"got stop_gmp_epochs=8, stop_gmp_fraction=0.8\. To override one given by a config, set the other to null\."),
        ({"stop_dst_epochs": 2, "stop_dst_fraction": 0.2}, r"`stop_dst_epochs` .* or `stop_dst_fraction` .* not both"),
        ({"stop_gmp_fraction": 0.0}, r"`stop_gmp_fraction` \(end of the channel schedule, a fraction of training\) must "
                                     r"be in \(0, 1\], got stop_gmp_fraction=0\.0"),
        ({"stop_gmp_fraction": 80}, r"must be in \(0, 1\], got stop_gmp_fraction=80"),
        ({"stop_dst_fraction": 1.0}, r"`stop_dst_fraction` \(length of phase 2, a fraction of training\) must be in "
                                     r"\[0, 1\), got stop_dst_fraction=1\.0"),
        ({"channel_interval_fraction": 0}, r"`channel_interval_fraction` .* must be in \(0, 1\]"),
        ({"stop_gmp_epochs": 0.8}, r"`stop_gmp_epochs` must be an int >= 1, got stop_gmp_epochs=0\.8"),
        ({"stop_gmp_epochs": 1.0}, r"`stop_gmp_epochs` must be an int >= 1, got stop_gmp_epochs=1\.0"),
        ({"channel_interval_fraction": 0.5, "stop_gmp_fraction": 0.3},
         r"Conflicting channel schedule: the first removal \(`channel_interval_fraction`=0\.5\) comes after the schedule "
         r"ends \(`stop_gmp_fraction`=0\.3\)"),
    ],
)
def test_bad_span_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Chase(**kwargs)


def test_epoch_spans_that_do_not_fit_name_the_fractions_to_set():
    with pytest.raises(ValueError, match=r"Chase schedule does not fit max_epochs=4: stop_gmp_epochs=8 \(step 32\) must be "
                                         r"<= the 16 training steps; stop_dst_epochs=4 \(16 steps of phase 2\) must be < "
                                         r"the 16 training steps\. Give the schedule as fractions of training instead.*"
                                         r"stop_gmp_fraction, stop_dst_fraction, channel_interval_fraction \(the "
                                         r"reference: 0\.8, 0\.2, 0\.02\)"):
        resolve_spans({"stop_gmp_epochs": 8, "stop_dst_epochs": 4, **RATES}, 16, 4, "max_epochs=4")
    with pytest.raises(ValueError, match=r"Conflicting channel schedule: the first removal \(channel_interval_epochs=3, "
                                         r"step 12\) comes after the schedule ends \(stop_gmp_fraction=0\.5, step 8\)"):
        resolve_spans({"channel_interval_epochs": 3, "stop_gmp_fraction": 0.5, **RATES}, 16, 4, "max_epochs=4")
    with pytest.raises(ValueError, match=r"`stop_dst_epochs`=2 needs the number of steps per epoch, which is unknown .*"
                                         r"give `stop_dst_fraction`"):
        resolve_spans({"stop_dst_epochs": 2, **RATES}, 16, None, "max_steps=16")


# ------------------------------------------------------------------------------------ callbacks in a fit
def test_chase_fractions_scale_with_max_epochs_and_work_bounded_by_max_steps(tmp_path):
    kw = dict(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, update_interval=4, input_shape=(1, 8, 8),
              stop_gmp_fraction=0.5, stop_dst_fraction=0.25, channel_interval_fraction=0.25)
    for max_epochs in (2, 4):
        chase = Chase(**kw)
        trainer(tmp_path, callbacks=[chase], max_epochs=max_epochs).fit(TinyNet(), fixed_loader())
        total = max_epochs * SPE
        s = chase.schedule
        assert (s.total_steps, s.channel_stop, s.phase2_start, s.channel_interval) == (
            total, total // 2, total - math.floor(total / 4), math.floor(total / 4))
        assert any(chase.removed.values()), "the scaled channel schedule removed channels"
    chase = Chase(**kw)
    trainer(tmp_path, 10, [chase], max_epochs=-1).fit(TinyNet(), fixed_loader())  # 10 steps, no epoch limit
    assert (chase.schedule.total_steps, chase.schedule.channel_stop, chase.schedule.phase2_start) == (10, 5, 8)


def test_chase_epoch_schedule_too_long_for_max_epochs_fails_at_train_start(tmp_path):
    chase = Chase(density=0.3, channel_sparsity=0.5, stop_gmp_epochs=3, input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"does not fit max_epochs=2 \(12 optimizer steps\): stop_gmp_epochs=3 \(step 18\)"):
        trainer(tmp_path, callbacks=[chase], max_epochs=2).fit(TinyNet(), fixed_loader())


def test_dst_stop_fraction_scales_and_stop_epoch_past_the_end_fails(tmp_path):
    for max_epochs, fraction in ((2, 0.5), (3, None)):
        dst = DynamicSparsity(density=0.5, update_interval=1, stop_fraction=fraction, sparse_first_last=True)
        t = trainer(tmp_path, callbacks=[dst], max_epochs=max_epochs)
        t.fit(TinyNet(), fixed_loader())
        want = math.floor((0.75 if fraction is None else fraction) * max_epochs * SPE)
        assert dst.resolved_stop_step(t) == want and dst.num_updates == want  # one update per step until the stop
    with pytest.raises(ValueError, match=r"DynamicSparsity schedule does not fit max_epochs=2 \(12 optimizer steps\): "
                                         r"stop_epoch=3 \(step 18\) is after the end of training\. Set `stop_fraction`"):
        trainer(tmp_path, callbacks=[DynamicSparsity(stop_epoch=3)], max_epochs=2).fit(TinyNet(), fixed_loader())
    with pytest.raises(ValueError, match=r"Give one of `stop_step`, `stop_epoch` or `stop_fraction`, not several \(got "
                                         r"stop_epoch=2, stop_fraction=0\.5\)"):
        DynamicSparsity(stop_epoch=2, stop_fraction=0.5)
    with pytest.raises(ValueError, match=r"`stop_fraction` \(a fraction of the training's optimizer steps\) must be in "
                                         r"\(0, 1\], got stop_fraction=1\.5"):
        DynamicSparsity(stop_fraction=1.5)


def test_gmp_stop_fraction_reaches_the_final_density_and_a_stop_past_the_end_fails(tmp_path):
    gmp = GradualMagnitudePruning(density=0.2, update_interval=2, stop_fraction=0.5, sparse_first_last=True)
    t = trainer(tmp_path, callbacks=[gmp], max_epochs=2)
    t.fit(TinyNet(), fixed_loader())
    assert gmp.resolved_stop_step(t) == 6 and gmp.last_update_step == 6
    kept, total = sum(int(m.sum()) for m in gmp.masks.values()), sum(m.numel() for m in gmp.masks.values())
    assert kept == round(0.2 * total)
    for bad in ({"stop_epoch": 2}, {"stop_step": 12}):
        with pytest.raises(ValueError, match=r"GradualMagnitudePruning schedule does not fit max_epochs=2 \(12 optimizer "
                                             r"steps\): .* puts the last update at step 12, which never runs"):
            trainer(tmp_path, callbacks=[GradualMagnitudePruning(**bad)], max_epochs=2).fit(TinyNet(), fixed_loader())
    with pytest.raises(ValueError, match=r"must be in \(0, 1\), got stop_fraction=1\.0"):
        GradualMagnitudePruning(stop_fraction=1.0)


# ------------------------------------------------------------------------------------ the quick configs
def _fit_quick(name: str, tmp_path: Path, monkeypatch, *extra: str):
    from lightning_sparse.cli import main

    monkeypatch.chdir(tmp_path)
    text = (ROOT / "configs" / name).read_text()
    args = ["fit", "--config", str(ROOT / "configs" / name), "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=5", "--trainer.limit_val_batches=1", "--trainer.logger=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--data.init_args.batch_size=16", *extra]
    if "checkpoint_path" in text:  # a second stage: train from scratch here
        args.append("--model.init_args.checkpoint_path=null")
    if "model_name: resnet18" in text:  # the same code path, a smaller net
        args += ["--model.init_args.model_name=resnet10t", "--data.init_args.image_size=16"]
    return main(args)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if "chase" in n and "nm24" not in n else pytest.mark.slow)
                                  for n in QUICK])
def test_quick_config_fits_a_max_epochs_override_alone(name, tmp_path, monkeypatch):
    cli = _fit_quick(name, tmp_path, monkeypatch)
    t = cli.trainer
    assert t.global_step == 10 and t.current_epoch == 2  # 2 epochs x 5 batches, the whole scaled run
    for cb in t.callbacks:
        if isinstance(cb, Chase):  # the config's fractions of the 10 steps
            s = cb.schedule
            assert (s.total_steps, s.channel_stop, s.phase2_start, s.channel_interval) == (
                10, math.floor(10 * cb.stop_gmp_fraction), 10 - math.floor(10 * cb.stop_dst_fraction),
                max(1, math.floor(10 * cb.channel_interval_fraction)))
            assert (s.channel_stop, s.phase2_start) == (8, 8)
            assert sum(cb.start_channels.values()) > sum(cb.active_channels().values()), "channels were removed"
        if isinstance(cb, DynamicSparsity):
            assert cb.resolved_stop_step(t) == 7  # RigL's 75 % of the 10 steps


def test_quick_chase_config_with_epochs_too_long_names_the_fraction(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        _fit_quick("quickstart_chase.yaml", tmp_path, monkeypatch, "--sparsity.init_args.stop_gmp_fraction=null",
                   "--sparsity.init_args.stop_gmp_epochs=8")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"sparsity\.init_args\.stop_gmp_epochs=8 .*Chase schedule does not fit max_epochs=2 \(10 optimizer "
                     r"steps\): stop_gmp_epochs=8 \(step 40\) must be <= the 10 training steps.*stop_gmp_fraction", err)
