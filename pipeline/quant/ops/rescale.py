"""Applying a ``Requantize``: exactly in int64 (the definition), or in float64 where that is provably exact.

``apply_requantize`` is ``fixed_point.requantize`` per tensor or per channel. ``ExactRescale`` is the
engine's fast form (``pipeline.quant.engine``): y = floor(v * 2^lift * multiplier * 2^(shift - 31) + 1/2)
runs in float64 when |v| * multiplier + 2^(30 - shift - lift) <= 2^53 for the largest |v| the tensor can
hold: then v * M and v * M + 1/2 are exact (M's 31-bit multiplier times a power of two, and the sum's
bits span less than 53), and floor is exact. Otherwise it runs in int64.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.quant.fixed_point import MAX_SHIFT, MIN_SHIFT, requantize
from pipeline.quant.ops.base import Requantize

FLOAT64_EXACT = 2**53


def channel_shape(values: Tensor, ndim: int) -> Tensor:
    """A per-channel (C,) vector shaped to line up with dim 1 of an ``ndim``-dim batch; a 0-D one unchanged."""
    return values.reshape((1, -1) + (1,) * (ndim - 2)) if values.ndim else values


def apply_requantize(acc: Tensor, rq: Requantize) -> Tensor:
    """``fixed_point.requantize`` of int32 values ``acc`` (N, C, ...) by ``rq`` (per tensor or per channel)."""
    multiplier = channel_shape(rq.multiplier.to(acc.device, torch.int64), acc.ndim)
    shift = channel_shape(rq.shift.to(acc.device, torch.int64), acc.ndim)
    return requantize(acc, multiplier, shift, rq.clamp_min, rq.clamp_max)


def float_rescale_is_exact(largest: Tensor | int, rq: Requantize, lift: int = 0) -> bool:
    """Whether a rescale of values |v| <= ``largest`` (per channel or one bound) is exact in float64."""
    multiplier = rq.multiplier.to(torch.int64)
    total_shift = 31 - rq.shift.to(torch.int64) - lift
    if bool((total_shift < 1).any()):
        return False
    worst = torch.as_tensor(largest, dtype=torch.int64) * multiplier + (1 << (total_shift - 1))
    return bool((worst <= FLOAT64_EXACT).all())


@dataclass(frozen=True)
class ExactRescale:
    """A ``Requantize`` prepared for values |v| <= some bound: float64 where exact, else int64."""

    rq: Requantize
    lift: int
    real: Tensor | None  # float64 M * 2^lift, shaped per channel; None: the int64 path

    @classmethod
    def prepare(cls, rq: Requantize, largest: Tensor | int, lift: int = 0) -> ExactRescale:
        if not float_rescale_is_exact(largest, rq, lift):
            return cls(rq, lift, None)
        real = rq.multiplier.to(torch.float64) * torch.exp2(rq.shift.to(torch.float64) + (lift - 31))
        return cls(rq, lift, real)

    def __call__(self, values: Tensor) -> Tensor:
        """clamp(floor(v * 2^lift * M + 1/2)) of integer-valued ``values`` (N, C, ...), exactly, as float64."""
        if self.real is None:
            lifted = values.to(torch.int64) << self.lift if self.lift else values.to(torch.int64)
            return apply_requantize(lifted, self.rq).to(torch.float64)
        # A dimensioned float64 factor, so the product is float64 (a 0-D one would keep float32) and new:
        # the input is never changed in place.
        factor = self.real.to(values.device).reshape((1, -1) + (1,) * (values.ndim - 2) if self.real.ndim
                                                     else (1,) * values.ndim)
        return (values * factor).add_(0.5).floor_().clamp_(self.rq.clamp_min, self.rq.clamp_max)


def check_requantize(rq: Requantize, channels: int, where: str) -> None:
    """``ValueError`` naming ``where`` unless ``rq`` has 1 or ``channels`` multipliers, each 0 or in [2^30, 2^31),
    shifts in [MIN_SHIFT, MAX_SHIFT] (so 2^(30 - shift) and 31 - shift stay within int64) and a non-empty clamp."""
    multiplier, shift = rq.multiplier.reshape(-1).to(torch.int64), rq.shift.reshape(-1).to(torch.int64)
    if multiplier.numel() not in (1, channels) or shift.numel() != multiplier.numel():
        raise ValueError(
            f"{where} needs 1 or {channels} multipliers and as many shifts, got {multiplier.numel()} and {shift.numel()}"
        )
    valid = (multiplier == 0) | ((multiplier >= 2**30) & (multiplier < 2**31))
    if not bool(valid.all()) or not bool(((shift >= MIN_SHIFT) & (shift <= MAX_SHIFT)).all()):
        raise ValueError(
            f"{where} needs multipliers 0 or in [2^30, 2^31) and shifts in [{MIN_SHIFT}, {MAX_SHIFT}], "
            f"got multipliers {multiplier.tolist()}, shifts {shift.tolist()}"
        )
    if rq.clamp_min > rq.clamp_max:
        raise ValueError(f"{where} saturates to an empty range [{rq.clamp_min}, {rq.clamp_max}]")


__all__ = ["ExactRescale", "apply_requantize", "channel_shape", "check_requantize", "float_rescale_is_exact"]
