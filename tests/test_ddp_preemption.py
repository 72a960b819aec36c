"""Preemption of a 2-process DDP run (CPU, gloo) through ``train.py fit``, in subprocesses (slow).

- SIGTERM to one rank (rank 1 alone, or rank 0 alone) or to every rank (the process group, as a scheduler's
  kill): every rank stops after the same step, exactly one ``interrupted-*.ckpt`` is written, the run exits 143;
  ``--ckpt_path last`` then ends bitwise equal to the uninterrupted 2-process run (weights, optimizer state,
  masks and every callback's state from the final checkpoint, each rank's masks, each rank's per-step losses),
  for RigL, Chase (slimming during training) and 2:4 SR-STE.
- SIGKILL of one rank (rank 1, or rank 0, the process that launched rank 1): the other exits within a bounded
  time with one line that says what happened and which checkpoint to resume from (no hang, no checkpoint of
  the half-done step); the newest good checkpoint resumes bitwise.

Checkpoints are found by globbing under the run directory, states are read from the checkpoint files and the
per-step losses from a test callback (:mod:`helpers.ddp_steps`), so where run versions go does not matter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from helpers.ddp_steps import read_records
from helpers.training import assert_equal_nested

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCHES = 3, 4  # 12 steps; steps 4-7 are epoch 1
STOP = 5  # the signal arrives during step 5 (0-based); every rank stops after it: global_step 6, mid-epoch 1
EVERY = ["--last_checkpoint.every_n_train_steps=3"]  # last.ckpt at global steps 3, 6, 9, 12 (every run)
DDP = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", *EVERY]
OVERRIDES = {
    "quickstart_rigl.yaml": {"update_interval": 2},
    "quickstart_chase.yaml": {"update_interval": 2, "channel_interval_fraction": 1 / 3, "stop_gmp_fraction": 2 / 3,
                              "stop_dst_fraction": 1 / 3},
    "quickstart_nm24.yaml": {},
}
LOST_PEER = "another process of this 2-process run exited or stopped answering"

pytestmark = pytest.mark.slow


def _config(cwd: Path, name: str, tag: str, extra: list[dict]) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / name).read_text())
    cfg["trainer"].update(max_epochs=EPOCHS, limit_train_batches=BATCHES, limit_val_batches=2, log_every_n_steps=1,
                          enable_progress_bar=False, enable_model_summary=False)
    cfg["sparsity"]["init_args"].update(OVERRIDES[name])
    cfg["trainer"]["callbacks"] += [*extra,
                                    {"class_path": "helpers.ddp_steps.StepLosses",
                                     "init_args": {"out_dir": str(cwd / f"losses_{tag}")}},
                                    {"class_path": "helpers.dump_masks.DumpMasks",
                                     "init_args": {"out_dir": str(cwd / f"masks_{tag}")}}]
    cfg["model"]["init_args"]["model_name"] = "resnet10t"
    cfg["data"]["init_args"].update(image_size=16, batch_size=32)
    out = cwd / f"{tag}_{name}"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _train(cwd: Path, name: str, tag: str, extra: list[dict] = (), *args: str, timeout: int = 600) -> tuple[int, str, float]:
    """``train.py fit`` with 2 DDP processes in their own process group: ``(exit code, output, seconds)``.
    On timeout the whole group is killed (no process is left behind) and the test fails."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(_config(cwd, name, tag, list(extra))), *DDP,
           *args]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"train.py {tag} hung for {timeout} s (killed):\n{out[-3000:]}")
    return proc.returncode, out, time.time() - start


def _run_dir(cwd: Path, name: str) -> Path:
    return cwd / "runs" / yaml.safe_load((ROOT / "configs" / name).read_text())["run_name"]


