"""Fixed-point requantization: the real multiplier M applied with integers only.

A layer's int32 accumulator (scale S_in * S_w) is rescaled to the next layer's
int8 (scale S_out) by M = S_in * S_w / S_out. Hardware applies M as an integer
multiplier and a shift. The convention here is TFLite's ``QuantizeMultiplier``:

    M ~= multiplier * 2^(shift - 31)

with ``multiplier`` an int32 in [2^30, 2^31) (a Q0.31 fraction in [0.5, 1); the arithmetic below takes
any multiplier in [0, 2^31), which TFLite's MEAN uses: ``ops.avgpool``)
and ``shift`` the power-of-two exponent in [-31, 30]: shift > 0 scales up
(M >= 1), shift <= 0 scales down (M < 1). The representation's relative error
is at most 2^-31. M == 0, and any M < 2^-32 (which turns every int32
accumulator into 0 anyway), is stored as multiplier 0, shift 0.

Two rounding rules, named by the model (``ROUNDINGS``); both are exact integer arithmetic:

- ``double`` (the default; TFLite's and TensorFlow Lite Micro's ``MultiplyByQuantizedMultiplier``, which
  CMSIS-NN follows bit for bit): acc is shifted left by max(shift, 0) in int32, multiplied by
  ``multiplier`` with gemmlowp's ``SaturatingRoundingDoublingHighMul`` (the high 32 bits of 2 * x * m,
  rounded: (x * m + 2^30) / 2^31 for x * m >= 0, (x * m + 1 - 2^30) / 2^31 otherwise, C's division
  truncating toward zero, so a tie goes up), then divided by 2^max(-shift, 0) with
  ``RoundingDivideByPOT`` (round half away from zero). Two roundings: about 1-2% of values differ
  by one from the single rule. TFLite's int32 left shift must not overflow (only a rescale M >= 1 has
  one): ``requantize`` raises ``ValueError`` for an accumulator that would.
- ``single`` (TFLite's ``TFLITE_SINGLE_ROUNDING``): one rounding, round half up (ties toward +infinity):

    total_shift = 31 - shift                                # in [1, 62]
    y = (acc * multiplier + 2^(total_shift - 1)) >> total_shift

  where ``>>`` is an arithmetic shift (floor division by 2^total_shift), so y is
  floor(acc * M + 1/2) for the stored M. It is exact in int64: |acc| <= 2^31 and
  multiplier < 2^31 give |acc * multiplier| < 2^62, and the rounding term is at
  most 2^61, so the sum stays below 2^63.

Either way the result is then saturated to [qmin, qmax].
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.quant.ranges import INT32_MAX, INT32_MIN
from pipeline.quant.settings import REQUANTIZE_ROUNDINGS

MULTIPLIER_BITS = 31  # the multiplier is a Q0.31 fraction in [0.5, 1)
ROUNDINGS = REQUANTIZE_ROUNDINGS  # the requantization rules (module docstring); "double" is TFLite's default
MIN_SHIFT, MAX_SHIFT = -31, 30  # keeps total_shift = 31 - shift in [1, 62]


def quantize_multiplier(real_multiplier: float) -> tuple[int, int]:
    """(multiplier, shift) with real_multiplier ~= multiplier * 2^(shift - 31).

    >>> quantize_multiplier(0.5)
    (1073741824, 0)
    >>> quantize_multiplier(3.0)
    (1610612736, 2)
    >>> quantize_multiplier(0.0)
    (0, 0)
    """
    if not math.isfinite(real_multiplier) or real_multiplier < 0:
        raise ValueError(f"real_multiplier must be finite and >= 0, got {real_multiplier!r}")
    if real_multiplier == 0:
        return 0, 0
    mantissa, exponent = math.frexp(real_multiplier)  # real_multiplier = mantissa * 2^exponent, mantissa in [0.5, 1)
    # The product is exact (scaling by a power of two); a tie rounds up, as TFLite's std::round does for it
    # (Python's round would take the even neighbour).
    multiplier = math.floor(mantissa * 2**MULTIPLIER_BITS + 0.5)
    if multiplier == 2**MULTIPLIER_BITS:  # mantissa rounded up to 1.0
        multiplier //= 2
        exponent += 1
    if exponent < MIN_SHIFT:
        return 0, 0
    if exponent > MAX_SHIFT:
        raise ValueError(f"real_multiplier must be < 2^{MAX_SHIFT}, got {real_multiplier!r}")
    return multiplier, exponent


def quantize_multipliers(real_multipliers: Tensor) -> tuple[Tensor, Tensor]:
    """``quantize_multiplier`` elementwise: int64 tensors (multiplier, shift) of the input's shape."""
    pairs = [quantize_multiplier(float(m)) for m in real_multipliers.reshape(-1).tolist()]
    multipliers = torch.tensor([m for m, _ in pairs], dtype=torch.int64).reshape(real_multipliers.shape)
    shifts = torch.tensor([s for _, s in pairs], dtype=torch.int64).reshape(real_multipliers.shape)
    return multipliers, shifts


def _check_multiplier_and_shift(multiplier: Tensor, shift: Tensor) -> None:
    if not bool(((multiplier >= 0) & (multiplier < 2**31)).all()):
        raise ValueError(f"multiplier must be in [0, 2^31), got {multiplier.tolist()}")
    if not bool(((shift >= MIN_SHIFT) & (shift <= MAX_SHIFT)).all()):
        raise ValueError(f"shift must be in [{MIN_SHIFT}, {MAX_SHIFT}], got {shift.tolist()}")


