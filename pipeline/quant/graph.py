"""Walking and rewriting the ``nn.Sequential`` models of ``pipeline.models``.

Quantized layers are the ``Conv2d`` and ``Linear`` children; BatchNorm is
folded into the preceding convolution before quantization.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

QUANTIZED_LAYER_TYPES = (nn.Conv2d, nn.Linear)


def quantized_layer_names(model: nn.Sequential) -> list[str]:
    """Names of the Conv2d and Linear children, in forward order."""
    return [name for name, layer in model.named_children() if isinstance(layer, QUANTIZED_LAYER_TYPES)]


def _folded_conv(conv: nn.Conv2d, batchnorm: nn.BatchNorm2d) -> nn.Conv2d:
    """A copy of ``conv`` with eval-mode ``batchnorm`` folded into its weight and bias.

    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta, per output channel, so
    w' = w * gamma / sqrt(var + eps) and b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    Computed in float64, stored in the conv's dtype.
    """
    if batchnorm.running_mean is None or batchnorm.running_var is None:
        raise ValueError("BatchNorm2d without running statistics (track_running_stats=False) cannot be folded")
    running_mean = batchnorm.running_mean.to(torch.float64)
    inv_std = torch.rsqrt(batchnorm.running_var.to(torch.float64) + batchnorm.eps)
    gamma = batchnorm.weight.detach().to(torch.float64) if batchnorm.affine else torch.ones_like(running_mean)
    beta = batchnorm.bias.detach().to(torch.float64) if batchnorm.affine else torch.zeros_like(running_mean)
    weight = conv.weight.detach().to(torch.float64)
    bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros_like(running_mean)
    per_channel_gain = gamma * inv_std
    folded = copy.deepcopy(conv)
    folded.bias = nn.Parameter(torch.empty(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device))
    with torch.no_grad():
        folded.weight.copy_(weight * per_channel_gain.reshape(-1, 1, 1, 1))
        folded.bias.copy_((bias - running_mean) * per_channel_gain + beta)
    return folded


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model`` with every BatchNorm2d folded into the Conv2d just before it and removed.

    Uses eval-mode semantics (running statistics), so the folded model equals
    ``model.eval()``. A BatchNorm2d that does not directly follow a Conv2d is an error.
    """
    children = list(model.named_children())
    folded: list[tuple[str, nn.Module]] = []
    for name, layer in children:
        if isinstance(layer, nn.BatchNorm2d):
            if not folded or not isinstance(folded[-1][1], nn.Conv2d):
                raise ValueError(f"BatchNorm2d {name!r} must directly follow a Conv2d to be folded")
            conv_name, conv = folded.pop()
            folded.append((conv_name, _folded_conv(conv, layer)))
        else:
            folded.append((name, copy.deepcopy(layer)))
    return nn.Sequential(OrderedDict(folded)).eval()
