"""The SemiStructuredBenchmark callback: argument checks, the CPU skip, and fit/test with fake kernels."""

from __future__ import annotations

import logging

import pytest
import torch

from lightning_sparse.semi_structured import (
    LAYER_COLUMNS,
)
from lightning_sparse.sparsity.nm import nm_violations
from tests.helpers import fake_semi_structured
from tests.helpers.semi_structured import MLP


# ------------------------------------------------------------------------------------- callback
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"when": "epoch_end"}, r"`when` must be one of \['fit_end', 'test_end', 'both'\], got when='epoch_end'"),
        ({"dtype": "float32"}, r"`dtype` must be one of \['float16', 'bfloat16'\].*got dtype='float32'"),
        ({"backend": "triton"}, r"`backend` must be one of \['cusparselt', 'cutlass'\], got backend='triton'"),
        ({"batch_size": 0}, r"`batch_size` must be an int >= 1, got batch_size=0"),
        ({"warmup": -1}, r"`warmup` must be an int >= 0, got warmup=-1"),
        ({"runs": 10}, r"`runs` must be an int >= 50 \(medians of many runs\), got runs=10"),
        ({"input_shape": [3, 0, 8]}, r"`input_shape` must be None or a list of positive ints.*got input_shape=\[3, 0, 8\]"),
    ],
)
def test_callback_argument_validation(kwargs, match):
    from lightning_sparse.callbacks import SemiStructuredBenchmark

    with pytest.raises(ValueError, match=match):
        SemiStructuredBenchmark(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_callback_skips_on_cpu_and_run_succeeds(tmp_path, caplog):
    from lightning_sparse.callbacks import SemiStructuredBenchmark
    from tests.helpers.training import fixed_loader
    from tests.helpers.training import trainer as make_trainer

    model = MLP()
    cb = SemiStructuredBenchmark(when="both")
    trainer = make_trainer(tmp_path, 2, [cb])
    loader = fixed_loader(n=32, batch_size=16)

    class Collect(logging.Handler):  # attached to Lightning's rank-zero logger itself: no reliance on propagation
        def __init__(self):
            super().__init__(logging.INFO)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    handler = Collect()
    rank_zero_logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    old_level = rank_zero_logger.level
    rank_zero_logger.addHandler(handler)
    rank_zero_logger.setLevel(logging.INFO)
    try:
        trainer.fit(model, loader)
        trainer.test(model, loader, verbose=False)
    finally:
        rank_zero_logger.removeHandler(handler)
        rank_zero_logger.setLevel(old_level)
    lines = [r.getMessage() for r in handler.records if "SemiStructuredBenchmark" in r.getMessage()]
    assert lines == [
        "SemiStructuredBenchmark (fit_end) skipped: no CUDA device: 2:4 semi-structured sparse kernels need an "
        "NVIDIA GPU with compute capability >= 8.0.",
        "SemiStructuredBenchmark (test_end) skipped: no CUDA device: 2:4 semi-structured sparse kernels need an "
        "NVIDIA GPU with compute capability >= 8.0.",
    ]
    assert trainer.state.finished and cb.reports == [] and cb.last_skip_reason.startswith("no CUDA device")
    assert cb._infer_input_shape(trainer, model) == (1, 8, 8)


def test_callback_fit_and_test_end_with_fake_kernels(monkeypatch, tmp_path, few_runs):
    from lightning_sparse.callbacks import SemiStructuredBenchmark
    from tests.helpers.training import fixed_loader
    from tests.helpers.training import trainer as make_trainer

    fake = fake_semi_structured.install(monkeypatch)
    model = MLP()
    cb = SemiStructuredBenchmark(when="both", batch_size=8, warmup=0, runs=2)
    trainer = make_trainer(tmp_path, 2, [cb])
    loader = fixed_loader(n=32, batch_size=16)
    trainer.fit(model, loader)
    trainer.test(model, loader, verbose=False)
    assert [r.converted for r in cb.reports] == [["net.1", "net.3"], ["net.1", "net.3"]]
    rep = cb.reports[-1]
    assert rep.input_shape == (1, 8, 8) and [t.input_shape for t in rep.layers] == [(8, 64), (8, 128)]
    assert rep.parity_ok and len(rep.layer_rows()[0]) == len(LAYER_COLUMNS)
    assert nm_violations(model.net[1].weight, 2, 4) > 0 and model.net[1].weight.dtype == torch.float32
    assert fake.compressed == [(128, 64), (64, 128)] * 2

    fake.refuse_compress = True
    trainer.test(model, loader, verbose=False)
    assert len(cb.reports) == 2 and cb.last_skip_reason.startswith("no layer converted")
