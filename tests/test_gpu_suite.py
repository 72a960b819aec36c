"""benchmarks/gpu_suite.py: the whole suite at toy size on CPU (also without wandb, jsonargparse and Torch-Pruning),
its time budget, inputs and report files; benchmarks/gpu_tables.py; CUDA-graph replay lifetime and the suite on a GPU
(``gpu``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_sparse.semi_structured import sparsify_model
from lightning_sparse.utils import cuda_graph
from tests.helpers import fake_semi_structured
from tests.helpers.run_if import RunIf

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_test_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_suite = _load("gpu_suite")
gpu_tables = _load("gpu_tables")

TINY = ["--device", "cpu", "--tiny"]
CNN_ARMS = {"dense", "DynamicSparsity (RigL)", "NMSparsity SR-STE 2:4", "Chase before slimming"}
VIT_ARMS = {"dense", "NMSparsity SR-STE 2:4", "DynamicSparsity (RigL)"}

# importing any of these raises, as on the GPU machine (which has none of them)
BLOCKER = """
import sys
BLOCKED = {"wandb", "jsonargparse", "torch_pruning"}
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed on the GPU machine")
        return None
sys.meta_path.insert(0, _Blocked())
"""


def _report(out: Path) -> tuple[dict, Path]:
    [folder] = [p for p in out.iterdir() if p.is_dir()]
    return json.loads((folder / "report.json").read_text()), folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The whole suite at toy size on CPU, in this process (Torch-Pruning installed)."""
    out = tmp_path_factory.mktemp("gpu_suite")
    assert gpu_suite.main([*TINY, "--out", str(out)]) == 0
    return _report(out)


# ----------------------------------------------------------------------------------------- the toy-size run
def test_tiny_run_times_every_training_arm(tiny):
    report, _ = tiny
    assert not [s for s in report["skipped"] if "FAILED" in s["reason"]], report["skipped"]
    rows = report["rows"]["a"]
    by_model = {m: {r["arm"]: r for r in rows if r["model"] == m} for m in ("test_resnet", "test_vit")}
    assert CNN_ARMS <= set(by_model["test_resnet"]) and len(by_model["test_resnet"]) == 6
    assert {a for a in by_model["test_resnet"] if a.startswith("Chase slim")} == {
        f"Chase slim S_c {report['rows']['b'][1]['S_c']}", f"Chase slim prune skip S_c {report['rows']['b'][2]['S_c']}"}
    assert set(by_model["test_vit"]) == VIT_ARMS
    for model, arms in by_model.items():
        assert arms["dense"]["ratio"] == 1.0
        for arm, r in arms.items():
            assert r["timed_steps"] == gpu_suite.TINY.train_steps
            assert math.isfinite(r["ratio"]) and r["ratio"] > 0, (model, arm)
            assert r["ratio"] == pytest.approx(r["amortised_ms"] / arms["dense"]["amortised_ms"], rel=1e-3)
            if arm.startswith(("DynamicSparsity", "Chase")):  # ΔT = 2 in the window: mask updates were timed
                assert r["update_ms"] is not None, (model, arm)
                ref_dt, ref_batch = gpu_suite.RECIPE_DT["rigl" if arm.startswith("Dynamic") else "chase"]
                assert r["recipe_dt"] == round(ref_dt * ref_batch / 2)
                low, high = sorted((r["step_ms"], r["update_ms"]))
                assert low <= r["amortised_ms"] <= high
            else:
                assert r["update_ms"] is None and r["amortised_ms"] == r["step_ms"]
    slim = [r for r in rows if r["arm"].startswith("Chase slim")]
    assert all(0 < r["flops_ratio"] < 1 for r in slim)


