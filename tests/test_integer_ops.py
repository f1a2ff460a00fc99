"""Add, average pool and concat requantization bit-exact against the pure-Python integer references."""
from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.quant.fixed_point import quantize_multiplier, quantize_multipliers
from pipeline.quant.ops.add import ADD_LEFT_SHIFT, add_integers, add_reference
from pipeline.quant.ops.avgpool import (
    IntAvgPool,
    avgpool_integers,
    avgpool_reference,
    mean_requantization,
    window_means,
)
from pipeline.quant.ops.base import Requantize, activation_clamp
from pipeline.quant.ops.concat import concat_integers, concat_reference
from pipeline.quant.ops.rescale import apply_requantize
from pipeline.quant.ranges import INT32_MAX, INT32_MIN
from tests.integer_graphs import toy_model

EVERY_INT8 = torch.arange(-128, 128, dtype=torch.int64)


def requantization(real: float, low: int = -128, high: int = 127, rounding: str = "double") -> Requantize:
    multiplier, shift = quantize_multipliers(torch.tensor(real, dtype=torch.float64))
    return Requantize(multiplier.to(torch.int32), shift.to(torch.int32), low, high, rounding)


def add_parameters(scale_a: float, scale_b: float, scale_out: float, clamp=(-128, 127), rounding: str = "double"):
    twice_max = 2 * max(scale_a, scale_b)
    inputs = (requantization(scale_a / twice_max, INT32_MIN, INT32_MAX, rounding),
              requantization(scale_b / twice_max, INT32_MIN, INT32_MAX, rounding))
    return inputs, requantization(twice_max / 2**ADD_LEFT_SHIFT / scale_out, *clamp, rounding)


# Input scales both larger and smaller than the output's; output multipliers above 1 (shift > 0) and below.
ADD_SCALES = [(0.02, 0.05, 0.04), (0.1, 0.01, 0.03), (0.01, 0.01, 0.5), (0.2, 0.03, 0.011), (0.003, 0.004, 0.002)]


@pytest.mark.parametrize(("scale_a", "scale_b", "scale_out"), ADD_SCALES)
@pytest.mark.parametrize("clamp", [(-128, 127), (0, 127), (0, 40)])
def test_add_equals_the_reference_on_every_int8_pair(scale_a, scale_b, scale_out, clamp):
    input_rq, output_rq = add_parameters(scale_a, scale_b, scale_out, clamp)
    a, b = (grid.reshape(1, -1) for grid in torch.meshgrid(EVERY_INT8, EVERY_INT8, indexing="ij"))
    got = add_integers(a, b, ADD_LEFT_SHIFT, input_rq, output_rq)
    expected = [add_reference(int(x), int(y), ADD_LEFT_SHIFT, input_rq, output_rq) for x, y in zip(a[0], b[0])]
    assert got.reshape(-1).tolist() == expected
    assert int(got.min()) >= clamp[0] and int(got.max()) <= clamp[1]
    if clamp == (-128, 127):  # the rescale is accurate: within one step of the real sum, away from saturation
        real = (a * scale_a + b * scale_b) / scale_out
        inside = real.abs() < 120
        assert float((got[inside] - real[inside]).abs().max()) <= 1.0


# single rounding takes ties up, double rounding (TFLite's) away from zero
@pytest.mark.parametrize(("rounding", "expected"), [("single", [1, 0, 2, -1, 127, -128]),
                                                    ("double", [1, -1, 2, -2, 127, -128])])
def test_add_saturates_and_rounds_ties_by_its_rule(rounding, expected):
    # Scales equal and the output scale twice them: a + b = odd gives an exact .5 tie
    input_rq, output_rq = add_parameters(0.5, 0.5, 1.0, rounding=rounding)
    a = torch.tensor([[1, -1, 3, -3, 127, -128]])
    b = torch.tensor([[0, 0, 0, 0, 127, -128]])
    assert add_integers(a, b, ADD_LEFT_SHIFT, input_rq, output_rq).tolist() == [expected]
    assert [add_reference(int(x), int(y), ADD_LEFT_SHIFT, input_rq, output_rq) for x, y in zip(a[0], b[0])] == \
        expected


def pool(kernel, stride, padding, rq: Requantize, mean_zero_point: int | None = None) -> IntAvgPool:
    return IntAvgPool("pool", "x", "y", kernel, stride, padding, rq, mean_zero_point)


WINDOWS = [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((4, 4), (4, 4), (0, 0)), ((2, 3), (1, 2), (1, 1))]


# the mean forms are built for unpadded windows only
@pytest.mark.parametrize(("kernel", "stride", "padding", "form"),
                         [(*window, "sum") for window in WINDOWS]
                         + [(*window, form) for window in WINDOWS if window[2] == (0, 0)
                            for form in ("mean", "unsigned mean")])
@pytest.mark.parametrize("ratio", [1.0, 0.37, 2.5])  # S_in / S_out: the output finer, coarser, equal
def test_average_pool_equals_the_reference_window_by_window(kernel, stride, padding, form, ratio):
    generator = torch.Generator().manual_seed(kernel[0] * 10 + stride[1])
    low, high = (0, 256) if form == "unsigned mean" else (-128, 128)
    x = torch.randint(low, high, (2, 3, 6, 7), generator=generator)
    x[0, 0] = high - 1  # saturating windows
    x[1, 1] = low
    area = kernel[0] * kernel[1]
    if form == "sum":
        node = pool(kernel, stride, padding, requantization(ratio / area))
    else:
        node = pool(kernel, stride, padding, requantization(ratio), 0 if form == "mean" else 128)
    got = avgpool_integers(x, node)
    padded = torch.nn.functional.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    for n, c, i, j in itertools.product(*(range(size) for size in got.shape)):
        window = padded[n, c, i * stride[0] : i * stride[0] + kernel[0], j * stride[1] : j * stride[1] + kernel[1]]
        assert int(got[n, c, i, j]) == avgpool_reference(window.reshape(-1).tolist(), node)


