"""The residual add, as TFLite's ADD: both inputs lifted and rescaled to a common fine grid, summed, requantized.

With S_max = max(S_a, S_b) and a left shift L (20 for int8 inputs), each input q is lifted to
q * 2^L, rescaled by M_i = S_i / (2 S_max) (<= 1/2, so the sum cannot leave int32) to the common
grid S_c = 2 S_max / 2^L, the two summed in int32, and the sum requantized by M_out = S_c / S_out
with the output's saturation (a fused ReLU's clamp).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.graph.nodes import ActivationKind, Add
from pipeline.quant.ops.base import (
    BuildContext,
    IntegerOp,
    Requantize,
    activation_clamp,
)
from pipeline.quant.ops.rescale import (
    ExactRescale,
    apply_requantize,
    check_requantize,
    requantize_one,
)
from pipeline.quant.ranges import INT32_MAX, INT32_MIN, fake_quantize, largest_magnitude

ADD_LEFT_SHIFT = 20  # TFLite's for 8-bit inputs: |q| * 2^20 <= 2^27 leaves headroom in int32


@dataclass(frozen=True)
class IntAdd:
    name: str
    inputs: tuple[str, str]
    output: str
    left_shift: int  # the inputs are scaled by 2^left_shift before their multipliers, for headroom
    input_requantize: tuple[Requantize, Requantize]  # to the common grid S_common = 2 max(S_a, S_b) / 2^left_shift
    output_requantize: Requantize  # from the common grid to the output scale; carries the fused activation
    activation: ActivationKind

    def requantizations(self) -> list[Requantize]:
        return [*self.input_requantize, self.output_requantize]


def build(node: Add, context: BuildContext) -> IntAdd:
    scale_a, scale_b, scale_out = (context.scale(name) for name in (*node.inputs, node.output))
    twice_max = 2 * max(scale_a, scale_b)
    common = twice_max / 2**ADD_LEFT_SHIFT
    input_rq = tuple(context.requantization(s / twice_max, (INT32_MIN, INT32_MAX)) for s in (scale_a, scale_b))
    clamp = activation_clamp(node.activation, scale_out, *context.tensors[node.output].range)
    return IntAdd(node.name, node.inputs, node.output, ADD_LEFT_SHIFT, input_rq,
                  context.requantization(common / scale_out, clamp), node.activation)


def output_shape(node: IntAdd, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    if shapes[0] != shapes[1]:
        raise ValueError(f"{where} adds tensors of different shapes {shapes[0]} and {shapes[1]}")
    return shapes[0]


def check(node: IntAdd, model, where: str) -> None:
    for rq in node.requantizations():
        check_requantize(rq, 1, where)


def add_integers(a: Tensor, b: Tensor, left_shift: int, input_rq: tuple[Requantize, Requantize],
                 output_rq: Requantize) -> Tensor:
    """The integer residual add (module docstring) of int8 tensors ``a`` and ``b``, as int64."""
    scaled = [
        apply_requantize(x.to(torch.int64) << left_shift, rq)
        for x, rq in zip((a, b), input_rq, strict=True)
    ]
    return apply_requantize(scaled[0] + scaled[1], output_rq)


def add_reference(a: int, b: int, left_shift: int, input_rq: tuple[Requantize, Requantize],
                  output_rq: Requantize) -> int:
    """``add_integers`` for one pair of values, in Python integers."""
    total = sum(
        requantize_one(x << left_shift, rq)
        for x, rq in zip((a, b), input_rq, strict=True)
    )
    return requantize_one(total, output_rq)


def prepare(node: IntAdd, model, device: torch.device) -> tuple[tuple[ExactRescale, ExactRescale], ExactRescale]:
    largest = [largest_magnitude(model.tensors[name].range) for name in node.inputs]
    inputs = tuple(ExactRescale.prepare(rq, bound, node.left_shift)
                   for rq, bound in zip(node.input_requantize, largest, strict=True))
    # Each scaled input is at most |q| * 2^left_shift / 2 + 1 in magnitude (M_i <= 1/2).
    total = sum(largest) << max(node.left_shift - 1, 0)
    return inputs, ExactRescale.prepare(node.output_requantize, total + 2)


def run(node: IntAdd, prepared: tuple[tuple[ExactRescale, ExactRescale], ExactRescale],
        values: dict[str, Tensor]) -> Tensor:
    inputs, output = prepared
    a, b = (rescale(values[name]) for rescale, name in zip(inputs, node.inputs, strict=True))
    return output(a.add_(b))


def simulate(node: IntAdd, model, values: dict[str, Tensor]) -> Tensor:
    y = values[node.inputs[0]] + values[node.inputs[1]]
    rq = node.output_requantize
    return fake_quantize(y, model.tensors[node.output].scale, rq.clamp_min, rq.clamp_max)


OP = IntegerOp(IntAdd, (Add,), build, output_shape, prepare, run, simulate, check=check)

__all__ = ["ADD_LEFT_SHIFT", "OP", "IntAdd", "add_integers", "add_reference"]
