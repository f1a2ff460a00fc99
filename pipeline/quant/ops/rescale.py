"""Applying a ``Requantize``: exactly in int64 (the definition), or in float64 where that is provably exact.

``apply_requantize`` is ``fixed_point.requantize`` per tensor or per channel, with the Requantize's
rounding rule; ``requantize_one`` is the pure-Python reference for one value. ``ExactRescale`` is the
engine's fast form (``pipeline.quant.engine``) of v * 2^lift rescaled:

- single rounding, y = floor(v * 2^lift * multiplier * 2^(shift - 31) + 1/2), runs in float64 when
  |v| * multiplier + 2^(30 - shift - lift) <= 2^53 for the largest |v| the tensor can hold: then v * M
  and v * M + 1/2 are exact (M's 31-bit multiplier times a power of two, and the sum's bits span less
  than 53), and floor is exact;
- double rounding (``fixed_point``) runs in float64 when the product p = v * 2^(lift + max(shift, 0)) *
  multiplier satisfies |p| + 2^30 <= 2^53: p is then an exact integer, |p| + 2^30 - 1 and its quotient by
  2^31 are exact, so the high word's rounding is a floor of exact values, and the rounding division
  by 2^max(-shift, 0) of an integer below 2^53 is one more exact floor.

Otherwise it runs in int64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.quant.fixed_point import (
    MAX_SHIFT,
    MIN_SHIFT,
    ROUNDINGS,
    requantize,
    requantize_reference,
)
from pipeline.quant.ops.base import Requantize
from pipeline.quant.ranges import INT32_MAX

FLOAT64_EXACT = 2**53


def channel_shape(values: Tensor, ndim: int) -> Tensor:
    """A per-channel (C,) vector shaped to line up with dim 1 of an ``ndim``-dim batch; a 0-D one unchanged."""
    return values.reshape((1, -1) + (1,) * (ndim - 2)) if values.ndim else values


def apply_requantize(acc: Tensor, rq: Requantize) -> Tensor:
    """``fixed_point.requantize`` of int32 values ``acc`` (N, C, ...) by ``rq`` (per tensor or per channel)."""
    multiplier = channel_shape(rq.multiplier.to(acc.device, torch.int64), acc.ndim)
    shift = channel_shape(rq.shift.to(acc.device, torch.int64), acc.ndim)
    return requantize(acc, multiplier, shift, rq.clamp_min, rq.clamp_max, rq.rounding)


def requantize_one(value: int, rq: Requantize) -> int:
    """``apply_requantize`` of one value by a per-tensor ``rq``, in Python integers (the slow reference)."""
    return requantize_reference(value, int(rq.multiplier), int(rq.shift), rq.clamp_min, rq.clamp_max, rq.rounding)


def float_rescale_is_exact(largest: Tensor | int, rq: Requantize, lift: int = 0) -> bool:
    """Whether a rescale of values |v| <= ``largest`` (per channel or one bound) is exact in float64."""
    multiplier = rq.multiplier.to(torch.int64)
    shift = rq.shift.to(torch.int64)
    largest = torch.as_tensor(largest, dtype=torch.int64)
    if rq.rounding == "double":
        left_shift = lift + shift.clamp(min=0)
        if bool((left_shift > 31).any()) or bool(((largest << left_shift) > INT32_MAX).any()):
            return False  # the int64 path raises where TFLite's int32 left shift would really overflow
        worst = (largest << left_shift) * multiplier + (1 << 30)
        return bool((worst <= FLOAT64_EXACT).all())
    total_shift = 31 - shift - lift
    if bool((total_shift < 1).any()):
        return False
    worst = largest * multiplier + (1 << (total_shift - 1))
    return bool((worst <= FLOAT64_EXACT).all())


@dataclass(frozen=True)
class ExactRescale:
    """A ``Requantize`` prepared for values |v| <= some bound: float64 where exact, else int64."""

    rq: Requantize
    lift: int
    # float64, shaped per channel, None for the int64 path: single rounding M * 2^lift; double rounding
    # multiplier * 2^(lift + max(shift, 0)), the integer factor of the product p.
    real: Tensor | None
    divisor_exponent: Tensor | None = None  # double rounding: max(-shift, 0), float64

    @classmethod
    def prepare(cls, rq: Requantize, largest: Tensor | int, lift: int = 0) -> ExactRescale:
        if not float_rescale_is_exact(largest, rq, lift):
            return cls(rq, lift, None)
        shift = rq.shift.to(torch.float64)
        if rq.rounding == "double":
            factor = rq.multiplier.to(torch.float64) * torch.exp2(lift + shift.clamp(min=0))
            return cls(rq, lift, factor, (-shift).clamp(min=0))
        real = rq.multiplier.to(torch.float64) * torch.exp2(shift + (lift - 31))
        return cls(rq, lift, real)

    def _per_channel(self, values: Tensor, vector: Tensor) -> Tensor:
        """``vector`` (0-D or per channel) on ``values``' device, shaped to broadcast along dim 1 (``channel_shape``);
        a 0-D one gets ``values``' number of dimensions, so a float64 factor makes the product float64."""
        vector = vector.to(values.device)
        return channel_shape(vector, values.ndim) if vector.ndim else vector.reshape((1,) * values.ndim)

    def _double_rounding(self, values: Tensor) -> Tensor:
        """``fixed_point``'s double rounding in exact float64 steps (module docstring), before saturation."""
        product = values * self._per_channel(values, self.real)
        negative = product < 0
        # the high word: floor((|p| + 2^30 - [p < 0]) / 2^31) with p's sign (ties go up)
        high = product.abs_().add_(2.0**30).sub_(negative.to(torch.float64)).mul_(2.0**-31).floor_()
        high = torch.where(negative, -high, high)
        # rounding division by 2^e, half away from zero: floor(|h| / 2^e + 1/2) with h's sign
        scale = torch.exp2(-self._per_channel(values, self.divisor_exponent))
        rounded = high.abs().mul_(scale).add_(0.5).floor_()
        return torch.where(high < 0, -rounded, rounded)

    def __call__(self, values: Tensor) -> Tensor:
        """clamp(floor(v * 2^lift * M + 1/2)) of integer-valued ``values`` (N, C, ...), exactly, as float64."""
        if self.real is None:
            lifted = values.to(torch.int64) << self.lift if self.lift else values.to(torch.int64)
            return apply_requantize(lifted, self.rq).to(torch.float64)
        if self.rq.rounding == "double":
            return self._double_rounding(values).clamp_(self.rq.clamp_min, self.rq.clamp_max)
        # A dimensioned float64 factor, so the product is float64 (a 0-D one would keep float32) and new:
        # the input is never changed in place.
        factor = self._per_channel(values, self.real)
        return (values * factor).add_(0.5).floor_().clamp_(self.rq.clamp_min, self.rq.clamp_max)


