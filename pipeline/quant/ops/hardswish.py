"""Hard swish, x * relu6(x + 3) / 6, with the integer arithmetic of TFLite's int8 HARD_SWISH.

All in 16-bit fixed point, per input code q (zero point 0), with gemmlowp's rounding helpers:

1. hires = q * 2^7, the input on the scale S_in / 128 (|q| <= 255 keeps it in int16);
2. preshift = SRDHM(hires, output_multiplier): the input on the output scale times 2^-output_exponent;
3. the "reluish" factor relu6(x + 3) / 6 as a 16-bit fraction: hires rescaled by reluish_multiplier *
   2^reluish_exponent to the scale on which 3.0 is 2^15 (saturating left shifts, or a rounding right
   shift), then mapped from [-1, 1] to [0, 1] by (v + 2^15) >> 1;
4. out = RoundingDivideByPOT(SDHM(reluish, preshift), -output_exponent), clamped to the output's range.

SRDHM is SaturatingRoundingDoublingHighMul (round half away from zero), SDHM the same truncating
toward zero (TFLite's SaturatingDoublingHighMul), RoundingDivideByPOT a right shift rounding half away
from zero. The 16-bit multipliers come from ``fixed_point.quantize_multiplier`` of S_in / (128 S_out) and
of (S_in / 128) / (3 / 2^15), rounded to their upper 16 bits (TFLite's DownScaleInt32ToInt16Multiplier);
TFLite computes those ratios in float32 from the file's scales, this project in float64 from its own.
Both exponents must lie in [-15, 30], and the output's at most 0 (TFLite's own condition): wider
right shifts of a 16-bit value are not what TFLite computes (its mask wraps in int16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.graph.nodes import HardSwish, UnsupportedModelError
from pipeline.quant.fixed_point import quantize_multiplier
from pipeline.quant.ops.base import (
    BuildContext,
    IntegerOp,
    Requantize,
    nothing_to_prepare,
    same_shape,
)
from pipeline.quant.ranges import fake_quantize

INT16_MIN, INT16_MAX = -(2**15), 2**15 - 1
HIRES_SHIFT = 7  # the input is lifted to S_in / 2^7
RELUISH_SCALE = 3.0 / 2**15  # the scale on which 3.0 is 2^15
MIN_EXPONENT = -15


@dataclass(frozen=True)
class IntHardSwish:
    name: str
    input: str
    output: str
    reluish_multiplier: int  # int16 fixed point in [2^14, 2^15) (or 0, or 2^15 - 1 saturated)
    reluish_exponent: int
    output_multiplier: int  # int16, likewise
    output_exponent: int  # <= 0
    clamp_min: int
    clamp_max: int

    def requantizations(self) -> list[Requantize]:
        return []


def int16_multiplier(real: float) -> tuple[int, int]:
    """(int16 multiplier, exponent) with real ~= multiplier * 2^(exponent - 15): ``quantize_multiplier``'s 31-bit
    multiplier rounded to its upper 16 bits, saturating at 2^15 - 1 (TFLite's DownScaleInt32ToInt16Multiplier)."""
    multiplier, exponent = quantize_multiplier(real)
    rounding = 1 << 15
    if multiplier >= 2**31 - 1 - rounding:
        return INT16_MAX, exponent
    return (multiplier + rounding) >> 16, exponent


def build(node: HardSwish, context: BuildContext) -> IntHardSwish:
    hires_scale = context.scale(node.input) / 2**HIRES_SHIFT
    output_multiplier, output_exponent = int16_multiplier(hires_scale / context.scale(node.output))
    reluish_multiplier, reluish_exponent = int16_multiplier(hires_scale / RELUISH_SCALE)
    if not (MIN_EXPONENT <= output_exponent <= 0 and reluish_exponent >= MIN_EXPONENT):
        raise UnsupportedModelError(
            f"node {node.name!r} (hardswish): input scale {context.scale(node.input):.6g} and output scale "
            f"{context.scale(node.output):.6g} give exponents {output_exponent} (output, must be in "
            f"[{MIN_EXPONENT}, 0]) and {reluish_exponent} (relu-ish, must be >= {MIN_EXPONENT}); the calibrated "
            "ranges around it are far apart"
        )
    low, high = context.tensors[node.output].range
    return IntHardSwish(node.name, node.input, node.output, reluish_multiplier, reluish_exponent,
                        output_multiplier, output_exponent, low, high)


# ---------------------------------------------------------------- the reference, in Python integers


def _srdhm(a: int, b: int) -> int:
    """gemmlowp's SaturatingRoundingDoublingHighMul of two int16 values: round(a * b / 2^15), ties away from 0."""
    if a == b == INT16_MIN:
        return INT16_MAX
    product = a * b
    nudge = (1 << 14) if product >= 0 else 1 - (1 << 14)
    total = product + nudge
    return abs(total) >> 15 if total >= 0 else -(abs(total) >> 15)  # C's division truncates toward zero


def _sdhm(a: int, b: int) -> int:
    """TFLite's SaturatingDoublingHighMul of two int16 values: a * b / 2^15 truncated toward zero."""
    if a == b == INT16_MIN:
        return INT16_MAX
    product = a * b
    return abs(product) >> 15 if product >= 0 else -(abs(product) >> 15)


def _saturating_left_shift(value: int, amount: int) -> int:
    return min(max(value * (1 << amount), INT16_MIN), INT16_MAX)


def _rounding_divide_by_pot(x: int, exponent: int) -> int:
    """gemmlowp's RoundingDivideByPOT: x / 2^exponent rounded half away from zero (0 <= exponent <= 15)."""
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if (x & mask) > threshold else 0)


