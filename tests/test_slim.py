"""Physical channel slimming (Torch-Pruning): candidates, exact outputs, kept indices, rebuild, export."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from helpers.timm_models import timm_with_random_bn
from lightning_sparse.slim import (
    apply_channel_config,
    channel_candidates,
    channel_config,
    export_slim,
    load_slim,
    slim_model,
    slim_report,
    zero_channels,
)

SIZE = 32


def _model(arch: str) -> nn.Module:
    return timm_with_random_bn(arch)


def _pick(groups: dict, n_layers: int, frac: float, seed: int = 0) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    names = list(groups)
    chosen = [names[int(i)] for i in torch.randperm(len(names), generator=g)[:n_layers]]
    out = {}
    for name in chosen:
        c = groups[name].channels
        out[name] = torch.randperm(c, generator=g)[: max(1, int(frac * c))].tolist()
    return out


def test_candidates_resnet18_basic_blocks():
    model = _model("resnet18")
    groups = channel_candidates(model, torch.randn(1, 3, SIZE, SIZE))
    assert sorted(groups) == sorted(f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2))
    g = groups["layer2.1.conv1"]
    assert g.params == [("layer2.1.conv1.weight", 0), ("layer2.1.bn1.weight", 0), ("layer2.1.bn1.bias", 0),
                        ("layer2.1.conv2.weight", 1)]
    assert g.buffers == [("layer2.1.bn1.running_mean", 0), ("layer2.1.bn1.running_var", 0)]
    assert g.coupled == () and g.channels == 128
    with pytest.raises(ValueError, match=r"residual"):
        slim_model(model, {"layer1.0.conv2": [0]}, torch.randn(1, 3, SIZE, SIZE))


def test_candidates_resnet50_bottleneck():
    model = _model("resnet50")
    groups = channel_candidates(model, torch.randn(1, 3, SIZE, SIZE))
    blocks = [f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3)) for j in range(n)]
    expected = {f"{b}.conv{k}" for b in blocks for k in (1, 2)} | {"conv1"}  # the stem feeds no sum
    assert set(groups) == expected
    assert not any(n.endswith("conv3") or "downsample" in n for n in groups)
    with_res = channel_candidates(model, torch.randn(1, 3, SIZE, SIZE), include_residual=True)
    assert "layer1.0.conv3" in with_res and "layer1.0.downsample.0" in with_res["layer1.0.conv3"].coupled


def test_group_indices_flatten_into_linear():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.randn(2, 1, 6, 6)
    groups = channel_candidates(model, x)
    assert list(groups) == ["0"]
    idx = groups["0"].indices([1])
    assert idx["5.weight"][0] == 1 and idx["5.weight"][1].tolist() == [4, 5, 6, 7]
    zero_channels(model, groups["0"], [1, 3])
    ref = model(x)
    res = slim_model(model, {"0": [1, 3]}, x, return_result=True)
    assert model[5].in_features == 8 and res.kept["5.weight"][1].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert res.kept["0.weight"][0].tolist() == [0, 2] and list(res.kept["5.weight"]) == [1]
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)


ARCHS = [
    "resnet18",
    "mobilenetv2_100",
    pytest.param("resnet50", marks=pytest.mark.slow),
    pytest.param("vgg11_bn", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("arch", ARCHS)
def test_slim_preserves_logits(arch):
    model = _model(arch)
    x = torch.randn(2, 3, SIZE, SIZE)
    groups = channel_candidates(model, x[:1])
    removed = _pick(groups, n_layers=min(6, len(groups)), frac=0.4)
    dense_ref = model(x)
    for name, idx in removed.items():
        zero_channels(model, groups[name], idx)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    ref = model(x)
    assert not torch.allclose(ref, dense_ref, atol=1e-4)  # zeroing did something the slimming must keep
    res = slim_model(model, removed, x[:1], return_result=True)
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for name, idx in removed.items():
        assert dict(model.named_modules())[name].out_channels == groups[name].channels - len(idx)
        assert res.removed[name] == sorted(idx)
    # every shrunk tensor equals the original sliced by the recorded kept indices
    assert set(res.kept) >= {n for g in removed for n, _ in groups[g].params}
    sd = model.state_dict()
    for n in res.kept:
        torch.testing.assert_close(sd[n], res.slice(n, before[n]), rtol=0, atol=0)


def test_slim_without_zeroing_changes_outputs():
    model = _model("resnet18")
    x = torch.randn(2, 3, SIZE, SIZE)
    ref = model(x)
    slim_model(model, {"layer1.0.conv1": list(range(20))}, x[:1])
    assert not torch.allclose(model(x), ref, atol=1e-4)


def test_round_to_keeps_trailing_requests():
    model = _model("resnet18")
    order = [63, 5, 7, 1, 2, 3, 4, 0, 9, 10, 11, 12, 13]  # 13 requested, priority order
    res = slim_model(model, {"layer1.0.conv1": order}, torch.randn(1, 3, SIZE, SIZE), round_to=8, return_result=True)
    assert model.layer1[0].conv1.out_channels == 56 and model.layer1[0].conv2.in_channels == 56
    assert res.removed["layer1.0.conv1"] == sorted(order[:8])
    untouched = slim_model(model, {"layer1.1.conv1": [0, 1, 2]}, torch.randn(1, 3, SIZE, SIZE), round_to=8, return_result=True)
    assert model.layer1[1].conv1.out_channels == 64 and untouched.removed == {}


def test_slim_model_trains():
    model = _model("resnet18")
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    slim_model(model, {"layer1.0.conv1": list(range(32)), "layer3.1.conv1": list(range(0, 256, 2))}, x[:1])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # rebuilt after slimming
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.layer1[0].conv1.weight.grad.shape[0] == 32


def test_channel_config_rebuild_and_strict_load():
    model = _model("resnet18")
    x = torch.randn(2, 3, SIZE, SIZE)
    slim_model(model, {"layer1.0.conv1": [0, 3, 9], "layer4.1.conv1": list(range(100, 300))}, x[:1])
    config = channel_config(model)
    assert config["layer4.1.conv1"]["out_channels"] == 312 and config["layer4.1.bn1"] == {"num_features": 312}
    fresh = timm.create_model("resnet18", num_classes=5, pretrained=False).eval()
    apply_channel_config(fresh, config)
    assert channel_config(fresh) == config
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)


def test_apply_channel_config_errors():
    model = _model("resnet18")
    config = channel_config(model)
    with pytest.raises(ValueError, match=r"lacks .*\['nope'\]"):
        apply_channel_config(copy.deepcopy(model), {**config, "nope": {"num_features": 3}})
    bigger = copy.deepcopy(config)
    bigger["layer1.0.conv1"]["out_channels"] = 80
    with pytest.raises(ValueError, match=r"could not rebuild the channel config"):
        apply_channel_config(copy.deepcopy(model), bigger)


def test_export_load_round_trip(tmp_path):
    model = _model("mobilenetv2_100")
    x = torch.randn(2, 3, SIZE, SIZE)
    groups = channel_candidates(model, x[:1])
    removed = _pick(groups, n_layers=4, frac=0.5, seed=1)
    for name, idx in removed.items():
        zero_channels(model, groups[name], idx)
    slim_model(model, removed, x[:1])
    path = export_slim(model, tmp_path / "slim.pt", example_inputs=x, epoch=3)
    payload = torch.load(path, weights_only=True)
    assert payload["arch"] == "mobilenetv2_100" and payload["num_classes"] == 5 and payload["meta"] == {"epoch": 3}
    loaded = load_slim(path)
    assert channel_config(loaded) == channel_config(model)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=1e-5)
    assert loaded.slim_meta["epoch"] == 3


def test_export_needs_arch(tmp_path):
    with pytest.raises(ValueError, match=r"needs the timm architecture of Sequential; pass arch="):
        export_slim(nn.Sequential(nn.Conv2d(1, 2, 1)), tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"is not a slim export"):
        torch.save({"a": 1}, tmp_path / "y.pt")
        load_slim(tmp_path / "y.pt")


class _LayerScale(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 1)
        self.gamma = nn.Parameter(torch.ones(1, c, 1, 1))
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x) * self.gamma)


def test_unsupported_layers_named():
    x = torch.randn(1, 3, 8, 8)
    model = _LayerScale(4)
    with pytest.raises(ValueError, match=r"cannot slim layer 'conv': .*bare nn.Parameter"):
        slim_model(model, {"conv": [0]}, x)
    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 2, 1))
    with pytest.raises(ValueError, match=r"cannot slim layer '0': .*grouped conv '1' \(groups=2\)"):
        slim_model(grouped, {"0": [0]}, x)
    with pytest.raises(ValueError, match=r"cannot slim layer '1': it is a grouped conv \(groups=2\)"):
        slim_model(grouped, {"1": [0]}, x)
    model = _model("resnet18")
    xs = torch.randn(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"cannot slim layer '2': its channels are outputs of the model"):
        slim_model(grouped, {"2": [0]}, x)
    with pytest.raises(ValueError, match=r"cannot slim layer 'fc': it is a Linear"):
        slim_model(model, {"fc": [0]}, xs)
    with pytest.raises(ValueError, match=r"cannot slim layers \['layer9.conv1'\]: no such modules"):
        slim_model(model, {"layer9.conv1": [0]}, xs)
    with pytest.raises(ValueError, match=r"cannot slim layer 'layer1.0.conv1': all 64 output channels"):
        slim_model(model, {"layer1.0.conv1": list(range(64))}, xs)
    with pytest.raises(ValueError, match=r"layer 'layer1.0.conv1' has 64 output channels; got invalid or repeated"):
        slim_model(model, {"layer1.0.conv1": [1, 1]}, xs)
    with pytest.raises(ValueError, match=r"round_to must be None or a positive int \(e.g. 8\), got round_to=0"):
        slim_model(model, {"layer1.0.conv1": [1]}, xs, round_to=0)


def test_slim_report_flops_and_params():
    dense = _model("resnet18")
    slim = copy.deepcopy(dense)
    slim_model(slim, {f"layer{i}.{j}.conv1": list(range(0, 64 * 2 ** (i - 1), 2)) for i in range(1, 5) for j in range(2)},
               torch.randn(1, 3, SIZE, SIZE))
    rep = slim_report(dense, slim, (1, 3, SIZE, SIZE))
    assert rep["channels"]["layer2.0.conv1"] == (128, 64) and rep["channels"]["layer2.0.conv2"] == (128, 128)
    assert 0.4 < rep["flops"]["ratio"] < 0.9 and rep["params"]["slim"] < rep["params"]["dense"]
    assert rep["params"]["slim"] == sum(p.numel() for p in slim.parameters())


def test_tensor_slimmed_on_both_dims():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.ReLU(), nn.Conv2d(5, 2, 1)).eval()
    x = torch.randn(2, 2, 6, 6)
    groups = channel_candidates(model, x)
    assert set(groups) == {"0", "2"}
    zero_channels(model, groups["0"], [1, 4])
    zero_channels(model, groups["2"], [0])
    before, ref = model[2].weight.detach().clone(), model(x)
    res = slim_model(model, {"2": [0], "0": [4, 1]}, x, return_result=True)
    assert sorted(res.kept["2.weight"]) == [0, 1] and res.kept["2.weight"][1].tolist() == [0, 2, 3, 5]
    torch.testing.assert_close(model[2].weight, res.slice("2.weight", before), rtol=0, atol=0)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
