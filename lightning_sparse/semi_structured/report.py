"""Results of a 2:4 semi-structured benchmark: per-layer rows, the end-to-end report, plain-text output."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lightning_sparse.semi_structured.eligibility import LayerEligibility
from lightning_sparse.utils.tables import text_table
from lightning_sparse.utils.timing import HOST_BOUND_FRACTION

__all__ = ["LAYER_COLUMNS", "LayerTiming", "SemiStructuredReport", "format_report"]

NAN = float("nan")
LAYER_COLUMNS = ["layer", "weight", "input", "dense_ms", "sparse_ms", "speedup",
                 "dense_host_ms", "sparse_host_ms", "host_bound", "rel_err"]


def _bound(host_ms: float, event_ms: float) -> bool:
    return not math.isnan(host_ms) and host_ms >= HOST_BOUND_FRACTION * event_ms


@dataclass
class LayerTiming:
    """One converted linear at its real input shape: CUDA-event and host medians (ms), output parity."""

    name: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    dense_ms: float
    sparse_ms: float
    dense_host_ms: float = NAN
    sparse_host_ms: float = NAN
    rel_err: float = NAN  # max |sparse - dense| / max |dense| of this layer's output

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else NAN

    @property
    def host_bound(self) -> bool:
        """The host took (nearly) as long as the GPU for the dense or the sparse call: not a kernel figure."""
        return _bound(self.dense_host_ms, self.dense_ms) or _bound(self.sparse_host_ms, self.sparse_ms)


@dataclass
class SemiStructuredReport:
    """Result of :func:`lightning_sparse.semi_structured.benchmark_semi_structured`."""

    dtype: str
    backend: str
    batch_size: int
    input_shape: tuple[int, ...]
    device_name: str
    runs: int
    dense_ms: float  # end-to-end median (CUDA events), dense masked model
    sparse_ms: float  # end-to-end median (CUDA events), semi-structured model
    parity_max_rel_err: float
    parity_tolerance: float
    converted: list[str] = field(default_factory=list)  # module names with a semi-structured weight
    skipped: list[LayerEligibility] = field(default_factory=list)
    layers: list[LayerTiming] = field(default_factory=list)
    dense_host_ms: float = NAN
    sparse_host_ms: float = NAN
    runner: str = "eager"  # "eager", "cuda-graph" or "compile"
    torch_version: str = ""
    algorithms: dict[str, int] = field(default_factory=dict)  # cuSPARSELt alg id per layer, when searched
    layer_errors: dict[str, float] = field(default_factory=dict)  # per converted layer parity

    @property
    def speedup_e2e(self) -> float:
        return self.dense_ms / self.sparse_ms if self.sparse_ms > 0 else NAN

    @property
    def dense_images_per_s(self) -> float:
        return self.batch_size / (self.dense_ms / 1e3) if self.dense_ms > 0 else NAN

    @property
    def sparse_images_per_s(self) -> float:
        return self.batch_size / (self.sparse_ms / 1e3) if self.sparse_ms > 0 else NAN

    @property
    def host_bound(self) -> bool:
        return _bound(self.dense_host_ms, self.dense_ms) or _bound(self.sparse_host_ms, self.sparse_ms)

    @property
    def worst_layer(self) -> tuple[str, float] | None:
        """``(name, relative error)`` of the converted layer whose output differs most from dense."""
        if not self.layer_errors:
            return None
        name = max(self.layer_errors, key=lambda n: self.layer_errors[n])
        return name, self.layer_errors[name]

    @property
    def parity_ok(self) -> bool:
        worst = self.worst_layer
        layer_ok = worst is None or worst[1] <= self.parity_tolerance
        return self.parity_max_rel_err <= self.parity_tolerance and layer_ok

    def metrics(self, prefix: str = "semi/") -> dict[str, float]:
        """Scalars for a logger: ``semi/speedup_e2e``, ``semi/dense_img_s``, ``semi/sparse_img_s`` ..."""
        return {
            f"{prefix}speedup_e2e": self.speedup_e2e,
            f"{prefix}dense_img_s": self.dense_images_per_s,
            f"{prefix}sparse_img_s": self.sparse_images_per_s,
            f"{prefix}dense_ms": self.dense_ms,
            f"{prefix}sparse_ms": self.sparse_ms,
            f"{prefix}dense_host_ms": self.dense_host_ms,
            f"{prefix}sparse_host_ms": self.sparse_host_ms,
            f"{prefix}parity_max_rel_err": self.parity_max_rel_err,
            f"{prefix}converted_layers": float(len(self.converted)),
        }

    def layer_rows(self) -> list[list[object]]:
        """Rows of the per-layer table, in the order of :data:`LAYER_COLUMNS`."""
        return [
            [t.name, "x".join(map(str, t.weight_shape)), "x".join(map(str, t.input_shape)),
             round(t.dense_ms, 5), round(t.sparse_ms, 5), round(t.speedup, 3),
             round(t.dense_host_ms, 5), round(t.sparse_host_ms, 5), "yes" if t.host_bound else "no",
             f"{t.rel_err:.1e}"]
            for t in self.layers
        ]



def format_report(report: SemiStructuredReport) -> str:
    """Plain-text summary: end-to-end line, host line, parity line, per-layer table, skipped layers.

    Example:
        >>> r = SemiStructuredReport("float16", "cusparselt", 64, (3, 224, 224), "GPU", 50, 2.0, 1.6, 1e-3, 1e-2,
        ...                          ["fc"], [], [LayerTiming("fc", (64, 64), (64, 64), 0.02, 0.015)])
        >>> print(format_report(r).splitlines()[0])
        2:4 semi-structured (float16, cusparselt, eager) on GPU, batch 64: dense masked 2.000 ms (32000 img/s),
        sparse 1.600 ms (40000 img/s), speed-up x1.250
    """
    r = report
    lines = [
        f"2:4 semi-structured ({r.dtype}, {r.backend}, {r.runner}) on {r.device_name}, batch {r.batch_size}: "
        f"dense masked {r.dense_ms:.3f} ms ({r.dense_images_per_s:.0f} img/s), "
        f"sparse {r.sparse_ms:.3f} ms ({r.sparse_images_per_s:.0f} img/s), speed-up x{r.speedup_e2e:.3f}",
    ]
    if not math.isnan(r.dense_host_ms):
        lines.append(
            f"host time per call: dense {r.dense_host_ms:.3f} ms, sparse {r.sparse_host_ms:.3f} ms"
            + (" -- HOST-BOUND: the GPU waited on the host; try --runner cuda-graph" if r.host_bound else "")
        )
    worst = r.worst_layer
    worst_text = f"; worst layer {worst[0]} {worst[1]:.2e}" if worst else ""
    lines.append(
        f"parity vs dense masked: max rel err {r.parity_max_rel_err:.2e}{worst_text} "
        f"({'ok' if r.parity_ok else 'FAILED'}, tolerance {r.parity_tolerance:.0e}); "
        f"{len(r.converted)} linear(s) converted, {len(r.skipped)} layer(s) left dense; median of {r.runs} runs"
    )
    if r.algorithms:
        lines.append(f"cuSPARSELt algorithms (searched): {sorted(set(r.algorithms.values()))}")
    if r.layers:
        lines += ["", text_table(LAYER_COLUMNS, r.layer_rows())]
    if r.skipped:
        lines += ["", "left dense:"] + [f"  {s.name} {s.shape}: {s.reason}" for s in r.skipped]
    return "\n".join(lines)
