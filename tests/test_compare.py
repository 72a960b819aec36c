"""``python -m lightning_sparse.compare`` on tiny real runs trained here: table values against the runs' own
files (metrics.csv, checkpoint weights), FLOPs against an analytic count, and bad inputs."""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_sparse.cli import main as train
from lightning_sparse.compare import NotARunError, compare
from lightning_sparse.compare.__main__ import main as compare_cli

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "configs" / "sweep"
TINY = [
    "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
    "--trainer.log_every_n_steps=1", "--model.init_args.model_name=resnet10t", "--data.init_args.image_size=16",
    "--data.init_args.batch_size=16",
]
# name -> (method file, extra overrides); the method callback is the last one, so init_args overrides reach it
RUNS = {
    "rigl": ("rigl.yaml", ["--trainer.max_epochs=1", "--trainer.limit_train_batches=6",
                           "--sparsity.density=0.2", "--sparsity.update_interval=2"]),
    "chase": ("chase.yaml", ["--trainer.max_epochs=2", "--sparsity.stop_gmp_epochs=2",
                             "--sparsity.stop_dst_epochs=1",
                             "--sparsity.update_interval=2",
                             "--sparsity.density=0.3"]),
    "nm": ("srste.yaml", ["--trainer.max_epochs=1", "--sparsity.n=1", "--sparsity.m=8"]),
    "dense": ("dense.yaml", ["--trainer.max_epochs=1"]),
}
# (epochs, optimizer steps, images seen) from the overrides above: batches per epoch x epochs, 16 images a batch
BUDGETS = {"rigl": (1, 6, 96), "chase": (2, 6, 96), "nm": (1, 3, 48), "dense": (1, 3, 48)}
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny runs (RigL, Chase with slimming, 1:8 SR-STE, dense) made with train.py's CLI: ``<tmp>/runs/<name>``."""
    root = tmp_path_factory.mktemp("compare")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for name, (method, extra) in RUNS.items():
            train(["--config", str(SWEEP / "base.yaml"), "--config", str(SWEEP / method), *TINY, *extra,
                   f"--run_name={name}"])
    return root / "runs"


def _last(path: Path, key: str) -> float | None:
    with (path / "metrics.csv").open() as f:
        values = [r[key] for r in csv.DictReader(f) if r.get(key)]
    return float(values[-1]) if values else None


