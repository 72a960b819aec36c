"""Every ```python block of README.md runs as written, in order, in one namespace (later blocks reuse the
names earlier ones define, as a reader does). A block that needs a GPU or a dataset says so in its first
line (``# needs: gpu`` / ``# needs: data``) and is skipped where that is missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_sparse.slim import channel_config

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def readme_python_blocks(text: str) -> list[str]:
    """The fenced python blocks of a Markdown text, in order."""
    return BLOCK.findall(text)


def test_block_extraction_finds_every_fence():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    assert readme_python_blocks(text) == ["x = 1\n", "y = x + 1\n"]


def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = readme_python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3
    ns: dict = {"__name__": "readme"}
    for i, code in enumerate(blocks):
        need = re.match(r"# needs: (\w+)", code)
        if need and need.group(1) == "gpu" and not torch.cuda.is_available():
            continue
        if need and need.group(1) == "data":
            continue
        exec(compile(code, f"README.md python block {i + 1}", "exec"), ns)  # noqa: S102

    # what the snippets claim, checked on the objects they built
    model = ns["my_module"]
    params = dict(model.named_parameters())
    masks = ns["dst"].masks
    assert masks and not any("downsample" in n for n in masks)
    assert "model.fc.weight" not in masks and "model.conv1.0.weight" not in masks  # first/last stay dense
    conv = params["model.layer2.0.conv2.weight"].detach()  # N:M baked: <= 2 nonzeros in every 4 input channels
    groups = conv.permute(0, 2, 3, 1).reshape(-1, 4)
    assert int((groups != 0).sum(dim=1).max()) <= 2
    # load_slim rebuilt the exported network: the channels of my_module.model (its shapes; N:M kept them)
    assert channel_config(ns["model"]) == channel_config(model.model) and (tmp_path / "slim.pt").is_file()
    with torch.no_grad():  # the export was taken before the N:M snippet trained on: same shapes, a model that runs
        assert ns["model"](ns["x"]).shape == ns["logits"].shape == (2, 10)
