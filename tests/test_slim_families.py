"""The channel slimmer's contract on timm CNN families (CHASE.md §3).

For any timm CNN: every channel that :func:`~lightning_sparse.slim.channel_candidates` offers can be
slimmed, and slimming leaves the outputs of the zeroed model unchanged (float noise, ~1e-6 relative).

Behaviour chosen for what the dependency graph cannot follow exactly: such convs are **left out of the
candidates at listing time**, each with its reason in ``channel_candidates(...).refused`` (a
:class:`~lightning_sparse.slim.ChannelCandidates` dict; ``slim_model`` refuses the same layers with the same
reason). Never a candidate that fails later, never a silently different network. A model left with no
candidate at all (or one Torch-Pruning cannot trace) raises ``ValueError`` naming the model and the reasons.
What is left out, and why:

* channel slices/splits whose bounds live in forward code: a Ghost module's ``[:, :oup]`` when it drops
  channels, DPN's and ReXNet's slices, Res2Net's ``torch.split``;
* timm ``MixedConv2d`` (MixNet) is handled exactly (its ``splits`` are rewritten after slimming), but only
  for groups that stay inside one branch of each mixed conv: across branches the branch sizes would depend
  on which channels went, and a slim checkpoint could not be rebuilt on a fresh model;
* two channels of a group tied to each other: a concat added back onto its own input (GhostNet's residual
  streams with ``include_residual=True``), split-attention reshapes (SKNet, ResNeSt);
* residual partners that hold the channels in another layout (a concat of two halves of them), which Chase
  could not score filter by filter;
* norms other than BatchNorm (ConvNeXt's ``LayerNorm2d``) and convs using their filters as a whole
  (NFNet's ``ScaledStdConv2d``).

Each (family, mode) test: list candidates, zero 30% of the channels of every group (:func:`zero_channels`,
the slices Chase masks), record logits (eval mode, fixed input), slim, compare logits (1e-5 absolute, times
the largest logit when that is above 1: random BN statistics make some nets' logits large), check that
parameters went down, that every group lost exactly its channels, and that the slim architecture rebuilds
on a fresh model (:func:`apply_channel_config`) with identical logits. Families marked ``slow`` run with
``pytest -m slow``. The module runs with one intra-op thread (graph tracing is thousands of tiny ops).
"""

from __future__ import annotations

import re

import pytest
import torch
from timm.layers import StdConv2d
from timm.models.ghostnet import GhostModule
from torch import nn

from helpers.timm_models import timm_with_random_bn
from lightning_sparse.slim import (
    apply_channel_config,
    channel_candidates,
    channel_config,
    slim_model,
    zero_channels,
)
from lightning_sparse.slim._graph import GroupRefused, build_graph, trace_group

SIZE = 64
FRACTION = 0.3
slow = pytest.mark.slow

# family -> smallest timm variant; marks
FAMILIES = [
    ("resnet", "resnet18", ()),
    ("resnet-d", "resnet18d", ()),
    ("resnext", "resnext26ts", ()),
    ("regnet", "regnetx_002", ()),
    ("mobilenetv2", "mobilenetv2_050", ()),
    ("mobilenetv3", "mobilenetv3_small_050", ()),
    ("efficientnet", "efficientnet_b0", ()),
    ("convnext", "convnext_atto", ()),
    ("repvgg", "repvgg_a0", ()),
    ("dla", "dla34", ()),
    ("mixnet", "mixnet_s", ()),
    ("ghostnet", "ghostnet_100", ()),
    ("lcnet", "lcnet_050", ()),
    ("densenet", "densenet121", ()),
    ("vgg", "vgg11_bn", ()),
    ("hrnet", "hrnet_w18_small", ()),
    ("vovnet", "ese_vovnet19b_slim_dw", ()),
    ("darknet", "darknet17", ()),
    ("nfnet", "nf_resnet26", ()),
    ("cspnet", "cs3darknet_s", ()),
    ("rexnet", "rexnet_100", ()),
    ("dpn", "dpn48b", ()),
    ("res2net", "res2net50_14w_8s", ()),
    ("sknet", "skresnet18", ()),
    ("resnest", "resnest14d", (slow,)),
    ("ghostnetv2", "ghostnetv2_100", ()),
    ("repghostnet", "repghostnet_050", ()),
    ("mobileone", "mobileone_s0", ()),
    ("xception", "xception41", ()),
    ("gernet", "gernet_s", ()),
    ("selecsls", "selecsls42b", ()),
]

