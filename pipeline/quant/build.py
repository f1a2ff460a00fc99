"""From a float graph to the integer graph: weights, biases, tensor scales and fixed-point multipliers.

The scheme (r ~= S * q, symmetric, zero point 0):

- weights: int8 in [-127, 127], S_w = range / 127 (per tensor, or per output channel);
- activations: ``ActivationFormat.bits`` b wide, signed [-2^(b-1), 2^(b-1) - 1] with S_a = range / (2^(b-1) - 1)
  (int8: [-128, 127], S_a = range / 127), or with ``ActivationFormat.unsigned`` the full unsigned range
  [0, 2^b - 1], S_a = range / (2^b - 1), for the tensors non-negative by construction
  (``tensor_signedness``). Max-pool, flatten and a standalone ReLU/ReLU6 keep their input's
  integers and scale, so the tensors they connect form one *scale group* with one range and one
  signedness, calibrated on the group's tensors that a rescaling node (conv, linear, add,
  concat, average pool) reads (``scale_groups``);
- biases: int32, q_b = round(b / (S_in * S_w)) (round half to even); a bias outside int32
  is an ``OverflowError`` naming the layer, never a clamp;
- accumulators: int32; every layer is checked at build time so that
  sum(|q_w|) * max|q_in| + |q_b| < 2^31 for each output channel, max|q_in| from the input's own range
  (128 for int8, 255 for uint8: ``ranges.accumulator_bound``);
- every rescaling is a fixed-point multiplier and shift (``fixed_point``), with the
  integer semantics of ``integer_ops``; a fused ReLU is the lower clamp 0, a fused ReLU6
  also the upper clamp round(6 / S_out);
- the last layer gives int32 logits: its accumulators at scale S_in * S_w with per-tensor
  weights; with per-channel weights they are requantized (same rule, saturating to int32)
  to one common scale, the largest S_in * S_w_c, so the class is the argmax of integers.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from pipeline.graph.nodes import (
    Activation,
    ActivationKind,
    Add,
    AvgPool,
    Concat,
    Conv,
    FloatGraph,
    Linear,
    MaxPool,
    Reshape,
    UnsupportedModelError,
    check_output_layer,
)
from pipeline.quant.calibrators import (
    Granularity,
    PerChannel,
    parse_granularity,
    weight_range,
)
from pipeline.quant.fixed_point import quantize_multipliers
from pipeline.quant.integer_ops import ADD_LEFT_SHIFT
from pipeline.quant.ir import (
    IntAdd,
    IntAvgPool,
    IntClamp,
    IntConcat,
    IntConv,
    IntegerModel,
    IntMaxPool,
    IntNode,
    IntReshape,
    Requantize,
    TensorInfo,
)
from pipeline.quant.ranges import (
    INT32_MAX,
    INT32_MIN,
    ActivationFormat,
    check_accumulator,
    check_bits,
    check_layer_bits,
    fake_quantize,
    int_range,
    layer_bits,
    quantize,
    scale_from_range,
)

RESCALING_NODES = (Conv, Linear, Add, Concat, AvgPool)  # nodes whose inputs' scales enter their multipliers
SCALE_KEEPING_NODES = (MaxPool, Reshape, Activation)  # output integers and scale are the input's


# ---------------------------------------------------------------- scale groups


@dataclass(frozen=True)
class ScaleGroup:
    """Tensors sharing one scale and integer range: ``root`` and what scale-keeping nodes make of it.

    ``observed`` are the members whose statistics set the range: those read by a rescaling node
    (the root when none is). ``read_by`` names those rescaling nodes.
    """

    root: str
    members: tuple[str, ...]
    observed: tuple[str, ...]
    read_by: tuple[str, ...]


def scale_groups(graph: FloatGraph) -> dict[str, ScaleGroup]:
    """The activation scale groups of ``graph`` by root name, in topological order (the logits are not one)."""
    group_of = {graph.input: graph.input}
    for node in graph.nodes:
        group_of[node.output] = group_of[node.input] if isinstance(node, SCALE_KEEPING_NODES) else node.output
    logits_group = group_of[graph.output]
    readers = graph.consumers()
    groups: dict[str, ScaleGroup] = {}
    for root in dict.fromkeys(group_of.values()):
        if root == logits_group:
            continue
        members = tuple(name for name, group in group_of.items() if group == root)
        observed = tuple(m for m in members if any(isinstance(r, RESCALING_NODES) for r in readers[m]))
        read_by = tuple(dict.fromkeys(r.name for m in members for r in readers[m] if isinstance(r, RESCALING_NODES)))
        groups[root] = ScaleGroup(root, members, observed or (root,), read_by)
    return groups


def nonnegative_tensors(graph: FloatGraph) -> set[str]:
    """The tensors of ``graph`` that are >= 0 by construction, whatever the input.

    A ReLU or ReLU6 (fused into a conv, linear or add, or standalone) makes one; max-pool, average pool
    and flatten keep it; a concat of such tensors is one. The input (a normalized image) is not.
    """
    nonnegative: set[str] = set()
    for node in graph.nodes:
        if isinstance(node, (Conv, Linear, Add, Activation)):
            is_nonnegative = node.activation != "none"
        elif isinstance(node, Concat):
            is_nonnegative = all(name in nonnegative for name in node.inputs)
        else:  # MaxPool, AvgPool, Reshape
            is_nonnegative = node.input in nonnegative
        if is_nonnegative:
            nonnegative.add(node.output)
    return nonnegative


def tensor_signedness(graph: FloatGraph, activation_format: ActivationFormat) -> dict[str, bool]:
    """Whether each activation tensor (the members of ``scale_groups``) is signed.

    A scale group shares its integers, so it has one signedness: unsigned when the format asks for
    unsigned activations and the group's root is non-negative by construction (then so is every
    member: a max-pool, flatten or clamp of it). A standalone ReLU of a signed tensor stays signed,
    in its input's group.
    """
    nonnegative = nonnegative_tensors(graph) if activation_format.unsigned else set()
    return {member: root not in nonnegative for root, group in scale_groups(graph).items() for member in group.members}


def group_ranges(graph: FloatGraph, activation_format: ActivationFormat) -> dict[str, tuple[int, int]]:
    """The integer range [qmin, qmax] of every scale group, by root: what its calibrated range maps onto."""
    signed = tensor_signedness(graph, activation_format)
    return {root: activation_format.range(signed[root]) for root in scale_groups(graph)}


def activation_quantizer(
    graph: FloatGraph, activation_ranges: Mapping[str, float], activation_format: ActivationFormat = ActivationFormat()
) -> Callable[[str, Tensor], Tensor]:
    """The integer model's activation quantization, in float, for ``run_float(activations=...)``.

    Every member of a scale group is snapped to the group's grid (``fake_quantize``: the scale
    ``build_integer_model`` gives it from ``activation_ranges[root]``, round half to even, clamped to
    the group's [qmin, qmax]); the logits and any tensor outside the groups pass unchanged.
    """
    integer_ranges = group_ranges(graph, activation_format)
    grids = {}
    for root, group in scale_groups(graph).items():
        qmin, qmax = integer_ranges[root]
        scale = scale_from_range(float(activation_ranges[root]), qmax)
        grids |= dict.fromkeys(group.members, (scale, qmin, qmax))

    def quantized(name: str, value: Tensor) -> Tensor:
        grid = grids.get(name)
        return value if grid is None else fake_quantize(value, *grid)

    return quantized


# ---------------------------------------------------------------- weights and biases


def quantize_layer_weights(
    weight: Tensor,
    bits: int = 8,
    calibrator: str = "sigma",
    granularity: str | Granularity = "per_tensor",
    settings: Any = None,
) -> tuple[Tensor, Tensor]:
    """(q_weight int8, weight_scale float64) with weight ~= q_weight * weight_scale.

    q_weight is in the narrow range [-(2^(bits-1) - 1), 2^(bits-1) - 1];
    weight_scale is 0-D per tensor or one value per index of the PerChannel axis.
    ``settings`` are the calibrator's (``pipeline.quant.calibrators``), None for its defaults.
    The seed's default: 8 bits, 3-sigma range, per tensor.
    """
    check_bits(bits, "bits (weights are stored as int8)")
    granularity = parse_granularity(granularity)
    qmin, qmax = int_range(bits, narrow=True)
    weight_scale = scale_from_range(weight_range(weight, qmax, calibrator, granularity, settings), qmax)
    axis = granularity.axis if isinstance(granularity, PerChannel) else 0
    return quantize(weight, weight_scale, qmin, qmax, axis).to(torch.int8), weight_scale


def quantize_model_weights(
    graph: FloatGraph,
    weight_bits: int | Mapping[str, int] = 8,
    weight_calibrator: str = "sigma",
    granularity: str | Granularity = "per_tensor",
    weight_settings: Any = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``quantize_layer_weights`` for every Conv/Linear node of the (BatchNorm-folded) graph, by layer name.

    ``weight_bits`` is one width for every layer or a width per layer name (mixed precision; every
    layer must be named).
    """
    check_layer_bits(weight_bits, [node.name for node in graph.layers()])
    granularity = parse_granularity(granularity)
    if isinstance(granularity, PerChannel) and granularity.axis != 0:
        raise ValueError(f"granularity must be per tensor or PerChannel(axis=0) (output channels), got {granularity}")
    return {
        node.name: quantize_layer_weights(node.weight, layer_bits(weight_bits, node.name), weight_calibrator, granularity,
                                          weight_settings)
        for node in graph.layers()
    }


