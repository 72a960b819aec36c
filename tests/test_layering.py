"""The package layering: no private cross-package imports, export and compare independent, utils at the bottom."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_sparse"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every absolute ``lightning_sparse`` name a module imports (``module.name`` for ``from`` imports)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return [(name, line) for name, line in out if name.startswith("lightning_sparse.")]


def _top(name: str) -> str:
    return name.split(".")[1]


def cross_package_violations(root: Path = PACKAGE) -> list[str]:
    """Imports of another top-level package's private module or name, and of export by compare or back."""
    found = []
    for path in sorted(root.rglob("*.py")):
        mod = _module_name(path, root)
        for name, line in _imports(path):
            if _top(name) == _top(mod) or len(mod.split(".")) < 2:
                continue
            private = [p for p in name.split(".")[1:] if p.startswith("_") and not p.startswith("__")]
            if private:
                found.append(f"{mod}:{line} imports private {name}")
            if {_top(mod), _top(name)} == {"export", "compare"}:
                found.append(f"{mod}:{line} imports the sibling tool {name}")
            if _top(mod) == "utils":
                found.append(f"{mod}:{line} (the lower layer) imports {name}")
    return found


def test_no_package_imports_a_private_module_or_a_sibling_tool():
    assert cross_package_violations() == []


def test_the_check_catches_each_kind_of_violation(tmp_path):
    pkg = tmp_path / "lightning_sparse"
    files = {
        "export/fold.py": "from lightning_sparse.slim._graph import eval_mode\n",
        "export/report.py": "from lightning_sparse.compare.measure import measure_costs\n",
        "compare/runs.py": "import lightning_sparse.export\n",
        "benchmark.py": "from lightning_sparse.semi_structured.report import _table\n",
        "utils/timing.py": "from lightning_sparse.slim import count_flops\n",
        "slim/config.py": "from lightning_sparse.slim._graph import build_graph\n",  # inside its own package: fine
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    found = cross_package_violations(pkg)
    assert found == [
        "lightning_sparse.benchmark:1 imports private lightning_sparse.semi_structured.report._table",
        "lightning_sparse.compare.runs:1 imports the sibling tool lightning_sparse.export",
        "lightning_sparse.export.fold:1 imports private lightning_sparse.slim._graph.eval_mode",
        "lightning_sparse.export.report:1 imports the sibling tool lightning_sparse.compare.measure.measure_costs",
        "lightning_sparse.utils.timing:1 (the lower layer) imports lightning_sparse.slim.count_flops",
    ]


@pytest.mark.parametrize("text", ["2:4", "1:8"])
def test_one_nm_representation_round_trips(text):
    from lightning_sparse.run import NM

    pattern = NM.parse(text)
    assert str(pattern) == text and pattern.fraction == int(text[0]) / int(text[2])


@pytest.mark.parametrize("bad", ["2-4", "4:4", "0:4", "a:b"])
def test_a_bad_nm_pattern_is_named(bad):
    from lightning_sparse.run import NM

    with pytest.raises(ValueError, match=repr(bad) if "-" in bad or "a" in bad else r"0 < n < m"):
        NM.parse(bad)


def test_class_path_and_image_size_resolvers_name_bad_values():
    from lightning_sparse.run import UnknownImageSize, config_image_size, resolve_class, resolve_image_size

    assert resolve_class("lightning_sparse.data.DigitsDataModule").__name__ == "DigitsDataModule"
    with pytest.raises(ValueError, match=r"class_path='lightning_sparse.data.NoSuch' names no importable class"):
        resolve_class("lightning_sparse.data.NoSuch")
    with pytest.raises(ValueError, match=r"class_path='Digits' is not a dotted path"):
        resolve_class("Digits")
    assert config_image_size({"data": {"init_args": {"image_size": 24}}}) == 24
    assert config_image_size({"data": {"class_path": "lightning_sparse.data.DigitsDataModule"}}) == 32
    assert config_image_size({}) is None
    assert resolve_image_size(None, [None, "16", 20, 28], "run x", "nowhere") == 20
    assert resolve_image_size(12, [20], "run x", "nowhere") == 12
    with pytest.raises(ValueError, match=r"image_size must be a positive int, got image_size=0"):
        resolve_image_size(0, [20], "run x", "nowhere")
    with pytest.raises(UnknownImageSize, match=r"cannot tell the input size of run x: nowhere. Pass --image_size"):
        resolve_image_size(None, [None], "run x", "nowhere")
