"""The end-of-run summary counts what the model holds: N:M at N/M of its layers, a slimmed model against itself and
the original. Each expected line is computed here from the run's checkpoint weights and a model built with timm."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from lightning_sparse.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--trainer.max_epochs=2", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
    "--trainer.limit_test_batches=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    "--trainer.logger=false", "--model.init_args.model_name=resnet10t", "--data.init_args.image_size=16",
]


def _weights_line(out: str) -> str:
    summary = out[out.rindex("summary"):]
    return next(line for line in summary.splitlines() if line.startswith("weights:")).split(":", 1)[1].split("; forward")[0]


def _conv_linear(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("model.") and k.endswith(".weight") and v.ndim in (2, 4)}


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, config: str, *extra: str):
    monkeypatch.chdir(tmp_path)
    main(["--config", str(ROOT / "configs" / config), *TINY, *extra])
    return _weights_line(capfd.readouterr().out), tmp_path / "runs"


def test_summary_lines_after_an_nm_fit(digits_small, tmp_path):
    """The fast check: a foreign LightningModule fit with NMSparsity, the summary line against its own weights."""
    import pytorch_lightning as pl

    from helpers.training import trainer as make_trainer
    from lightning_sparse.callbacks import NMSparsity
    from lightning_sparse.cli.summary import summary_lines
    from tests.conftest import TinyNet

    pl.seed_everything(0)
    model, nm = TinyNet(), NMSparsity(n=2, m=4)
    trainer = make_trainer(tmp_path, 2, [nm])
    with pytest.warns(UserWarning, match="skips"):
        trainer.fit(model, digits_small.train_dataloader())
    params = dict(model.named_parameters())
    covered = sum(params[k].numel() for k in ("body.0.weight", "body.3.weight", "head.weight"))
    total = covered + params["stem.weight"].numel()
    zeros = covered // 2 + int((params["stem.weight"] == 0).sum())
    line = next(x for x in summary_lines(trainer, model, None, original_total=total) if x.startswith("weights:"))
    assert line.split(":", 1)[1].strip() == (f"{zeros / total:.4f} sparse ({zeros:,} of {total:,} conv/linear weights "
                                             f"are 0, counted against the original model); 2:4 in {covered:,} of them: "
                                             "0.5000 of those are 0")


@pytest.mark.slow
def test_summary_counts_nm_as_the_model_holds_it(tmp_path, monkeypatch, capfd):
    line, runs = _run(tmp_path, monkeypatch, capfd, "quickstart_nm24.yaml")
    # train.py tests the best checkpoint (dense W, written during fit): the module ends holding its 2:4 weights
    best = next(runs.glob("quickstart_nm24/checkpoints/best-*.ckpt"))
    layers = _conv_linear(torch.load(best, map_location="cpu", weights_only=True)["state_dict"])
    covered = {k: w for k, w in layers.items() if w.shape[1] % 4 == 0}  # every layer but the 1-channel stem
    zeros = sum(w.numel() // 2 for w in covered.values())
    zeros += sum(int((w == 0).sum()) for k, w in layers.items() if k not in covered)
    total = sum(w.numel() for w in layers.values())
    n_covered = sum(w.numel() for w in covered.values())
    assert line.strip() == (f"{zeros / total:.4f} sparse ({zeros:,} of {total:,} conv/linear weights are 0, counted "
                            f"against the original model); 2:4 in {n_covered:,} of them: 0.5000 of those are 0")
    assert 0.49 < zeros / total < 0.5


@pytest.mark.slow
def test_summary_counts_a_slimmed_model_against_itself_and_the_original(tmp_path, monkeypatch, capfd):
    line, runs = _run(tmp_path, monkeypatch, capfd, "quickstart_chase.yaml", "--sparsity.init_args.stop_gmp_fraction=null",
                      "--sparsity.init_args.stop_gmp_epochs=2", "--sparsity.init_args.stop_dst_fraction=null",
                      "--sparsity.init_args.stop_dst_epochs=1", "--sparsity.init_args.update_interval=2")
    # a slimmed model is tested with its final weights, which last.ckpt holds
    last = runs / "quickstart_chase" / "checkpoints" / "last.ckpt"
    layers = _conv_linear(torch.load(last, map_location="cpu", weights_only=False)["state_dict"])
    zeros, total = sum(int((w == 0).sum()) for w in layers.values()), sum(w.numel() for w in layers.values())
    built = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    original = sum(m.weight.numel() for m in built.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert total < original  # the run slimmed the model
    assert line.strip() == (
        f"{zeros / total:.4f} sparse against the slimmed model ({zeros:,} of its {total:,} conv/linear weights are 0); "
        f"{(zeros + original - total) / original:.4f} against the original model (zeros and the {original - total:,} "
        f"removed weights among its {original:,})"
    )


def test_summary_lines_after_a_one_shot_nm_fit(digits_small, tmp_path):
    """One-shot N:M zeroes the pruned weights at every step, so the module after fit is its 2:4 model as well."""
    import pytorch_lightning as pl

    from helpers.training import trainer as make_trainer
    from lightning_sparse.callbacks import OneShotPruning
    from lightning_sparse.cli.summary import summary_lines
    from lightning_sparse.sparsity.nm import nm_violations
    from tests.conftest import TinyNet

    pl.seed_everything(0)
    model, cb = TinyNet(), OneShotPruning(pattern="nm", n=2, m=4)
    trainer = make_trainer(tmp_path, 2, [cb])
    with pytest.warns(UserWarning, match="dense"):
        trainer.fit(model, digits_small.train_dataloader())
    params = dict(model.named_parameters())
    targets = ("body.0.weight", "body.3.weight", "head.weight")
    assert all(nm_violations(params[k].detach(), 2, 4) == 0 for k in targets)
    covered = sum(params[k].numel() for k in targets)
    line = next(x for x in summary_lines(trainer, model, None) if x.startswith("weights:"))
    assert line.endswith(f"2:4 in {covered:,} of them: 0.5000 of those are 0")
