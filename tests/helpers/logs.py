"""Reading Lightning's rank-zero info lines and checking where a figure's legend sits."""

from __future__ import annotations

import logging

import pytest
from matplotlib.figure import Figure


def capture_lightning_info(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Let ``caplog`` see Lightning's info lines (its loggers do not propagate to the root logger by default)."""
    for name in ("lightning_fabric", "pytorch_lightning"):
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.INFO)


def info_lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    """The captured log messages that start with ``start``."""
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


def legends_clear_of_axes(fig: Figure) -> int:
    """Draw ``fig`` and check that no legend (figure or axes legend) overlaps any axes (colorbars included);
    returns the number of legends."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), (legend, ax)
    return len(legends)
