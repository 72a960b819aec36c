"""Figures of SADTracker runs: the SAD point of a mask update sits at that update's step, and the figures carry
the run, the method, the updates/removals/stop marks, the SAD normaliser and every layer (dense ones labelled)."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from helpers.logs import capture_lightning_info, info_lines, legends_clear_of_axes
from helpers.training import fixed_loader, trainer
from lightning_sparse import plots
from lightning_sparse.callbacks import Chase, DynamicSparsity, NMSparsity, SADTracker
from lightning_sparse.sparsity.targets import candidate_weights


def _csv_rows(log_dir: str) -> list[dict[str, str]]:
    with open(Path(log_dir) / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _column(rows: list[dict[str, str]], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key) not in (None, "")}


def _dst_run(tiny_net: pl.LightningModule, tmp_path: Path) -> tuple[DynamicSparsity, SADTracker, str]:
    dst = DynamicSparsity(density=0.3, growth="random", update_interval=3, stop_step=10)
    tracker = SADTracker(interval=3)
    logger = CSVLogger(tmp_path, name="tiny_rigl")
    trainer(tmp_path, 15, [dst, tracker], logger=logger).fit(tiny_net, fixed_loader())
    return dst, tracker, logger.log_dir


def test_sad_point_sits_at_the_step_of_the_update(tiny_net: pl.LightningModule, tmp_path: Path) -> None:
    dst, tracker, log_dir = _dst_run(tiny_net, tmp_path)
    rows = _csv_rows(log_dir)
    regrown = _column(rows, "dst/regrown")
    sad_global = _column(rows, "sad/global")
    assert sorted(regrown) == [0, 3, 6, 9]  # updates every 3 steps from step 0 until the stop step 10
    for step, grown in regrown.items():
        # nothing else moves the masks: an update swaps `grown` positions off and as many on -> 2 * grown
        assert grown > 0 and sad_global[step] == 2 * grown, step
    # the points between updates are 0: no update leaks into a later point
    assert {s: v for s, v in sad_global.items() if s not in regrown} == {12: 0.0}
    assert tracker.history["step"] == [0, 3, 6, 9, 12]
    assert tracker.history["events"] == {"mask update": [0, 3, 6, 9]}


def test_figures_carry_run_method_marks_and_normaliser(tiny_net: pl.LightningModule, tmp_path: Path) -> None:
    dst, tracker, log_dir = _dst_run(tiny_net, tmp_path)
    h = tracker.history
    n_updates = len(_column(_csv_rows(log_dir), "dst/regrown"))
    masked = sum(m.numel() for m in dst.masks.values())  # the normaliser, counted from the masks themselves

    fig = plots.plot_sad(h)
    title = fig.axes[0].get_title()
    assert "tiny_rigl/version_0" in title and "SET (ERK, density 0.3)" in title
    for ax in fig.axes:
        updates = [ln for ln in ax.lines if ln.get_linestyle() == "--" and ln.get_color() == "tab:green"]
        stops = [ln for ln in ax.lines if ln.get_color() == "black"]
        assert len(updates) == n_updates == 4
        assert sorted(ln.get_xdata()[0] for ln in updates) == [0, 3, 6, 9]
        assert len(stops) == 1 and stops[0].get_xdata()[0] == 10  # the DST stop step
        assert f"fraction of all {masked:,} mask elements" in ax.get_ylabel()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["mask update (4)", "DST stop (step 10)"]
    assert legends_clear_of_axes(fig) == 1
    ticks = [t for t in fig.axes[1].get_xticks() if 0 <= t <= h["step"][-1]]
    assert len({round(b - a, 6) for a, b in zip(ticks, ticks[1:])}) == 1  # evenly spaced

    # DST keeps each layer's count: the heatmap would be flat rows, so the bar chart stands in for it
    assert not plots.heatmap_informative(h)
    bars = plots.plot_layer_density(h)
    labels = [t.get_text() for t in bars.axes[0].get_yticklabels()]
    dense = [n for n in candidate_weights(tiny_net) if n not in dst.masks]
    assert dense, "the first and last layer stay dense by default"
    assert labels == [f"{n} ({'unstructured' if n in dst.masks else 'dense'})" for n in candidate_weights(tiny_net)]
    widths = {n: p.get_width() for n, p in zip(candidate_weights(tiny_net), bars.axes[0].patches)}
    for name in dense:
        assert widths[name] == 1.0
    for name, mask in dst.masks.items():
        assert widths[name] == pytest.approx(mask.float().mean().item())
    assert "tiny_rigl/version_0" in bars.axes[0].get_title()
    names = sorted(p.name for p in (Path(log_dir) / "figures").iterdir())
    assert names == ["layer_density.png", "sad.png"]


def test_nm_bars_show_coverage_and_dense_layers(tiny_net: pl.LightningModule, tmp_path: Path) -> None:
    nm = NMSparsity(n=2, m=4)
    tracker = SADTracker(interval=2)
    trainer(tmp_path, 4, [nm, tracker], logger=CSVLogger(tmp_path, name="tiny_nm")).fit(tiny_net, fixed_loader())
    h = tracker.history
    fig = plots.plot_layer_density(h)
    params = dict(tiny_net.named_parameters())
    covered = set(nm.current_masks(tiny_net))
    names = candidate_weights(tiny_net)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [
        f"{n} ({'2:4' if n in covered else 'dense'})" for n in names]
    assert [p.get_width() for p in fig.axes[0].patches] == pytest.approx([0.5 if n in covered else 1.0 for n in names])
    share = sum(params[n].numel() for n in covered) / sum(params[n].numel() for n in names)
    assert f"2:4 {share:.1%}" in fig.axes[0].get_title() and "2:4 SR-STE" in fig.axes[0].get_title()
    assert not plots.heatmap_informative(h)


def test_chase_marks_channel_removals(tiny_net: pl.LightningModule, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    chase = Chase(density=0.3, channel_sparsity=0.5, minimum_ratio=0.5, channel_interval_epochs=1,
                  stop_gmp_epochs=2, stop_dst_epochs=1, update_interval=4, input_shape=(1, 8, 8))
    tracker = SADTracker(interval=2)
    logger = CSVLogger(tmp_path, name="tiny_chase")
    capture_lightning_info(caplog, monkeypatch)
    shapes: dict[int, dict[str, tuple[int, ...]]] = {}

    class Shapes(pl.Callback):  # mask shapes at every measurement, recorded beside the tracker
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            shapes[trainer.global_step - 1] = {k: tuple(v.shape) for k, v in chase.masks.items()}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, 18, [chase, tracker, Shapes()], logger=logger, max_epochs=3).fit(tiny_net, fixed_loader())
    assert not [w for w in caught if "changed shape" in str(w.message)]  # an info line, not a warning per layer
    rows = _csv_rows(logger.log_dir)
    removal_steps = sorted(_column(rows, "channels/global"))  # Chase logs channel counts at each removal
    h = tracker.history
    # after the steps that make (step + ΔT/2) a multiple of the 6-step epoch, 4 and 10: iterations 3 and 9
    assert h["events"]["channel removal"] == removal_steps == [3, 9]
    # one line per measurement at which slimming reshaped masks, naming every reshaped mask
    measured = h["step"]
    reshaped = {s: [k for k in shapes[s] if shapes[s][k] != shapes[p][k]] for p, s in zip(measured, measured[1:])}
    reshaped = {s: names for s, names in reshaped.items() if names}
    lines = info_lines(caplog, "SADTracker: step ")
    assert len(reshaped) >= 1 and len(lines) == len(reshaped)
    for line, (step, names) in zip(lines, sorted(reshaped.items())):
        assert line.startswith(f"SADTracker: step {step}: {len(names)} mask(s) changed shape"), line
        assert all(f"{n} {shapes[p][n]} -> {shapes[step][n]}" in line
                   for n in names for p in [measured[measured.index(step) - 1]])
    fig = plots.plot_active_channels(h)
    red = [ln for ln in fig.axes[0].lines if ln.get_color() == "tab:red"]
    assert sorted(ln.get_xdata()[0] for ln in red) == removal_steps
    assert "Chase (density 0.3, channel sparsity 0.5)" in fig.axes[0].get_title()
    # removals are steps; layers with the same curve share one line with their count
    curves = [ln for ln in fig.axes[0].lines if ln.get_drawstyle() == "steps-post"]
    relative = {n: tuple(c / v[0] for c in v) for n, v in h["channels"].items()}
    kept = [n for n, v in relative.items() if set(v) == {1.0}]
    assert len(curves) == len(set(relative.values()))
    if len(kept) > 1:
        assert f"{len(kept)} layers unchanged (1.0)" in [ln.get_label() for ln in curves]
    assert legends_clear_of_axes(fig) == 1
    heat = plots.plot_density_heatmap(h)  # redistribution after a removal changes layer densities
    assert plots.heatmap_informative(h) and "tiny_chase/version_0" in heat.axes[0].get_title()
    assert legends_clear_of_axes(heat) == 1  # right of the colorbar, off the cells
    assert not any(math.isnan(x) for x in h["sad_norm"])
