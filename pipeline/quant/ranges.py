"""Integer ranges, scales, and the quantize/dequantize primitives.

The scheme: a real value r is represented by an integer q and a scale S (the
size of one integer step) as r ~= S * q. It is symmetric, with zero point 0, so
0.0 is exactly representable (zero padding and ReLU stay exact on integers).

- Weights: signed, narrow range [-(2^(b-1) - 1), 2^(b-1) - 1] (int8: [-127, 127]),
  S_w = range / qmax, so +range and -range are both representable.
- Activations: ``activation_bits`` b (4..8, stored as int8/uint8 bytes) wide, signed [-2^(b-1), 2^(b-1) - 1]
  with S_a = range / (2^(b-1) - 1), or, with full-range unsigned activations (``ActivationFormat.unsigned``)
  for a tensor non-negative by construction (after a ReLU, ...: ``scale_groups.tensor_signedness``), unsigned
  [0, 2^b - 1] with S_a = range / (2^b - 1): a post-ReLU int8 tensor then uses all 8 bits, not 7.
- Biases: int32 at scale S_in * S_w (see ``pipeline.quant.model.quantize_bias``).

``quantize`` rounds half to even (``torch.round``, the same rule as
``torch.fake_quantize_per_tensor_affine``) and then saturates to [qmin, qmax].
It computes in float64 so the result does not depend on the input's dtype.
Integer widths come from ``int_range`` and nowhere else; ``check_bits`` is the one
check of a bit width, ``accumulator_bound`` the one worst case of an int32 accumulator.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Scale used when a range is 0 (an all-zero tensor). Any positive scale
# represents zeros exactly; 1.0 keeps the bias scale S_in * S_w of the order of
# the data, where a tiny epsilon would push the int32 bias out of range.
ZERO_RANGE_SCALE = 1.0


def int_range(bits: int, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """The closed integer interval [qmin, qmax] of a ``bits``-wide integer.

    ``narrow`` drops the most negative signed value (so the range is symmetric)
    or, for unsigned integers, the largest value (as Brevitas does).

    >>> int_range(8)
    (-128, 127)
    >>> int_range(8, narrow=True)
    (-127, 127)
    >>> int_range(8, signed=False)
    (0, 255)
    >>> int_range(4, signed=False, narrow=True)
    (0, 14)
    >>> int_range(32)
    (-2147483648, 2147483647)
    >>> int_range(2, narrow=True)
    (-1, 1)
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 32:
        raise ValueError(f"bits must be an integer in [2, 32], got {bits!r}")
    if signed:
        qmax = 2 ** (bits - 1) - 1
        qmin = -qmax if narrow else -qmax - 1
    else:
        qmin = 0
        qmax = 2**bits - 2 if narrow else 2**bits - 1
    return qmin, qmax


def check_bits(bits: object, what: str, low: int = 2, high: int = 8) -> int:
    """``bits`` if it is an integer in [low, high], else a ValueError naming ``what`` and the allowed range."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
        raise ValueError(f"{what}: value {bits!r} is not allowed; allowed: an integer in [{low}, {high}]")
    return bits


def layer_bits(bits: int | Mapping[str, int], layer: str) -> int:
    """The width of ``layer``'s weights: ``bits`` itself, or its entry when ``bits`` maps layer names to widths."""
    return bits[layer] if isinstance(bits, Mapping) else bits


def check_layer_bits(bits: int | Mapping[str, int], layers: Sequence[str]) -> None:
    """A ValueError unless ``bits`` is one width or names exactly ``layers`` (mixed precision), naming the layers
    it leaves out and those it names that the model lacks (only what there is of each) and the model's layers."""
    if not isinstance(bits, Mapping):
        return
    missing = [layer for layer in layers if layer not in bits]
    unknown = sorted(set(bits) - set(layers))
    problems = [f"{what} layers {', '.join(names)}" for what, names in (("missing", missing), ("unknown", unknown))
                if names]
    if problems:
        raise ValueError(f"weight bits per layer: {', '.join(problems)}; allowed: one width for every layer, or one "
                         f"for each of the model's layers {', '.join(layers)}")


INT32_MIN, INT32_MAX = int_range(32)
ACTIVATION_BITS_MIN = 4  # below 4 bits a requantized ReLU6 or residual keeps too few levels to be useful


@dataclass(frozen=True)
class ActivationFormat:
    """How activation tensors are stored: ``bits`` wide, signed, or unsigned where non-negative (``unsigned``).

    The default is the seed's: signed int8 everywhere. Zero point 0 either way, so 0.0 stays exact.
    """

    bits: int = 8
    unsigned: bool = False  # full range [0, 2^bits - 1] for tensors non-negative by construction

    def __post_init__(self) -> None:
        check_bits(self.bits, "activation bits (stored as int8/uint8)", low=ACTIVATION_BITS_MIN)
        if not isinstance(self.unsigned, bool):
            raise ValueError(f"unsigned activations: value {self.unsigned!r} is not allowed; allowed: true, false")

    def range(self, signed: bool) -> tuple[int, int]:
        """[qmin, qmax] of a tensor of this format: full range, signed or unsigned."""
        return int_range(self.bits, signed=signed)


