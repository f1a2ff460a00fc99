"""Concatenation on channels: each input requantized to the output scale by M = S_in / S_out.

An input already at the output's scale and range is copied as it is (M = 1 maps every integer to
itself); a uint8 input copied into a signed output could exceed its qmax, so it is requantized by
M = 1, which saturates.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.graph.nodes import Concat
from pipeline.quant.ops.base import BuildContext, IntegerOp, Requantize
from pipeline.quant.ops.rescale import (
    ExactRescale,
    apply_requantize,
    check_requantize,
    requantize_one,
)
from pipeline.quant.ranges import fake_quantize, largest_magnitude


@dataclass(frozen=True)
class IntConcat:
    name: str
    inputs: tuple[str, ...]
    output: str
    input_requantize: tuple[Requantize | None, ...]  # None: the input already has the output's scale

    def requantizations(self) -> list[Requantize]:
        return [rq for rq in self.input_requantize if rq is not None]


def build(node: Concat, context: BuildContext) -> IntConcat:
    output_range = context.tensors[node.output].range
    output_scale = context.scale(node.output)
    input_rq = tuple(
        None if context.scale(name) == output_scale and context.tensors[name].range == output_range
        else context.requantization(context.scale(name) / output_scale, output_range)
        for name in node.inputs
    )
    return IntConcat(node.name, node.inputs, node.output, input_rq)


def output_shape(node: IntConcat, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    if any(len(shape) != 3 or shape[1:] != shapes[0][1:] for shape in shapes):
        raise ValueError(f"{where} concatenates maps of unequal H, W: {shapes}")
    return (sum(shape[0] for shape in shapes), *shapes[0][1:])


def check(node: IntConcat, model, where: str) -> None:
    output = model.tensors[node.output]
    for name, rq in zip(node.inputs, node.input_requantize, strict=True):
        if rq is not None:
            check_requantize(rq, 1, where)
        elif model.tensors[name].range != output.range:
            raise ValueError(f"{where} copies {name!r} ({model.tensors[name].type_name}) as it is into "
                             f"{output.type_name}; an input of another range needs a Requantize")


def concat_integers(inputs: list[Tensor], input_rq: tuple[Requantize | None, ...]) -> Tensor:
    """Each input requantized to the output scale (None: unchanged), concatenated on channels, as int64."""
    parts = [
        x.to(torch.int64) if rq is None else apply_requantize(x.to(torch.int64), rq)
        for x, rq in zip(inputs, input_rq, strict=True)
    ]
    return torch.cat(parts, dim=1)


def concat_reference(value: int, rq: Requantize | None) -> int:
    """One value of one input of ``concat_integers``, in Python integers."""
    if rq is None:
        return value
    return requantize_one(value, rq)


def prepare(node: IntConcat, model, device: torch.device) -> tuple[ExactRescale | None, ...]:
    return tuple(None if rq is None else ExactRescale.prepare(rq, largest_magnitude(model.tensors[name].range))
                 for rq, name in zip(node.input_requantize, node.inputs, strict=True))


def run(node: IntConcat, prepared: tuple[ExactRescale | None, ...], values: dict[str, Tensor]) -> Tensor:
    parts = [values[name].to(torch.float64) if rescale is None else rescale(values[name])
             for rescale, name in zip(prepared, node.inputs, strict=True)]
    return torch.cat(parts, dim=1)


def simulate(node: IntConcat, model, values: dict[str, Tensor]) -> Tensor:
    output = model.tensors[node.output]
    return torch.cat([fake_quantize(values[name], output.scale, *output.range) for name in node.inputs], 1)


OP = IntegerOp(IntConcat, (Concat,), build, output_shape, prepare, run, simulate, check=check)

__all__ = ["OP", "IntConcat", "concat_integers", "concat_reference"]
