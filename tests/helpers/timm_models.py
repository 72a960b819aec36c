"""timm CNNs with non-trivial norm state, for tests that zero channels and compare logits."""

from __future__ import annotations

import timm
import torch
from torch import nn


def timm_with_random_bn(arch: str, num_classes: int = 5) -> nn.Module:
    """``timm.create_model(arch)`` (seed 0, no pretrained weights) in eval mode, with random BatchNorm statistics
    and affine parameters and layer scales (``gamma``) at 1, so a zeroed channel changes the logits."""
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=num_classes, pretrained=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1] == "gamma":  # ConvNeXt layer scale starts at 1e-6
                p.fill_(1.0)
    return model.eval()