# (arch, include_residual or None for both) -> a pattern one reason in `.refused` must match
REFUSED = {
    ("convnext_atto", True): r"unsupported layer type LayerNorm2d",
    ("mixnet_s", True): r"spread over branches \[0, 1, 2\] of mixed conv 'blocks\.2\.0\.conv_dw'",
    ("ghostnet_100", True): r"its channels 0 and 8 meet at channel 0",
    ("ghostnetv2_100", True): r"meet at channel",
    ("rexnet_100", None): r"channel slice \[\d+:\d+:1\] of a \d+-channel tensor",
    ("dpn48b", None): r"channel slice",
    ("res2net50_14w_8s", None): r"channel split/chunk/unbind \(SplitBackward0",
    ("skresnet18", None): r"meet at channel",
    ("resnest14d", None): r"meet at channel \d+ of TransposeBackward0",
}
# (arch, include_residual or None) -> the ValueError channel_candidates raises
RAISES = {
    ("repvgg_a0", False): r"ByobNet has no conv whose output channels can be removed \(\d+ convs refused, .*sum",
    ("mobileone_s0", False): r"ByobNet has no conv whose output channels can be removed",
    ("nf_resnet26", None): r"NormFreeNet has no conv .* it is a ScaledStdConv2d",
    ("cs3darknet_s", None): r"Torch-Pruning cannot build the channel dependency graph of CspNet",
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Graph tracing runs thousands of tiny ops; with two intra-op threads each one waits at a thread barrier
    whenever other processes hold the cores (on a busy 2-core machine this module took 5.5 min, not 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _expected(table: dict, arch: str, residual: bool) -> str | None:
    return table.get((arch, residual), table.get((arch, None)))


def _model(arch: str) -> nn.Module:
    return timm_with_random_bn(arch)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    scale = max(1.0, ref.abs().max().item())
    err = (out - ref).abs().max().item()
    assert err <= tol * scale, f"logits moved by {err:.3g} (largest logit {scale:.3g})"


def _params():
    for family, arch, marks in FAMILIES:
        for residual in (False, True):
            mode = "residual" if residual else "plain"
            yield pytest.param(arch, residual, id=f"{family}-{mode}", marks=marks)


@pytest.mark.parametrize(("arch", "residual"), list(_params()))
def test_family_contract(arch: str, residual: bool) -> None:
    model = _model(arch)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    raises = _expected(RAISES, arch, residual)
    if raises is not None:  # refused up front, as a whole
        with pytest.raises(ValueError, match=raises):
            channel_candidates(model, x[:1], include_residual=residual)
        return
    groups = channel_candidates(model, x[:1], include_residual=residual)
    assert groups and not set(groups) & set(groups.refused)
    refused = _expected(REFUSED, arch, residual)
    if refused is not None:
        hits = [n for n, r in groups.refused.items() if re.search(refused, r)]
        assert hits, f"no refusal matches {refused!r}: {groups.refused}"
        with pytest.raises(ValueError) as err:  # the same reason at slim time as at listing time
            slim_model(model, {hits[0]: [0]}, x[:1], include_residual=residual)
        assert str(err.value) == f"cannot slim layer {hits[0]!r}: {groups.refused[hits[0]]}."

    g = torch.Generator().manual_seed(0)
    removed = {}
    with torch.no_grad():
        dense = model(x)
        for name, group in groups.items():
            if group.channels < 2:
                continue
            k = min(group.channels - 1, max(1, round(FRACTION * group.channels)))
            removed[name] = torch.randperm(group.channels, generator=g)[:k].tolist()
            zero_channels(model, group, removed[name])
        ref = model(x)
    assert not torch.allclose(ref, dense, rtol=0, atol=1e-4 * max(1.0, dense.abs().max().item()))
    before = _n_params(model)
    res = slim_model(model, removed, x[:1], include_residual=residual, return_result=True)
    with torch.no_grad():
        out = model(x)
    _close(out, ref)
    assert _n_params(model) < before
    modules = dict(model.named_modules())
    for name, idx in removed.items():
        assert res.removed[name] == sorted(idx)
        assert modules[name].out_channels == groups[name].channels - len(idx)

    fresh = _model(arch)  # the slim architecture rebuilds on a fresh model (slim checkpoints, export)
    apply_channel_config(fresh, channel_config(model), x[:1])
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        _close(fresh(x), out, tol=1e-6)


def test_mixnet_mixed_convs_slim_per_branch() -> None:
    """MixNet: branch convs of a ``MixedConv2d`` are candidates; slimming one removes the matching input
    channels of the *same* branch downstream (Torch-Pruning alone maps branch 0 onto branch 1) and rewrites
    ``splits``; groups that spread over several branches of a mixed conv are refused with the reason."""
    model = _model("mixnet_s")
    x = torch.randn(2, 3, SIZE, SIZE)
    groups = channel_candidates(model, x[:1])
    block = model.blocks[1][0]
    assert {"blocks.1.0.conv_pw.0", "blocks.1.0.conv_pw.1"} <= set(groups)
    assert [c.in_channels for c in block.conv_pwl.values()] == block.conv_pwl.splits == [48, 48]
    removed = {"blocks.1.0.conv_pw.0": [0, 5, 47], "blocks.1.0.conv_pw.1": list(range(10))}
    for name, idx in removed.items():
        zero_channels(model, groups[name], idx)
    with torch.no_grad():
        ref = model(x)
    res = slim_model(model, removed, x[:1], return_result=True)
    with torch.no_grad():
        _close(model(x), ref)
    assert block.conv_pwl.splits == [45, 38] and block.conv_pwl.in_channels == 83
    assert res.kept["blocks.1.0.conv_pwl.0.weight"][1].tolist() == [i for i in range(48) if i not in (0, 5, 47)]
    assert res.kept["blocks.1.0.conv_pwl.1.weight"][1].tolist() == list(range(10, 48))

    with_res = channel_candidates(_model("mixnet_s"), x[:1], include_residual=True)
    reason = with_res.refused["blocks.2.0.conv_pw"]
    assert reason.startswith("its channels spread over branches [0, 1, 2] of mixed conv 'blocks.2.0.conv_dw'")
    with pytest.raises(ValueError, match=r"cannot slim layer 'blocks.2.0.conv_pw': its channels spread over"):
        slim_model(_model("mixnet_s"), {"blocks.2.0.conv_pw": [0]}, x[:1], include_residual=True)


def test_ghostnet_residual_streams_refused() -> None:
    """GhostNet: a Ghost module concatenates ``primary`` and ``cheap(primary)``; in a residual stream the sum
    folds that concat back onto the stream, so stream channels c and c + C/2 are one channel: refused at
    listing time (it used to be offered and silently changed the logits). Plain mode slims exactly."""
    x = torch.randn(1, 3, SIZE, SIZE)
    model = _model("ghostnet_100")
    plain = channel_candidates(model, x)
    assert "blocks.0.0.ghost1.primary_conv.0" in plain
    assert plain["blocks.0.0.ghost1.primary_conv.0"].coupled == ("blocks.0.0.ghost1.cheap_operation.0",)
    assert plain.refused["conv_stem"].startswith("its channels feed a residual sum")
    groups = channel_candidates(model, x, include_residual=True)
    assert "conv_stem" not in groups and "blocks.1.0.ghost2.primary_conv.0" not in groups
    assert groups.refused["conv_stem"].startswith("its channels 0 and 8 meet at channel 0 of ")
    assert groups.refused["blocks.1.0.ghost2.primary_conv.0"].startswith(
        "its channels are produced in another layout by 'blocks.1.0.shortcut.2' (24 output channels for 12")
    for layer in ("conv_stem", "blocks.1.0.ghost2.primary_conv.0"):
        with pytest.raises(ValueError, match=rf"cannot slim layer '{layer}': its channels"):
            slim_model(model, {layer: [0]}, x, include_residual=True)


class _Chunked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.a, self.b, self.head = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.stem(x).chunk(2, dim=1)
        return self.head(torch.cat([self.a(x1), self.b(x2)], dim=1))


def test_forward_code_slices_and_splits_refused() -> None:
    x = torch.randn(1, 3, 12, 12)
    # a Ghost module with an odd width: cat(4 + 4 channels)[:, :7] really drops a channel
    ghost = nn.Sequential(nn.Conv2d(3, 8, 3), GhostModule(8, 7), nn.Conv2d(7, 2, 1)).eval()
    groups = channel_candidates(ghost, x)
    assert list(groups) == ["0"]
    assert groups.refused["1.primary_conv.0"].startswith(
        "its channels pass a channel slice [0:7:1] of a 8-channel tensor (SliceBackward0 after ")
    with pytest.raises(ValueError, match=r"cannot slim layer '1.primary_conv.0': its channels pass a channel slice"):
        slim_model(ghost, {"1.primary_conv.0": [0]}, x)

    chunked = _Chunked().eval()
    groups = channel_candidates(chunked, x)
    assert set(groups) == {"a", "b"}
    assert groups.refused["stem"].startswith(
        "its channels reach a channel split/chunk/unbind (SplitBackward0 after 'stem')")


def test_conv_subclasses_with_whole_filter_forward_refused() -> None:
    x = torch.randn(1, 3, 12, 12)
    model = nn.Sequential(StdConv2d(3, 8, 3), nn.Conv2d(8, 8, 1), StdConv2d(8, 4, 1), nn.Conv2d(4, 2, 1)).eval()
    with pytest.raises(ValueError, match=r"Sequential has no conv .* it is a StdConv2d, whose forward uses more"):
        channel_candidates(model, x)
    with pytest.raises(ValueError, match=r"cannot slim layer '1': its channels reach '2': unsupported conv type"):
        slim_model(model, {"1": [0]}, x)


def test_group_search_is_bounded() -> None:
    model = _model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    graph = build_graph(model, x)
    names = {m: n for n, m in model.named_modules()}
    with pytest.raises(GroupRefused, match=r"its dependency group did not close within 2 steps"):
        trace_group(graph, model.layer1[0].conv2, list(range(64)), names, max_steps=2)
    group = trace_group(graph, model.layer1[0].conv1, list(range(64)), names)
    layers = {names[i.dep.target.module] for i in group if i.dep.target.module in names}
    assert layers == {"layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}
    assert all(list(i.idxs) == list(i.root_idxs) for i in group)
