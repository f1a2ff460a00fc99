"""Integer ranges, quantize/dequantize and fixed-point requantization against independent references."""
from __future__ import annotations

import doctest
import math
import random
from fractions import Fraction

import pytest
import torch

from pipeline.quant import fixed_point, ranges
from pipeline.quant.fixed_point import (
    quantize_multiplier,
    quantize_multipliers,
    requantize,
    requantize_reference,
)
from pipeline.quant.ranges import (
    ZERO_RANGE_SCALE,
    dequantize,
    fake_quantize,
    int_range,
    quantize,
    scale_from_range,
)

BITS = list(range(2, 9))


@pytest.mark.parametrize("module", [ranges, fixed_point])
def test_doctests_pass(module):
    """The examples in the docstrings are true."""
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- int_range


@pytest.mark.parametrize("bits", BITS)
def test_int_range_widths(bits):
    """Signed ranges hold 2^bits values (narrow: one fewer, symmetric); unsigned start at 0."""
    qmin, qmax = int_range(bits)
    assert (qmin, qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert int_range(bits, narrow=True) == (-qmax, qmax)
    assert int_range(bits, signed=False) == (0, 2**bits - 1)
    assert int_range(bits, signed=False, narrow=True) == (0, 2**bits - 2)


@pytest.mark.parametrize("bad", [1, 33, 8.0, True, "8"])
def test_int_range_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 32\], got"):
        int_range(bad)


# ---------------------------------------------------------------- scales


def test_scale_from_range_per_tensor_and_per_channel():
    assert scale_from_range(2.54, 127) == pytest.approx(0.02)
    scales = scale_from_range(torch.tensor([1.27, 0.0, 12.7]), 127)
    assert scales.dtype == torch.float64
    assert torch.allclose(scales, torch.tensor([0.01, ZERO_RANGE_SCALE, 0.1], dtype=torch.float64))


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf])
def test_scale_from_range_rejects_bad_range(bad):
    with pytest.raises(ValueError, match="range must be finite and >= 0"):
        scale_from_range(bad, 127)


# ---------------------------------------------------------------- quantize against torch


@pytest.mark.parametrize("bits", BITS)
def test_quantize_matches_torch_fake_quantize_on_exact_ties(bits):
    """With a power-of-two scale every x / scale is exact, so ties k + 0.5 must round to even like torch."""
    qmin, qmax = int_range(bits)
    scale = 0.125
    # every tie and every integer multiple of the scale, a little past both ends
    x = torch.arange(2 * qmin - 4, 2 * qmax + 5, dtype=torch.float32) * (scale / 2)
    expected = torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)
    assert torch.equal(fake_quantize(x, scale, qmin, qmax), expected)


@pytest.mark.parametrize("bits", BITS)
def test_quantize_matches_torch_fake_quantize_per_tensor(bits):
    qmin, qmax = int_range(bits, narrow=True)
    generator = torch.Generator().manual_seed(bits)
    x = torch.randn(4000, generator=generator) * 3
    scale = 0.0371
    ratio = x.double() / scale
    # torch multiplies by a float32 reciprocal; away from ties both roundings agree.
    away_from_ties = ((ratio - ratio.floor()) - 0.5).abs() > 1e-4
    ours = fake_quantize(x, scale, qmin, qmax)
    theirs = torch.fake_quantize_per_tensor_affine(x, scale, 0, qmin, qmax)
    assert torch.allclose(ours[away_from_ties], theirs[away_from_ties], rtol=1e-6, atol=0)


