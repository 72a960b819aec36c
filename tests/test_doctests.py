"""Run every docstring example in the package (the equivalent of ``pytest --doctest-modules lightning_sparse``)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_sparse

MODULES = sorted(m.name for m in pkgutil.walk_packages(lightning_sparse.__path__, "lightning_sparse."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
