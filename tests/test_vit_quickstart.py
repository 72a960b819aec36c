"""configs/quickstart_vit_nm24.yaml trains a model the 2:4 semi-structured kernels can run: the benchmark command
on a checkpoint of it (a tiny-budget run through the CLI) lists at least 40 eligible ``nn.Linear`` layers, all of
them trained 2:4 by SR-STE."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_sparse.semi_structured.__main__ import main as benchmark_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart_vit_nm24.yaml"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path of the benchmark command")
def test_vit_quickstart_checkpoint_has_40_eligible_linears(tmp_path, monkeypatch, capsys):
    from lightning_sparse.callbacks import NMSparsity
    from lightning_sparse.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(CONFIG), "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
                "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--data.init_args.batch_size=16"])
    nm = next(cb for cb in cli.trainer.callbacks if isinstance(cb, NMSparsity))
    backbone = cli.model.model
    linears = {f"model.{n}.weight": m for n, m in backbone.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(linears) <= set(nm.targets) and len(linears) == 49  # SR-STE covers every Linear (4 per block + head)

    ckpt = sorted(tmp_path.rglob("last.ckpt"))
    assert ckpt, "the run wrote a checkpoint"
    capsys.readouterr()
    assert benchmark_main(["--checkpoint", str(ckpt[-1])]) == 0
    out = capsys.readouterr().out
    found = re.search(r"(\d+) of (\d+) nn\.Linear layer\(s\) eligible \((\d+) conv\(s\) stay dense\)", out)
    assert found, out[-3000:]
    eligible, total, convs = map(int, found.groups())
    assert eligible >= 40 and (eligible, total, convs) == (48, 49, 1)
    for block in range(12):  # every block's qkv, proj, fc1, fc2 is a row marked eligible
        for layer, shape in (("attn.qkv", "192x64"), ("attn.proj", "64x64"), ("mlp.fc1", "256x64"), ("mlp.fc2", "64x256")):
            assert re.search(rf"^blocks\.{block}\.{layer}\s+{shape}\s+yes\b", out, re.M), (block, layer)
    assert re.search(r"^head\s+10x64\s+no\s+out_features=10 is not a positive multiple of 16", out, re.M)
