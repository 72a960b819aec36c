"""Physical channel removal for Chase (CHASE.md §3) on Torch-Pruning's dependency graph.

Chase zeroes whole output channels of "active" convs during training; this module deletes them: the
conv's filters (and bias), the matching channels of the norm layer after it (and of any depthwise conv
that follows channel-wise), and the matching input channels of the consuming ("passive") layer. Which
layers qualify and which parameters move together is read from ``torch_pruning.DependencyGraph``, never
hand-coded per architecture.

One concept per file; every public name is re-exported here:

* ``candidates.py`` — :func:`channel_candidates`: convs whose output channels can go without touching a
  residual sum, each with the ``(parameter, dim)`` slices that go with a channel (:class:`ChannelGroup`);
  convs it leaves out (also constructs slimming cannot follow exactly) are listed with the reason in
  :attr:`ChannelCandidates.refused`.
* ``prune.py`` — :func:`slim_model` removes channels in place (:class:`SlimResult` says which indices each
  parameter kept, so masks and optimizer state are sliced alike); :func:`zero_channels`.
* ``config.py`` — :func:`channel_config` / :func:`apply_channel_config`: record a slim architecture and
  rebuild it on a fresh dense model.
* ``checkpoint.py`` — :func:`find_channel_config` / :func:`restore_channel_config`: the channel config a
  checkpoint holds, rebuilt on a model before its weights load (every ``Trainer`` stage,
  ``load_from_checkpoint``); for modules without that hook, ``Chase`` installs the Lightning shim of
  :mod:`lightning_sparse.callbacks._slim_restore`.
* ``export.py`` — :func:`export_slim` / :func:`load_slim`: a self-contained file (timm arch + channel
  config + weights).
* ``flops.py`` — :func:`count_flops`, :func:`slim_report`: params, FLOPs (``torch.utils.flop_counter``)
  and channels, dense vs slim.

Torch-Pruning replaces the ``nn.Parameter`` objects it prunes, so an optimizer built before
:func:`slim_model` points at stale tensors: rebuild it (slicing its state with :meth:`SlimResult.slice`).

Example:
    >>> import timm, torch
    >>> model = timm.create_model("resnet18", num_classes=10).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> groups = channel_candidates(model, x)
    >>> sorted(groups)[:2], ("layer1.0.bn1.weight", 0) in groups["layer1.0.conv1"].params
    (['layer1.0.conv1', 'layer1.1.conv1'], True)
    >>> res = slim_model(model, {"layer1.0.conv1": [0, 1, 2]}, x, return_result=True)
    >>> model.layer1[0].conv1.out_channels, model.layer1[0].conv2.in_channels
    (61, 61)
    >>> res.kept["layer1.0.conv2.weight"][1][:3].tolist()  # dim 1 (input channels) kept 3, 4, 5, ...
    [3, 4, 5]
"""


from lightning_sparse.slim.candidates import ChannelCandidates, ChannelEntry, ChannelGroup, channel_candidates
from lightning_sparse.slim.checkpoint import CHANNEL_CONFIG_KEY, find_channel_config, restore_channel_config
from lightning_sparse.slim.config import apply_channel_config, channel_config
from lightning_sparse.slim.export import SLIM_FORMAT, build_slim, export_slim, load_slim
from lightning_sparse.slim.flops import count_flops, slim_report
from lightning_sparse.slim.prune import SlimResult, slim_model, zero_channels

__all__ = [
    "ChannelCandidates",
    "ChannelEntry",
    "ChannelGroup",
    "SlimResult",
    "channel_candidates",
    "slim_model",
    "zero_channels",
    "channel_config",
    "apply_channel_config",
    "CHANNEL_CONFIG_KEY",
    "find_channel_config",
    "restore_channel_config",
    "SLIM_FORMAT",
    "build_slim",
    "export_slim",
    "load_slim",
    "slim_report",
    "count_flops",
]