def test_tiny_run_checks_chase_outputs_against_the_cpu_model(tiny):
    report, folder = tiny
    rows = report["rows"]["b"]
    assert {(r["variant"], r["runner"], r["dtype"]) for r in rows} == {
        (v, run, "float32") for v in ("dense", "plain", "skip") for run in ("eager", "compile")}
    assert all(r["output_ok"] and r["max_rel_err"] <= r["tolerance"] for r in rows)
    plain, skip = (next(r for r in rows if r["variant"] == v) for v in ("plain", "skip"))
    assert plain["S_c"] == 0.4 and 0 < skip["flops_ratio"] < plain["flops_ratio"] < 1
    skipped = {s["what"]: s["reason"] for s in report["skipped"]}
    assert "CUDA" in skipped["cuda-graph runner"]
    assert "no CUDA device" in skipped["2:4 test_vit (all rows)"]
    assert report["rows"]["d"][0]["files"] == gpu_suite.gpu_test_files()
    assert "tests/test_gpu_suite.py" in report["rows"]["d"][0]["files"]
    assert len(report["goals"]) == len(gpu_suite.GOALS)
    # rows run by priority: the Chase models first, then the goal rows of each section, then the others
    assert [w["what"] for w in report["walls"]] == [
        "Chase slim models of test_resnet", "training step test_resnet 32px batch 2", "training step test_vit batch 2",
        "Chase inference float32 eager", "Chase inference float32 compile"]
    profile = report["profiles"]["Chase inference float32 eager"]
    assert set(profile) == {"dense", "skip"} and all(any("conv" in o["op"] for o in ops) for ops in profile.values())
    md = (folder / "report.md").read_text()
    assert "## Profile: Chase inference float32 eager" in md
    assert "## a. Training step ÷ dense" in md and "| test_vit | NMSparsity SR-STE 2:4 | 2 |" in md
    assert folder.name == gpu_suite.report_dir(Path("."), {"gpu": "cpu", "torch": torch.__version__}).name


def test_a_wrong_output_is_reported_and_fails_the_run(tmp_path, monkeypatch):
    real = gpu_suite._inference_runner

    def off_by_some(model, x, runner, suite):
        fn = real(model, x, runner, suite)
        return (lambda: fn() * 1.5) if runner == "compile" else fn

    monkeypatch.setattr(gpu_suite, "_inference_runner", off_by_some)
    assert gpu_suite.main([*TINY, "--sections", "b", "--out", str(tmp_path)]) == 1
    report, folder = _report(tmp_path)
    bad = {(r["variant"], r["runner"]) for r in report["rows"]["b"] if not r["output_ok"]}
    assert bad == {("dense", "compile"), ("plain", "compile"), ("skip", "compile")}
    assert "**WRONG**" in (folder / "report.md").read_text()