@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_matches_torch_fake_quantize_per_channel(axis):
    qmin, qmax = int_range(8, narrow=True)
    generator = torch.Generator().manual_seed(axis)
    x = torch.randn(6, 5, 3, 3, generator=generator)
    scales = torch.rand(x.shape[axis], generator=generator, dtype=torch.float64) * 0.05 + 0.005
    shape = [1] * x.ndim
    shape[axis] = -1
    ratio = x.double() / scales.reshape(shape)
    away_from_ties = ((ratio - ratio.floor()) - 0.5).abs() > 1e-4
    ours = fake_quantize(x, scales, qmin, qmax, axis=axis)
    theirs = torch.fake_quantize_per_channel_affine(
        x, scales.float(), torch.zeros(x.shape[axis], dtype=torch.int32), axis, qmin, qmax
    )
    assert torch.allclose(ours[away_from_ties], theirs[away_from_ties], rtol=1e-6, atol=0)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(bits):
    """|x - dq(q(x))| <= S/2 for x in [qmin*S, qmax*S]; outside, values saturate to the ends."""
    qmin, qmax = int_range(bits)
    scale = 0.173
    generator = torch.Generator().manual_seed(bits)
    inside = (torch.rand(5000, generator=generator, dtype=torch.float64) * (qmax - qmin) + qmin) * scale
    q = quantize(inside, scale, qmin, qmax)
    assert q.dtype == torch.int64 and int(q.min()) >= qmin and int(q.max()) <= qmax
    assert float((inside - dequantize(q, scale)).abs().max()) <= scale / 2 * (1 + 1e-12)
    outside = torch.tensor([qmin * scale * 10, qmax * scale * 10], dtype=torch.float64)
    assert quantize(outside, scale, qmin, qmax).tolist() == [qmin, qmax]


@pytest.mark.parametrize("bits", BITS)
def test_zero_and_grid_points_are_exact(bits):
    """Symmetric with zero point 0: 0 and every k * S survive a round trip unchanged."""
    qmin, qmax = int_range(bits, narrow=True)
    scale = 0.25
    grid = torch.arange(qmin, qmax + 1, dtype=torch.float64) * scale
    assert torch.equal(fake_quantize(grid, scale, qmin, qmax), grid)


def test_quantize_rejects_non_positive_scale():
    with pytest.raises(ValueError, match="scale must be > 0"):
        quantize(torch.ones(3), torch.tensor([1.0, 0.0, 1.0]), -127, 127)


# ---------------------------------------------------------------- fixed point


def test_quantize_multiplier_reconstructs_m_to_2_pow_minus_31():
    rng = random.Random(0)
    multipliers = [2.0 ** rng.uniform(-31.9, 29.9) for _ in range(2000)] + [1.0, 0.5, 2.0**-20, 3.0, 1 - 2**-40]
    for real_multiplier in multipliers:
        multiplier, shift = quantize_multiplier(real_multiplier)
        assert 2**30 <= multiplier < 2**31 and -31 <= shift <= 30
        reconstructed = multiplier * 2.0 ** (shift - 31)
        assert abs(reconstructed - real_multiplier) <= real_multiplier * 2.0**-31


def test_quantize_multiplier_special_cases():
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0**-33) == (0, 0)  # rounds every int32 accumulator to 0 anyway
    assert quantize_multiplier(1 - 2**-40) == (2**30, 1)  # mantissa rounds up to 1.0
    with pytest.raises(ValueError, match=r"real_multiplier must be finite and >= 0, got -0.5"):
        quantize_multiplier(-0.5)
    with pytest.raises(ValueError, match=r"real_multiplier must be < 2\^30"):
        quantize_multiplier(2.0**30)


def test_quantize_multipliers_is_elementwise():
    values = torch.tensor([0.0, 0.3, 7.5], dtype=torch.float64)
    multipliers, shifts = quantize_multipliers(values)
    assert [(int(m), int(s)) for m, s in zip(multipliers, shifts)] == [quantize_multiplier(float(v)) for v in values]


@pytest.mark.parametrize(
    ("acc", "real_multiplier", "expected"),
    [
        # single rounding: round half up (toward +infinity)
        (3, 0.5, 2),  # 1.5 -> 2: ties round up
        (-3, 0.5, -1),  # -1.5 -> -1: up is toward +infinity
        (-2, 0.25, 0),  # -0.5 -> 0
        (5, 0.5, 3),  # 2.5 -> 3 (round half to even would give 2)
        (7, 0.25, 2),  # 1.75 -> 2
        (-7, 0.25, -2),  # -1.75 -> -2
        (1000, 3.0, 127),  # saturates high
        (-1000, 3.0, -128),  # saturates low
        (21, 2.0, 42),  # M > 1: shift to the left
    ],
)
def test_single_rounding_hand_worked(acc, real_multiplier, expected):
    multiplier, shift = quantize_multiplier(real_multiplier)
    assert requantize_reference(acc, multiplier, shift, -128, 127, "single") == expected
    assert requantize(torch.tensor([acc]), multiplier, shift, -128, 127, "single").tolist() == [expected]


