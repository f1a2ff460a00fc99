"""Max pool: the largest integer of each window (padding is -inf), at the input's scale; it only compares."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.graph.nodes import MaxPool
from pipeline.quant.ops.base import (
    BuildContext,
    IntegerOp,
    Requantize,
    nothing_to_prepare,
)
from pipeline.quant.ops.geometry import IntWindow, window_shape


@dataclass(frozen=True)
class IntMaxPool(IntWindow):
    """The largest integer of each window, at the input's scale."""

    def requantizations(self) -> list[Requantize]:
        return []


def build(node: MaxPool, context: BuildContext) -> IntMaxPool:
    return IntMaxPool(node.name, node.input, node.output, node.kernel, node.stride, node.padding)


def output_shape(node: IntMaxPool, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    if any(2 * p > k for p, k in zip(node.padding, node.kernel, strict=True)):
        # PyTorch's rule; it also means every window holds a real value, so padding (-inf) never wins
        raise ValueError(f"{where}: padding {node.padding} must be at most half the kernel {node.kernel}")
    return (shapes[0][0], *window_shape(shapes[0], node.kernel, node.stride, node.padding, where))


def maxpool(node: IntMaxPool, x: Tensor) -> Tensor:
    """The pool on integer values held in any float dtype (float32 holds int8 values and these accumulators exactly)."""
    return F.max_pool2d(x.to(torch.float32) if x.dtype != torch.float64 else x, node.kernel, node.stride,
                        node.padding)


def run(node: IntMaxPool, prepared: None, values: dict[str, Tensor]) -> Tensor:
    return maxpool(node, values[node.input])


def simulate(node: IntMaxPool, model, values: dict[str, Tensor]) -> Tensor:
    return F.max_pool2d(values[node.input], node.kernel, node.stride, node.padding)


OP = IntegerOp(IntMaxPool, (MaxPool,), build, output_shape, nothing_to_prepare, run, simulate, keeps_integers=True)

__all__ = ["OP", "IntMaxPool", "maxpool"]
