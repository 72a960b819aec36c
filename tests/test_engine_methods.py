"""MaskEngine's mask-changing methods check the invariants (bool, the parameter's shape, known names), and the
callback's SR-STE path through the engine equals the public autograd ``srste`` bit for bit."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from lightning_sparse.sparsity.engine import MaskEngine
from lightning_sparse.sparsity.nm import nm_mask, srste, srste_masked


def _engine(net: nn.Module) -> MaskEngine:
    eng = MaskEngine()
    eng.set_masks({"weight": torch.tensor([[True, False, True, False]] * 3)}, net)
    return eng


def test_set_masks_binds_and_zeroes() -> None:
    net = nn.Linear(4, 3)
    eng = _engine(net)
    eng.apply_weights()
    assert eng.params["weight"] is net.weight
    assert (net.weight[:, [1, 3]] == 0).all() and (net.weight[:, [0, 2]] != 0).all()


@pytest.mark.parametrize(("masks", "match"), [
    ({"weight": torch.ones(3, 4)}, r"set_masks: the mask of 'weight' is torch.float32; masks must be torch.bool"),
    ({"weight": torch.ones(3, 5, dtype=torch.bool)}, r"the mask of 'weight' has shape \(3, 5\), its parameter \(3, 4\)"),
    ({"nope": torch.ones(3, 4, dtype=torch.bool)}, r"set_masks: masks name parameters the model does not have: \['nope'\]"),
])
def test_set_masks_refuses_bad_masks(masks: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MaskEngine().set_masks(masks, nn.Linear(4, 3))


def test_replace_masks_takes_effect() -> None:
    net = nn.Linear(4, 3)
    eng = _engine(net)
    eng.apply_weights()  # caches the multipliers of the first masks
    new = torch.tensor([[False, True, False, False]] * 3)
    eng.replace_masks({"weight": new})
    assert torch.equal(eng.masks["weight"], new)
    with torch.no_grad():
        net.weight.fill_(1.0)
    eng.apply_weights()
    assert net.weight.tolist() == [[0.0, 1.0, 0.0, 0.0]] * 3


@pytest.mark.parametrize(("masks", "match"), [
    ({"bias": torch.ones(3, dtype=torch.bool)},
     r"replace_masks: no bound target mask for \['bias'\]; the engine holds masks for \['weight'\]"),
    ({"weight": torch.ones(3, 4, dtype=torch.uint8)}, r"the mask of 'weight' is torch.uint8; masks must be torch.bool"),
    ({"weight": torch.ones(4, 3, dtype=torch.bool)},
     r"replace_masks: the mask of 'weight' has shape \(4, 3\), its parameter \(3, 4\)"),
])
def test_replace_masks_refuses_bad_masks(masks: dict, match: str) -> None:
    eng = _engine(nn.Linear(4, 3))
    before = eng.masks["weight"].clone()
    with pytest.raises(ValueError, match=match):
        eng.replace_masks(masks)
    assert torch.equal(eng.masks["weight"], before)  # nothing changed


def test_masks_and_allowed_are_read_only() -> None:
    eng = _engine(nn.Linear(4, 3))
    with pytest.raises(AttributeError):
        eng.masks = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        eng.masks["weight"] = torch.ones(3, 4, dtype=torch.bool)  # type: ignore[index]
    with pytest.raises(TypeError):
        eng.allowed["weight"] = torch.ones(3, 4, dtype=torch.bool)  # type: ignore[index]


def test_bind_refuses_a_mask_of_another_shape() -> None:
    eng = MaskEngine()
    eng.load_state_dict({"masks": {"weight": torch.ones(2, 4, dtype=torch.bool)}})
    with pytest.raises(ValueError, match=r"bind: the mask of 'weight' has shape \(2, 4\), its parameter \(3, 4\)"):
        eng.bind(nn.Linear(4, 3))


def _slim_first_output(net: nn.Linear) -> dict[str, nn.Parameter]:
    """Drop output row 0 of ``net`` the way Torch-Pruning does: new Parameter objects. Returns the old ones."""
    old = dict(net.named_parameters())
    net.weight = nn.Parameter(net.weight.detach()[1:].clone())
    net.bias = nn.Parameter(net.bias.detach()[1:].clone())
    return old


def _drop_row0(name: str, t: torch.Tensor) -> torch.Tensor:
    return t[1:]


def test_slice_masks_and_repoint_optimizers() -> None:
    net = nn.Linear(4, 3)
    eng = _engine(net)
    eng.block("weight", net.weight, 0, torch.tensor([0]))  # output 0 removed: about to be slimmed
    eng.block("bias", net.bias, 0, torch.tensor([0]))
    eng.block("weight", net.weight, 1, torch.tensor([2]))  # input 2 removed: stays forbidden after slimming
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    momentum = opt.state[net.weight]["momentum_buffer"].clone()

    old = _slim_first_output(net)
    eng.slice_masks(_drop_row0, net)
    eng.repoint_optimizers([opt], old, net, _drop_row0)

    assert eng.params["weight"] is net.weight and eng.masks["weight"].shape == (2, 4)
    assert set(eng.allowed) == {"weight"}  # the bias keeps every remaining entry: no longer listed
    assert eng.allowed["weight"].tolist() == [[True, True, False, True]] * 2
    assert opt.param_groups[0]["params"][0] is net.weight and opt.param_groups[0]["params"][1] is net.bias
    assert torch.equal(opt.state[net.weight]["momentum_buffer"], momentum[1:])
    net(torch.randn(2, 4)).sum().backward()
    opt.step()  # the optimizer runs on the slim Parameters
    eng.enforce([opt])
    assert (net.weight[:, [1, 2, 3]] == 0).all()


def test_slice_masks_refuses_a_cut_of_the_wrong_shape() -> None:
    net = nn.Linear(4, 3)
    eng = _engine(net)
    _slim_first_output(net)
    with pytest.raises(ValueError, match=r"slice_masks: the mask of 'weight' has shape \(3, 4\), its parameter \(2, 4\)"):
        eng.slice_masks(lambda name, t: t, net)


def test_slice_masks_refuses_a_non_bool_cut() -> None:
    net = nn.Linear(4, 3)
    eng = _engine(net)
    _slim_first_output(net)
    with pytest.raises(ValueError, match=r"slice_masks: the mask of 'weight' is torch.float32"):
        eng.slice_masks(lambda name, t: t[1:].float(), net)


def test_repoint_optimizers_refuses_state_cut_to_the_wrong_shape() -> None:
    net = nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    old = _slim_first_output(net)
    with pytest.raises(ValueError, match=r"state 'momentum_buffer' of 'weight' was cut to \(3, 4\), its parameter has \(2, 4\)"):
        MaskEngine().repoint_optimizers([opt], old, net, lambda name, t: t)


def test_repoint_optimizers_refuses_a_vanished_parameter() -> None:
    net = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    old = dict(net.named_parameters())
    net[0] = nn.Identity()
    with pytest.raises(ValueError, match=r"the optimizer holds '0.weight', which the model no longer has"):
        MaskEngine().repoint_optimizers([opt], old, net, _drop_row0)


@pytest.mark.parametrize("layout", ["input_channels", "flattened"])
def test_engine_srste_path_equals_autograd_srste(layout: str) -> None:
    """The NMSparsity path (write_masked, backward on W̃, restore_dense, add_decay) and ``srste`` give the
    same forward and the same gradient, bit for bit."""
    torch.manual_seed(0)
    w0, x, decay = torch.randn(6, 8, 3, 3), torch.randn(2, 8, 5, 5), 0.3

    w = w0.clone().requires_grad_(True)
    out_ref = torch.nn.functional.conv2d(x, srste(w, 2, 4, decay=decay, layout=layout))
    out_ref.square().sum().backward()

    conv = nn.Conv2d(8, 6, 3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(w0)
    eng = MaskEngine()
    eng.bind(conv, ["weight"])
    eng.write_masked(partial(srste_masked, n=2, m=4, layout=layout))
    assert torch.equal(conv.weight.detach(), w0 * nm_mask(w0, 2, 4, layout))
    out = conv(x)
    out.square().sum().backward()
    assert eng.restore_dense()
    eng.add_decay(decay)

    assert torch.equal(out, out_ref)
    assert torch.equal(conv.weight.detach(), w0)  # the dense weight is back
    assert torch.equal(conv.weight.grad, w.grad)
    assert not torch.equal(w.grad, torch.zeros_like(w.grad))
