"""Fixed-point requantization: the real multiplier M applied with integers only.

A layer's int32 accumulator (scale S_in * S_w) is rescaled to the next layer's
int8 (scale S_out) by M = S_in * S_w / S_out. Hardware applies M as an integer
multiplier and a shift. The convention here is TFLite's ``QuantizeMultiplier``:

    M ~= multiplier * 2^(shift - 31)

with ``multiplier`` an int32 in [2^30, 2^31) (a Q0.31 fraction in [0.5, 1))
and ``shift`` the power-of-two exponent in [-31, 30]: shift > 0 scales up
(M >= 1), shift <= 0 scales down (M < 1). The representation's relative error
is at most 2^-31. M == 0, and any M < 2^-32 (which turns every int32
accumulator into 0 anyway), is stored as multiplier 0, shift 0.

Requantization uses ONE rounding, round half up (ties toward +infinity), the
rule of TFLite's single-rounding ``MultiplyByQuantizedMultiplier``:

    total_shift = 31 - shift                                # in [1, 62]
    y = (acc * multiplier + 2^(total_shift - 1)) >> total_shift
    out = clamp(y, qmin, qmax)

where ``>>`` is an arithmetic shift (floor division by 2^total_shift), so y is
floor(acc * M + 1/2) for the stored M. It is exact in int64: |acc| <= 2^31 and
multiplier < 2^31 give |acc * multiplier| < 2^62, and the rounding term is at
most 2^61, so the sum stays below 2^63.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.quant.ranges import INT32_MAX, INT32_MIN

MULTIPLIER_BITS = 31  # the multiplier is a Q0.31 fraction in [0.5, 1)
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
    multiplier = round(mantissa * 2**MULTIPLIER_BITS)  # the product is exact: scaling by a power of two
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
    valid_multiplier = (multiplier == 0) | ((multiplier >= 2**30) & (multiplier < 2**31))
    if not bool(valid_multiplier.all()):
        raise ValueError(f"multiplier must be 0 or in [2^30, 2^31), got {multiplier.tolist()}")
    if not bool(((shift >= MIN_SHIFT) & (shift <= MAX_SHIFT)).all()):
        raise ValueError(f"shift must be in [{MIN_SHIFT}, {MAX_SHIFT}], got {shift.tolist()}")


def requantize(acc: Tensor, multiplier: int | Tensor, shift: int | Tensor, qmin: int, qmax: int) -> Tensor:
    """clamp(floor(acc * multiplier * 2^(shift - 31) + 1/2), qmin, qmax), exactly, as int64.

    ``acc`` holds int32 values (any integer dtype); ``multiplier`` and ``shift``
    are ints or int tensors that broadcast against it (one per output channel).
    """
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
    total_shift = MULTIPLIER_BITS - shift64
    rounding = torch.ones_like(total_shift) << (total_shift - 1)  # 1/2 in units of 2^-total_shift: round half up
    # The sum broadcasts acc, multiplier and shift; shift and clamp then work in place on it, because
    # for a batch of activations each extra temporary is tens of MB.
    scaled = acc64 * multiplier64 + rounding
    return scaled.bitwise_right_shift_(total_shift).clamp_(qmin, qmax)


def requantize_reference(acc: int, multiplier: int, shift: int, qmin: int, qmax: int) -> int:
    """``requantize`` for one accumulator in plain Python integers (the slow reference)."""
    if not (multiplier == 0 or 2**30 <= multiplier < 2**31) or not MIN_SHIFT <= shift <= MAX_SHIFT:
        raise ValueError(
            f"need multiplier 0 or in [2^30, 2^31) and shift in [{MIN_SHIFT}, {MAX_SHIFT}], got {multiplier}, {shift}"
        )
    if not INT32_MIN <= acc <= INT32_MAX:
        raise ValueError(f"acc must be an int32 value, got {acc}")
    total_shift = MULTIPLIER_BITS - shift
    # Python's >> on ints floors, like the arithmetic shift of the vectorized version.
    rounded = (acc * multiplier + (1 << (total_shift - 1))) >> total_shift
    return min(max(rounded, qmin), qmax)