@pytest.mark.parametrize(("rounding", "expected"), [("single", [1, 0, 2, -1]), ("double", [1, -1, 2, -2])])
def test_average_pool_rounds_ties_by_its_rule_including_negative_ones(rounding, expected):
    x = torch.tensor([[[[1, 1], [0, 0]], [[-1, -1], [0, 0]], [[3, 2], [1, 0]], [[-3, -2], [-1, 0]]]])
    # the sum times M = 1/4 in one rescale: each rule's ties
    node = pool((2, 2), (2, 2), (0, 0), requantization(1 / 4, rounding=rounding))
    assert avgpool_integers(x, node).reshape(-1).tolist() == expected
    # TFLite's AVERAGE_POOL_2D: the mean rounded half away from zero, then M = 1 (an identity)
    mean = pool((2, 2), (2, 2), (0, 0), requantization(1.0, rounding=rounding), 0)
    assert avgpool_integers(x, mean).reshape(-1).tolist() == [1, -1, 2, -2]


def test_an_unsigned_mean_rounds_where_tflite_stores_it():
    """An unsigned tensor is stored as q - 128 in a .tflite; AVERAGE_POOL_2D rounds that mean half away from zero:
    a mean of 127.5 (stored -0.5) goes to 127, a mean of 128.5 (stored 0.5) to 129."""
    x = torch.tensor([[[[127, 128], [127, 128]], [[128, 129], [128, 129]]]])
    node = pool((2, 2), (2, 2), (0, 0), requantization(1.0, 0, 255), 128)
    assert avgpool_integers(x, node).reshape(-1).tolist() == [127, 129]
    assert window_means(torch.tensor([510, 514]), 4, 128).tolist() == [127, 129]
    assert window_means(torch.tensor([510, 514]), 4, 0).tolist() == [128, 129]  # signed: 127.5 -> 128


def test_a_global_average_pool_is_tflite_mean():
    """A global pool folds 1/n into the multiplier as TFLite's int8 MEAN: exactly M / n for n = 64, and for n = 9
    the integer division's multiplier (below 2^30), with the output still the mean within one step."""
    exact = mean_requantization(0.8, 64, (-128, 127), "double")
    assert (int(exact.multiplier), int(exact.shift)) == quantize_multiplier(0.8 / 64)
    folded = mean_requantization(0.52, 9, (-128, 127), "double")
    multiplier, shift = quantize_multiplier(0.52)
    assert (int(folded.multiplier), int(folded.shift)) == ((multiplier << 3) // 9, shift - 3)
    assert 2**29 < int(folded.multiplier) < 2**30
    sums = torch.arange(-9 * 128, 9 * 127 + 1).reshape(1, 1, -1)
    means = apply_requantize(sums, folded)
    assert float((means - sums * 0.52 / 9).abs().max()) <= 1


@pytest.mark.parametrize("ratio", [1.0, 0.5, 0.3, 1.7, 3.0])
def test_concat_requantizes_each_input_to_the_output_scale(ratio):
    rq = None if ratio == 1.0 else requantization(ratio)
    x = EVERY_INT8.reshape(1, 1, 16, 16)
    other = torch.zeros(1, 2, 16, 16, dtype=torch.int64)
    got = concat_integers([x, other], (rq, None))
    assert got.shape == (1, 3, 16, 16) and torch.equal(got[:, 1:], other)
    assert got[0, 0].reshape(-1).tolist() == [concat_reference(int(v), rq) for v in EVERY_INT8]


def test_a_unit_multiplier_maps_every_integer_to_itself():
    assert concat_integers([EVERY_INT8.reshape(1, 1, 16, 16)], (requantization(1.0),)).reshape(-1).tolist() == \
        EVERY_INT8.tolist()


def test_relu6_clamp_is_quantize_of_min_six():
    assert activation_clamp("relu6", 0.05, -128, 127) == (0, 120)
    assert activation_clamp("relu6", 0.01, -128, 127) == (0, 127)  # 6 is beyond the range: the int8 max
    assert activation_clamp("relu", 0.05, -128, 127) == (0, 127)
    assert activation_clamp("none", 0.05, -128, 127) == (-128, 127)


def test_build_gives_adds_the_tflite_parameters():
    model = toy_model("residual", "per_tensor")
    add = next(node for node in model.nodes if type(node).__name__ == "IntAdd")
    scale_a, scale_b = (float(model.tensors[name].scale) for name in add.inputs)
    scale_out = float(model.tensors[add.output].scale)
    twice_max = 2 * max(scale_a, scale_b)
    for rq, scale in zip(add.input_requantize, (scale_a, scale_b)):
        real = int(rq.multiplier) * 2.0 ** (int(rq.shift) - 31)
        assert real == pytest.approx(scale / twice_max, rel=2**-30) and real <= 0.5
    real_out = int(add.output_requantize.multiplier) * 2.0 ** (int(add.output_requantize.shift) - 31)
    assert real_out == pytest.approx(twice_max / 2**ADD_LEFT_SHIFT / scale_out, rel=2**-30)
    assert add.activation == "relu" and add.output_requantize.clamp_min == 0
