"""Leaky ReLU, as TFLite's LEAKY_RELU: one fixed-point multiplier per sign of the input.

y = requantize(q, M_pos) for q >= 0 and requantize(q, M_neg) for q < 0, with M_pos = S_in / S_out and
M_neg = negative_slope * S_in / S_out (negative_slope >= 0, so both are multipliers ``fixed_point``
represents), each saturating to the output's range.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.graph.nodes import LeakyReLU
from pipeline.quant.ops.base import (
    BuildContext,
    IntegerOp,
    Requantize,
    same_shape,
)
from pipeline.quant.ops.rescale import ExactRescale, check_requantize, requantize_one
from pipeline.quant.ranges import fake_quantize, largest_magnitude


@dataclass(frozen=True)
class IntLeakyReLU:
    name: str
    input: str
    output: str
    negative_slope: float  # the float slope, for the simulation; the integers use ``negative``
    positive: Requantize  # M_pos = S_in / S_out, for q >= 0
    negative: Requantize  # M_neg = negative_slope * S_in / S_out, for q < 0

    def requantizations(self) -> list[Requantize]:
        return [self.positive, self.negative]


def build(node: LeakyReLU, context: BuildContext) -> IntLeakyReLU:
    ratio = context.scale(node.input) / context.scale(node.output)
    clamp = context.tensors[node.output].range
    return IntLeakyReLU(node.name, node.input, node.output, node.negative_slope,
                        context.requantization(ratio, clamp), context.requantization(node.negative_slope * ratio, clamp))


def check(node: IntLeakyReLU, model, where: str) -> None:
    for rq in node.requantizations():
        check_requantize(rq, 1, where)


def leaky_relu_reference(q: int, positive: Requantize, negative: Requantize) -> int:
    """One output of the integer leaky ReLU, in Python integers."""
    rq = positive if q >= 0 else negative
    return requantize_one(q, rq)


def prepare(node: IntLeakyReLU, model, device: torch.device) -> tuple[ExactRescale, ExactRescale]:
    largest = largest_magnitude(model.tensors[node.input].range)
    return ExactRescale.prepare(node.positive, largest), ExactRescale.prepare(node.negative, largest)


def run(node: IntLeakyReLU, prepared: tuple[ExactRescale, ExactRescale], values: dict[str, Tensor]) -> Tensor:
    positive, negative = prepared
    x = values[node.input]
    return torch.where(x >= 0, positive(x), negative(x))


def simulate(node: IntLeakyReLU, model, values: dict[str, Tensor]) -> Tensor:
    y = F.leaky_relu(values[node.input], node.negative_slope)
    return fake_quantize(y, model.tensors[node.output].scale, node.positive.clamp_min, node.positive.clamp_max)


OP = IntegerOp(IntLeakyReLU, (LeakyReLU,), build, same_shape, prepare, run, simulate, check=check)

__all__ = ["OP", "IntLeakyReLU", "leaky_relu_reference"]