def quantize_bias(bias: Tensor, input_scale: float, weight_scale: Tensor, layer_name: str) -> Tensor:
    """q_b = round(b / (S_in * S_w)) (half to even) as int32; ``OverflowError`` naming the layer if out of int32."""
    bias_scale = input_scale * torch.as_tensor(weight_scale, dtype=torch.float64)
    q_bias = torch.round(bias.detach().to(torch.float64) / bias_scale)
    out_of_range = (q_bias < INT32_MIN) | (q_bias > INT32_MAX)
    if bool(out_of_range.any()):
        channel = int(out_of_range.nonzero()[0, 0])
        raise OverflowError(
            f"layer {layer_name!r}: bias[{channel}] = {float(bias[channel])} at scale S_in*S_w = "
            f"{float(bias_scale.expand_as(q_bias)[channel])} quantizes to "
            f"{float(q_bias[channel])}, outside int32 [{INT32_MIN}, {INT32_MAX}]; "
            "the input or weight scale is too small for this bias"
        )
    return q_bias.to(torch.int32)


# ---------------------------------------------------------------- building


def activation_clamp(activation: ActivationKind, scale: float, qmin: int, qmax: int) -> tuple[int, int]:
    """The integer saturation of a tensor at ``scale`` in [qmin, qmax] with a fused activation.

    ReLU is the lower clamp 0; ReLU6 also clamps at round(6 / scale), which is exactly
    quantize(min(x, 6)) because rounding is monotonic.
    """
    if activation == "none":
        return qmin, qmax
    if activation == "relu":
        return max(qmin, 0), qmax
    six = int(quantize(torch.tensor(6.0), scale, qmin, qmax))
    return max(qmin, 0), six


