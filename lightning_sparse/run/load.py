"""Read what a run trained into the network its forward used: slim shapes, weights, N:M masks baked in.

Accepted inputs:

* a Lightning checkpoint of an :class:`~lightning_sparse.models.ImageClassifier` run: the timm backbone
  is rebuilt from the checkpoint's hyper-parameters (``model_name``, ``num_classes``, ``in_chans``,
  ``model_kwargs``), slimmed to the channel configuration the checkpoint holds (Chase), and loaded
  strictly. ``DynamicSparsity``/``Chase`` masks (callback state) are already applied to the stored
  weights; that is checked, and a weight that is nonzero outside its mask is an error. Channels a Chase
  run zeroed but never slimmed (``slim="never"``) are removed here (logits checked unchanged). ``NMSparsity``
  keeps the dense weights and recomputes ``M(W)`` from them at every forward once its dense warm-up is
  over, so the same masks are recomputed here and written as exact zeros (``bake_nm`` on the callback's
  targets, ``n``, ``m`` and ``layout``);
* a slim export file (:func:`~lightning_sparse.slim.export_slim`), loaded with
  :func:`~lightning_sparse.slim.load_slim` (its weights are used as they are; the N:M layers, masked
  weights and preprocessing an export recorded in its ``meta`` are read back).

Loading a timm run also records its preprocessing (:func:`~lightning_sparse.run.preprocess.run_preprocessing`)
and which weights hold unstructured masks (``RunModel.masked``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from lightning_sparse.run.model import NM, RunModel
from lightning_sparse.run.preprocess import run_preprocessing
from lightning_sparse.run.resolve import config_image_size, find_config, resolve_class, resolve_image_size
from lightning_sparse.slim import SLIM_FORMAT, load_slim, restore_channel_config, slim_model
from lightning_sparse.sparsity.chase import ChannelBook
from lightning_sparse.sparsity.nm import bake_nm, nm_violations
from lightning_sparse.utils.checkpoints import load_checkpoint
from lightning_sparse.utils.errors import InputError
from lightning_sparse.utils.inputs import example_inputs
from lightning_sparse.utils.modules import first_conv

__all__ = ["load_run_model"]

_PREFIX = "model."  # the timm backbone inside ImageClassifier
_CLASSIFIER_KEYS = ("model_name", "num_classes", "in_chans")  # its hyper-parameters that build the backbone


def _not_a_checkpoint(path: Path, why: str) -> InputError:
    return InputError(
        f"checkpoint={str(path)!r} {why}; expected a Lightning checkpoint of an ImageClassifier run "
        f"or a slim export file ({SLIM_FORMAT!r})."
    )


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise _not_a_checkpoint(path, "does not exist or is not a file")
    payload = load_checkpoint(path)  # the messages of its InputErrors name the file
    if not isinstance(payload, dict):
        raise _not_a_checkpoint(path, f"holds a {type(payload).__name__}")
    return payload


def _timm_default_size(model: nn.Module) -> int:
    """The input size a timm model was built for (ViT-style ``patch_embed.img_size``), else its default
    config's (224 where it has none)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None:
        return int(tuple(size)[-1])
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def _image_size(path: Path, payload: Mapping[str, Any], override: int | None, model: nn.Module | None = None) -> int:
    """``override``, else the checkpoint's datamodule hyper-parameters, the slim export's meta or example,
    the run's ``config.yaml``; else (``model`` given) the size the timm model was built for."""
    found = [
        (payload.get("datamodule_hyper_parameters") or {}).get("image_size"),
        (payload.get("meta") or {}).get("image_size"),
        payload["example_inputs"].shape[-1] if torch.is_tensor(payload.get("example_inputs")) else None,
        config_image_size(find_config(path)),
        None if model is None else _timm_default_size(model),
    ]
    return resolve_image_size(override, found, repr(str(path)), "no datamodule hyper-parameters, no image_size in "
                              "its meta and no config.yaml next to it")


