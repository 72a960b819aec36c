"""Interleaved timing of callables; on CUDA, events on the device's own stream tell GPU time from host time.

Each timed call starts on an idle GPU (the device is synchronized first), then records a start event,
runs the call, records an end event. Two figures per call:

- ``event_ms``: GPU time from the start to the end event, idle gaps included;
- ``host_ms``: wall time the host spent issuing the call (Python, dispatch, kernel launches).

When ``host_ms`` is close to ``event_ms`` the GPU spent the call waiting for the host: the row measures
host overhead, not the kernel (:data:`HOST_BOUND_FRACTION`). Replaying a CUDA graph (:func:`cuda_graph`)
removes the host from the measurement: one launch replays every kernel.

On a CPU device (:func:`interleaved_times` with ``device="cpu"``) a call is synchronous: both figures are
its wall time (``time.perf_counter``), so ``host_bound`` carries no information there.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["HOST_BOUND_FRACTION", "Timing", "cuda_graph", "interleaved_times"]

# host_ms >= this fraction of event_ms: the GPU waited on the host for (nearly) the whole call
HOST_BOUND_FRACTION = 0.8


@dataclass(frozen=True)
class Timing:
    """Medians over the timed runs of one function (milliseconds).

    ``host_runs`` holds the host time of every timed run in round order (round ``r`` of every function
    returned by one :func:`interleaved_times` call ran in the same pass), so per-round ratios between two
    functions pair measurements taken side by side.
    """

    event_ms: float
    host_ms: float
    host_runs: tuple[float, ...] = field(default=(), compare=False, repr=False)

    @property
    def host_bound(self) -> bool:
        """``True`` when issuing the call took nearly as long as the GPU time: the host is measured."""
        return self.host_ms >= HOST_BOUND_FRACTION * self.event_ms


def interleaved_times(
    fns: Sequence[Callable[[], object]], warmup: int, runs: int, device: torch.device | str
) -> list[Timing]:
    """Median CUDA-event and host times per call of each ``fn``, the functions interleaved run by run.

    ``warmup`` untimed rounds first; then ``runs`` rounds, each calling every function once (the order
    rotates every round so none always runs first). On CUDA, events are recorded on ``device``'s current
    stream; on CPU both figures are the wall time of the call.

    Example:
        >>> t = interleaved_times([lambda: sum(range(1000)), lambda: sum(range(10))], 1, 3, "cpu")
        >>> t[0].event_ms == t[0].host_ms and t[0].event_ms > 0, len(t[0].host_runs)
        (True, 3)
    """
    if runs < 1:
        raise ValueError(f"`runs` must be >= 1, got runs={runs!r}.")
    if warmup < 0:
        raise ValueError(f"`warmup` must be >= 0, got warmup={warmup!r}.")
    device = torch.device(device)
    cuda = device.type == "cuda"
    if not cuda and device.type != "cpu":
        raise ValueError(f"interleaved_times times 'cuda' or 'cpu' devices, got device={str(device)!r}.")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    with torch.cuda.device(device) if cuda else contextlib.nullcontext():
        stream = torch.cuda.current_stream(device) if cuda else None
        for _ in range(warmup):
            for fn in fns:
                fn()
        sync()
        events: list[list[tuple[torch.cuda.Event, torch.cuda.Event]]] = [[] for _ in fns]
        host: list[list[float]] = [[] for _ in fns]
        k = len(fns)
        for r in range(runs):
            for j in range(k):
                i = (j + r) % k
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync()
                t0 = time.perf_counter()
                if cuda:
                    start.record(stream)
                fns[i]()
                if cuda:
                    end.record(stream)
                    events[i].append((start, end))
                host[i].append((time.perf_counter() - t0) * 1e3)
        sync()
    if not cuda:
        return [Timing(statistics.median(h), statistics.median(h), tuple(h)) for h in host]
    return [
        Timing(statistics.median(s.elapsed_time(e) for s, e in ev), statistics.median(h), tuple(h))
        for ev, h in zip(events, host)
    ]


def cuda_graph(fn: Callable[[], object], device: torch.device | str, warmup: int = 3) -> Callable[[], object]:
    """Capture ``fn`` (fixed inputs) into a CUDA graph; return a function that replays it.

    ``fn`` runs ``warmup`` times on a side stream first (as ``torch.cuda.graphs`` asks), then once under
    capture. The replay returns the output tensors of the captured call, refreshed in place.

    The replay keeps ``fn`` (and so everything it closes over: the model's weights, its input) alive. A
    graph stores raw device addresses, not tensors: had the replay held only the graph and its output, a
    caller that kept no other reference to the model (a runner built on a temporary BN-folded copy) would
    free the weights and the input right after capture. The caching allocator keeps that memory reserved,
    so replays stay correct until other GPU work (another model's forward) is given those blocks and
    overwrites them; from then on the replay reads foreign data and returns wrong outputs. That was the
    wrong-logits failure of a CUDA-graph runner seen once other models had run between capture and replay.
    """
    device = torch.device(device)
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()

    def replay() -> object:
        graph.replay()
        return out

    replay.captured = fn  # type: ignore[attr-defined]  # the graph reads fn's tensors by address: keep them alive

    return replay