@pytest.mark.parametrize(
    ("acc", "real_multiplier", "expected"),
    [
        # M = 0.5 is 2^30 * 2^(0 - 31): shift 0, so only the high word's rounding acts, and its ties go up
        (3, 0.5, 2),  # (3 * 2^30 + 2^30) / 2^31 = 2
        (-3, 0.5, -1),  # (-3 * 2^30 + 1 - 2^30) / 2^31 = -1.99.. -> -1 (truncated toward zero)
        (-1, 0.5, 0),  # -0.5 -> 0
        # M = 0.25 is shift -1: the high word is exact (acc * 2^30 / 2^31 = acc / 2), then RoundingDivideByPOT
        # halves it rounding ties away from zero
        (2, 0.25, 1),  # 0.5 -> 1
        (-2, 0.25, -1),  # high -1 (-1.49.. truncated), then -0.5 -> -1: single rounding gives 0
        (6, 0.25, 2),  # 1.5 -> 2
        (-6, 0.25, -2),  # -1.5 -> -2: single rounding gives -1
        (7, 0.25, 2),  # 1.75 -> 2
        (-7, 0.25, -2),
        # the two roundings compound: 0.4729 -> high 1 (0.9458 rounded) -> 0.5 -> 1; single rounding gives 0
        (1, 2031111647 * 2.0**-32, 1),
        # M >= 1: the accumulator is shifted left first (M = 1.5: multiplier 3 * 2^29, shift 1)
        (1, 1.5, 2),  # x = 2, high (2 * 3 * 2^29 + 2^30) / 2^31 = 2: 1.5 -> 2
        (-1, 1.5, -1),  # x = -2, high -1.99.. -> -1: -1.5 -> -1 (the high word's tie goes up)
        (21, 2.0, 42),
        (1000, 3.0, 127),  # saturates high
        (-1000, 3.0, -128),  # saturates low
    ],
)
def test_double_rounding_hand_worked(acc, real_multiplier, expected):
    multiplier, shift = quantize_multiplier(real_multiplier)
    assert requantize_reference(acc, multiplier, shift, -128, 127, "double") == expected
    assert requantize(torch.tensor([acc]), multiplier, shift, -128, 127, "double").tolist() == [expected]
    assert requantize(torch.tensor([acc]), multiplier, shift, -128, 127).tolist() == [expected]  # the default


def _exact_ties(multiplier: int, total_shift: int) -> list[int]:
    """Accumulators with acc * multiplier an odd multiple of 2^(total_shift - 1): exactly half a step."""
    if multiplier == 0:
        return []
    twos = (multiplier & -multiplier).bit_length() - 1  # multiplier = odd * 2^twos
    if twos > total_shift - 1:
        return []
    unit = 1 << (total_shift - 1 - twos)
    return [odd * unit for odd in (1, -1, 3, -3, 255, -255)]


@pytest.mark.parametrize("rounding", ["double", "single"])
def test_requantize_matches_python_reference_bit_exactly(rounding):
    rng = random.Random(1)
    int32_min, int32_max = int_range(32)
    extreme_multipliers = [(2**30, -31), (2**31 - 1, -31), (2**30, 30), (2**31 - 1, 30), (0, 0), (2**31 - 1, 0)]
    pairs = extreme_multipliers + [quantize_multiplier(2.0 ** rng.uniform(-32, 8)) for _ in range(60)]
    edges = [0, 1, -1, int32_min, int32_max, int32_min + 1, 2**30, -(2**30)]
    for multiplier, shift in pairs:
        ties = _exact_ties(multiplier, 31 - shift)
        accs = edges + ties
        accs += [rng.randint(int32_min, int32_max) for _ in range(40)] + [rng.randint(-5000, 5000) for _ in range(40)]
        # double rounding shifts acc left by a positive shift in int32 first: only accumulators it fits
        lift = 2 ** max(shift, 0) if rounding == "double" else 1
        accs = [acc for acc in accs if int32_min <= acc * lift <= int32_max]
        for qmin, qmax in [(-128, 127), (0, 127), int_range(32)]:
            expected = [requantize_reference(acc, multiplier, shift, qmin, qmax, rounding) for acc in accs]
            got = requantize(torch.tensor(accs, dtype=torch.int64), multiplier, shift, qmin, qmax, rounding)
            assert got.tolist() == expected, (multiplier, shift, qmin, qmax)


