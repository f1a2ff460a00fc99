"""Average pool: the int32 sum of each window (zero padding adds 0), brought to the output's scale.

Three forms, each chosen at build time and recorded in the node:

- a global pool (one window over the whole H x W map, no padding) follows TFLite's int8 MEAN, so that a
  ``.tflite`` MEAN runs it bit-exact: M = S_in / S_out is quantized first (``fixed_point``), then 1/n is
  folded into its integer multiplier, (multiplier << s) / n with C's integer division, and its shift
  lowered by s = min(floor(log2 n), 32, 31 + shift). For n a power of two that is exactly the multiplier
  of M / n; otherwise the multiplier may fall below 2^30 (it stays above 2^29);
- a window pool without padding, with double rounding, follows TFLite's AVERAGE_POOL_2D and a QUANTIZE:
  the window mean rounded half away from zero (TFLite's integer division of the sum by the count), taken
  on the values less ``mean_zero_point`` (128 for an unsigned tensor, which a ``.tflite`` stores at zero
  point -128, so that the ties fall where TFLite's do), then rescaled by M = S_in / S_out. Dividing first
  keeps the rescale's input a full-range integer: double rounding of a sum times M / area, a few units,
  would be coarse;
- otherwise (single rounding, or a padded window) the window sum rescaled by M = S_in / (S_out * area),
  the division by the area inside the one rounding (the rule before double rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.graph.nodes import AvgPool
from pipeline.quant.fixed_point import quantize_multiplier
from pipeline.quant.ops.base import BuildContext, IntegerOp, Requantize
from pipeline.quant.ops.geometry import IntWindow, window_shape
from pipeline.quant.ops.rescale import (
    ExactRescale,
    apply_requantize,
    check_requantize,
    requantize_one,
)
from pipeline.quant.ranges import fake_quantize, largest_magnitude

UNSIGNED_MEAN_ZERO_POINT = 128  # an unsigned code q is q - 128 in a .tflite: its mean is taken there


@dataclass(frozen=True)
class IntAvgPool(IntWindow):
    # M = S_in / (S_out * kernel_h * kernel_w) on the sum; a global pool's as TFLite's MEAN; with mean_zero_point
    # M = S_in / S_out on the rounded mean
    requantize: Requantize
    # None: the window sum is rescaled; an int: the window mean (rounded half away from zero, taken on the values
    # less this zero point) is (TFLite's AVERAGE_POOL_2D)
    mean_zero_point: int | None = None

    def requantizations(self) -> list[Requantize]:
        return [self.requantize]


def is_global(kernel: tuple[int, int], padding: tuple[int, int], input_shape: tuple[int, ...]) -> bool:
    """Whether a pool is one window over its whole (C, H, W) input: TFLite's MEAN over H and W."""
    return tuple(kernel) == tuple(input_shape[1:]) and tuple(padding) == (0, 0)


