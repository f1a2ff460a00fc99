"""Helpers that make test models non-trivial."""
from __future__ import annotations

import torch
from torch import nn


def randomize_batchnorm(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm2d random running statistics and affine parameters, so folding it changes the weights."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.modules():
        if isinstance(layer, nn.BatchNorm2d):
            size = layer.num_features
            layer.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            layer.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            with torch.no_grad():
                layer.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                layer.bias.copy_(torch.rand(size, generator=generator) * 0.4 - 0.2)