def test_single_rounding_reference_is_floor_of_exact_product_plus_half():
    """The reference itself against exact rational arithmetic: floor(acc * M + 1/2)."""
    rng = random.Random(2)
    for _ in range(500):
        multiplier, shift = quantize_multiplier(2.0 ** rng.uniform(-20, 5))
        acc = rng.randint(-(2**20), 2**20)
        exact = Fraction(acc * multiplier) * Fraction(2) ** (shift - 31)
        expected = math.floor(exact + Fraction(1, 2))
        assert requantize_reference(acc, multiplier, shift, -(2**40), 2**40, "single") == expected


def _round_half_up(value: Fraction) -> int:
    return math.floor(value + Fraction(1, 2))


def _round_half_away_from_zero(value: Fraction) -> int:
    magnitude = math.floor(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def test_double_rounding_reference_is_two_exact_roundings():
    """The reference against exact rationals: the high word acc * 2^max(s,0) * m / 2^31 rounded half up, then
    divided by 2^max(-s,0) rounded half away from zero; and never more than one step from single rounding."""
    rng = random.Random(3)
    for _ in range(2000):
        multiplier, shift = quantize_multiplier(2.0 ** rng.uniform(-25, 3))
        acc = rng.randint(-(2**20), 2**20) >> rng.randint(0, 20)
        high = _round_half_up(Fraction(acc * 2 ** max(shift, 0) * multiplier, 2**31))
        expected = _round_half_away_from_zero(Fraction(high, 2 ** max(-shift, 0)))
        got = requantize_reference(acc, multiplier, shift, -(2**40), 2**40, "double")
        assert got == expected
        assert abs(got - requantize_reference(acc, multiplier, shift, -(2**40), 2**40, "single")) <= 1


def test_requantize_per_channel_broadcast():
    acc = torch.tensor([[10, 10, 10], [-10, -10, -10]])
    pairs = [quantize_multiplier(m) for m in (0.5, 1.0, 0.1)]
    multiplier = torch.tensor([m for m, _ in pairs]).reshape(1, -1)
    shift = torch.tensor([s for _, s in pairs]).reshape(1, -1)
    assert requantize(acc, multiplier, shift, -128, 127).tolist() == [[5, 10, 1], [-5, -10, -1]]
    # The result takes the broadcast shape of all three, even where acc is the smallest, and acc is not modified.
    one_acc = torch.tensor(10)
    expected = [[requantize_reference(10, int(multiplier[0, 0]), int(s), -128, 127) for s in shift[0]]]
    assert requantize(one_acc, multiplier[0, 0], shift, -128, 127).tolist() == expected
    assert one_acc.item() == 10


def test_requantize_rejects_bad_inputs():
    multiplier, shift = quantize_multiplier(0.5)
    with pytest.raises(TypeError, match="acc must be an integer tensor"):
        requantize(torch.tensor([1.0]), multiplier, shift, -128, 127)
    with pytest.raises(ValueError, match=r"acc must hold int32 values"):
        requantize(torch.tensor([2**31]), multiplier, shift, -128, 127)
    with pytest.raises(ValueError, match=r"multiplier must be in \[0, 2\^31\)"):
        requantize(torch.tensor([1]), -5, shift, -128, 127)
    with pytest.raises(ValueError, match=r"rounding must be one of \('double', 'single'\), got 'nearest'"):
        requantize(torch.tensor([1]), multiplier, shift, -128, 127, "nearest")
    with pytest.raises(ValueError, match=r"double rounding shifts the accumulator left .* reach \[0, 2147483648\]"):
        requantize(torch.tensor([0, 2**30]), multiplier, 1, -128, 127, "double")
    with pytest.raises(ValueError, match=r"shift must be in \[-31, 30\]"):
        requantize(torch.tensor([1]), multiplier, 31, -128, 127)
