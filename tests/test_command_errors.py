"""Every command answers bad input alike: ONE line ``<prog>: error: ...`` on stderr, exit code 2, no traceback;
no option is matched by a prefix; a bug keeps its traceback; ``JSONARGPARSE_DEBUG=true`` shows tracebacks.
(``train.py``'s own cases: tests/test_cli_errors.py.)"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXPORT, COMPARE, BENCHMARK = (f"python -m lightning_sparse.{name}" for name in ("export", "compare", "benchmark"))


class RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A crafted checkpoint (its pickle would write ``ran``), a plain slim-export-free torch file, a run folder
    whose checkpoint is the crafted one, a non-empty folder and a plain file."""
    root = tmp_path_factory.mktemp("inputs")
    torch.save({"state_dict": {}, "hyper_parameters": {"x": RunsCode(str(root / "ran"))}}, root / "crafted.ckpt")
    run = root / "runs" / "crafted" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model:\n  class_path: lightning_sparse.models.ImageClassifier\n")
    (run / "metrics.csv").write_text("step,val/acc\n0,0.5\n")
    (run / "checkpoints" / "best-000.ckpt").write_bytes((root / "crafted.ckpt").read_bytes())
    (root / "busy").mkdir()
    (root / "busy" / "keep.txt").write_text("mine")
    (root / "a_file").write_text("not a folder")
    return root


CASES = {
    # export
    "export: missing checkpoint": (EXPORT, ["missing.ckpt", "--out", "o"], "checkpoint='missing.ckpt' does not exist"),
    "export: option given by a prefix": (EXPORT, ["crafted.ckpt", "--out", "o", "--batch", "8"],
                                         "--batch: unknown option; did you mean --batch_size?"),
    "export: value of the wrong type": (EXPORT, ["crafted.ckpt", "--out", "o", "--batch-size", "x"],
                                        "--batch_size=x: expected int"),
    "export: foreign pickle": (EXPORT, ["crafted.ckpt", "--out", "o"],
                               "checkpoint 'crafted.ckpt' would build Python objects no lightning_sparse checkpoint "
                               "holds (builtins.exec)"),
    "export: out folder not empty": (EXPORT, ["missing.ckpt", "--out", "busy"], "out='busy' exists and is not empty"),
    "export: out is a file": (EXPORT, ["missing.ckpt", "--out", "a_file"], "out='a_file' exists and is not a folder"),
    "export: argument out of range": (EXPORT, ["missing.ckpt", "--out", "o", "--reps", "0"],
                                      "reps must be a positive int, got reps=0"),
    # compare
    "compare: not a run": (COMPARE, ["busy", "--out", "o"], "'busy' is not a run directory"),
    "compare: option given by a prefix": (COMPARE, ["runs/crafted", "--rep", "3"],
                                          "--rep: unknown option; did you mean --reps?"),
    "compare: value of the wrong type": (COMPARE, ["runs/crafted", "--reps", "x"], "--reps=x: expected int"),
    "compare: out is a file": (COMPARE, ["runs/crafted", "--out", "a_file"], "out='a_file' exists and is not a folder"),
    "compare: run with a foreign pickle": (COMPARE, ["runs/crafted", "--out", "o", "--no_timing"],
                                           "best-000.ckpt' would build Python objects"),
    # benchmark
    "benchmark: option given by a prefix": (BENCHMARK, ["--linear", "64x64", "--batch", "8"],
                                            "--batch: unknown option; did you mean --batch-size?"),
    "benchmark: value of the wrong type": (BENCHMARK, ["--linear", "64x64", "--runs", "x"], "--runs=x: expected int"),
    "benchmark: missing checkpoint": (BENCHMARK, ["--checkpoint", "missing.ckpt"], "--checkpoint missing.ckpt: no such file"),
    "benchmark: foreign pickle": (BENCHMARK, ["--checkpoint", "crafted.ckpt"],
                                  "checkpoint 'crafted.ckpt' would build Python objects"),
    # train.py
    "train.py: foreign pickle to resume from": ("train.py fit", ["fit", "--config", str(ROOT / "configs" / "debug.yaml"),
                                                                 "--ckpt_path=crafted.ckpt"],
                                                "--ckpt_path='crafted.ckpt' is not a readable Lightning checkpoint "
                                                "(checkpoint 'crafted.ckpt' would build Python objects"),
}


def _command(prog: str, args: list[str]) -> list[str]:
    if prog.startswith("train.py"):
        return [sys.executable, str(ROOT / "train.py"), *args]
    return [sys.executable, "-m", prog.split()[-1], *args]


def _run(argv: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), **env}
    if "JSONARGPARSE_DEBUG" not in env:
        environ.pop("JSONARGPARSE_DEBUG", None)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=environ)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(files, case):
    prog, args, expected = CASES[case]
    proc = _run(_command(prog, args), files)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"{prog}: error: ") and expected in errors[0], errors[0]
    assert not (files / "ran").exists()  # the crafted pickle never ran
    assert not (files / "o").exists() and not list(files.glob(".o.*"))  # no half-written output


def test_a_bug_keeps_its_traceback(files):
    """Only InputError becomes one line: a ValueError from a bug is shown whole."""
    code = ("import lightning_sparse.export.__main__ as m, lightning_sparse.export.exporter as e\n"
            "def bug(*a, **k):\n    raise ValueError('a bug, not an input error')\n"
            "e.load_run_model = bug\nm.main(['crafted.ckpt', '--out', 'o'])\n")
    proc = _run([sys.executable, "-c", code], files)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: a bug, not an input error" in proc.stderr


def test_debug_switch_shows_the_traceback_of_an_input_error(files):
    proc = _run(_command(COMPARE, ["busy", "--out", "o"]), files, JSONARGPARSE_DEBUG="true")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "NotARunError" in proc.stderr


def _parser_calls(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, callee, passes allow_abbrev=False)`` of every parser a file builds."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in ("ArgumentParser", "CLI", "auto_cli"):
                off = any(k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and k.value.value is False
                          for k in node.keywords)
                found.append((node.lineno, name, off))
    return found


def test_no_parser_matches_options_by_prefix():
    """Every parser in the package, the benchmarks and train.py refuses abbreviated options (the commands build
    theirs with command_parser, train.py with SparseArgumentParser)."""
    files = [ROOT / "train.py", *sorted((ROOT / "lightning_sparse").rglob("*.py")), *sorted((ROOT / "benchmarks").rglob("*.py"))]
    calls = {f"{p.relative_to(ROOT)}:{line}": (name, off) for p in files for line, name, off in _parser_calls(p)}
    assert any(k.startswith("lightning_sparse/cli/commands.py") for k in calls)  # the commands' one parser
    assert [k for k, (_, off) in calls.items() if not off] == []
    from lightning_sparse.cli.parser import SparseArgumentParser

    assert SparseArgumentParser().allow_abbrev is False