def hardswish_reference(q: int, node: IntHardSwish) -> int:
    """One output of the integer hard swish (module docstring), in Python integers."""
    hires = q * (1 << HIRES_SHIFT)
    preshift = _srdhm(hires, node.output_multiplier)
    reluish = hires
    if node.reluish_exponent > 0:
        reluish = _saturating_left_shift(reluish, node.reluish_exponent - 1)
    reluish = _srdhm(reluish, node.reluish_multiplier)
    if node.reluish_exponent > 0:
        reluish = _saturating_left_shift(reluish, 1)
    if node.reluish_exponent < 0:
        reluish = _rounding_divide_by_pot(reluish, -node.reluish_exponent)
    reluish = (reluish + (1 << 15)) >> 1
    output = _rounding_divide_by_pot(_sdhm(reluish, preshift), -node.output_exponent)
    return min(max(output, node.clamp_min), node.clamp_max)


# ---------------------------------------------------------------- the engine: the same steps on int64 tensors


def _truncating_shift(values: Tensor, amount: int) -> Tensor:
    """values / 2^amount truncated toward zero (C's integer division)."""
    return torch.where(values >= 0, values >> amount, -((-values) >> amount))


def _srdhm_tensor(a: Tensor, b: int) -> Tensor:
    product = a * b
    total = product + torch.where(product >= 0, 1 << 14, 1 - (1 << 14))
    result = _truncating_shift(total, 15)
    return torch.where((a == INT16_MIN) & (b == INT16_MIN), INT16_MAX, result)


def _rounding_divide_by_pot_tensor(x: Tensor, exponent: int) -> Tensor:
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> exponent) + ((x & mask) > threshold).to(torch.int64)


def hardswish_integers(q: Tensor, node: IntHardSwish) -> Tensor:
    """``hardswish_reference`` of every value of the integer tensor ``q``, as int64."""
    hires = q.to(torch.int64) * (1 << HIRES_SHIFT)
    preshift = _srdhm_tensor(hires, node.output_multiplier)
    reluish = hires
    if node.reluish_exponent > 0:
        reluish = (reluish * (1 << (node.reluish_exponent - 1))).clamp(INT16_MIN, INT16_MAX)
    reluish = _srdhm_tensor(reluish, node.reluish_multiplier)
    if node.reluish_exponent > 0:
        reluish = (reluish * 2).clamp(INT16_MIN, INT16_MAX)
    if node.reluish_exponent < 0:
        reluish = _rounding_divide_by_pot_tensor(reluish, -node.reluish_exponent)
    reluish = (reluish + (1 << 15)) >> 1
    product = reluish * preshift  # reluish >= 0, so no INT16_MIN * INT16_MIN saturation
    output = _rounding_divide_by_pot_tensor(_truncating_shift(product, 15), -node.output_exponent)
    return output.clamp(node.clamp_min, node.clamp_max)


def run(node: IntHardSwish, prepared: None, values: dict[str, Tensor]) -> Tensor:
    return hardswish_integers(values[node.input], node).to(torch.float64)


def simulate(node: IntHardSwish, model, values: dict[str, Tensor]) -> Tensor:
    y = F.hardswish(values[node.input])
    return fake_quantize(y, model.tensors[node.output].scale, node.clamp_min, node.clamp_max)


OP = IntegerOp(IntHardSwish, (HardSwish,), build, same_shape, nothing_to_prepare, run, simulate)

__all__ = ["OP", "IntHardSwish", "hardswish_integers", "hardswish_reference", "int16_multiplier"]