def _requantization(real_multiplier: Tensor | float, clamp: tuple[int, int]) -> Requantize:
    multiplier, shift = quantize_multipliers(torch.as_tensor(real_multiplier, dtype=torch.float64))
    return Requantize(multiplier.to(torch.int32), shift.to(torch.int32), *clamp)


def _scalar(value: float) -> Tensor:
    return torch.tensor(value, dtype=torch.float64)


def build_integer_model(
    graph: FloatGraph,
    activation_ranges: dict[str, float],
    quantized_weights: dict[str, tuple[Tensor, Tensor]],
    input_mean: list[float] | None = None,
    input_std: list[float] | None = None,
    activation_format: ActivationFormat = ActivationFormat(),
) -> IntegerModel:
    """Quantize ``graph`` into an ``IntegerModel``.

    ``activation_ranges[root]`` is the calibrated range of each scale group (``scale_groups``), mapped
    onto the group's qmax in ``activation_format`` (``group_ranges``); ``quantized_weights`` is
    ``quantize_model_weights``' result (the quantize-weights stage's output).
    """
    logits_layer = check_output_layer(graph)
    groups = scale_groups(graph)
    missing = [root for root in groups if root not in activation_ranges]
    if missing:
        raise ValueError(f"activation_ranges lacks {missing}; it needs the range of each scale group {list(groups)}")
    layers_missing = [node.name for node in graph.layers() if node.name not in quantized_weights]
    if layers_missing:
        raise ValueError(f"quantized_weights lacks layers {layers_missing}")
    signed = tensor_signedness(graph, activation_format)
    tensors: dict[str, TensorInfo] = {}
    for root, group in groups.items():
        value = float(activation_ranges[root])
        if not 0 <= value < float("inf"):
            raise ValueError(f"activation_ranges[{root!r}] must be finite and >= 0, got {activation_ranges[root]!r}")
        scale = _scalar(scale_from_range(value, activation_format.range(signed[root])[1]))
        for member in group.members:
            tensors[member] = TensorInfo(graph.shapes[member], activation_format.bits, scale, signed[root])
    nodes: list[IntNode] = []
    for node in graph.nodes:
        if isinstance(node, (Conv, Linear)):
            layer, logits_scale = _layer(node, tensors, quantized_weights[node.name], node is logits_layer)
            nodes.append(layer)
            if logits_scale is not None:
                tensors[node.output] = TensorInfo(graph.shapes[node.output], 32, logits_scale)
        elif isinstance(node, Reshape) and node.input in tensors and tensors[node.input].bits == 32:
            tensors[node.output] = TensorInfo(graph.shapes[node.output], 32, tensors[node.input].scale)
            nodes.append(IntReshape(node.name, node.input, node.output))
        else:
            nodes.append(_other_node(node, tensors))
    return IntegerModel(graph.input, graph.output, tensors, nodes, input_mean, input_std)


