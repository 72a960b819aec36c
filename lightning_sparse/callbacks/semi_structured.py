"""2:4 semi-structured inference benchmark of the trained model, as a Callback (fit end and/or test end)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_sparse.callbacks._base import log_metrics
from lightning_sparse.semi_structured import (
    BACKENDS,
    DTYPES,
    LAYER_COLUMNS,
    MIN_RUNS,
    RUNNERS,
    Backend,
    NothingConverted,
    SemiStructuredReport,
    benchmark_semi_structured,
    format_report,
    resolve_device,
    skip_reason,
)

__all__ = ["SemiStructuredBenchmark"]

When = Literal["fit_end", "test_end", "both"]
WHENS = ("fit_end", "test_end", "both")


class SemiStructuredBenchmark(pl.Callback):
    """Time the trained model with 2:4 semi-structured sparse linears vs the dense 2:4-masked model.

    At the chosen hook, on rank zero, a copy of the module is cast to ``dtype`` on the GPU, 2:4 masks are
    baked into every eligible ``nn.Linear`` and converted with ``torch.sparse.to_sparse_semi_structured``;
    the trained model is never modified. The result is printed and logged (``semi/speedup_e2e``,
    ``semi/dense_img_s``, ``semi/sparse_img_s``, ...; a ``semi/layers`` table to W&B). Where it cannot run
    (CPU, an unsupported GPU, no eligible layer) it says why and the run goes on. The user guide is the
    SemiStructuredBenchmark page of the documentation (``docs/callbacks/semi-structured-benchmark.md``).

    Args:
        when: ``"fit_end"``, ``"test_end"`` or ``"both"``.
        dtype: ``"float16"`` or ``"bfloat16"``.
        backend: ``"cusparselt"`` (default) or ``"cutlass"``.
        batch_size: images per timed forward.
        warmup: untimed rounds before timing.
        runs: timed rounds (>= 50); medians are reported.
        input_shape: one sample's shape, e.g. ``[3, 224, 224]``; default: ``example_input_array`` of the
            module, else the first batch of the train/val/test dataloader.
        layers: also time every converted linear on its own.
        runner: ``"eager"`` (Python dispatch included), ``"cuda-graph"`` (replays a captured CUDA graph: the
            kernels alone) or ``"compile"`` (``torch.compile``).
        search: cuSPARSELt algorithm search per layer at its input shape.

    Raises:
        ValueError: for invalid arguments.

    Example:
        >>> cb = SemiStructuredBenchmark(when="both", dtype="bfloat16", batch_size=256)
        >>> cb.state_key
        "SemiStructuredBenchmark{'when': 'both', 'dtype': 'bfloat16', 'backend': 'cusparselt', 'batch_size': 256}"
    """

    def __init__(
        self,
        when: When = "fit_end",
        dtype: str = "float16",
        backend: Backend = "cusparselt",
        batch_size: int = 64,
        warmup: int = 10,
        runs: int = MIN_RUNS,
        input_shape: Sequence[int] | None = None,
        layers: bool = True,
        runner: str = "eager",
        search: bool = False,
    ) -> None:
        super().__init__()
        self._validate(when, dtype, backend, batch_size, warmup, runs, input_shape)
        if runner not in RUNNERS:
            raise ValueError(f"`runner` must be one of {list(RUNNERS)}, got runner={runner!r}.")
        if search and backend != "cusparselt":
            raise ValueError(f"`search=True` needs backend='cusparselt', got backend={backend!r}.")
        self.runner, self.search = runner, bool(search)
        self.when, self.dtype, self.backend = when, dtype, backend
        self.batch_size, self.warmup, self.runs = batch_size, warmup, runs
        self.input_shape = None if input_shape is None else tuple(input_shape)
        self.layers = bool(layers)
        self.reports: list[SemiStructuredReport] = []
        self.last_skip_reason: str | None = None

    @staticmethod
    def _validate(
        when: Any, dtype: Any, backend: Any, batch_size: Any, warmup: Any, runs: Any, input_shape: Any
    ) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if when not in WHENS:
            raise ValueError(f"`when` must be one of {list(WHENS)}, got when={when!r}.")
        if dtype not in DTYPES:
            raise ValueError(
                f"`dtype` must be one of {list(DTYPES)} for 2:4 semi-structured sparsity, got dtype={dtype!r}."
            )
        if backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got backend={backend!r}.")
        if not is_int(batch_size) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got batch_size={batch_size!r}.")
        if not is_int(warmup) or warmup < 0:
            raise ValueError(f"`warmup` must be an int >= 0, got warmup={warmup!r}.")
        if not is_int(runs) or runs < MIN_RUNS:
            raise ValueError(f"`runs` must be an int >= {MIN_RUNS} (medians of many runs), got runs={runs!r}.")
        if input_shape is not None and (
            isinstance(input_shape, (str, bytes)) or not all(is_int(d) and d > 0 for d in input_shape)
        ):
            raise ValueError(
                f"`input_shape` must be None or a list of positive ints (one sample, no batch dim), "
                f"got input_shape={input_shape!r}."
            )

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            when=self.when, dtype=self.dtype, backend=self.backend, batch_size=self.batch_size
        )

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when in ("fit_end", "both") and trainer.is_global_zero:
            self._run_benchmark(trainer, pl_module, "fit_end")

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when in ("test_end", "both") and trainer.is_global_zero:
            self._run_benchmark(trainer, pl_module, "test_end")

    # ------------------------------------------------------------------ internals
    def _run_benchmark(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hook: str) -> None:
        reason = skip_reason(pl_module, self.dtype, self.backend)
        input_shape = self.input_shape or self._infer_input_shape(trainer, pl_module)
        if reason is None and input_shape is None:
            reason = "cannot infer the input shape (no example_input_array, no dataloader); pass input_shape=[C, H, W]"
        if reason is not None:
            self.last_skip_reason = reason
            rank_zero_info(f"SemiStructuredBenchmark ({hook}) skipped: {reason}.")
            return
        try:
            report = benchmark_semi_structured(
                pl_module, input_shape, self.dtype, self.backend, self.batch_size, self.warmup, self.runs,
                layers=self.layers, device=resolve_device(None),
                runner=self.runner, search=self.search,
            )
        except NothingConverted as err:
            self.last_skip_reason = str(err)
            rank_zero_info(f"SemiStructuredBenchmark ({hook}) skipped: {err}.")
            return
        self.last_skip_reason = None
        self.reports.append(report)
        rank_zero_info(f"SemiStructuredBenchmark ({hook}):\n{format_report(report)}")
        if not report.parity_ok:
            worst = report.worst_layer
            layer = f"; worst layer {worst[0]} ({worst[1]:.2e})" if worst else ""
            rank_zero_warn(
                f"SemiStructuredBenchmark: sparse outputs differ from the dense masked model by "
                f"{report.parity_max_rel_err:.2e} (relative), above the {report.parity_tolerance:.0e} "
                f"tolerance{layer}."
            )
        log_metrics(trainer, report.metrics())
        self._log_wandb_table(trainer, report)

    @staticmethod
    def _infer_input_shape(trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[int, ...] | None:
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, torch.Tensor):
            return tuple(example.shape[1:])
        for attr in ("train_dataloader", "val_dataloaders", "test_dataloaders"):
            loader = getattr(trainer, attr, None)
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            if loader is None:
                continue
            try:
                batch = next(iter(loader))
            except (StopIteration, TypeError):
                continue
            x = batch[0] if isinstance(batch, (list, tuple)) else batch
            if isinstance(x, torch.Tensor) and x.ndim >= 2:
                return tuple(x.shape[1:])
        return None

    @staticmethod
    def _log_wandb_table(trainer: pl.Trainer, report: SemiStructuredReport) -> None:
        if not report.layers:
            return
        from pytorch_lightning.loggers import WandbLogger  # only imports wandb itself when used

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="semi/layers", columns=LAYER_COLUMNS, data=report.layer_rows())
