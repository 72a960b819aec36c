"""Run every docstring example in the package (the equivalent of ``pytest --doctest-modules lightning_sparse``).

Only modules whose source holds an example are collected, and each must run at least one: a module without
examples is not a passing doctest."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path

import pytest

import lightning_sparse

ALL_MODULES = sorted(m.name for m in pkgutil.walk_packages(lightning_sparse.__path__, "lightning_sparse."))


def _has_example(name: str) -> bool:
    """Whether the module's source holds a ``>>>`` prompt (read from the file: nothing is imported)."""
    return ">>> " in Path(importlib.util.find_spec(name).origin).read_text(encoding="utf-8")


MODULES = [name for name in ALL_MODULES if _has_example(name)]


def test_modules_with_examples_are_found():
    assert "lightning_sparse.sparsity.sad" in MODULES and "lightning_sparse.sparsity.masks" in MODULES
    assert len(MODULES) >= 25, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{name} has a '>>> ' in its source but no docstring example ran"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