def _check_masks(payload: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Check that every unstructured/channel mask in callback state is applied to the stored weights."""
    notes = []
    for key, cb in (payload.get("callbacks") or {}).items():
        if not isinstance(cb, Mapping) or not isinstance(cb.get("masks"), Mapping):
            continue
        bad = {}
        for table in ("masks", "allowed"):
            for name, mask in (cb.get(table) or {}).items():
                w = state.get(name)
                if w is None or tuple(w.shape) != tuple(mask.shape):
                    raise InputError(
                        f"the {table!r} of callback {key} do not fit the stored weights at {name!r} "
                        f"(mask {tuple(mask.shape)}, weight {None if w is None else tuple(w.shape)})."
                    )
                outside = int(torch.count_nonzero(w[~mask.bool()]))
                if outside:
                    bad[name] = bad.get(name, 0) + outside
        if bad:
            raise InputError(f"weights are nonzero outside the masks of callback {key}: {bad}; the checkpoint is inconsistent.")
        notes.append(f"{key.split('{')[0]}: masks of {len(cb['masks'])} weights checked, applied to the stored weights.")
    return notes


def _unstructured_masked(payload: Mapping[str, Any], prefix: str = _PREFIX) -> list[str]:
    """Weights (model names) that an unstructured-mask callback's state masks: a mask with a pruned position.

    N:M masks of a one-shot callback (``pattern="nm"``) are not unstructured: :func:`_bake_nm` lists those.
    """
    names: dict[str, None] = {}
    for cb in (payload.get("callbacks") or {}).values():
        if not isinstance(cb, Mapping) or not isinstance(cb.get("masks"), Mapping) or cb.get("pattern") == "nm":
            continue
        for name, mask in cb["masks"].items():
            if name.startswith(prefix) and not bool(mask.bool().all()):
                names[name[len(prefix):]] = None
    return list(names)


def _slim_removed_channels(model: nn.Module, payload: Mapping[str, Any], x: torch.Tensor) -> list[str]:
    """Remove the channels a Chase run zeroed but never slimmed (``slim="never"``, or saved before ``"end"``).

    Only when the run slimmed nothing: a run that slimmed during training keeps the channel counts it
    chose (its ``round_to`` may have kept some zeroed channels on purpose).
    """
    notes = []
    for key, cb in (payload.get("callbacks") or {}).items():
        if not key.startswith("Chase") or not isinstance(cb, Mapping) or any((cb.get("slimmed") or {}).values()):
            continue
        book = ChannelBook()
        book.load_state_dict(cb)
        todo = {k[len(_PREFIX):]: v for k, v in book.pending_slim().items() if k.startswith(_PREFIX) and v}
        if not todo:
            continue
        with torch.no_grad():
            before = model.eval()(x)
            slim_model(model, todo, x[:1])
            diff = (model(x) - before).abs().max().item()
        if diff > 1e-4 * max(1.0, before.abs().max().item()):
            raise InputError(f"callback {key}: removing its zeroed channels changed the logits by {diff:.3g}; "
                             "the removed channels are not all zero in the stored weights.")
        notes.append(f"{key.split('{')[0]}: {sum(map(len, todo.values()))} zeroed channels of {len(todo)} convs "
                     "removed (the run kept them as zeros).")
    return notes


def _bake_nm(model: nn.Module, payload: Mapping[str, Any], prefix: str = _PREFIX) -> tuple[dict[str, NM], list[str]]:
    """Bake the N:M masks the forward used (after the dense warm-up), from the callback state."""
    nm, notes = {}, []
    step = int(payload.get("global_step", 0))
    for key, cb in (payload.get("callbacks") or {}).items():
        if key.startswith("OneShotPruning") and isinstance(cb, Mapping) and cb.get("pattern") == "nm":
            nm.update(_fixed_nm(model, key, cb, prefix))
            notes.append(f"{key}: N:M masks fixed at fit start; the stored weights hold them.")
            continue
        if not key.startswith("NMSparsity") or not isinstance(cb, Mapping):
            continue
        pattern, layout = NM(int(cb["n"]), int(cb["m"])), str(cb.get("layout", "input_channels"))
        warmup = int(cb.get("dense_warmup_steps", 0))
        names = [t[len(prefix):] for t in cb.get("targets") or [] if t.startswith(prefix)]
        if not names:
            raise InputError(f"callback {key} lists no target weights of the backbone; cannot bake its masks.")
        if step < warmup:
            notes.append(f"{key}: checkpoint at step {step}, before dense_warmup_steps={warmup}: "
                         "the forward was dense, weights exported without N:M masks.")
            continue
        for name in bake_nm(model, pattern.n, pattern.m, layout, names=names):
            nm[name] = pattern
        notes.append(f"{key}: {pattern} masks ({layout}) recomputed from the dense weights and baked into "
                     f"{len(names)} weights.")
    return nm, notes


def _fixed_nm(model: nn.Module, key: str, cb: Mapping[str, Any], prefix: str = _PREFIX) -> dict[str, NM]:
    """The N:M weights of a callback whose masks are fixed (one-shot), checked against the stored weights."""
    pattern, layout = NM(int(cb["n"]), int(cb["m"])), str(cb.get("layout", "input_channels"))
    params = dict(model.named_parameters())
    out = {}
    for target in cb.get("masks") or {}:
        name = target[len(prefix):] if target.startswith(prefix) else target
        if name not in params:
            raise InputError(f"callback {key} masks {target!r}, which the backbone does not have.")
        bad = nm_violations(params[name].detach(), pattern.n, pattern.m, layout)
        if bad:
            raise InputError(f"callback {key}: {target!r} has {bad} groups with more than {pattern.n} nonzeros of "
                             f"{pattern.m}; the stored weights do not hold its {pattern} masks.")
        out[name] = pattern
    return out


def _from_config_class(path: Path, payload: Mapping[str, Any], image_size: int | None) -> RunModel:
    """Any LightningModule: built from the run's ``config.yaml`` ``model`` section, its checkpoint weights loaded."""
    spec = (find_config(path) or {}).get("model")
    if not isinstance(spec, Mapping) or not spec.get("class_path"):
        raise _not_a_checkpoint(path, "has no ImageClassifier hyper-parameters and no config.yaml next to it "
                                      "naming its model's class_path")
    cls = resolve_class(spec["class_path"])
    accepted = inspect.signature(cls).parameters
    kwargs = {**(spec.get("init_args") or {}), **dict(payload.get("hyper_parameters") or {})}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    model = cls(**kwargs)
    in_chans = first_conv(model).in_channels
    size = _image_size(path, payload, image_size)
    restore_channel_config(model, payload, example_inputs((in_chans, size, size)), prefix="")
    state = payload["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise InputError(f"checkpoint={str(path)!r}: its weights do not fit {spec['class_path']}: {err}") from None
    notes = _check_masks(payload, state)
    nm, nm_notes = _bake_nm(model, payload, prefix="")
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return RunModel(model.eval(), str(spec["class_path"]), heads[-1].out_features if heads else 0, in_chans, size,
                    kwargs, "lightning checkpoint", nm, notes + nm_notes, factory=lambda: cls(**kwargs))


def _from_lightning(path: Path, payload: dict[str, Any], image_size: int | None, model_default_size: bool,
                    remove_zeroed_channels: bool) -> RunModel:
    hp = payload.get("hyper_parameters") or {}
    missing = [k for k in _CLASSIFIER_KEYS if k not in hp]
    if missing:
        raise _not_a_checkpoint(path, f"has no ImageClassifier hyper-parameters {missing}")
    arch, num_classes, in_chans = str(hp["model_name"]), int(hp["num_classes"]), int(hp["in_chans"])
    model_kwargs = dict(hp.get("model_kwargs") or {})
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **model_kwargs)
    size = _image_size(path, payload, image_size, model if model_default_size else None)
    shape = (in_chans, size, size)
    restore_channel_config(model, payload, example_inputs(shape), prefix=_PREFIX)
    state = payload["state_dict"]
    weights = {k[len(_PREFIX):]: v for k, v in state.items() if k.startswith(_PREFIX)}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise InputError(f"checkpoint={str(path)!r}: its weights do not fit {arch!r}: {err}") from None
    notes = _check_masks(payload, state)
    if remove_zeroed_channels:
        notes += _slim_removed_channels(model, payload, example_inputs(shape, batch_size=2))
    nm, nm_notes = _bake_nm(model, payload)
    return RunModel(model.eval(), arch, num_classes, in_chans, size, model_kwargs, "lightning checkpoint",
                    nm, notes + nm_notes, masked=_unstructured_masked(payload),
                    preprocessing=run_preprocessing(path, payload, model, shape, arch))


def load_run_model(path: str | Path, image_size: int | None = None, *, model_default_size: bool = False,
                   remove_zeroed_channels: bool = True, any_module: bool = False) -> RunModel:
    """The deployable network of a Lightning checkpoint or a slim export file (see the module docstring).

    Args:
        path: the checkpoint or slim export file.
        image_size: input height/width; default: the checkpoint's datamodule hyper-parameters, the slim
            export's stored example, or the run's ``config.yaml`` (``data.init_args.image_size``).
        model_default_size: where none of those tells the size, use the one the timm model was built for
            (else that is an error).
        remove_zeroed_channels: remove the channels a Chase run zeroed but never slimmed (off: the network
            keeps the channel counts the checkpoint stores).
        any_module: a checkpoint of another LightningModule than ImageClassifier is built from the
            ``model`` section (``class_path``, ``init_args``) of the run's ``config.yaml`` and measured whole
            (``compare`` does this; an export needs a timm backbone).

    Raises:
        InputError: (a ``ValueError``) a missing or unreadable file, a file that is neither kind, weights that
            do not fit, masks that are not applied, or an unknown input size (:class:`UnknownImageSize`).
            Among them (:func:`lightning_sparse.utils.checkpoints.load_checkpoint`): ``UnreadableCheckpoint``
            (truncated, not a ``torch.save`` zip file) and ``UntrustedCheckpoint`` (a pickle that would build
            objects our checkpoints never hold; refused unread).
    """
    path = Path(path)
    payload = _read(path)
    if payload.get("format") == SLIM_FORMAT:
        model = load_slim(path, verify=True)
        size = _image_size(path, payload, image_size, model if model_default_size else None)
        meta = payload.get("meta") or {}
        in_chans = int(payload["in_chans"])
        nm = {str(k): NM.parse(v) for k, v in (meta.get("nm") or {}).items()}
        return RunModel(model.eval(), payload["arch"], int(payload["num_classes"]), in_chans,
                        size, dict(payload.get("model_kwargs") or {}), "slim export", nm=nm,
                        notes=["slim export: weights used as stored."], masked=list(meta.get("masked") or []),
                        preprocessing=run_preprocessing(path, payload, model, (in_chans, size, size), payload["arch"]))
    hp = payload.get("hyper_parameters") or {}
    if any_module and "state_dict" in payload and not all(k in hp for k in _CLASSIFIER_KEYS):
        return _from_config_class(path, payload, image_size)
    if "state_dict" in payload and "hyper_parameters" in payload:
        return _from_lightning(path, payload, image_size, model_default_size, remove_zeroed_channels)
    raise _not_a_checkpoint(path, "is a torch file but neither a Lightning checkpoint nor a slim export")
