"""Average pool: the int32 sum of each window (zero padding adds 0), requantized by M = S_in / (S_out * area).

The division by the window's area is inside the one rounding. A global average pool is one H x W window.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.graph.nodes import AvgPool
from pipeline.quant.fixed_point import requantize_reference
from pipeline.quant.ops.base import BuildContext, IntegerOp, Requantize, requantization
from pipeline.quant.ops.geometry import IntWindow, window_shape
from pipeline.quant.ops.rescale import ExactRescale, apply_requantize, check_requantize
from pipeline.quant.ranges import fake_quantize, largest_magnitude


@dataclass(frozen=True)
class IntAvgPool(IntWindow):
    requantize: Requantize  # M = S_in / (S_out * kernel_h * kernel_w)

    def requantizations(self) -> list[Requantize]:
        return [self.requantize]


def build(node: AvgPool, context: BuildContext) -> IntAvgPool:
    area = node.kernel[0] * node.kernel[1]
    rq = requantization(context.scale(node.input) / (context.scale(node.output) * area),
                        context.tensors[node.output].range)
    return IntAvgPool(node.name, node.input, node.output, node.kernel, node.stride, node.padding, rq)


def output_shape(node: IntAvgPool, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    return (shapes[0][0], *window_shape(shapes[0], node.kernel, node.stride, node.padding, where))


def check(node: IntAvgPool, model, where: str) -> None:
    check_requantize(node.requantize, 1, where)


def window_sums(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """int64 sum of every pooling window of ``x`` (N, C, H, W); zero padding adds nothing.

    float64 holds these sums exactly (|sum| <= 128 * window area).
    """
    sums = F.avg_pool2d(x.to(torch.float64), kernel, stride, padding, count_include_pad=True, divisor_override=1)
    return sums.to(torch.int64)


def avgpool_integers(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                     rq: Requantize) -> Tensor:
    """The integer average pool: window sums requantized by M = S_in / (S_out * area), as int64."""
    return apply_requantize(window_sums(x, kernel, stride, padding), rq)


def avgpool_reference(window: list[int], rq: Requantize) -> int:
    """One output of ``avgpool_integers`` from the values of its window (padding as zeros), in Python integers."""
    return requantize_reference(sum(window), int(rq.multiplier), int(rq.shift), rq.clamp_min, rq.clamp_max)


def prepare(node: IntAvgPool, model, device: torch.device) -> ExactRescale:
    return ExactRescale.prepare(node.requantize,
                                largest_magnitude(model.tensors[node.input].range) * node.kernel[0] * node.kernel[1])


def run(node: IntAvgPool, prepared: ExactRescale, values: dict[str, Tensor]) -> Tensor:
    # float64 sums of at most kernel-area int8 values are exact integers
    sums = F.avg_pool2d(values[node.input].to(torch.float64), node.kernel, node.stride, node.padding,
                        count_include_pad=True, divisor_override=1)
    return prepared(sums)


def simulate(node: IntAvgPool, model, values: dict[str, Tensor]) -> Tensor:
    y = F.avg_pool2d(values[node.input], node.kernel, node.stride, node.padding)
    rq = node.requantize
    return fake_quantize(y, model.tensors[node.output].scale, rq.clamp_min, rq.clamp_max)


OP = IntegerOp(IntAvgPool, (AvgPool,), build, output_shape, prepare, run, simulate, check=check)

__all__ = ["OP", "IntAvgPool", "avgpool_integers", "avgpool_reference", "window_sums"]
