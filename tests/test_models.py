import pytest
import timm
import torch

from lightning_sparse.models import ImageClassifier, create_backbone, warmup_cosine


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "mobilenetv2_050"])
def test_forward_backward_timm_backbones(name):
    torch.manual_seed(0)
    m = ImageClassifier(name, num_classes=10, in_chans=1)
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([1, 2])
    loss = m._loss(m(x), y)
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # checkpoint keys stay timm's under the `model.` prefix
    plain = timm.create_model(name, num_classes=10, in_chans=1)
    stripped = {k.removeprefix("model."): v for k, v in m.state_dict().items() if k.startswith("model.")}
    plain.load_state_dict(stripped, strict=True)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ValueError, match=r"model_name='resnet181'.*resnet18"):
        ImageClassifier("resnet181")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "adam"}, r"optimizer='adam' is not supported; choose one of \['sgd', 'adamw'\]"),
        ({"lr": 0.0}, "lr must be > 0, got lr=0.0"),
        ({"label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got label_smoothing=1.0"),
        ({"warmup_epochs": -1}, "warmup_epochs must be >= 0, got warmup_epochs=-1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier("resnet10t", **kwargs)


def test_local_checkpoint_path_loads_weights(tmp_path):
    src = timm.create_model("resnet10t", num_classes=3, in_chans=1)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    m = ImageClassifier("resnet10t", num_classes=3, in_chans=1, checkpoint_path=str(tmp_path / "w.pth"))
    assert torch.equal(m.model.conv1[0].weight, src.conv1[0].weight)
    with pytest.raises(ValueError, match="does not exist"):
        create_backbone("resnet10t", 3, 1, checkpoint_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="does not fit 'resnet18'"):
        create_backbone("resnet18", 3, 1, checkpoint_path=str(tmp_path / "w.pth"))


def test_warmup_cosine_schedule():
    f = [warmup_cosine(s, 10, 110) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.5) and f[110] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def _slim_resnet10t() -> torch.nn.Module:
    """A resnet10t with channels zeroed and then removed (its outputs are those of the zeroed model)."""
    from lightning_sparse.slim import channel_candidates, slim_model, zero_channels

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=3, in_chans=1).eval()
    x = torch.randn(1, 1, 32, 32)
    groups = channel_candidates(model, x)
    removed = {"layer1.0.conv1": [0, 5, 7], "layer3.0.conv1": list(range(40, 100))}
    for name, idx in removed.items():
        zero_channels(model, groups[name], idx)
    return slim_model(model, removed, x)


def test_checkpoint_path_from_a_slim_export(tmp_path):
    from lightning_sparse.slim import export_slim

    slim = _slim_resnet10t()
    path = export_slim(slim, tmp_path / "slim.pt", arch="resnet10t")
    m = ImageClassifier("resnet10t", num_classes=3, in_chans=1, checkpoint_path=str(path)).eval()
    assert m.model.layer1[0].conv1.out_channels == 61 and m.model.layer3[0].conv1.out_channels == 196
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), slim(x), rtol=0, atol=1e-6)


def test_channel_config_in_checkpoint_hooks():
    slim = _slim_resnet10t()
    writer = ImageClassifier("resnet10t", num_classes=3, in_chans=1)
    writer.model = slim
    checkpoint = {"state_dict": writer.state_dict()}
    writer.on_save_checkpoint(checkpoint)
    assert checkpoint["channel_config"]["model.layer1.0.conv1"]["out_channels"] == 61
    reader = ImageClassifier("resnet10t", num_classes=3, in_chans=1)
    reader.on_load_checkpoint(checkpoint)
    reader.load_state_dict(checkpoint["state_dict"], strict=True)
    x = torch.randn(4, 1, 32, 32)
    reader.eval(), writer.eval()
    with torch.no_grad():
        torch.testing.assert_close(reader(x), writer(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"lacks .*\['model.nope'\]"):
        reader.on_load_checkpoint({"channel_config": {"model.nope": {"num_features": 3}}})


def test_predict_step_returns_logits_of_images_or_labelled_batches():
    m = ImageClassifier("resnet10t", num_classes=3, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits = m(x)
        torch.testing.assert_close(m.predict_step(x, 0), logits)
        torch.testing.assert_close(m.predict_step((x, torch.tensor([0, 1])), 0), logits)