def mean_requantization(real_multiplier: float, count: int, clamp: tuple[int, int], rounding: str) -> Requantize:
    """The rescale of a sum of ``count`` values to their mean times ``real_multiplier``, as TFLite's int8 MEAN
    computes it (module docstring)."""
    multiplier, shift = quantize_multiplier(real_multiplier)
    fold = min(count.bit_length() - 1, 32, 31 + shift)
    return Requantize(torch.tensor((multiplier << fold) // count, dtype=torch.int32),
                      torch.tensor(shift - fold, dtype=torch.int32), *clamp, rounding)


def build(node: AvgPool, context: BuildContext) -> IntAvgPool:
    area = node.kernel[0] * node.kernel[1]
    ratio = context.scale(node.input) / context.scale(node.output)
    clamp = context.tensors[node.output].range
    window = (node.name, node.input, node.output, node.kernel, node.stride, node.padding)
    if is_global(node.kernel, node.padding, context.tensors[node.input].shape):
        return IntAvgPool(*window, mean_requantization(ratio, area, clamp, context.rounding))
    if context.rounding == "double" and tuple(node.padding) == (0, 0):
        zero_point = 0 if context.tensors[node.input].signed else UNSIGNED_MEAN_ZERO_POINT
        return IntAvgPool(*window, context.requantization(ratio, clamp), zero_point)
    return IntAvgPool(*window, context.requantization(ratio / area, clamp))


def output_shape(node: IntAvgPool, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    return (shapes[0][0], *window_shape(shapes[0], node.kernel, node.stride, node.padding, where))


def check(node: IntAvgPool, model, where: str) -> None:
    check_requantize(node.requantize, 1, where)
    if node.mean_zero_point is not None and tuple(node.padding) != (0, 0):
        raise ValueError(f"{where} takes window means, which needs no padding, got padding {node.padding}")


def window_sums(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """int64 sum of every pooling window of ``x`` (N, C, H, W); zero padding adds nothing.

    float64 holds these sums exactly (|sum| <= 255 * window area).
    """
    sums = F.avg_pool2d(x.to(torch.float64), kernel, stride, padding, count_include_pad=True, divisor_override=1)
    return sums.to(torch.int64)


def window_means(sums: Tensor, count: int, zero_point: int) -> Tensor:
    """TFLite's AVERAGE_POOL_2D mean of int64 window ``sums`` of ``count`` values each, taken on the values less
    ``zero_point``: (s + count / 2) / count for s > 0, (s - count / 2) / count otherwise, C's truncating division,
    i.e. rounded half away from zero; the zero point added back."""
    centered = sums - zero_point * count
    magnitude = (centered.abs() + count // 2) // count
    return torch.where(centered < 0, -magnitude, magnitude) + zero_point


def _rescaled_windows(sums: Tensor, node: IntAvgPool) -> Tensor:
    """What the node's requantize reads: the window sums, or their means (module docstring)."""
    if node.mean_zero_point is None:
        return sums
    return window_means(sums, node.kernel[0] * node.kernel[1], node.mean_zero_point)


def avgpool_integers(x: Tensor, node: IntAvgPool) -> Tensor:
    """The integer average pool of ``x`` (N, C, H, W) as ``node`` defines it, as int64."""
    sums = window_sums(x, node.kernel, node.stride, node.padding)
    return apply_requantize(_rescaled_windows(sums, node), node.requantize)


def avgpool_reference(window: list[int], node: IntAvgPool) -> int:
    """One output of ``avgpool_integers`` from the values of its window (padding as zeros), in Python integers."""
    total = sum(window)
    if node.mean_zero_point is not None:
        count = node.kernel[0] * node.kernel[1]
        centered = total - node.mean_zero_point * count
        magnitude = (abs(centered) + count // 2) // count
        total = (magnitude if centered >= 0 else -magnitude) + node.mean_zero_point
    return requantize_one(total, node.requantize)


def prepare(node: IntAvgPool, model, device: torch.device) -> ExactRescale:
    largest = largest_magnitude(model.tensors[node.input].range)
    return ExactRescale.prepare(node.requantize,
                                largest if node.mean_zero_point is not None else largest * node.kernel[0] * node.kernel[1])


def run(node: IntAvgPool, prepared: ExactRescale, values: dict[str, Tensor]) -> Tensor:
    sums = window_sums(values[node.input], node.kernel, node.stride, node.padding)
    return prepared(_rescaled_windows(sums, node).to(torch.float64))


def simulate(node: IntAvgPool, model, values: dict[str, Tensor]) -> Tensor:
    y = F.avg_pool2d(values[node.input], node.kernel, node.stride, node.padding)
    rq = node.requantize
    return fake_quantize(y, model.tensors[node.output].scale, rq.clamp_min, rq.clamp_max)


OP = IntegerOp(IntAvgPool, (AvgPool,), build, output_shape, prepare, run, simulate, check=check)

__all__ = [
    "OP", "UNSIGNED_MEAN_ZERO_POINT", "IntAvgPool", "avgpool_integers", "avgpool_reference", "mean_requantization",
    "window_means", "window_sums",
]
