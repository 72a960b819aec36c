"""Each kind of bad input ends ``train.py`` with one line ``train.py[ <subcommand>]: error: ...`` naming the
option path, the value and what is allowed, and exit code 2 (no traceback, no checkpoint)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--config", "configs/quickstart.yaml"]

CASES = {
    "unknown option of a class": (["fit", *QUICK, "--model.init_args.depth=3"],
                                  "train.py fit: error: model.init_args.depth=3: ImageClassifier has no argument "
                                  "`depth`"),
    "unknown top-level option": (["fit", *QUICK, "--nope=3"], "train.py fit: error: --nope: unknown option"),
    "unknown subcommand": (["fitt", *QUICK], "train.py: error: fitt: unknown subcommand or argument"),
    "option given by a prefix": (["fit", *QUICK, "--trainer.max_epoch=1"],
                                 "trainer.max_epoch=1: Trainer has no argument `max_epoch`; did you mean `max_epochs`?"),
    "value of the wrong type": ([*QUICK, "--model.init_args.lr=abc"],
                                "train.py: error: model.init_args.lr=abc: expected float "
                                "(lightning_sparse.models.ImageClassifier;"),
    "trainer value of the wrong type": ([*QUICK, "--trainer.max_epochs=abc"],
                                        "trainer.max_epochs=abc: expected int or None"),
    "class path that does not import": (["fit", *QUICK, "--model=lightning_sparse.models.Nope"],
                                        "model=lightning_sparse.models.Nope: cannot import it"),
    "class path of the wrong base": (["fit", *QUICK, "--data=torch.nn.Linear"],
                                     "data=torch.nn.Linear: not a subclass of "
                                     "pytorch_lightning.core.datamodule.LightningDataModule"),
    "sparsity class path that does not import": (["fit", *QUICK, "--sparsity=lightning_sparse.callbacks.Nope"],
                                                 "sparsity=lightning_sparse.callbacks.Nope: cannot import it"),
    "missing config file": (["--config", "configs/nope.yaml"], "train.py: error: --config=configs/nope.yaml: no such file"),
    "wrong type inside a config file": (["fit", "--config", "bad_lr.yaml"],
                                        "model.init_args.lr=abc: expected float"),
    "wrong type of a callback in a config file's list": (["fit", *QUICK, "--config", "bad_callback.yaml"],
                                                         "trainer.callbacks.init_args.interval=abc: expected int "
                                                         "(lightning_sparse.callbacks.sad.SADTracker;"),
    "wrong type of a callback added on the command line": (["fit", *QUICK,
                                                            "--trainer.callbacks+=lightning_sparse.callbacks.SADTracker",
                                                            "--trainer.callbacks.interval=abc"],
                                                           "trainer.callbacks.init_args.interval=abc: expected int"),
    "callback constructor": (["fit", "--config", "configs/quickstart_nm24.yaml", "--sparsity.n=5"],
                             "train.py fit: error: sparsity.init_args.n=5 (lightning_sparse.callbacks.NMSparsity): "
                             "`n` must be < `m`"),
    "value outside a Literal": ([*QUICK, "--model.init_args.optimizer=adam"],
                                "model.init_args.optimizer=adam: expected one of ['sgd', 'adamw']"),
    "model constructor": ([*QUICK, "--model.init_args.model_name=resnet181"],
                          "model.init_args.model_name='resnet181' (lightning_sparse.models.ImageClassifier): "
                          "Unknown timm model_name='resnet181'"),
    "data constructor": (["fit", *QUICK, "--data.init_args.batch_size=0"],
                         "data.init_args.batch_size=0 (lightning_sparse.data.DigitsDataModule): batch_size must be >= 1"),
    "trainer constructor": ([*QUICK, "--trainer.devices=0"], "train.py: error: trainer.devices='0': `Trainer(devices="),
    "data directory refused at setup": (["fit", "--config", "configs/cifar10_resnet18.yaml",
                                         "--data.init_args.data_dir=no_cifar", "--trainer.accelerator=cpu",
                                         "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32"],
                                        "data.init_args.data_dir='no_cifar' (lightning_sparse.data.CIFARDataModule): "
                                        "CIFAR-10 not found"),
}


def _run(tmp_path, args):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    quick = (ROOT / "configs" / "quickstart.yaml").read_text()
    assert "lr: " in quick
    (tmp_path / "bad_lr.yaml").write_text("\n".join(
        "    lr: abc" if line.strip().startswith("lr:") else line for line in quick.splitlines()))
    (tmp_path / "bad_callback.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_sparse.callbacks.SADTracker\n"
        "      init_args:\n        interval: abc\n")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("JSONARGPARSE_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    args, expected = CASES[case]
    proc = _run(tmp_path, args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert expected in errors[0], errors[0]
    assert not list(tmp_path.rglob("*.ckpt"))


def test_debug_mode_shows_the_traceback(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT), "JSONARGPARSE_DEBUG": "true"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", *QUICK, "--data.init_args.batch_size=0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    assert "batch_size must be >= 1" in proc.stderr