def _params(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.") and not k.endswith(BUFFERS)}


def _copy_run(src: Path, dst: Path, *skip: str) -> None:
    """Copy a run version without its W&B folder (W&B's ``debug-internal.log`` and ``latest-run`` are symlinks
    that dangle once the run ends) and without ``skip``; any other symlink is copied as a link."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("wandb", *skip))


def _dense_layers(image_size: int) -> tuple[dict[str, int], dict[str, int]]:
    """H*W of every Conv2d output (1 for Linear) of a dense resnet10t (slimming keeps the spatial sizes) and
    the dense weight sizes."""
    import timm

    model, areas = timm.create_model("resnet10t", num_classes=10, in_chans=1).eval(), {}
    numel = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            mod.register_forward_hook(lambda m, a, out, name=name: areas.__setitem__(
                name, out.shape[-1] * out.shape[-2] if out.ndim == 4 else 1))
    with torch.no_grad():
        model(torch.zeros(1, 1, image_size, image_size))
    return areas, numel


def test_table_matches_run_files_and_checkpoints(runs: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    rows = {Path(r["run"]).parent.name: r for r in compare([str(runs / "*")], out=str(tmp_path), reps=5)}
    elapsed_ms = (time.perf_counter() - start) * 1e3
    assert set(rows) == set(RUNS)
    areas, dense_numel = _dense_layers(16)
    for name, row in rows.items():
        run = runs / name / "version_0"
        assert row["test_acc"] == pytest.approx(_last(run, "test/acc")) and row["test_acc"] is not None
        assert row["val_acc"] == pytest.approx(_last(run, "val/acc"))
        assert row["sad_vs_init_norm"] == pytest.approx(_last(run, "sad/global_vs_init_norm"))
        last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert row["train_time_s"] == pytest.approx(last["callbacks"]["Timer"]["time_elapsed"]["train"])
        assert row["train_time_from"] == "Timer"
        # the tested checkpoint: best by val/acc, or last where Chase reshaped the model
        ckpt_name = "last.ckpt" if name == "chase" else next(p.name for p in (run / "checkpoints").glob("best-*.ckpt"))
        assert row["checkpoint"] == ckpt_name
        weights = _params(torch.load(run / "checkpoints" / ckpt_name, map_location="cpu", weights_only=False)["state_dict"])
        layers = {k.removesuffix(".weight"): w for k, w in weights.items() if w.ndim in (2, 4)}
        if name == "nm":  # 1:8 along C_in wherever C_in divides by 8 (all but the 1-channel stem)
            frac = {k: 1 / 8 if w.shape[1] % 8 == 0 else 1.0 for k, w in layers.items()}
            nonzero = sum(int(torch.count_nonzero(w)) for k, w in weights.items() if k.removesuffix(".weight") not in layers)
            nonzero += sum(round(w.numel() * frac[k]) if frac[k] < 1 else int(torch.count_nonzero(w)) for k, w in layers.items())
            assert row["nonzero_params"] == nonzero
            assert row["params"] == round(sum(w.numel() for w in weights.values())
                                          - sum(w.numel() * (1 - frac[k]) for k, w in layers.items()))
            assert row["flops"] == round(sum(2 * areas[k] * w.numel() * frac[k] for k, w in layers.items()))
            assert row["N:M"] == "1:8" and row["method"] == "SR-STE"
        else:
            assert row["nonzero_params"] == sum(int(torch.count_nonzero(w)) for w in weights.values())
            assert row["params"] == sum(w.numel() for w in weights.values())
            assert row["flops"] == sum(2 * areas[k] * w.numel() for k, w in layers.items())
        # zero conv/linear weights (N:M counted as baked, 1:8 -> 7/8) and removed ones, over the original model's
        fraction = {k: 1 / 8 if name == "nm" and w.shape[1] % 8 == 0 else 1.0 for k, w in layers.items()}
        zeros = sum(w.numel() - round(w.numel() * fraction[k]) if fraction[k] < 1 else int((w == 0).sum())
                    for k, w in layers.items())
        original = sum(dense_numel.values())
        removed = original - sum(w.numel() for w in layers.values())
        assert (removed > 0) == (name == "chase")
        assert row["sparsity_vs_original"] == pytest.approx((zeros + removed) / original, rel=1e-12)
        assert row["flops_nonzero"] <= row["flops"]
        if name != "nm":
            assert row["flops_nonzero"] == pytest.approx(
                sum(2 * areas[k] * int(torch.count_nonzero(w)) for k, w in layers.items()), rel=1e-9)
        assert row["dense_flops"] == sum(2 * areas[k] * dense_numel[k] for k in areas)
        # a latency is one batch-1 forward in ms: more than 10 µs for a conv net on a CPU, and less than the
        # whole compare call that measured it (a value in s or µs, or a NaN, fails one side)
        for key in ("latency_ms", "dense_latency_ms"):
            assert 0.01 < row[key] < elapsed_ms, (key, row[key], elapsed_ms)
        assert row["timing_reps"] == 5
        assert (row["epochs"], row["optimizer_steps"], row["images_seen"]) == BUDGETS[name]
    assert rows["chase"]["params"] < rows["chase"]["dense_params"]  # measured in slimmed shape
    assert rows["chase"]["flops"] < rows["chase"]["dense_flops"]
    assert rows["rigl"]["params"] == rows["rigl"]["dense_params"]  # unstructured: dense-shaped
    assert rows["rigl"]["method"] == "RigL" and rows["rigl"]["density"] == 0.2
    assert rows["chase"]["S_c"] == 0.4
    for fig in ("acc_vs_density", "acc_vs_flops", "acc_vs_throughput", "sad_curves"):
        assert (tmp_path / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"
    with (tmp_path / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [float(r["test_acc"]) for r in table] == [rows[Path(r["run"]).parent.name]["test_acc"] for r in table]
    for r in table:  # read back from the file: a median inside its range, and a flag for another budget
        name = Path(r["run"]).parent.name
        for key in ("latency_ms", "throughput", "speedup", "latency_speedup"):
            assert float(r[f"{key}_min"]) <= float(r[key]) <= float(r[f"{key}_max"]), (name, key)
        assert (int(r["epochs"]), int(r["optimizer_steps"]), int(r["images_seen"])) == BUDGETS[name]
        # nm and dense share the most common budget; RigL and Chase saw twice their images
        assert (r["budget_flag"], float(r["budget_ratio"])) == (("", 1.0) if name in ("nm", "dense") else ("unequal", 2.0))
    md = (tmp_path / "comparison.md").read_text()
    assert "| RigL | 0.2 | — |" in md  # S_c of RigL: missing
    assert "**Unequal training budgets**: 2 of 4 runs trained on another budget than the most common one " \
           "(1 epochs, 3 optimizer steps, 48 images)" in md
    assert "| 1 | 6 | 96 | **unequal** (2.00x images) |" in md
    assert [float(r["sparsity_vs_original"]) for r in table] == [
        rows[Path(r["run"]).parent.name]["sparsity_vs_original"] for r in table]
    assert 0.87 < rows["nm"]["sparsity_vs_original"] < 0.875  # 1:8 everywhere but the 1-channel stem


def test_run_without_checkpoint_shows_missing_values(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bare = tmp_path / "runs" / "bare" / "version_0"
    _copy_run(runs / "rigl" / "version_0", bare, "checkpoints")
    (row,) = compare([str(tmp_path / "runs" / "bare")], out=str(tmp_path / "out"), timing=False)
    assert row["test_acc"] == pytest.approx(_last(bare, "test/acc"))
    for key in ("nonzero_params", "params", "flops", "latency_ms", "train_time_s", "checkpoint"):
        assert row[key] is None
    assert "bare/version_0: no checkpoint" in capsys.readouterr().err
    with (tmp_path / "out" / "comparison.csv").open() as f:
        assert next(csv.DictReader(f))["nonzero_params"] == ""


def test_run_name_means_latest_version(runs: Path, tmp_path: Path) -> None:
    name = tmp_path / "runs" / "nm"
    _copy_run(runs / "nm" / "version_0", name / "version_0", "checkpoints")
    _copy_run(runs / "nm" / "version_0", name / "version_10", "checkpoints")
    text = (name / "version_10" / "metrics.csv").read_text().splitlines()
    col = text[0].split(",").index("test/acc")
    for i in range(len(text) - 1, 0, -1):  # overwrite the last logged test/acc of version_10
        cells = text[i].split(",")
        if cells[col]:
            cells[col] = "0.123"
            text[i] = ",".join(cells)
            break
    (name / "version_10" / "metrics.csv").write_text("\n".join(text) + "\n")
    (row,) = compare([str(name)], out=str(tmp_path / "out"), timing=False)
    assert row["run"].endswith("version_10") and row["test_acc"] == pytest.approx(0.123)


def test_bad_inputs_name_the_path(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"'.*nothing_\*' matches no file or directory"):
        compare([str(tmp_path / "nothing_*")], out=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no runs given"):
        compare([], out=str(tmp_path / "out"))
    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "readme.txt").write_text("not a run")
    with pytest.raises(NotARunError, match=r"'.*notes' is not a run directory: expected config.yaml and metrics.csv"):
        compare([str(runs / "rigl"), str(stray)], out=str(tmp_path / "out"))
    with pytest.raises(NotARunError, match=r"It holds runs \(chase, dense, nm, \.\.\.\): pass"):
        compare([str(runs)], out=str(tmp_path / "out"))
    corrupt = tmp_path / "runs" / "corrupt" / "version_0"
    _copy_run(runs / "rigl" / "version_0", corrupt, "*.ckpt")
    (corrupt / "checkpoints" / "best-000.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"best-000.ckpt' is not a readable checkpoint"):
        compare([str(corrupt)], out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are valid
    with pytest.raises(SystemExit) as exc:
        compare_cli([str(stray), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and f"'{stray}' is not a run directory" in capsys.readouterr().err


def test_dense_against_itself_reads_one_within_its_range(runs: Path, tmp_path: Path) -> None:
    """The dense run and the dense model of its architecture are the same network: every ratio of the two,
    timed side by side, must straddle 1.0 (a bias between the two timing slots would not)."""
    compare([str(runs / "dense")], out=str(tmp_path), reps=15, batch_size=16)
    with (tmp_path / "comparison.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["method"] == "dense" and int(row["timing_reps"]) == 15
    for key in ("speedup", "latency_speedup"):
        low, median, high = (float(row[f"{key}{s}"]) for s in ("_min", "", "_max"))
        assert low <= 1.0 <= high, (key, low, median, high)
    md = (tmp_path / "comparison.md").read_text()
    assert f"| {float(row['speedup']):.2f} ({float(row['speedup_min']):.2f}–{float(row['speedup_max']):.2f}) |" in md
    assert "median (min–max) of 15 round-robin repetitions" in md


def test_too_few_repetitions_is_refused(runs: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"reps must be an int >= 5 .* got reps=3; pass --no_timing"):
        compare([str(runs / "dense")], out=str(tmp_path / "out"), reps=3)
    assert not (tmp_path / "out").exists()
    (row,) = compare([str(runs / "dense")], out=str(tmp_path / "out"), reps=1, timing=False)  # nothing timed
    assert row["latency_ms"] is None and row["epochs"] == 1


def test_wandb_offline_table_and_images(runs: Path, tmp_path: Path) -> None:
    # Through the command, as a user runs it before ``wandb sync``. Read in-process right after
    # ``run.finish()``, the offline transaction log was once only its header on a loaded machine: W&B's
    # service completes it asynchronously, and it is certain only once the process has ended.
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, "-m", "lightning_sparse.compare", str(runs / "rigl"), str(runs / "nm"),
                    "--out", str(tmp_path), "--wandb", "--no_timing"], env=env, check=True, timeout=300)
    (record,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert b"comparison" in data and b"figures/acc_vs_throughput" in data


def _sweep_module():
    spec = importlib.util.spec_from_file_location("digits_sweep", ROOT / "benchmarks" / "digits_sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_plan_and_seed_spread_verdicts(tmp_path: Path) -> None:
    sweep = _sweep_module()
    names = [n for n, _ in sweep.plan(["dense", "rigl", "srste"], [0.05, 0.01], ["1to8"], [0, 1])]
    assert names[:4] == ["sweep_dense_s0", "sweep_rigl_d0.05_s0", "sweep_rigl_d0.01_s0", "sweep_srste_1to8_s0"]
    assert len(names) == 8
    with pytest.raises(ValueError, match=r"methods \['lasso'\] are not in the sweep"):
        sweep.plan(["lasso"], [0.1], [], [0])
    with pytest.raises(ValueError, match="N:M pattern '2-4'"):
        sweep._nm("2-4")
    with pytest.raises(ValueError, match="jobs must be >= 1, got jobs=0"):
        sweep.main(jobs=0, workdir=str(tmp_path))
    assert not (tmp_path / "runs").exists()
    accs = {"rigl_d0.01": (0.90, 0.94), "set_d0.01": (0.90, 0.92), "srste_1to8": (0.95, 0.96), "ste_1to8": (0.80, 0.82),
            "chase_d0.01": (0.90, 0.91), "chase_residual_d0.01": (0.95, 0.96)}
    path = tmp_path / "comparison.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "test_acc"])
        for stem, pair in accs.items():
            for seed, acc in enumerate(pair):
                w.writerow([f"runs/sweep_{stem}_s{seed}/version_0", acc])
    text = sweep._summary(path)
    assert "| rigl vs set | d0.01 | +0.0100 | 0.0400 | within seed spread |" in text
    assert "| srste vs ste | 1to8 | +0.1450 | 0.0200 | srste better, beyond seed spread |" in text
    assert "| chase_residual vs chase | d0.01 | +0.0500 | 0.0100 | chase_residual better, beyond seed spread |" in text
    assert "| chase | residual_d0.01 |" not in text


@pytest.mark.slow
def test_digits_sweep_end_to_end(tmp_path: Path) -> None:
    """Every sweep config trains (6 short epochs, two runs at a time) and the sweep ends in a comparison with seed statistics."""
    sweep = _sweep_module()
    short = ["--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    sweep.main(densities=[0.05], nm=["2to4"], seeds=[0, 1], out=str(tmp_path / "out"), workdir=str(tmp_path),
               max_epochs=6, overrides=short, reps=5, jobs=2)
    with (tmp_path / "out" / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    # per seed: dense; SET, RigL, Chase, Chase prune skip, GMP at 0.05; SR-STE, STE, one-shot at 2:4
    assert len(table) == 2 * (1 + 5 + 3) and all(r["test_acc"] for r in table)
    text = (tmp_path / "out" / "sweep.md").read_text()
    assert "| rigl vs set | d0.05 |" in text and "| chase_residual vs chase | d0.05 |" in text
    assert "| rigl vs gmp | d0.05 |" in text and "| oneshot_nm vs srste | 2to4 |" in text
