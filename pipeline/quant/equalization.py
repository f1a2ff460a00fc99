"""Cross-layer equalization of the BatchNorm-folded float graph (Nagel et al. 2019, "Data-Free
Quantization Through Weight Equalization and Bias Correction", section 4.1).

For two layers A -> B where everything between them commutes with a positive per-channel
scale, f(x / s) = f(x) / s for s > 0 (A's fused ReLU, a standalone ReLU, max pool, average
pool, a flatten), dividing A's output channel i (its weights and bias) by s_i and multiplying
B's weights that read channel i by s_i leaves B's output, and so the model's, unchanged.
With r1_i = max|A's weights of output channel i| and r2_i = max|B's weights reading channel i|,
s_i = sqrt(r1_i * r2_i) / r2_i makes both ranges sqrt(r1_i * r2_i), the paper's optimum of the
summed per-channel precision r_i / max(r) of both layers under per-tensor quantization: a channel
whose weights are small next to its layer's largest is no longer rounded away. A chain
A -> B -> C scales B along both axes, so the pairs are equalized in turn until the scales stop
changing (``equalize``).

A pair is only formed where A's output reaches B and nothing else (``equalization_pairs``):
a tensor also read by a residual add, a concat or a second layer would see the scaled values.
A fused or standalone ReLU6 ends the search: min(x / s, 6) != min(x, 6) / s, and the clamp at 6
is fixed in the integer model, so those pairs (most of MobileNetV2's) are left alone.

Equalization changes the tensors between A and B (channel i divided by s_i), so activation
ranges must be calibrated on the equalized graph: its ``traced`` is None, so ``observe_original``
(which runs the unequalized model) refuses it, the graph stage stores none of the trained model's calls
with it, and the profile runs the graph itself (``run_float(observe=...)``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from pipeline.graph.nodes import (
    Activation,
    AvgPool,
    Conv,
    FloatGraph,
    Linear,
    MaxPool,
    Node,
    Reshape,
)

DEFAULT_MAX_ITERATIONS = 100  # sweeps over all pairs; a lone pair needs one (and one more to see it converged)
DEFAULT_TOLERANCE = 1e-6  # converged when every scale of a sweep has |log s| <= this (about 1e-6 relative)


@dataclass(frozen=True)
class EqualizationPair:
    """Layers ``first`` -> ``second`` with only scale-equivariant ops between them.

    ``block`` is the number of ``second``'s input features per channel of ``first``: H * W when a
    (C, H, W) map is flattened into a Linear layer (channel c is features c*H*W .. (c+1)*H*W - 1,
    the flatten's C-major order), 1 otherwise.
    """

    first: str
    second: str
    block: int = 1


@dataclass(frozen=True)
class Equalization:
    """The equalized graph, its pairs in graph order, and what was done to them.

    ``scales[(first, second)]`` is s per channel, the product over all sweeps: the tensors from
    ``first``'s output to ``second``'s input are the unequalized ones divided by s, channel by channel.
    ``iterations`` is the number of sweeps run; ``converged`` is False when ``max_iterations`` sweeps
    ended with a scale still changing (the pairs are then nearly, not exactly, equalized).
    """

    graph: FloatGraph
    pairs: tuple[EqualizationPair, ...]
    scales: Mapping[tuple[str, str], Tensor]
    iterations: int
    converged: bool


# ---------------------------------------------------------------- finding pairs


def _commutes_with_scaling(node: Node) -> bool:
    """Whether f(x / s) = f(x) / s per channel for every s > 0 (max pool pads with -inf, average pool with 0)."""
    if isinstance(node, Activation):
        return node.activation == "relu"
    return isinstance(node, (MaxPool, AvgPool, Reshape))


def _pair_from(graph: FloatGraph, first: Conv | Linear, readers: Mapping[str, list[Node]]) -> EqualizationPair | None:
    """The pair starting at ``first``; None unless its output reaches one layer, and only it, through
    scale-equivariant ops."""
    if first.activation == "relu6":
        return None  # the clamp at 6 does not commute with scaling (module docstring)
    name = first.output
    while True:
        if name == graph.output or len(readers[name]) != 1:
            return None  # a model output, a residual add, a concat branch or a second layer also reads it
        reader = readers[name][0]
        if isinstance(reader, (Conv, Linear)):
            break
        if not _commutes_with_scaling(reader):
            return None
        name = reader.output
    second = reader
    channels = first.weight.shape[0]
    shape = graph.shapes[name]  # what ``second`` reads, per image
    if isinstance(second, Conv):
        return EqualizationPair(first.name, second.name) if len(shape) == 3 else None
    # A Linear layer mixes the last axis only: the channels are its features only once flattened (1-D).
    if len(shape) != 1 or shape[0] % channels:
        return None
    return EqualizationPair(first.name, second.name, shape[0] // channels)


def equalization_pairs(graph: FloatGraph) -> list[EqualizationPair]:
    """Every layer pair A -> B of ``graph`` that can be equalized (module docstring), in graph order."""
    readers = graph.consumers()
    return [pair for layer in graph.layers() if (pair := _pair_from(graph, layer, readers)) is not None]


# ---------------------------------------------------------------- ranges and scales


def input_channel_index(second: Conv | Linear, block: int = 1) -> Tensor:
    """For each weight of ``second``, the input channel it reads (int64, shaped like the weight).

    Conv (out, in / groups, kh, kw): output channel o is in group g = o // (out / groups) and its
    weight j reads input channel g * (in / groups) + j; depthwise (groups = in = out) thus gives
    filter c wholly to channel c. Linear (out, features): feature f belongs to channel f // block.
    """
    weight = second.weight
    if isinstance(second, Linear):
        return (torch.arange(weight.shape[1]) // block).expand(weight.shape)
    per_group_out = weight.shape[0] // second.groups
    per_group_in = weight.shape[1]
    group = torch.arange(weight.shape[0]) // per_group_out
    channel = group[:, None] * per_group_in + torch.arange(per_group_in)[None, :]  # (out, in / groups)
    return channel[:, :, None, None].expand(weight.shape)


def output_channel_ranges(weight: Tensor) -> Tensor:
    """r1: max |w| of each output channel (axis 0), float64."""
    return weight.detach().to(torch.float64).abs().reshape(weight.shape[0], -1).amax(dim=1)


def input_channel_ranges(weight: Tensor, index: Tensor, channels: int) -> Tensor:
    """r2: max |w| over the weights reading each of ``channels`` input channels (``input_channel_index``), float64."""
    magnitudes = weight.detach().to(torch.float64).abs().reshape(-1)
    ranges = torch.zeros(channels, dtype=torch.float64)
    return ranges.scatter_reduce(0, index.reshape(-1), magnitudes, reduce="amax")


def pair_ranges(graph: FloatGraph, pair: EqualizationPair) -> tuple[Tensor, Tensor]:
    """(r1, r2) of ``pair`` in ``graph``: per channel of ``first``'s output, its weight range and ``second``'s."""
    layers = {layer.name: layer for layer in graph.layers()}
    first, second = layers[pair.first], layers[pair.second]
    channels = first.weight.shape[0]
    return output_channel_ranges(first.weight), input_channel_ranges(
        second.weight, input_channel_index(second, pair.block), channels
    )


def equalizing_scales(first_ranges: Tensor, second_ranges: Tensor) -> Tensor:
    """s_i = sqrt(r1_i * r2_i) / r2_i = sqrt(r1_i / r2_i), so that r1_i / s_i = r2_i * s_i; 1 where a range is 0.

    A channel with all-zero weights on either side carries nothing to balance (and would give s = 0 or inf).
    """
    usable = (first_ranges > 0) & (second_ranges > 0)
    ratio = torch.where(usable, first_ranges, 1.0) / torch.where(usable, second_ranges, 1.0)
    return torch.sqrt(ratio)


# ---------------------------------------------------------------- equalizing


def equalize_pair(
    first_weight: Tensor, first_bias: Tensor | None, second_weight: Tensor, index: Tensor
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """One step of the rule on a pair: (first's weight, first's bias, second's weight, the scales s).

    ``index`` is ``input_channel_index`` of the second layer. First's output channel i (weights and
    bias: the bias is part of channel i's output) is divided by s_i, second's weights reading it multiplied.
    """
    channels = first_weight.shape[0]
    scales = equalizing_scales(output_channel_ranges(first_weight),
                               input_channel_ranges(second_weight, index, channels))
    scaled_first = first_weight / scales.to(first_weight.dtype).reshape(-1, *([1] * (first_weight.ndim - 1)))
    scaled_bias = None if first_bias is None else first_bias / scales.to(first_bias.dtype)
    return scaled_first, scaled_bias, second_weight * scales.to(second_weight.dtype)[index], scales


def equalize(
    graph: FloatGraph, max_iterations: int = DEFAULT_MAX_ITERATIONS, tolerance: float = DEFAULT_TOLERANCE
) -> Equalization:
    """Cross-layer equalization of every pair of ``equalization_pairs(graph)``; ``graph`` is not changed.

    Each sweep equalizes the pairs in graph order; sweeps repeat until every scale of a sweep is
    within ``tolerance`` of 1 (|log s| <= tolerance) or ``max_iterations`` sweeps ran. The arithmetic
    is float64, the result in each layer's dtype; the model's float outputs are unchanged up to
    that rounding. A graph with no pairs is returned as it is.
    """
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations: value {max_iterations!r} is not allowed; allowed: an integer >= 1")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance: value {tolerance!r} is not allowed; allowed: a finite number > 0")
    pairs = tuple(equalization_pairs(graph))
    if not pairs:
        return Equalization(graph, (), {}, 0, True)
    layers = {layer.name: layer for layer in graph.layers()}
    weights = {name: layer.weight.detach().to(torch.float64) for name, layer in layers.items()}
    biases = {name: None if layer.bias is None else layer.bias.detach().to(torch.float64)
              for name, layer in layers.items()}
    indices = {pair: input_channel_index(layers[pair.second], pair.block) for pair in pairs}
    totals = {pair: torch.ones(layers[pair.first].weight.shape[0], dtype=torch.float64) for pair in pairs}
    converged, iterations = False, 0
    while not converged and iterations < max_iterations:
        iterations += 1
        largest_change = 0.0
        for pair in pairs:
            weights[pair.first], biases[pair.first], weights[pair.second], scales = equalize_pair(
                weights[pair.first], biases[pair.first], weights[pair.second], indices[pair])
            totals[pair] = totals[pair] * scales
            largest_change = max(largest_change, float(scales.log().abs().max()))
        converged = largest_change <= tolerance
    changed = {name for pair in pairs for name in (pair.first, pair.second)}
    nodes = tuple(
        replace(node, weight=weights[node.name].to(node.weight.dtype),
                bias=None if node.bias is None else biases[node.name].to(node.bias.dtype))
        if node.name in changed else node
        for node in graph.nodes
    )
    # The trace runs the unequalized model: its tensors between the pairs are no longer this graph's.
    equalized = replace(graph, nodes=nodes, traced=None)
    return Equalization(equalized, pairs, {(pair.first, pair.second): totals[pair] for pair in pairs},
                        iterations, converged)


__all__ = [
    "DEFAULT_MAX_ITERATIONS", "DEFAULT_TOLERANCE", "Equalization", "EqualizationPair", "equalization_pairs",
    "equalize", "equalize_pair", "equalizing_scales", "input_channel_index", "input_channel_ranges",
    "output_channel_ranges", "pair_ranges",
]