def largest_magnitude(value_range: tuple[int, int]) -> int:
    """max(|qmin|, |qmax|): the largest |q| of a tensor with integer range ``value_range``."""
    return max(abs(value_range[0]), abs(value_range[1]))


def accumulator_bound(q_weight: Tensor, q_bias: Tensor, input_range: tuple[int, int]) -> Tensor:
    """Per output channel, the largest |acc| any input in ``input_range`` [qmin, qmax] can produce (int64, (out,)).

    acc = sum(q_w * q_x) + q_b, so |acc| <= sum(|q_w|) * max(|qmin|, |qmax|) + |q_b|: an unsigned 8-bit
    input (up to 255) doubles the signed int8 bound (128). Grouped and depthwise weights
    (out, in / groups, kh, kw) sum over their own group only.
    """
    weight_abs_sum = q_weight.to(torch.int64).abs().reshape(q_weight.shape[0], -1).sum(dim=1)
    return weight_abs_sum * largest_magnitude(input_range) + q_bias.to(torch.int64).abs()


def check_accumulator(where: str, q_weight: Tensor, q_bias: Tensor, input_range: tuple[int, int]) -> int:
    """The layer's worst-case |accumulator| for inputs in ``input_range``; an ``OverflowError`` naming ``where``
    when it exceeds int32.

    int32 accumulators: a larger sum would overflow (undefined behavior in C).
    """
    bound = int(accumulator_bound(q_weight, q_bias, input_range).max())
    if bound > INT32_MAX:
        raise OverflowError(f"{where}: worst-case accumulator {bound} for inputs in {list(input_range)} exceeds "
                            f"int32 max {INT32_MAX}")
    return bound


def scale_from_range(range_: float | Tensor, qmax: int) -> float | Tensor:
    """Scale S = range / qmax, elementwise for a tensor of per-channel ranges.

    A range of 0 gives ``ZERO_RANGE_SCALE`` (1.0): the tensor is all zeros and
    any positive scale represents it exactly. Returns a float for a float range
    and a float64 tensor for a tensor range.
    """
    if qmax <= 0:
        raise ValueError(f"qmax must be positive, got {qmax!r}")
    ranges = torch.as_tensor(range_, dtype=torch.float64)
    if not bool(torch.isfinite(ranges).all()) or bool((ranges < 0).any()):
        raise ValueError(f"range must be finite and >= 0, got {range_!r}")
    scales = torch.where(ranges == 0, torch.full_like(ranges, ZERO_RANGE_SCALE), ranges / qmax)
    return scales if isinstance(range_, Tensor) else float(scales)


def _broadcast_scale(scale: float | Tensor, ndim: int, axis: int) -> Tensor:
    """A float64 scale shaped to broadcast against an ``ndim``-dim tensor.

    A 1-D scale holds one value per index of ``axis`` (per-channel); a 0-D
    scale or a float applies to the whole tensor (per-tensor).
    """
    scale_tensor = torch.as_tensor(scale, dtype=torch.float64)
    if scale_tensor.ndim == 0:
        return scale_tensor
    if scale_tensor.ndim != 1:
        raise ValueError(f"scale must be a scalar or 1-D per-channel tensor, got shape {tuple(scale_tensor.shape)}")
    shape = [1] * ndim
    shape[axis] = -1
    return scale_tensor.reshape(shape)


def quantize(x: Tensor, scale: float | Tensor, qmin: int, qmax: int, axis: int = 0) -> Tensor:
    """q = clamp(round_half_to_even(x / scale), qmin, qmax) as an int64 tensor.

    ``scale`` is a float or 0-D tensor (per-tensor) or a 1-D tensor with one
    scale per index of ``axis`` (per-channel).
    """
    scale_b = _broadcast_scale(scale, x.ndim, axis).to(x.device)
    if bool((scale_b <= 0).any()):
        raise ValueError(f"scale must be > 0, got {scale!r}")
    return torch.round(x.to(torch.float64) / scale_b).clamp(qmin, qmax).to(torch.int64)


def dequantize(q: Tensor, scale: float | Tensor, axis: int = 0) -> Tensor:
    """r = q * scale, computed in float64."""
    return q.to(torch.float64) * _broadcast_scale(scale, q.ndim, axis).to(q.device)


def fake_quantize(x: Tensor, scale: float | Tensor, qmin: int, qmax: int, axis: int = 0) -> Tensor:
    """dequantize(quantize(x)): x snapped to the integer grid, in x's dtype."""
    return dequantize(quantize(x, scale, qmin, qmax, axis), scale, axis).to(x.dtype)
