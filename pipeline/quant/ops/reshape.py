"""Flatten (C, H, W) to (C*H*W,): no data moves; the integers, their type and scale are the input's."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pipeline.graph.nodes import Reshape, numel
from pipeline.quant.ops.base import (
    BuildContext,
    IntegerOp,
    Requantize,
    TensorInfo,
    nothing_to_prepare,
)


@dataclass(frozen=True)
class IntReshape:
    """Flatten (C, H, W) to (C*H*W,): no data moves."""

    name: str
    input: str
    output: str

    def requantizations(self) -> list[Requantize]:
        return []


def build(node: Reshape, context: BuildContext) -> IntReshape:
    """A flatten of the int32 logits (after the last layer) gives int32 logits at the same scale."""
    source = context.tensors.get(node.input)
    if source is not None and source.bits == 32:
        context.tensors[node.output] = TensorInfo(context.graph.shapes[node.output], 32, source.scale)
    return IntReshape(node.name, node.input, node.output)


def output_shape(node: IntReshape, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    return (numel(shapes[0]),)


def run(node: IntReshape, prepared: None, values: dict[str, Tensor]) -> Tensor:
    return values[node.input].flatten(1)


def simulate(node: IntReshape, model, values: dict[str, Tensor]) -> Tensor:
    return values[node.input].flatten(1)


OP = IntegerOp(IntReshape, (Reshape,), build, output_shape, nothing_to_prepare, run, simulate, keeps_integers=True)

__all__ = ["OP", "IntReshape"]