def _check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def _lift_to_int32(acc64: Tensor, left_shift: Tensor) -> Tensor:
    """acc << left_shift, which TFLite computes in int32: ``ValueError`` where that would overflow."""
    lifted = acc64 << left_shift
    if lifted.numel() and (int(lifted.min()) < INT32_MIN or int(lifted.max()) > INT32_MAX):
        raise ValueError(
            f"double rounding shifts the accumulator left by the rescale's positive shift in int32 (TFLite's "
            f"MultiplyByQuantizedMultiplier), and these accumulators overflow it: shifted values reach "
            f"[{int(lifted.min())}, {int(lifted.max())}]; a rescale M >= 1 needs smaller accumulators"
        )
    return lifted


def _double_rounding(acc64: Tensor, multiplier64: Tensor, shift64: Tensor) -> Tensor:
    """TFLite's ``MultiplyByQuantizedMultiplier`` (module docstring) on int64 tensors, before saturation."""
    product = _lift_to_int32(acc64, shift64.clamp(min=0)) * multiplier64  # |.| < 2^62
    # SaturatingRoundingDoublingHighMul: (p + nudge) / 2^31 truncated toward zero. For p >= 0 that is the
    # floor shift; for p < 0 the sum is negative and its truncation is -((-sum) >> 31).
    nudge = torch.where(product >= 0, 1 << 30, 1 - (1 << 30))
    total = product + nudge
    high = torch.where(total >= 0, total >> MULTIPLIER_BITS, -((-total) >> MULTIPLIER_BITS))
    # RoundingDivideByPOT: floor(x / 2^e), plus one where the remainder exceeds half (half, for x >= 0):
    # round half away from zero.
    exponent = (-shift64).clamp(min=0)
    mask = (torch.ones_like(exponent) << exponent) - 1
    threshold = (mask >> 1) + (high < 0).to(torch.int64)
    return (high >> exponent) + ((high & mask) > threshold).to(torch.int64)


def requantize(acc: Tensor, multiplier: int | Tensor, shift: int | Tensor, qmin: int, qmax: int,
               rounding: str = "double") -> Tensor:
    """acc * multiplier * 2^(shift - 31) rounded by ``rounding`` (module docstring), clamped to [qmin, qmax], as int64.

    ``acc`` holds int32 values (any integer dtype); ``multiplier`` and ``shift``
    are ints or int tensors that broadcast against it (one per output channel).
    """
    _check_rounding(rounding)
    if acc.dtype.is_floating_point or acc.dtype.is_complex or acc.dtype == torch.bool:
        raise TypeError(f"acc must be an integer tensor, got dtype {acc.dtype}")
    acc64 = acc.to(torch.int64)
    if acc64.numel() and (int(acc64.min()) < INT32_MIN or int(acc64.max()) > INT32_MAX):
        raise ValueError(
            f"acc must hold int32 values [{INT32_MIN}, {INT32_MAX}], got [{int(acc64.min())}, {int(acc64.max())}]"
        )
    multiplier64 = torch.as_tensor(multiplier, dtype=torch.int64, device=acc.device)
    shift64 = torch.as_tensor(shift, dtype=torch.int64, device=acc.device)
    _check_multiplier_and_shift(multiplier64, shift64)
    if rounding == "double":
        return _double_rounding(acc64, multiplier64, shift64).clamp_(qmin, qmax)
    total_shift = MULTIPLIER_BITS - shift64
    rounding_term = torch.ones_like(total_shift) << (total_shift - 1)  # 1/2 in units of 2^-total_shift: round half up
    # The sum broadcasts acc, multiplier and shift; shift and clamp then work in place on it, because
    # for a batch of activations each extra temporary is tens of MB.
    scaled = acc64 * multiplier64 + rounding_term
    return scaled.bitwise_right_shift_(total_shift).clamp_(qmin, qmax)


def _truncating_division(numerator: int, power: int) -> int:
    """numerator / 2^power rounded toward zero, as C's integer division."""
    quotient = abs(numerator) >> power
    return quotient if numerator >= 0 else -quotient


def requantize_reference(acc: int, multiplier: int, shift: int, qmin: int, qmax: int, rounding: str = "double") -> int:
    """``requantize`` for one accumulator in plain Python integers (the slow reference), written as TFLite's C."""
    _check_rounding(rounding)
    if not 0 <= multiplier < 2**31 or not MIN_SHIFT <= shift <= MAX_SHIFT:
        raise ValueError(
            f"need multiplier in [0, 2^31) and shift in [{MIN_SHIFT}, {MAX_SHIFT}], got {multiplier}, {shift}"
        )
    if not INT32_MIN <= acc <= INT32_MAX:
        raise ValueError(f"acc must be an int32 value, got {acc}")
    if rounding == "single":
        total_shift = MULTIPLIER_BITS - shift
        # Python's >> on ints floors, like the arithmetic shift of the vectorized version.
        rounded = (acc * multiplier + (1 << (total_shift - 1))) >> total_shift
        return min(max(rounded, qmin), qmax)
    lifted = acc * 2 ** max(shift, 0)
    if not INT32_MIN <= lifted <= INT32_MAX:
        raise ValueError(f"acc {acc} shifted left by {shift} overflows int32 (TFLite's double rounding)")
    product = lifted * multiplier
    high = _truncating_division(product + (1 << 30 if product >= 0 else 1 - (1 << 30)), MULTIPLIER_BITS)
    exponent = max(-shift, 0)
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (1 if high < 0 else 0)
    rounded = (high >> exponent) + (1 if (high & mask) > threshold else 0)
    return min(max(rounded, qmin), qmax)
