"""Leaky ReLU and hard swish: captured from modules and functions, integer ops equal to their pure-Python references
on every input code, close to the float functions, and refused where the integer form cannot hold them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.graph.capture import capture
from pipeline.graph.nodes import FloatGraph, HardSwish, LeakyReLU, UnsupportedModelError
from pipeline.graph.run import run_float
from pipeline.model_files import load_integer_model, save_integer_model
from pipeline.quant.engine import quantize_model_input, run_integer
from pipeline.quant.ops import hardswish, leaky_relu
from pipeline.quant.ops.base import BuildContext, TensorInfo
from pipeline.quant.scale_groups import nonnegative_tensors, scale_groups
from tests.integer_graphs import toy_model

# (input scale, output scale, bits, input signed): multipliers above and below 1, narrow and unsigned inputs.
SCALES = [(0.02, 0.02, 8, True), (0.05, 0.01, 8, True), (0.004, 0.03, 8, True), (0.1, 0.09, 4, True),
          (0.03, 0.02, 8, False), (0.5, 0.3, 6, False), (0.0007, 0.0005, 8, True)]


def context(scale_in: float, scale_out: float, bits: int, signed: bool) -> BuildContext:
    tensors = {"x": TensorInfo((4,), bits, torch.tensor(scale_in, dtype=torch.float64), signed),
               "y": TensorInfo((4,), bits, torch.tensor(scale_out, dtype=torch.float64), True)}
    return BuildContext(FloatGraph("x", "y", ()), tensors, None, {})


def every_code(ctx: BuildContext) -> torch.Tensor:
    qmin, qmax = ctx.tensors["x"].range
    return torch.arange(qmin, qmax + 1, dtype=torch.int64)


@pytest.mark.parametrize(("scale_in", "scale_out", "bits", "signed"), SCALES)
@pytest.mark.parametrize("slope", [0.0, 0.01, 0.1, 0.5, 1.5])
def test_leaky_relu_equals_its_reference_and_the_float_function_on_every_code(scale_in, scale_out, bits, signed, slope):
    ctx = context(scale_in, scale_out, bits, signed)
    node = leaky_relu.build(LeakyReLU("leaky", "x", "y", slope), ctx)
    codes = every_code(ctx)
    prepared = leaky_relu.prepare(node, _model(ctx), codes.device)
    engine = leaky_relu.run(node, prepared, {"x": codes.to(torch.float32).reshape(1, -1)}).reshape(-1)
    reference = torch.tensor([leaky_relu.leaky_relu_reference(int(q), node.positive, node.negative) for q in codes])
    assert torch.equal(engine.to(torch.int64), reference)
    real = (F.leaky_relu(codes.double() * scale_in, slope) / scale_out).clamp(*ctx.tensors["y"].range)
    # double rounding (the default, TFLite's LEAKY_RELU arithmetic): the high word is q * M * 2^e rounded (half a
    # unit of 2^-e), then divided by 2^e rounded (half a step): at most 0.5 + 2^-(e+1) steps from the float function,
    # e = max(-shift, 0); one rounding (e = 0) stays within half a step. M is within 2^-31 of its real value.
    exponents = [max(-int(rq.shift), 0) for rq in (node.positive, node.negative)]
    bound = max(0.5 + (0.5 / 2**exponent if exponent else 0.0) for exponent in exponents)
    assert (reference.double() - real).abs().max() <= bound + 1e-6


@pytest.mark.parametrize(("scale_in", "scale_out", "bits", "signed"), SCALES)
def test_hardswish_equals_its_reference_and_stays_within_a_step_of_the_float_function(scale_in, scale_out, bits, signed):
    ctx = context(scale_in, scale_out, bits, signed)
    node = hardswish.build(HardSwish("hswish", "x", "y"), ctx)
    codes = every_code(ctx)
    engine = hardswish.hardswish_integers(codes, node)
    reference = torch.tensor([hardswish.hardswish_reference(int(q), node) for q in codes])
    assert torch.equal(engine, reference)
    real = (F.hardswish(codes.double() * scale_in) / scale_out).clamp(node.clamp_min, node.clamp_max)
    # TFLite's 16-bit fixed point: within 0.53 of a step here, where exact rounding would be 0.5
    assert (reference.double() - real).abs().max() <= 0.6


def test_hardswish_multipliers_are_tflite_s_int16_downscale():
    assert hardswish.int16_multiplier(0.5) == (2**14, 0)
    assert hardswish.int16_multiplier(0.75) == (3 * 2**13, 0)
    assert hardswish.int16_multiplier(1.0 - 2**-17) == (2**15 - 1, 0)  # would round up to 2^15: saturates
    assert hardswish.int16_multiplier(3.0) == (3 * 2**13, 2)


def test_hardswish_refuses_scales_whose_output_shift_would_be_left():
    with pytest.raises(UnsupportedModelError, match="hswish.*exponents"):
        hardswish.build(HardSwish("hswish", "x", "y"), context(1.0, 0.001, 8, True))


def test_capture_takes_modules_and_functions_and_refuses_a_negative_slope():
    class Model(nn.Module):
        def __init__(self, slope: float = 0.2) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.leaky = nn.LeakyReLU(slope)
            self.swish = nn.Hardswish()
            self.fc = nn.Linear(4 * 30 * 30, 10)

        def forward(self, x):
            x = F.hardswish(F.leaky_relu(self.swish(self.leaky(self.conv(x))), negative_slope=0.05))
            return self.fc(x.flatten(1))

    graph = capture(Model())
    kinds = [(type(node).__name__, getattr(node, "negative_slope", None)) for node in graph.nodes]
    assert kinds[1:5] == [("LeakyReLU", 0.2), ("HardSwish", None), ("LeakyReLU", 0.05), ("HardSwish", None)]
    x = torch.randn(2, 3, 32, 32)
    model = Model()
    torch.testing.assert_close(run_float(capture(model), x), model.eval()(x), rtol=1e-5, atol=1e-5)
    # both rescale: each starts a scale group of its own, and neither output is non-negative by construction
    roots = set(scale_groups(graph))
    assert {node.output for node in graph.nodes[1:5]} <= roots
    assert not {node.output for node in graph.nodes[1:5]} & nonnegative_tensors(graph)
    with pytest.raises(UnsupportedModelError, match="negative_slope must be a number >= 0, got -0.1"):
        capture(Model(slope=-0.1))


def test_the_toy_s_integer_model_survives_its_file_and_runs_the_same(tmp_path):
    model = toy_model("rescaling-activations")
    assert {"IntLeakyReLU", "IntHardSwish"} <= {type(node).__name__ for node in model.nodes}
    save_integer_model(model, tmp_path / "model.npz")
    again = load_integer_model(tmp_path / "model.npz")
    assert [type(node) for node in again.nodes] == [type(node) for node in model.nodes]
    for saved, loaded in zip(model.nodes, again.nodes, strict=True):
        if isinstance(saved, hardswish.IntHardSwish):
            assert saved == loaded  # integers only
        if isinstance(saved, leaky_relu.IntLeakyReLU):
            assert loaded.negative_slope == saved.negative_slope
            assert torch.equal(loaded.negative.multiplier, saved.negative.multiplier)
    images = quantize_model_input(model, torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    assert torch.equal(run_integer(again, images), run_integer(model, images))


def _model(ctx: BuildContext):
    class _Tensors:
        tensors = ctx.tensors

    return _Tensors()
