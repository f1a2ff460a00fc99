"""A standalone ReLU / ReLU6 (one that could not be fused into its producer): a clamp at the input's scale."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pipeline.graph.nodes import Activation, ActivationKind
from pipeline.quant.ops.base import (
    BuildContext,
    IntegerOp,
    Requantize,
    activation_clamp,
    nothing_to_prepare,
    same_shape,
)
from pipeline.quant.ranges import fake_quantize


@dataclass(frozen=True)
class IntClamp:
    """A standalone ReLU (``clamp_max`` the type's max) or ReLU6 on the integers, at the input's scale."""

    name: str
    input: str
    output: str
    activation: ActivationKind
    clamp_min: int
    clamp_max: int

    def requantizations(self) -> list[Requantize]:
        return []


def build(node: Activation, context: BuildContext) -> IntClamp:
    low, high = activation_clamp(node.activation, context.scale(node.input), *context.tensors[node.input].range)
    return IntClamp(node.name, node.input, node.output, node.activation, low, high)


def clamp_integers(x: Tensor, clamp_min: int, clamp_max: int) -> Tensor:
    """A standalone ReLU / ReLU6 on integers at an unchanged scale."""
    return x.clamp(clamp_min, clamp_max)


def run(node: IntClamp, prepared: None, values: dict[str, Tensor]) -> Tensor:
    return clamp_integers(values[node.input], node.clamp_min, node.clamp_max)


def simulate(node: IntClamp, model, values: dict[str, Tensor]) -> Tensor:
    return fake_quantize(values[node.input], model.tensors[node.input].scale, node.clamp_min, node.clamp_max)


OP = IntegerOp(IntClamp, (Activation,), build, same_shape, nothing_to_prepare, run, simulate, keeps_integers=True)

__all__ = ["OP", "IntClamp", "clamp_integers"]