def _layer(node: Conv | Linear, tensors: dict[str, TensorInfo], quantized: tuple[Tensor, Tensor],
           is_logits: bool) -> tuple[IntConv, Tensor | None]:
    """The integer layer, and the logits' scale for the last layer (None for the others)."""
    q_weight, weight_scale = quantized
    input_scale = float(tensors[node.input].scale)
    bias = node.bias if node.bias is not None else torch.zeros(q_weight.shape[0])
    q_bias = quantize_bias(bias, input_scale, weight_scale, node.name)
    check_accumulator(f"layer {node.name!r}", q_weight, q_bias, tensors[node.input].range)
    accumulator_scale = input_scale * weight_scale
    is_conv = isinstance(node, Conv)
    geometry = (node.stride, node.padding, node.groups) if is_conv else ((1, 1), (0, 0), 1)
    logits_scale = None
    if is_logits:
        if accumulator_scale.ndim == 0:  # raw accumulators are the logits
            if node.activation == "relu6":
                raise UnsupportedModelError(
                    f"layer {node.name!r}: a ReLU6 on the logits needs a requantized output; remove it or set "
                    "quantize_weights.granularity=per_channel"
                )
            layer = IntConv(node.name, "conv2d" if is_conv else "linear", node.input, node.output, q_weight, q_bias,
                            weight_scale, *geometry, node.activation, None)
            return layer, accumulator_scale.clone()
        # Per-channel weights give every class its own accumulator scale. Rescale the logits to one
        # common int32 scale (the largest, so every M <= 1 and nothing saturates) so that the class is
        # the argmax of integers, with no float step.
        logits_scale = accumulator_scale.max()
        clamp = activation_clamp(node.activation, float(logits_scale), INT32_MIN, INT32_MAX)
        requantize = _requantization(accumulator_scale / logits_scale, clamp)
    else:
        output_scale = float(tensors[node.output].scale)
        clamp = activation_clamp(node.activation, output_scale, *tensors[node.output].range)
        requantize = _requantization(accumulator_scale / output_scale, clamp)
    layer = IntConv(node.name, "conv2d" if is_conv else "linear", node.input, node.output, q_weight, q_bias,
                    weight_scale, *geometry, node.activation, requantize)
    return layer, logits_scale


def raw_accumulator_clamp(layer: IntConv) -> tuple[int, int]:
    """The saturation of a layer without requantization: int32, at 0 below with a fused ReLU."""
    return (0 if layer.activation == "relu" else INT32_MIN), INT32_MAX


def _other_node(node: Any, tensors: dict[str, TensorInfo]) -> IntNode:
    def scale(name: str) -> float:
        return float(tensors[name].scale)

    if isinstance(node, Add):
        scale_a, scale_b, scale_out = scale(node.inputs[0]), scale(node.inputs[1]), scale(node.output)
        twice_max = 2 * max(scale_a, scale_b)
        common = twice_max / 2**ADD_LEFT_SHIFT
        input_rq = tuple(_requantization(s / twice_max, (INT32_MIN, INT32_MAX)) for s in (scale_a, scale_b))
        clamp = activation_clamp(node.activation, scale_out, *tensors[node.output].range)
        return IntAdd(node.name, node.inputs, node.output, ADD_LEFT_SHIFT, input_rq,
                      _requantization(common / scale_out, clamp), node.activation)
    if isinstance(node, AvgPool):
        area = node.kernel[0] * node.kernel[1]
        rq = _requantization(scale(node.input) / (scale(node.output) * area), tensors[node.output].range)
        return IntAvgPool(node.name, node.input, node.output, node.kernel, node.stride, node.padding, rq)
    if isinstance(node, Concat):
        # Copied as it is only at the same scale AND range: a uint8 input copied into a signed output
        # could exceed its qmax, so it is requantized by M = 1, which saturates.
        output_range = tensors[node.output].range
        input_rq = tuple(
            None if scale(name) == scale(node.output) and tensors[name].range == output_range
            else _requantization(scale(name) / scale(node.output), output_range)
            for name in node.inputs
        )
        return IntConcat(node.name, node.inputs, node.output, input_rq)
    if isinstance(node, MaxPool):
        return IntMaxPool(node.name, node.input, node.output, node.kernel, node.stride, node.padding)
    if isinstance(node, Activation):
        low, high = activation_clamp(node.activation, scale(node.input), *tensors[node.input].range)
        return IntClamp(node.name, node.input, node.output, node.activation, low, high)
    if isinstance(node, Reshape):
        return IntReshape(node.name, node.input, node.output)
    raise UnsupportedModelError(f"node {node.name!r} ({type(node).__name__}) has no integer form")


__all__ = [
    "RESCALING_NODES", "ScaleGroup", "activation_clamp", "activation_quantizer", "build_integer_model", "group_ranges", "nonnegative_tensors",
    "quantize_bias", "quantize_layer_weights", "quantize_model_weights", "raw_accumulator_clamp", "scale_groups",
    "tensor_signedness",
]
