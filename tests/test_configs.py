"""The configs parse as users run them (LightningCLI, several ``--config`` files merged) and hold the
recipes of the reference code; the layer coverage they ask for is what runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers.training import trainer
from lightning_sparse.cli import main
from lightning_sparse.models import ImageClassifier
from lightning_sparse.sparsity.distributions import erk_densities
from lightning_sparse.sparsity.nm import nm_mask

ROOT = Path(__file__).resolve().parents[1]
SRSTE = {"2to4": (2, 4), "1to4": (1, 4), "2to8": (2, 8), "4to8": (4, 8)}
SRSTE_BASE = "imagenet_resnet50_srste_base.yaml"


def _args(name: str) -> list[str]:
    """The ``--config`` arguments a config is run with (the N:M files come after their base)."""
    files = [SRSTE_BASE, name] if name.startswith("imagenet_resnet50_srste_") and name != SRSTE_BASE else [name]
    return [a for f in files for a in ("--config", str(ROOT / "configs" / f))]


def _resolved(name: str, capsys) -> dict:
    """The full configuration LightningCLI resolves for ``name`` (``fit --print_config``)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["fit", *_args(name), "--print_config"])
    assert exc.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def _callback(cfg: dict) -> dict:
    """The sparsity method's arguments (the ``sparsity`` section; no other callback in these configs)."""
    assert not cfg["trainer"]["callbacks"]
    return cfg["sparsity"]["init_args"]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_config_parses(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _resolved(name, capsys)
    assert cfg["model"]["class_path"] and cfg["data"]["class_path"]
    assert not (tmp_path / "runs").exists()


def test_chase_recipe(capsys):
    """luuyin/chase Imagenet/scripts/Chase_0.4 + main.py defaults (CHASE.md §4)."""
    cfg = _resolved("imagenet_resnet50_chase.yaml", capsys)
    model, trainer = cfg["model"]["init_args"], cfg["trainer"]
    assert model["weight_decay"] == 1e-4 and model["nesterov"] is False and model["momentum"] == 0.9
    assert model["lr"] == 0.512 and model["warmup_epochs"] == 8 and model["label_smoothing"] == 0.1
    assert cfg["data"]["init_args"]["batch_size"] * trainer["devices"] == 512
    assert trainer["max_epochs"] == 100 and cfg["seed_everything"] == 17 and trainer["precision"] == "32-true"
    chase = _callback(cfg)
    assert {k: chase[k] for k in ("density", "channel_sparsity", "minimum_ratio", "channel_interval_epochs",
                                  "stop_gmp_epochs", "stop_dst_epochs", "update_interval", "drop_fraction")} == {
        "density": 0.1, "channel_sparsity": 0.4, "minimum_ratio": 0.2, "channel_interval_epochs": 2,
        "stop_gmp_epochs": 80, "stop_dst_epochs": 20, "update_interval": 1000, "drop_fraction": 0.05}
    assert chase["sparse_first_last"] is True  # the reference masks the stem conv and the classifier too


def test_dense_baseline_uses_the_chase_recipe(capsys):
    """imagenet_resnet50.yaml is the dense run Chase is compared with: same model, data and trainer settings."""
    dense, chase = _resolved("imagenet_resnet50.yaml", capsys), _resolved("imagenet_resnet50_chase.yaml", capsys)
    assert dense["model"] == chase["model"] and dense["data"] == chase["data"]
    assert dense["seed_everything"] == chase["seed_everything"]
    for key in ("max_epochs", "devices", "strategy", "precision"):
        assert dense["trainer"][key] == chase["trainer"][key], key
    assert dense["trainer"]["callbacks"] is None and dense["sparsity"] is None


def _one_batch(model_cfg: dict, image_size: int = 32) -> tuple[ImageClassifier, DataLoader]:
    pl.seed_everything(0)
    model = ImageClassifier(**{**model_cfg, "num_classes": 1000, "in_chans": 3})
    x = torch.randn(2, 3, image_size, image_size)
    return model, DataLoader(TensorDataset(x, torch.tensor([1, 2])), batch_size=2)


def test_rigl_recipe_and_coverage(capsys):
    """google-research/rigl imagenet_train_eval.py: stem dense, every other conv and the fc sparse under ERK,
    ΔT x global batch = 100 x 4096 images between mask updates."""
    from lightning_sparse.callbacks import DynamicSparsity

    cfg = _resolved("imagenet_resnet50_rigl.yaml", capsys)
    model_cfg, trainer_cfg, rigl = cfg["model"]["init_args"], cfg["trainer"], _callback(cfg)
    global_batch = cfg["data"]["init_args"]["batch_size"] * trainer_cfg["devices"]
    assert global_batch == 1024 and rigl["update_interval"] * global_batch == 100 * 4096 == 409_600
    assert model_cfg["lr"] == pytest.approx(0.1 * global_batch / 256)
    assert model_cfg["weight_decay"] == 1e-4 and model_cfg["nesterov"] is True and model_cfg["label_smoothing"] == 0.1
    assert (rigl["density"], rigl["distribution"], rigl["growth"], rigl["drop_fraction"]) == (0.1, "erk", "gradient", 0.3)

    # what runs: after one optimizer step the stem conv has no zero, the fc (and every other conv) is sparse at its
    # ERK density (start_step=1: the first mask update, which would replace step 0's optimizer step, comes later)
    model, loader = _one_batch(model_cfg)
    trainer(None, 1, [DynamicSparsity(**{**rigl, "start_step": 1, "stop_step": 2})]).fit(model, loader)
    weights = {f"{n}.weight": m.weight for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    sparse = {n: w for n, w in weights.items() if n != "model.conv1.weight"}
    assert torch.count_nonzero(weights["model.conv1.weight"]) == weights["model.conv1.weight"].numel()
    expected = erk_densities({n: tuple(w.shape) for n, w in sparse.items()}, 0.1)
    for name in ("model.fc.weight", "model.layer1.0.downsample.0.weight", "model.layer4.2.conv2.weight"):
        density = torch.count_nonzero(sparse[name]).item() / sparse[name].numel()
        assert density == pytest.approx(expected[name], abs=2e-3), name
    kept = sum(torch.count_nonzero(w).item() for w in sparse.values())
    assert kept == pytest.approx(0.1 * sum(w.numel() for w in sparse.values()), rel=1e-3)


def test_cifar_rigl_coverage_is_the_reference_flags(capsys):
    """google-research/rigl cifar_resnet/resnet_train_eval.py: prune_first_layer=False, prune_last_layer=True."""
    from lightning_sparse.callbacks import DynamicSparsity

    cfg = _resolved("cifar10_resnet18_rigl.yaml", capsys)
    model, _ = _one_batch({**cfg["model"]["init_args"], "model_name": "resnet18"})
    names = DynamicSparsity(**_callback(cfg)).target_names(model)
    convs = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert "model.fc.weight" in names and "model.conv1.weight" not in names
    assert sorted(names) == sorted(c for c in convs if c != "model.conv1.weight")


def test_srste_files_hold_only_what_differs():
    for tag, (n, m) in SRSTE.items():
        cfg = yaml.safe_load((ROOT / "configs" / f"imagenet_resnet50_srste_{tag}.yaml").read_text())
        assert cfg == {"run_name": f"imagenet_resnet50_srste_{tag}", "sparsity": {
            "class_path": "lightning_sparse.callbacks.NMSparsity", "init_args": {"n": n, "m": m}}}


@pytest.mark.parametrize("tag", list(SRSTE))
def test_srste_recipe(tag, capsys):
    """aojunzz/NM-sparsity classification/configs: 120 epochs, cosine lr 0.1 with 5 warm-up epochs, batch 256,
    wd 5e-5, no Nesterov, λ_W 2e-4 per process (1.6e-3 effective on 8)."""
    n, m = SRSTE[tag]
    cfg = _resolved(f"imagenet_resnet50_srste_{tag}.yaml", capsys)
    model_cfg, trainer_cfg, nm = cfg["model"]["init_args"], cfg["trainer"], _callback(cfg)
    assert cfg["run_name"] == f"imagenet_resnet50_srste_{tag}" and (nm["n"], nm["m"]) == (n, m)
    assert cfg["data"]["init_args"]["batch_size"] * trainer_cfg["devices"] == 256 and trainer_cfg["max_epochs"] == 120
    assert (model_cfg["lr"], model_cfg["warmup_epochs"], model_cfg["weight_decay"]) == (0.1, 5, 5e-5)
    assert model_cfg["nesterov"] is False and model_cfg["label_smoothing"] == 0.0
    # the released 8-process run's effective λ_W: 2e-4 added on every rank to a loss / world size, SUM-reduced
    assert (nm["mode"], nm["decay"], nm["layout"]) == ("srste", 8 * 2e-4, "input_channels")


@pytest.mark.parametrize("tag", ["2to4", "4to8"])
def test_srste_coverage(tag, capsys):
    """The fc classifier stays dense (NM-sparsity models/resnet.py: a plain nn.Linear), the convs are N:M."""
    from lightning_sparse.callbacks import NMSparsity

    n, m = SRSTE[tag]
    cfg = _resolved(f"imagenet_resnet50_srste_{tag}.yaml", capsys)
    model_cfg, nm = cfg["model"]["init_args"], _callback(cfg)
    # what runs in evaluation: the fc sees its dense weight, a bottleneck conv sees its N:M-masked weight
    model, loader = _one_batch(model_cfg)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            seen[name] = (inputs[0].clone(), output.clone())
        return hook

    for name in ("model.fc", "model.layer2.0.conv2"):
        model.get_submodule(name).register_forward_hook(record(name))
    fc, conv = model.model.fc, model.model.layer2[0].conv2
    dense = conv.weight.detach().clone()
    trainer(callbacks=[NMSparsity(**nm)], limit_val_batches=1).validate(model, loader, verbose=False)
    with torch.no_grad():
        torch.testing.assert_close(seen["model.fc"][1], F.linear(seen["model.fc"][0], fc.weight, fc.bias))
        baked = dense * nm_mask(dense, n, m)
        assert not torch.equal(baked, dense)
        assert torch.equal(conv.weight, baked)  # after the run the module holds the masked weight
        torch.testing.assert_close(seen["model.layer2.0.conv2"][1],
                                   F.conv2d(seen["model.layer2.0.conv2"][0], baked, None, conv.stride, conv.padding))
