"""Every ```python block of README.md and of the documentation pages runs as written: the README first, then
the pages in the order of the site's navigation (mkdocs.yml), all in one namespace (later blocks reuse the
names earlier ones define, as a reader does). A block that needs a GPU or a dataset says so in its first
line (``# needs: gpu`` / ``# needs: data``) and is skipped where that is missing. The README's install, test
and docs commands are the ones CI (``.ci/run``) runs."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from lightning_sparse.slim import channel_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def readme_python_blocks(text: str) -> list[str]:
    """The fenced python blocks of a Markdown text, in order."""
    return BLOCK.findall(text)


def nav_pages(nav: list) -> list[str]:
    """The page paths of an mkdocs ``nav``, depth first, in reading order."""
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(nav_pages(value) if isinstance(value, list) else [value])
    return pages


def reading_order() -> list[Path]:
    """README.md, then every page of the documentation site in the order of its navigation."""
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    return [ROOT / "README.md", *(DOCS / page for page in nav_pages(nav))]


def test_nav_pages_reads_nested_sections_in_order():
    nav = [{"Home": "index.md"}, {"Callbacks": [{"A": "cb/a.md"}, "cb/b.md"]}, {"Last": "z.md"}]
    assert nav_pages(nav) == ["index.md", "cb/a.md", "cb/b.md", "z.md"]


def test_every_docs_page_is_in_the_navigation():
    """A page outside the navigation would escape the snippet run below (docs/figures/ holds data tables)."""
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] != "figures"}
    nav = set(nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    assert pages == nav, f"not in mkdocs.yml nav: {sorted(pages - nav)}; missing files: {sorted(nav - pages)}"


def test_readme_commands_are_what_ci_runs():
    """Every install command of the README starts one line of .ci/run, and every line of .ci/run starts with one."""
    readme = (ROOT / "README.md").read_text()
    commands = [line for block in BASH.findall(readme) for line in block.splitlines() if "pip install" in line]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    assert len(commands) == len(ci) == 3
    for line in ci:
        assert any(line == c or line.startswith(c + " ") for c in commands), line
    for c in commands:
        assert any(line == c or line.startswith(c + " ") for line in ci), c


def test_block_extraction_finds_every_fence():
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x + 1\n```\n"
    assert readme_python_blocks(text) == ["x = 1\n", "y = x + 1\n"]


def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [(path.relative_to(ROOT), i, code) for path in reading_order()
              for i, code in enumerate(readme_python_blocks(path.read_text()))]
    assert len(blocks) >= 3
    ns: dict = {"__name__": "readme"}
    for path, i, code in blocks:
        need = re.match(r"# needs: (\w+)", code)
        if need and need.group(1) == "gpu" and not torch.cuda.is_available():
            continue
        if need and need.group(1) == "data":
            continue
        exec(compile(code, f"{path} python block {i + 1}", "exec"), ns)

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
