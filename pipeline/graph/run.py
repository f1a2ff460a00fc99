"""Running the float graph: ``run_float(graph, x)`` equals ``model.eval()(x)`` to float tolerance.

Optionally with other weights (the weight-only quantized model), an ``activations`` hook (the
integer model's activation grid, in float) and an ``observe`` hook (calibration).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.graph.nodes import (
    Activation,
    ActivationKind,
    Add,
    AvgPool,
    Concat,
    Conv,
    FloatGraph,
    HardSwish,
    LeakyReLU,
    Linear,
    MaxPool,
    Node,
)


def apply_activation(x: Tensor, activation: ActivationKind) -> Tensor:
    if activation == "relu":
        return F.relu(x)
    if activation == "relu6":
        return F.relu6(x)
    return x


def run_float(
    graph: FloatGraph,
    x: Tensor,
    weights: Mapping[str, Tensor] | None = None,
    observe: Callable[[str, Tensor], None] | None = None,
    activations: Callable[[str, Tensor], Tensor] | None = None,
    computed: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The graph's output for a batch ``x`` (N, C, H, W), in ``x``'s dtype.

    ``weights`` replaces layers' weights by name (the weight-only quantized model);
    ``activations(tensor_name, value)`` replaces every tensor as it is computed (the input included), e.g. by its
    quantized value (``pipeline.profile.activation_quantizer``); ``observe(tensor_name, value)`` then sees it.
    ``computed`` holds tensors of an earlier pass on ``x`` whose nodes are not run again: the caller's promise that
    they are what this pass would compute (the same weights up to them), so a pass that changes one layer's weight
    can start at that layer.
    """
    if x.dim() == 4:
        # The graph's own ops, not the user's code (which gets contiguous NCHW): oneDNN's convolutions run
        # channels-last faster on a CPU (ResNet-20 0.87x, net 0.76x as fast without).
        x = x.contiguous(memory_format=torch.channels_last)
    values = {graph.input: x if activations is None else activations(graph.input, x)}
    if observe is not None:
        observe(graph.input, values[graph.input])
    for node in graph.nodes:
        if computed is not None and node.output in computed:
            values[node.output] = computed[node.output]
            continue
        values[node.output] = _float_node(node, values, x.dtype, weights or {})
        if activations is not None:
            values[node.output] = activations(node.output, values[node.output])
        if observe is not None:
            observe(node.output, values[node.output])
    return values[graph.output]


def tensor_values(
    graph: FloatGraph, x: Tensor, name: str, weights: Mapping[str, Tensor] | None = None, batch_size: int = 256,
    activations: Callable[[str, Tensor], Tensor] | None = None,
) -> Tensor:
    """The tensor ``name`` for every image of ``x`` (``weights`` and ``activations`` as in ``run_float``),
    ``batch_size`` images a pass."""
    parts = []

    def keep(tensor_name: str, value: Tensor) -> None:
        if tensor_name == name:
            parts.append(value.detach())

    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            run_float(graph, x[start : start + batch_size], weights, keep, activations)
    return torch.cat(parts)


def run_layer(node: Conv | Linear, x: Tensor, weight: Tensor) -> Tensor:
    """One Conv/Linear node on ``x`` with ``weight`` in its place (its own bias and fused activation), in x's dtype."""
    weight = weight.to(x.dtype)
    bias = node.bias.to(x.dtype) if node.bias is not None else None
    if isinstance(node, Conv):
        y = F.conv2d(x, weight, bias, node.stride, node.padding, 1, node.groups)
    else:
        y = F.linear(x, weight, bias)
    return apply_activation(y, node.activation)


def _float_node(node: Node, values: Mapping[str, Tensor], dtype: torch.dtype, weights: Mapping[str, Tensor]) -> Tensor:
    if isinstance(node, (Conv, Linear)):
        return run_layer(node, values[node.input], weights.get(node.name, node.weight))
    if isinstance(node, Add):
        return apply_activation(values[node.inputs[0]] + values[node.inputs[1]], node.activation)
    if isinstance(node, Concat):
        return torch.cat([values[name] for name in node.inputs], dim=1)
    if isinstance(node, MaxPool):
        return F.max_pool2d(values[node.input], node.kernel, node.stride, node.padding)
    if isinstance(node, AvgPool):
        return F.avg_pool2d(values[node.input], node.kernel, node.stride, node.padding)
    if isinstance(node, Activation):
        return apply_activation(values[node.input], node.activation)
    if isinstance(node, LeakyReLU):
        return F.leaky_relu(values[node.input], node.negative_slope)
    if isinstance(node, HardSwish):
        return F.hardswish(values[node.input])
    return values[node.input].flatten(1)


class GraphModel(nn.Module):
    """A float graph as an ``nn.Module`` (``forward`` is ``run_float``), for code that runs modules."""

    def __init__(self, graph: FloatGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> Tensor:
        return run_float(self.graph, x)