def _final(run_dir: Path) -> dict:
    """The newest ``last.ckpt`` under the run directory: weights, optimizer and callback state (not the
    checkpoint callbacks' own bookkeeping, which names paths)."""
    path = max(run_dir.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    ckpt = torch.load(path, weights_only=False)
    return {"weights": ckpt["state_dict"], "optimizer": ckpt["optimizer_states"], "step": ckpt["global_step"],
            "callbacks": {k: v for k, v in ckpt["callbacks"].items() if "Checkpoint" not in k}}


def _masks(cwd: Path, tag: str) -> list[dict]:
    return [torch.load(cwd / f"masks_{tag}" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


_FULL: dict[str, dict] = {}


def _full(tmp_path_factory, name: str) -> dict:
    """The uninterrupted 2-process run (once per session): final state, each rank's masks and losses."""
    if name not in _FULL:
        cwd = tmp_path_factory.mktemp("full")
        rc, out, seconds = _train(cwd, name, "full")
        assert rc == 0, out[-3000:]
        _FULL[name] = {"final": _final(_run_dir(cwd, name)), "masks": _masks(cwd, "full"), "seconds": seconds,
                       "losses": [read_records(cwd / "losses_full", r)[0] for r in (0, 1)]}
        assert sorted(_FULL[name]["losses"][0]) == list(range(EPOCHS * BATCHES))
    return _FULL[name]


def _interrupted(run_dir: Path) -> list[Path]:
    return sorted(run_dir.rglob("interrupted-*.ckpt"))


def _assert_stopped_together(cwd: Path, name: str, tag: str, rc: int, out: str) -> Path:
    """Exit 143, both ranks stopped by SIGTERMException after the same step, exactly one checkpoint, of that step."""
    assert rc == 143, out[-3000:]
    stops = [read_records(cwd / f"losses_{tag}", r)[1] for r in (0, 1)]
    assert [[(s["stopped"], s["exception"]) for s in rank] for rank in stops] == [[(STOP + 1, "SIGTERMException")]] * 2
    saved = _interrupted(_run_dir(cwd, name))
    assert len(saved) == 1, saved
    assert torch.load(saved[0], weights_only=False)["global_step"] == STOP + 1
    assert f"SIGTERM at step {STOP + 1}: saved" in out
    return saved[0]


def _assert_resumed_bitwise(tmp_path_factory, cwd: Path, name: str, first_tag: str, rc: int, out: str,
                            lost_step: int | None = None) -> None:
    """The resumed run ends as the uninterrupted one: final checkpoint state, every rank's masks, every rank's
    per-step losses (those of the first run up to where it stopped, and of the resumed run after)."""
    assert rc == 0, out[-3000:]
    full = _full(tmp_path_factory, name)
    res = _final(_run_dir(cwd, name))
    assert res["step"] == full["final"]["step"] == EPOCHS * BATCHES
    assert full["final"]["callbacks"] and res["callbacks"].keys() == full["final"]["callbacks"].keys()
    assert_equal_nested(res, full["final"])  # weights, optimizer state, masks, channel configuration, SAD history
    for r, (mine, theirs) in enumerate(zip(_masks(cwd, "resume"), full["masks"])):
        assert mine["masks"] and mine["masks"].keys() == theirs["masks"].keys(), r
        assert all(torch.equal(mine["masks"][k], theirs["masks"][k]) for k in mine["masks"]), r
        assert mine["shapes"] == theirs["shapes"], r
    for r in (0, 1):
        first, _ = read_records(cwd / f"losses_{first_tag}", r)
        resumed, _ = read_records(cwd / "losses_resume", r)
        assert min(resumed) > 0  # it did resume mid-run
        if lost_step is not None:  # the step a peer died in never completed
            first = {s: v for s, v in first.items() if s < lost_step}
        assert set(first) | set(resumed) == set(full["losses"][r]), r
        for records in (first, resumed):
            for step, loss in records.items():
                assert loss == full["losses"][r][step], (r, step)  # bitwise
    print(f"\nDDP RESUME {name} after {first_tag}: from step {min(resumed)}; uninterrupted run {full['seconds']:.0f} s")


def _signal(rank: int, target: str = "self") -> dict:
    return {"class_path": "helpers.ddp_steps.SignalRankAt", "init_args": {"step": STOP, "rank": rank, "target": target}}


@pytest.mark.parametrize("name", list(OVERRIDES))
def test_sigterm_to_one_rank_stops_every_rank_at_one_step_then_resumes_bitwise(tmp_path, tmp_path_factory, name):
    rc, out, _ = _train(tmp_path, name, "term", [_signal(rank=1)])
    saved = _assert_stopped_together(tmp_path, name, "term", rc, out)
    assert "SIGTERM (received by rank 1): every rank stops after step 6" in out
    rc, out, _ = _train(tmp_path, name, "resume", [], "--ckpt_path", "last")
    assert f"Resuming from {saved.relative_to(tmp_path)}" in out, out[-3000:]
    _assert_resumed_bitwise(tmp_path_factory, tmp_path, name, "term", rc, out)


def test_sigterm_to_every_rank_saves_one_checkpoint_then_resumes_bitwise(tmp_path, tmp_path_factory):
    name = "quickstart_rigl.yaml"
    rc, out, _ = _train(tmp_path, name, "term", [_signal(rank=0, target="group")])
    _assert_stopped_together(tmp_path, name, "term", rc, out)
    rc, out, _ = _train(tmp_path, name, "resume", [], "--ckpt_path", "last")
    _assert_resumed_bitwise(tmp_path_factory, tmp_path, name, "term", rc, out)


def test_sigterm_to_rank_zero_alone_stops_every_rank_at_one_step(tmp_path):
    name = "quickstart_rigl.yaml"
    rc, out, _ = _train(tmp_path, name, "term", [_signal(rank=0)])
    _assert_stopped_together(tmp_path, name, "term", rc, out)
    assert "SIGTERM (received by rank 0): every rank stops after step 6" in out


def _lost_peer_line(out: str, survivor: int) -> str:
    lines = [line for line in out.splitlines() if LOST_PEER in line]
    assert len(lines) == 1 and lines[0].startswith(f"[rank: {survivor}] "), out[-3000:]
    assert "Connection" in lines[0] and "--ckpt_path last" in lines[0] and "Traceback" not in out, out[-3000:]
    return lines[0]


def test_sigkill_of_one_rank_ends_the_others_with_one_line_then_resumes(tmp_path, tmp_path_factory):
    name, killed_at = "quickstart_rigl.yaml", 8  # rank 1 dies at the end of step 7 (global step 8)
    kill = {"class_path": "helpers.kill.KillAt", "init_args": {"step": killed_at, "rank": 1}}
    killed_rc, out, _ = _train(tmp_path, name, "kill", [kill], timeout=300)
    # 1: rank 0's own exit; -9: Lightning's child-process observer on rank 0 SIGKILLs it (within 5 s of the
    # child's death) when rank 0 had not finished exiting by then; the line is printed before either
    assert killed_rc in (1, -9), out[-3000:]
    line = _lost_peer_line(out, survivor=0)
    # rank 1's last record is the end of step 6 (KillAt runs before StepLosses); rank 0 was gone soon after
    rank1_last = max(r["time"] for r in read_records(tmp_path / "losses_kill", 1, raw=True))
    assert sorted(read_records(tmp_path / "losses_kill", 1)[0])[-1] == killed_at - 2
    exited_after = time.time() - rank1_last
    assert exited_after < 60, f"rank 0 took {exited_after:.0f} s to exit after rank 1 died"
    assert not _interrupted(_run_dir(tmp_path, name))  # the survivor's step was half done: nothing saved
    newest = max(_run_dir(tmp_path, name).rglob("last.ckpt"), key=lambda p: p.stat().st_mtime)
    assert torch.load(newest, weights_only=False)["global_step"] == 6 and str(newest.relative_to(tmp_path)) in line
    rc, out, _ = _train(tmp_path, name, "resume", [], "--ckpt_path", "last")
    assert f"Resuming from {newest.relative_to(tmp_path)}" in out, out[-3000:]
    _assert_resumed_bitwise(tmp_path_factory, tmp_path, name, "kill", rc, out, lost_step=killed_at - 1)
    print(f"SIGKILL of rank 1: rank 0 exited (code {killed_rc}) {exited_after:.1f} s after rank 1's last step ended")


def test_sigkill_of_rank_zero_ends_rank_one_with_one_line(tmp_path):
    """Rank 0 (the process that launched rank 1) dies: rank 1 ends by itself with the line, no hang."""
    name = "quickstart_rigl.yaml"
    kill = {"class_path": "helpers.kill.KillAt", "init_args": {"step": 8, "rank": 0}}
    rc, out, seconds = _train(tmp_path, name, "kill", [kill], timeout=300)  # returns when rank 1 has exited too
    assert rc == -9, out[-3000:]
    line = _lost_peer_line(out, survivor=1)
    assert "last.ckpt" in line and not _interrupted(_run_dir(tmp_path, name))
    rank0_last = max(r["time"] for r in read_records(tmp_path / "losses_kill", 0, raw=True))
    print(f"\nSIGKILL of rank 0: rank 1 exited {time.time() - rank0_last:.1f} s after rank 0's last step ended")
    assert time.time() - rank0_last < 60
