"""Helpers that make test models non-trivial."""
from __future__ import annotations

import pytest
import torch
from torch import nn

# torch.onnx.export(dynamo=False), the exporter most users' ONNX files still come from, warns that it is deprecated
# (torch 2.9+), and with TrainingMode.PRESERVE about constant folding, which matters only for a model in training mode.
LEGACY_ONNX_EXPORT_WARNINGS = [
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:It is recommended that constant folding be turned off:UserWarning"),
]


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
