"""From a float graph to the integer graph: weights, biases, tensor scales and fixed-point multipliers.

The scheme (r ~= S * q, symmetric, zero point 0):

- weights: int8 in [-127, 127], S_w = range / 127 (per tensor, or per output channel);
- activations: ``ActivationFormat.bits`` b wide, signed [-2^(b-1), 2^(b-1) - 1] with S_a = range / (2^(b-1) - 1)
  (int8: [-128, 127], S_a = range / 127), or with ``ActivationFormat.unsigned`` the full unsigned range
  [0, 2^b - 1], S_a = range / (2^b - 1), for the tensors non-negative by construction
  (``scale_groups.tensor_signedness``); one range per scale group (``scale_groups``);
- biases: int32, q_b = round(b / (S_in * S_w)) (round half to even); a bias outside int32
  is an ``OverflowError`` naming the layer, never a clamp;
- accumulators: int32; every layer is checked at build time so that
  sum(|q_w|) * max|q_in| + |q_b| < 2^31 for each output channel, max|q_in| from the input's own range
  (128 for int8, 255 for uint8: ``ranges.accumulator_bound``);
- every scale is a float32 value (held in float64), as a ``.tflite`` file stores it, and every real
  multiplier is computed from those in float64, in TFLite's order, so that TensorFlow Lite Micro derives
  the same integers from the file;
- every rescaling is a fixed-point multiplier and shift (``fixed_point``) with the model's rounding rule
  (``rounding``: "double", TFLite's, by default, or "single"), with the
  integer semantics of each op's module (``pipeline.quant.ops``); a fused ReLU is the lower clamp 0, a fused ReLU6
  also the upper clamp round(6 / S_out);
- the last layer gives int8 logits at S = logits_range / 127 when a ``logits_range`` is given (the
  profile calibrates it on the float logits: TFLite's FULLY_CONNECTED writes int8), else int32 logits:
  its accumulators at scale S_in * S_w with per-tensor weights; with per-channel weights they are
  requantized (same rule, saturating to int32) to one common scale, the largest S_in * S_w_c. Either
  way the class is the argmax of integers (the first of equal ones).
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipeline.graph.nodes import FloatGraph, UnsupportedModelError, check_output_layer
from pipeline.quant.ir import IntegerModel
from pipeline.quant.ops.base import BuildContext, TensorInfo
from pipeline.quant.ops.registry import OP_FOR_FLOAT, IntNode
from pipeline.quant.ranges import ActivationFormat, scale_from_range
from pipeline.quant.scale_groups import scale_groups, tensor_signedness

LOGITS_BITS, LOGITS_QMAX = 8, 127  # int8 logits: signed, [-128, 127]


def float32_scale(scale: Tensor | float) -> Tensor:
    """``scale`` rounded to the nearest float32 (what a ``.tflite`` stores), held in float64."""
    return torch.as_tensor(scale, dtype=torch.float64).to(torch.float32).to(torch.float64)


def build_integer_model(
    graph: FloatGraph,
    activation_ranges: dict[str, float],
    quantized_weights: dict[str, tuple[Tensor, Tensor]],
    input_mean: list[float] | None = None,
    input_std: list[float] | None = None,
    activation_format: ActivationFormat = ActivationFormat(),
    rounding: str = "double",
    logits_range: float | None = None,
) -> IntegerModel:
    """Quantize ``graph`` into an ``IntegerModel``.

    ``activation_ranges[root]`` is the calibrated range of each scale group (``scale_groups``), mapped
    onto the group's qmax in ``activation_format`` (``group_ranges``); ``quantized_weights`` is
    ``quantize_model_weights``' result (the quantize-weights stage's output); its weight scales are
    rounded to float32 (the integer weights are kept: the change is below 2^-24 relative). Each node is
    built by its op module (``pipeline.quant.ops``), its rescales with ``rounding`` (``fixed_point.ROUNDINGS``).
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
        scale = float32_scale(scale_from_range(value, activation_format.range(signed[root])[1]))
        for member in group.members:
            tensors[member] = TensorInfo(graph.shapes[member], activation_format.bits, scale, signed[root])
    if logits_range is not None:
        if not 0 <= logits_range < float("inf"):
            raise ValueError(f"logits_range must be finite and >= 0, got {logits_range!r}")
        tensors[logits_layer.output] = TensorInfo(graph.shapes[logits_layer.output], LOGITS_BITS,
                                                  float32_scale(scale_from_range(logits_range, LOGITS_QMAX)))
    weights = {name: (q_weight, float32_scale(scale)) for name, (q_weight, scale) in quantized_weights.items()}
    context = BuildContext(graph, tensors, logits_layer, weights, rounding)
    nodes: list[IntNode] = []
    for node in graph.nodes:
        op = OP_FOR_FLOAT.get(type(node))
        if op is None:
            raise UnsupportedModelError(f"node {node.name!r} ({type(node).__name__}) has no integer form")
        nodes.append(op.build(node, context))
    return IntegerModel(graph.input, graph.output, tensors, nodes, input_mean, input_std)


__all__ = ["LOGITS_BITS", "build_integer_model", "float32_scale"]
