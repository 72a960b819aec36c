"""Execute every notebook in ``notebooks/`` from a temporary copy (nbclient, python3 kernel).

Slow (each notebook trains small models on CPU): ``pytest -m slow tests/test_notebooks.py``.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell
ACCURACY = re.compile(r"accuracy[^\n]*?\b(0\.\d+|1\.0+)\b")


def _text(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    return output.get("data", {}).get("text/plain", "")


def test_every_notebook_is_listed():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_chase_channels.ipynb", "03_nm_sad.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    # the kernel imports this checkout's package, whatever is installed in the environment
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(copy, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "some code cell did not run"
    errors = [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert not errors, errors
    final = "".join(_text(o) for o in code[-1].outputs)
    accuracies = [float(v) for v in ACCURACY.findall(final)]
    assert accuracies, f"the last cell printed no accuracy: {final!r}"
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    figures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert figures, "no figure was drawn"