def test_tiny_run_without_wandb_jsonargparse_torch_pruning(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(block), str(ROOT)]))
    probe = subprocess.run([sys.executable, "-c", "import torch_pruning"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "not installed on the GPU machine" in probe.stderr  # the blocker is active
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", *TINY, "--sections", "a", "c", "d", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report, _ = _report(out)
    assert not [s for s in report["skipped"] if "FAILED" in s["reason"]], report["skipped"]
    arms = {(r["model"], r["arm"]) for r in report["rows"]["a"]}
    assert arms == {("test_resnet", a) for a in CNN_ARMS - {"Chase before slimming"}} | {("test_vit", a) for a in VIT_ARMS}
    chase = [s for s in report["skipped"] if "Chase" in s["what"]]
    assert chase and all("Torch-Pruning" in s["reason"] for s in chase)


# ------------------------------------------------------------------------------------------ budget, inputs
def test_zero_budget_skips_every_row_with_the_reason(tmp_path):
    t0 = time.monotonic()
    assert gpu_suite.main([*TINY, "--budget-s", "0", "--sections", "a", "c", "--out", str(tmp_path)]) == 0
    assert time.monotonic() - t0 < 60
    report, folder = _report(tmp_path)
    assert report["rows"]["a"] == [] and report["rows"]["c"] == []
    over = {s["what"] for s in report["skipped"] if "does not fit the time budget" in s["reason"]}
    assert over == {"Chase slim models of test_resnet", "training step test_resnet 32px batch 2",
                    "training step test_vit batch 2"}, report["skipped"]
    assert (folder / "report.md").is_file()


def test_a_row_that_overruns_is_stopped_at_the_budget():
    args = gpu_suite.parser().parse_args(TINY)
    suite = gpu_suite.Suite(args, gpu_suite.TINY, torch.device("cpu"), gpu_suite.Budget(0.5, 0.0), {"x": 0.0})
    t0 = time.monotonic()
    assert suite.run("a", "a slow row", "x", lambda: time.sleep(5)) is False
    assert time.monotonic() - t0 < 3
    assert suite.skipped == [{"section": "a", "what": "a slow row", "reason": "stopped at the time budget (--budget-s 0)"}]

    def wrapped():  # torch.compile re-raises what interrupted it wrapped in its own exception
        try:
            raise gpu_suite.BudgetExceeded("stopped")
        except gpu_suite.BudgetExceeded as err:
            raise RuntimeError("backend compiler failed") from err

    suite.budget = gpu_suite.Budget(60.0, 0.0)
    assert suite.run("b", "a compile row", "x", wrapped) is False
    assert suite.skipped[-1]["reason"] == "stopped at the time budget (--budget-s 60)"
    assert suite.run("b", "a broken row", "x", lambda: 1 / 0) is False
    assert suite.skipped[-1]["reason"] == "FAILED: ZeroDivisionError: division by zero"
    assert [w["what"] for w in suite.walls] == ["a slow row", "a compile row", "a broken row"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--device", "cpu"], "--device cpu runs only at toy size: add --tiny"),
    (["--device", "tpu", "--tiny"], "--device 'tpu'"),
    ([*TINY, "--budget-s", "-1"], "--budget-s must be a finite number >= 0, got -1.0"),
    ([*TINY, "--sections", "e"], "invalid choice: 'e'"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        gpu_suite.main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_the_gpu_run_says_so_and_writes_nothing(tmp_path, capsys):
    assert gpu_suite.main(["--out", str(tmp_path)]) == 0
    assert "no CUDA GPU here" in capsys.readouterr().out and list(tmp_path.iterdir()) == []


def test_report_folder_name_and_replacement(tmp_path):
    info = {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130"}
    folder = gpu_suite.report_dir(tmp_path, info)
    assert folder.name == "nvidia-h200_2.11.0-cu130"
    report = {"machine": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "date": "d", "timm": "t", "lightning": "l",
                          "cuda": "c"}, "command": "python benchmarks/gpu_suite.py", "wall_s": 1.0, "budget_s": 480.0,
              "tiny": False, "rows": {k: [] for k in "abcd"}, "skipped": [], "notes": [], "goals": []}
    gpu_suite.write_report(report, folder)
    (folder / "stale.txt").write_text("from an older run")
    report["wall_s"] = 2.0
    gpu_suite.write_report(report, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temporary or old folder left
    assert sorted(p.name for p in folder.iterdir()) == ["report.json", "report.md"]
    assert json.loads((folder / "report.json").read_text())["wall_s"] == 2.0


# ----------------------------------------------------------------------------------------------- gpu_tables
def test_readme_gpu_tables_are_generated_from_the_reports():
    assert gpu_tables.main(["--check"]) == 0
    if not gpu_tables.load_reports():
        block = (ROOT / "README.md").read_text().split(gpu_tables.BEGIN)[1].split(gpu_tables.END)[0]
        assert block.count("| awaits a GPU |") == len(gpu_tables.AWAITING)


def test_tables_show_a_full_size_report_and_ignore_toy_ones(tiny, tmp_path):
    report, _ = tiny
    (tmp_path / "cpu_toy").mkdir()
    (tmp_path / "cpu_toy" / "report.json").write_text(json.dumps(report))
    assert gpu_tables.load_reports(tmp_path) == []
    full = dict(report, tiny=False)
    full["machine"] = dict(report["machine"], gpu="NVIDIA H200")
    (tmp_path / "nvidia-h200_x").mkdir()
    (tmp_path / "nvidia-h200_x" / "report.json").write_text(json.dumps(full))
    block = gpu_tables.render(gpu_tables.load_reports(tmp_path))
    assert "awaits a GPU" not in block and "**NVIDIA H200, torch" in block
    assert "| test_resnet batch 2 | NMSparsity SR-STE 2:4 |" in block and "| skip S_c" in block
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gpu_tables.BEGIN}\nold\n{gpu_tables.END}\nrest\n")
    assert gpu_tables.main(["--file", str(readme), "--results", str(tmp_path), "--check"]) == 1
    assert gpu_tables.main(["--file", str(readme), "--results", str(tmp_path)]) == 0
    assert readme.read_text() == f"intro\n{block}\nrest\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        gpu_tables.main(["--file", str(readme), "--results", str(tmp_path)])


# ------------------------------------------------------------------------------- 2:4 conversion, MLP only
class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Linear(64, 64)
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.fc2(torch.relu(self.mlp.fc1(self.attn(x))))


def test_include_converts_only_the_mlp_layers(monkeypatch):
    from torch.sparse import SparseSemiStructuredTensor

    fake_semi_structured.install(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dense, sparse, converted, skipped = sparsify_model(model, "float16", include=gpu_suite.MLP_ONLY)
    assert converted == ["0.mlp.fc1", "0.mlp.fc2", "1.mlp.fc1", "1.mlp.fc2"]
    assert {s.name: s.reason for s in skipped if "include" in s.reason}.keys() == {"0.attn", "1.attn"}
    for name in ("0.attn", "1.attn"):  # left out: dense and unmasked in both copies
        for copy_ in (dense, sparse):
            w = copy_.get_submodule(name).weight
            assert not isinstance(w, SparseSemiStructuredTensor)
            assert torch.equal(w, before[f"{name}.weight"].half())
    x = torch.randn(8, 64, dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"pattern\(s\) \['\*\.proj'\] match no 2:4-eligible layer"):
        sparsify_model(model, "float16", include=["*.mlp.fc1", "*.proj"])
    with pytest.raises(ValueError, match="non-empty list of fnmatch patterns, got include='\\*.fc1'"):
        sparsify_model(model, "float16", include="*.fc1")


# -------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@RunIf(min_gpus=1)
def test_cuda_graph_replay_survives_other_gpu_work():
    """The replay keeps the captured function's tensors: a runner whose model and input nobody else holds still
    returns the right outputs after other GPU work has reused every free block."""
    torch.manual_seed(0)

    def runner():
        model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).cuda().eval()
        x = torch.randn(256, 512, device="cuda")
        with torch.inference_mode():
            ref = model(x).clone()

        def run():
            with torch.inference_mode():
                return model(x)

        return cuda_graph(run, "cuda"), ref

    replay, ref = runner()  # model and x now live only inside the replay
    torch.testing.assert_close(replay(), ref)
    garbage = [torch.full((n,), float("nan"), device="cuda") for n in (512 * 512, 256 * 512, 512, 10 * 512) * 8]
    torch.cuda.synchronize()
    torch.testing.assert_close(replay(), ref)
    del garbage


@pytest.mark.gpu
@RunIf(min_gpus=1)
def test_tiny_suite_on_the_gpu(tmp_path):
    # a, b and c at toy size (d would run this file again); the CUDA-graph and compile outputs are checked
    code = gpu_suite.main(["--tiny", "--sections", "a", "b", "c", "--budget-s", "240", "--out", str(tmp_path)])
    report, _ = _report(tmp_path)
    assert code == 0 and not [s for s in report["skipped"] if "FAILED" in s["reason"]], report["skipped"]
    runners = {r["runner"] for r in report["rows"]["b"]}
    assert runners == {"eager", "cuda-graph", "compile"} and all(r["output_ok"] for r in report["rows"]["b"])
