"""What every integer op shares: tensor info, the fixed-point rescale, the op's record, and its build context.

An op module (``pipeline.quant.ops.<op>``) holds one node type and all of its rules: how it is
built from the float graph (``build``), its output shape, how the engine prepares and runs it
exactly, its float simulation, and a pure-Python reference of one output value. Its
``OP = IntegerOp(...)`` record is what ``pipeline.quant.ops.registry`` collects; the backends
(engine, C, integer ONNX, QLinear ONNX) each keep a table keyed by the node type.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from pipeline.graph.nodes import ActivationKind, FloatGraph
from pipeline.quant.fixed_point import ROUNDINGS, quantize_multipliers
from pipeline.quant.ranges import int_range, quantize

if TYPE_CHECKING:
    from pipeline.quant.ir import IntegerModel


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: ``bits`` 4..8 (activations, stored in one byte) or 32 (logits), one scale (0-D float64).

    ``signed`` False: the unsigned full range [0, 2^bits - 1] of a tensor non-negative by construction
    (``scale_groups.tensor_signedness``); the logits and the input are always signed.
    """

    shape: tuple[int, ...]
    bits: int
    scale: Tensor
    signed: bool = True

    @property
    def range(self) -> tuple[int, int]:
        """[qmin, qmax]: every integer this tensor can hold (``ranges.int_range``, full range)."""
        return int_range(self.bits, signed=self.signed)

    @property
    def type_name(self) -> str:
        """``int8``, ``uint8``, ``int4``, ``int32``, ...: what its integers are."""
        return f"{'' if self.signed else 'u'}int{self.bits}"


@dataclass(frozen=True)
class Requantize:
    """y = clamp(acc * multiplier * 2^(shift - 31) rounded by ``rounding``, clamp_min, clamp_max) (``fixed_point``)."""

    multiplier: Tensor  # int32, 0-D or (C,)
    shift: Tensor  # int32, like multiplier
    clamp_min: int
    clamp_max: int
    rounding: str = "double"  # fixed_point.ROUNDINGS: "double" (TFLite's) or "single" (round half up once)


def requantization(real_multiplier: Tensor | float, clamp: tuple[int, int], rounding: str) -> Requantize:
    """The ``Requantize`` of a real multiplier M (0-D or per channel) with saturation ``clamp``.

    Compute M in float64 from float32 scales in TFLite's order (``input * weight / output``): a
    ``.tflite`` stores the scales in float32 and TensorFlow Lite Micro derives the same multiplier from them.
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    multiplier, shift = quantize_multipliers(torch.as_tensor(real_multiplier, dtype=torch.float64))
    return Requantize(multiplier.to(torch.int32), shift.to(torch.int32), *clamp, rounding)


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


@dataclass
class BuildContext:
    """What building one node needs: the float graph, every tensor's info so far (a builder may add the
    logits'), the node whose output is the logits, the quantized weights by layer name, and the rounding rule."""

    graph: FloatGraph
    tensors: dict[str, TensorInfo]
    logits_layer: Any
    quantized_weights: dict[str, tuple[Tensor, Tensor]]
    rounding: str = "double"  # every Requantize's rule (fixed_point.ROUNDINGS)

    def requantization(self, real_multiplier: Tensor | float, clamp: tuple[int, int]) -> Requantize:
        """``requantization`` with this model's rounding rule."""
        return requantization(real_multiplier, clamp, self.rounding)

    def scale(self, name: str) -> float:
        return float(self.tensors[name].scale)


@dataclass(frozen=True)
class IntegerOp:
    """One integer op's rules, by its node type (see the module docstring).

    - ``build(float_node, context)``: the integer node of a float graph node of ``float_types``;
    - ``output_shape(node, input_shapes, where)``: its per-image output shape (``ValueError`` naming ``where``
      for inputs it cannot take);
    - ``prepare(node, model, device)``: what the engine needs ready (weights in their exact dtype, rescales
      checked for exactness), and ``run(node, prepared, values)`` its integers, exactly;
    - ``simulate(node, model, values)``: the float simulation (fake quantization at the tensors' scales);
    - ``keeps_integers``: its output holds its input's integers at the same scale and type (no rescale);
    - ``check(node, model, where)``: deployability checks beyond the shapes (None: none).
    """

    node_type: type
    float_types: tuple[type, ...]
    build: Callable[[Any, BuildContext], Any]
    output_shape: Callable[[Any, list[tuple[int, ...]], str], tuple[int, ...]]
    prepare: Callable[[Any, IntegerModel, torch.device], Any]
    run: Callable[[Any, Any, dict[str, Tensor]], Tensor]
    simulate: Callable[[Any, IntegerModel, dict[str, Tensor]], Tensor]
    keeps_integers: bool = False
    check: Callable[[Any, IntegerModel, str], None] | None = None


def nothing_to_prepare(node: Any, model: IntegerModel, device: torch.device) -> None:
    """``IntegerOp.prepare`` of an op that only compares or moves integers."""
    return None


def same_shape(node: Any, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    """``IntegerOp.output_shape`` of an elementwise op."""
    return shapes[0]


__all__ = [
    "BuildContext", "IntegerOp", "Requantize", "TensorInfo", "activation_clamp", "nothing_to_prepare",
    "requantization", "same_shape",
]
