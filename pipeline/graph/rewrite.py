"""Rewrites of the float graph, each found by pattern, not by position.

- a ``BatchNorm2d`` whose input is a convolution's output read by nothing else
  is folded into that convolution (eval-mode statistics, float64 arithmetic);
- a ReLU / ReLU6 (module, function, method, ``clamp(0, 6)``, ``hardtanh(0, 6)``)
  whose input is a ``Conv``, ``Linear`` or ``Add`` output read by nothing else
  becomes that node's ``activation``; elsewhere it stays an ``Activation`` node.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.graph.nodes import (
    Activation,
    Add,
    Concat,
    Conv,
    FloatGraph,
    Linear,
    Node,
    UnsupportedModelError,
)


@dataclass(frozen=True)
class BatchNormCall:
    name: str
    input: str
    output: str
    module: nn.BatchNorm2d



def rename_inputs(node: Any, aliases: Mapping[str, str]) -> Any:
    def resolve(name: str) -> str:
        while name in aliases:
            name = aliases[name]
        return name

    if isinstance(node, (Add, Concat)):
        return replace(node, inputs=tuple(resolve(name) for name in node.inputs))
    return replace(node, input=resolve(node.input))



def folded_conv_parameters(
    weight: Tensor, bias: Tensor | None, batchnorm: nn.BatchNorm2d
) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a convolution with eval-mode ``batchnorm`` folded into it.

    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta, per output channel, so
    w' = w * gamma / sqrt(var + eps) and b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    Computed in float64, returned in the weight's dtype.
    """
    running_mean = batchnorm.running_mean.to(torch.float64)
    inv_std = torch.rsqrt(batchnorm.running_var.to(torch.float64) + batchnorm.eps)
    gamma = batchnorm.weight.detach().to(torch.float64) if batchnorm.affine else torch.ones_like(running_mean)
    beta = batchnorm.bias.detach().to(torch.float64) if batchnorm.affine else torch.zeros_like(running_mean)
    bias64 = bias.to(torch.float64) if bias is not None else torch.zeros_like(running_mean)
    gain = gamma * inv_std
    folded_weight = weight.to(torch.float64) * gain.reshape(-1, *([1] * (weight.ndim - 1)))
    folded_bias = (bias64 - running_mean) * gain + beta
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def fold_batchnorms(graph: FloatGraph) -> FloatGraph:
    """Fold every BatchNorm2d into the Conv whose output only it reads; any other BatchNorm2d is an error."""
    consumers = graph.consumers()
    conv_index: dict[str, int] = {}  # output tensor -> position in ``nodes`` of the Conv producing it
    renamed: set[str] = set()
    nodes: list[Any] = []
    for node in graph.nodes:
        if not isinstance(node, BatchNormCall):
            if isinstance(node, Conv):
                conv_index[node.output] = len(nodes)
            nodes.append(node)
            continue
        index = conv_index.get(node.input)
        if index is None or len(consumers[node.input]) != 1:
            raise UnsupportedModelError(
                f"node {node.name!r} (BatchNorm2d) must read the output of a Conv2d that nothing else reads, "
                "to be folded into it"
            )
        conv = nodes[index]
        weight, bias = folded_conv_parameters(conv.weight, conv.bias, node.module)
        nodes[index] = replace(conv, weight=weight, bias=bias, output=node.output)
        conv_index[node.output] = index
        renamed.add(conv.output)
    shapes = {name: shape for name, shape in graph.shapes.items() if name not in renamed}
    return replace(graph, nodes=tuple(nodes), shapes=shapes)


def fuse_activations(graph: FloatGraph) -> FloatGraph:
    """Fuse each ReLU/ReLU6 into the Conv, Linear or Add whose output only it reads (module docstring)."""
    consumers = graph.consumers()
    nodes: list[Node] = list(graph.nodes)
    index_of = {node.output: index for index, node in enumerate(nodes)}
    aliases: dict[str, str] = {}
    kept: list[bool] = [True] * len(nodes)
    for index, node in enumerate(graph.nodes):
        if not isinstance(node, Activation):
            continue
        producer_index = index_of.get(node.input)
        if producer_index is None or not kept[producer_index]:
            continue
        producer = nodes[producer_index]
        fusable = isinstance(producer, (Conv, Linear, Add)) and producer.activation == "none"
        if fusable and len(consumers[node.input]) == 1 and node.input != graph.output:
            nodes[producer_index] = replace(producer, activation=node.activation, output=node.output)
            index_of[node.output] = producer_index
            kept[index] = False
            aliases[node.input] = node.output
    fused = [rename_inputs(node, aliases) for node, keep in zip(nodes, kept) if keep]
    shapes = {name: shape for name, shape in graph.shapes.items() if name not in aliases}
    return replace(graph, nodes=tuple(fused), shapes=shapes)