def check_requantize(rq: Requantize, channels: int, where: str) -> None:
    """``ValueError`` naming ``where`` unless ``rq`` has 1 or ``channels`` multipliers, each in [0, 2^31),
    shifts in [MIN_SHIFT, MAX_SHIFT] (so 2^(30 - shift) and 31 - shift stay within int64) and a non-empty clamp."""
    multiplier, shift = rq.multiplier.reshape(-1).to(torch.int64), rq.shift.reshape(-1).to(torch.int64)
    if multiplier.numel() not in (1, channels) or shift.numel() != multiplier.numel():
        raise ValueError(
            f"{where} needs 1 or {channels} multipliers and as many shifts, got {multiplier.numel()} and {shift.numel()}"
        )
    valid = (multiplier >= 0) & (multiplier < 2**31)
    if not bool(valid.all()) or not bool(((shift >= MIN_SHIFT) & (shift <= MAX_SHIFT)).all()):
        raise ValueError(
            f"{where} needs multipliers in [0, 2^31) and shifts in [{MIN_SHIFT}, {MAX_SHIFT}], "
            f"got multipliers {multiplier.tolist()}, shifts {shift.tolist()}"
        )
    if rq.clamp_min > rq.clamp_max:
        raise ValueError(f"{where} saturates to an empty range [{rq.clamp_min}, {rq.clamp_max}]")
    if rq.rounding not in ROUNDINGS:
        raise ValueError(f"{where} has rounding {rq.rounding!r}; the rules are {ROUNDINGS}")


__all__ = [
    "ExactRescale", "apply_requantize", "channel_shape", "check_requantize", "float_rescale_is_exact", "requantize_one",
]
