"""The TFLite exporter: TensorFlow Lite Micro runs its files integer for integer as the engine does, and it refuses,
naming the node, what TFLite would compute otherwise."""
from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import tflite
import torch

from pipeline.export import tflite_model as T
from pipeline.export.tflite_run import (
    arena_bound,
    run_litert_reference,
    run_tflm,
    tflm_arena_bytes,
)
from pipeline.quant.engine import (
    integer_tensor_outputs,
    quantize_model_input,
    run_integer,
)
from pipeline.quant.fixed_point import quantize_multiplier, requantize_reference
from pipeline.quant.ir import IntegerModel
from pipeline.quant.ops.avgpool import IntAvgPool
from pipeline.quant.ops.base import TensorInfo, requantization
from pipeline.quant.ops.conv import IntConv
from pipeline.quant.ops.hardswish import IntHardSwish, int16_multiplier
from pipeline.quant.ops.leaky_relu import IntLeakyReLU
from pipeline.quant.ranges import ActivationFormat
from pipeline.transforms import SEED_MEAN, SEED_STD
from tests.integer_graphs import FORMATS, cifar_model, random_uint8_images, toy_model

# ---------------------------------------------------------------- models TFLite can hold


def with_narrower_logits(model: IntegerModel, factor: float) -> IntegerModel:
    """The int8 logits' scale times ``factor`` (< 1 saturates some), the last layer's multiplier as TFLite derives it."""
    last = model.nodes[-1]
    tensors = dict(model.tensors)
    scale = float(np.float32(float(model.output_scale) * factor))
    tensors[model.output] = replace(tensors[model.output], scale=torch.tensor(scale, dtype=torch.float64))
    s_in, weight_scales = float(tensors[last.input].scale), last.weight_scale.reshape(-1).tolist()
    if last.kind == "linear" and len(weight_scales) == 1:
        pairs = [T.fully_connected_multiplier(s_in, weight_scales[0], scale)]
    else:
        pairs = T.conv_multipliers(s_in, weight_scales, scale)
    multiplier = torch.tensor([m for m, _ in pairs], dtype=torch.int32)
    shift = torch.tensor([s for _, s in pairs], dtype=torch.int32)
    if len(pairs) == 1:
        multiplier, shift = multiplier[0], shift[0]
    rq = replace(last.requantize, multiplier=multiplier, shift=shift)
    return replace(model, tensors=tensors, nodes=[*model.nodes[:-1], replace(last, requantize=rq)])


def images(model: IntegerModel, count: int, seed: int) -> torch.Tensor:
    """int8 engine inputs of random CIFAR-like images."""
    x = random_uint8_images(count, seed).permute(0, 3, 1, 2).to(torch.float32) / 255
    mean, std = torch.tensor(SEED_MEAN).view(1, 3, 1, 1), torch.tensor(SEED_STD).view(1, 3, 1, 1)
    return quantize_model_input(model, (x - mean) / std)


def tflite_toy(name: str, format_name: str | None = None, granularity: str = "per_channel"
               ) -> tuple[IntegerModel, torch.Tensor]:
    """A toy model built with int8 logits (the pipeline's default), and 8 images to run (not the calibration ones)."""
    model = toy_model(name, granularity, activation_format=FORMATS[format_name] if format_name else ActivationFormat(),
                      logits="int8")
    return model, images(model, 8, seed=11)


def opcodes(blob: bytes) -> list[str]:
    names = {value: key for key, value in vars(tflite.BuiltinOperator).items() if not key.startswith("_")}
    model = tflite.Model.GetRootAsModel(blob, 0)
    graph = model.Subgraphs(0)
    return [names[model.OperatorCodes(graph.Operators(i).OpcodeIndex()).BuiltinCode()]
            for i in range(graph.OperatorsLength())]


def tensor_types(blob: bytes) -> dict[str, int]:
    graph = tflite.Model.GetRootAsModel(blob, 0).Subgraphs(0)
    return {graph.Tensors(i).Name().decode(): graph.Tensors(i).Type() for i in range(graph.TensorsLength())}


# ---------------------------------------------------------------- TFLite's arithmetic, written from its C


def multiply_by_quantized_multiplier_c(x: int, multiplier: int, shift: int) -> int:
    """common.cc's double-rounding MultiplyByQuantizedMultiplier, one int32 at a time, as its C reads."""
    x = x * (1 << max(shift, 0))
    product = x * multiplier
    nudge = (1 << 30) if product >= 0 else 1 - (1 << 30)
    total = product + nudge
    high = abs(total) >> 31 if total >= 0 else -(abs(total) >> 31)  # C's division truncates toward zero
    exponent = max(-shift, 0)
    mask = (1 << exponent) - 1
    remainder, threshold = high & mask, (mask >> 1) + (1 if high < 0 else 0)
    return (high >> exponent) + (1 if remainder > threshold else 0)


def test_multipliers_round_ties_away_from_zero_and_mean_folds_in_the_count():
    assert quantize_multiplier(0.5 + 2.0**-32) == (2**30 + 1, 0)  # std::round, not round-half-even
    assert quantize_multiplier(0.75) == (3 << 29, 0) and quantize_multiplier(3.0) == (3 << 29, 2)
    assert quantize_multiplier(2.0**-40) == (0, 0)
    assert T.mean_multiplier(1.0, 1.0, 16) == (2**30, 1 - 4)  # a power of two: the multiplier unchanged
    assert T.mean_multiplier(1.0, 1.0, 9) == ((2**30 << 3) // 9, 1 - 3)
    # per-tensor FULLY_CONNECTED multiplies the scales in float32 first
    s_in, s_w, s_out = 0.1, 0.3, 0.7
    assert T.fully_connected_multiplier(s_in, s_w, s_out) == quantize_multiplier(
        float(np.float32(s_in) * np.float32(s_w)) / float(np.float32(s_out)))


def test_the_engines_double_rounding_is_tflite_multiply_by_quantized_multiplier():
    rng = random.Random(0)
    cases = [(rng.randint(-(2**20), 2**20), rng.randint(2**30, 2**31 - 1), rng.randint(-20, 3)) for _ in range(2000)]
    cases += [(x, 2**30, -1) for x in range(-9, 10)]  # ties: half away from zero
    for x, m, s in cases:
        assert requantize_reference(x, m, s, -(2**31), 2**31 - 1, "double") == multiply_by_quantized_multiplier_c(
            x, m, s), (x, m, s)


def test_fused_clamp_rounds_six_over_the_float32_scale_half_away_from_zero():
    info = TensorInfo((1,), 8, torch.tensor(6 / 20.5, dtype=torch.float64))  # 6 / scale = 20.5: std::round -> 21
    assert T.fused_clamp(tflite.ActivationFunctionType.RELU6, info) == (0, 21)
    unsigned = replace(info, signed=False)
    assert T.fused_clamp(tflite.ActivationFunctionType.RELU, unsigned) == (0, 255)


# ---------------------------------------------------------------- TFLM against the engine


@pytest.mark.parametrize(("name", "format_name", "granularity"), [
    ("depthwise", None, "per_channel"),  # PAD, depthwise, grouped, ReLU6, concat, PADV2 max pool, MEAN, FC
    ("depthwise", "unsigned-a4", "per_tensor"),  # unsigned 4-bit: MINIMUM / MAXIMUM after every rescale
    ("depthwise", "a4", "per_channel"),
    ("shared-relu", None, "per_tensor"),  # standalone ReLU, add of two scales, flatten of a map into a linear layer
    ("shared-relu", "unsigned", "per_channel"),
    ("reused-modules", "unsigned-a6", "per_channel"),  # add with a fused ReLU, max pools
])
def test_tflm_gives_the_engine_logits(name, format_name, granularity):
    model, x = tflite_toy(name, format_name, granularity)
    assert torch.equal(run_tflm(T.build_tflite(model), x, progress=False), run_integer(model, x).to(torch.int64))


@pytest.mark.parametrize(("name", "format_name"), [("depthwise", "unsigned-a4"), ("shared-relu", "unsigned")])
def test_tflm_gives_every_intermediate_tensor_of_the_engine(name, format_name):
    """Each node's output as the file's output (a flatten read by no linear layer is transposed to (C, H, W) order)."""
    model, x = tflite_toy(name, format_name)
    expected = integer_tensor_outputs(model, x)
    for index, node in enumerate(model.nodes[:-1]):
        truncated = replace(model, output=node.output, nodes=model.nodes[: index + 1])
        got = run_tflm(T.build_tflite(truncated), x, progress=False)
        assert torch.equal(got, expected[node.output]), node.name


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("format_name", [None, "unsigned", "a4", "unsigned-a4"])
def test_tflm_gives_the_engine_leaky_relu_and_hard_swish(format_name, granularity):
    """conv, LeakyReLU(0.1), conv, Hardswish, conv, ReLU, leaky_relu(0.25), add, max pool, hardswish, linear: the logits
    and every intermediate tensor."""
    model, x = tflite_toy("rescaling-activations", format_name, granularity)
    blob = T.build_tflite(model)
    assert {"HARD_SWISH", "MUL", "QUANTIZE", "MAXIMUM"} <= set(opcodes(blob))
    assert torch.equal(run_tflm(blob, x, progress=False), run_integer(model, x).to(torch.int64))
    expected = integer_tensor_outputs(model, x)
    for index, node in enumerate(model.nodes[:-1]):
        truncated = replace(model, output=node.output, nodes=model.nodes[: index + 1])
        assert torch.equal(run_tflm(T.build_tflite(truncated), x, progress=False), expected[node.output]), node.name


def one_node_model(node, s_in: float, s_out: float, bits: int = 8) -> IntegerModel:
    """``node`` reading a signed int8 (1, 16, 16) input at ``s_in`` and writing a signed ``bits`` output at ``s_out``."""
    tensors = {"x": TensorInfo((1, 16, 16), 8, torch.tensor(s_in, dtype=torch.float64)),
               "y": TensorInfo((1, 16, 16), bits, torch.tensor(s_out, dtype=torch.float64))}
    return IntegerModel("x", "y", tensors, [node])


EVERY_CODE = torch.arange(-128, 128, dtype=torch.int8).reshape(1, 1, 16, 16)


def leaky_node(s_in: float, s_out: float, slope: float, bits: int = 8) -> IntegerModel:
    s_in, s_out = float(np.float32(s_in)), float(np.float32(s_out))
    clamp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    ratio = s_in / s_out
    node = IntLeakyReLU("leaky", "x", "y", slope, requantization(ratio, clamp, "double"),
                        requantization(slope * ratio, clamp, "double"))
    return one_node_model(node, s_in, s_out, bits)


def hardswish_node(s_in: float, s_out: float, bits: int = 8) -> IntegerModel:
    s_in, s_out = float(np.float32(s_in)), float(np.float32(s_out))
    hires = s_in / 128
    output = int16_multiplier(hires / s_out)
    reluish = int16_multiplier(hires / (3.0 / 2**15))
    node = IntHardSwish("hardswish", "x", "y", *reluish, *output, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return one_node_model(node, s_in, s_out, bits)


@pytest.mark.parametrize(("s_in", "s_out", "slope", "bits", "op"), [
    (0.05, 0.031, 0.1, 8, "MAXIMUM"),  # MUL for the negative side, MAXIMUM of the two
    (0.013, 0.0717, 0.01, 8, "MAXIMUM"),
    (0.02, 0.0123, 1.7, 8, "MINIMUM"),  # a slope > 1: the negative side is the smaller
    (0.05, 0.031, 0.0, 8, "MAXIMUM"),  # slope 0: a maximum with the zero point
    (0.05, 0.1, 0.25, 8, "LEAKY_RELU"),  # power-of-two ratios: LEAKY_RELU's float32 multipliers are the engine's
    (0.04, 0.27, 0.3, 4, "MAXIMUM"),  # 4-bit output: MINIMUM / MAXIMUM after
])
def test_tflm_gives_the_engine_leaky_relu_of_every_input_code(s_in, s_out, slope, bits, op):
    model = leaky_node(s_in, s_out, slope, bits)
    blob = T.build_tflite(model)
    assert op in opcodes(blob)
    assert torch.equal(run_tflm(blob, EVERY_CODE, progress=False), run_integer(model, EVERY_CODE).to(torch.int64))


@pytest.mark.parametrize(("s_in", "s_out", "bits"), [
    (0.05, 0.031, 8), (0.02, 0.01, 8), (0.1, 0.09, 8), (0.3, 0.25, 8), (0.004, 0.002, 8), (0.05, 0.2, 4),
])
def test_tflm_gives_the_engine_hard_swish_of_every_input_code(s_in, s_out, bits):
    model = hardswish_node(s_in, s_out, bits)
    assert torch.equal(run_tflm(T.build_tflite(model), EVERY_CODE, progress=False),
                       run_integer(model, EVERY_CODE).to(torch.int64))


def test_the_file_pads_with_pad_where_same_differs_and_clamps_narrow_activations():
    model, _ = tflite_toy("depthwise", "unsigned-a4")
    ops = opcodes(T.build_tflite(model))
    # stride-2 conv padded 1 (TFLite's SAME would pad 0 before, 1 after) and the 3x3/2 max pool padded 1
    assert {"PAD", "PADV2", "DEPTHWISE_CONV_2D", "CONCATENATION", "QUANTIZE", "MEAN", "MINIMUM", "MAXIMUM"} <= set(ops)
    plain, _ = tflite_toy("depthwise")
    assert "MINIMUM" not in opcodes(T.build_tflite(replace(plain, nodes=plain.nodes[:2], output=plain.nodes[1].output)))


def test_int4_weights_are_packed_where_tflm_reads_them():
    model, x = tflite_toy("depthwise", granularity="per_tensor")
    nodes = [replace(node, weight=(node.weight.float() / 18).round().clamp(-7, 7).to(torch.int8))
             if isinstance(node, IntConv) else node for node in model.nodes]
    model = replace(model, nodes=nodes)
    blob = T.build_tflite(model)
    types = tensor_types(blob)
    assert types["stem/weight"] == types["depthwise/weight"] == types["fc/weight"] == tflite.TensorType.INT4
    assert torch.equal(run_tflm(blob, x, progress=False), run_integer(model, x).to(torch.int64))


def test_saturated_logits_match():
    model, x = tflite_toy("shared-relu")
    model = with_narrower_logits(model, 0.25)
    expected = run_integer(model, x).to(torch.int64)
    assert int((expected.abs() >= 127).sum()) > 0
    assert torch.equal(run_tflm(T.build_tflite(model), x, progress=False), expected)


def test_litert_reference_kernels_agree_where_they_share_tflm_arithmetic():
    pytest.importorskip("ai_edge_litert")
    model, x = tflite_toy("reused-modules", "unsigned")
    assert torch.equal(run_litert_reference(T.build_tflite(model), x, progress=False),
                       run_integer(model, x).to(torch.int64))


def test_save_writes_the_bytes_and_tflm_reports_its_arena(tmp_path):
    model, _ = tflite_toy("shared-relu")
    blob = T.save_tflite(model, tmp_path / "model.tflite")
    assert (tmp_path / "model.tflite").read_bytes() == blob == T.build_tflite(model)
    assert 0 < tflm_arena_bytes(blob) <= arena_bound(blob)


# ---------------------------------------------------------------- what it refuses


def test_refuses_int32_logits():
    with pytest.raises(ValueError, match="TFLite's FULLY_CONNECTED outputs int8.*needs int8 logits"):
        T.build_tflite(toy_model("shared-relu"))


def test_refuses_leaky_relu_and_hard_swish_multipliers_tflite_would_not_derive():
    model, _ = tflite_toy("rescaling-activations")
    leaky = model.nodes[1]
    assert isinstance(leaky, IntLeakyReLU)

    def with_node(index, node):
        return replace(model, nodes=[*model.nodes[:index], node, *model.nodes[index + 1:]])

    single = replace(leaky, positive=replace(leaky.positive, rounding="single"),
                     negative=replace(leaky.negative, rounding="single"))
    with pytest.raises(ValueError, match=r"node 1 \('leaky', IntLeakyReLU\) requantizes with 'single' rounding"):
        T.build_tflite(with_node(1, single))
    off = replace(leaky, positive=replace(leaky.positive, multiplier=leaky.positive.multiplier + 1))
    with pytest.raises(ValueError, match=r"\('leaky', IntLeakyReLU\): TFLite derives the non-negative side's"):
        T.build_tflite(with_node(1, off))
    index, hardswish = next((i, n) for i, n in enumerate(model.nodes) if isinstance(n, IntHardSwish))
    off = replace(hardswish, reluish_multiplier=hardswish.reluish_multiplier + 1)
    with pytest.raises(ValueError, match=r"IntHardSwish\): TFLite's HARD_SWISH derives the reluish int16"):
        T.build_tflite(with_node(index, off))


def test_refuses_a_leaky_relu_slope_no_float32_scales_reach():
    """slope 0.01 at s_out 0.07: M_neg / s_in is 1/7 to within 1e-8, and no C / Y with C, Y < 2^24 other than 1/7 is
    as close, so neither LEAKY_RELU (float32 ratios) nor MUL (s_in * s_c / s_y) derives the engine's multiplier."""
    with pytest.raises(ValueError, match=r"\('leaky', IntLeakyReLU\): TFLite derives neither LEAKY_RELU's"):
        T.build_tflite(leaky_node(0.013, 0.07, 0.01))


def test_refuses_a_hard_swish_whose_multiplier_tflite_derives_in_float32_otherwise():
    """The engine rounds hires / s_out to 16 bits from its float64 ratio, TFLite from a float32 one: where they
    differ, TFLite computes other integers."""
    rng = random.Random(1)
    for _ in range(20000):
        s_in, s_out = float(np.float32(rng.uniform(0.01, 0.1))), float(np.float32(rng.uniform(0.01, 0.1)))
        model = hardswish_node(s_in, s_out)
        node = model.nodes[0]
        if T.hard_swish_multipliers(s_in, s_out)[0] != (node.output_multiplier, node.output_exponent):
            break
    else:
        pytest.fail("no scales found where float32 and float64 ratios round to different int16 multipliers")
    with pytest.raises(ValueError, match=r"\('hardswish', IntHardSwish\): TFLite's HARD_SWISH derives the output"):
        T.build_tflite(model)


@pytest.mark.parametrize("name", ["residual", "mixed-sign"])
@pytest.mark.parametrize("format_name", [None, "unsigned", "a4", "unsigned-a4"])
def test_window_average_pools_run_as_average_pool_2d_then_quantize(name, format_name):
    """The engine's window pool (double rounding, no padding): TFLite's rounded mean, taken on the stored values
    (an unsigned tensor at zero point -128), then QUANTIZE to the output's scale."""
    model, x = tflite_toy(name, format_name)
    blob = T.build_tflite(model)
    assert {"AVERAGE_POOL_2D", "QUANTIZE"} <= set(opcodes(blob))
    assert torch.equal(run_tflm(blob, x, progress=False), run_integer(model, x).to(torch.int64))


def test_refuses_a_window_pool_that_rescales_its_sum():
    model = toy_model("residual", logits="int8")
    pool = next(node for node in model.nodes if isinstance(node, IntAvgPool))
    summed = replace(model, nodes=[replace(node, mean_zero_point=None) if node is pool else node
                                   for node in model.nodes])
    with pytest.raises(ValueError, match=rf"\('{pool.name}', IntAvgPool\) rescales its window sums in one rounding"):
        T.build_tflite(summed)


def test_refuses_single_rounding_and_multipliers_tflite_would_not_derive():
    model, _ = tflite_toy("shared-relu")
    fc = model.nodes[-1]
    single = replace(fc, requantize=replace(fc.requantize, rounding="single"))
    with pytest.raises(ValueError, match=r"\('fc', IntConv\) requantizes with 'single' rounding"):
        T.build_tflite(replace(model, nodes=[*model.nodes[:-1], single]))
    off = replace(fc, requantize=replace(fc.requantize, multiplier=fc.requantize.multiplier + 1))
    with pytest.raises(ValueError, match=r"\('fc', IntConv\): TFLite derives the output \(multiplier, shift\)"):
        T.build_tflite(replace(model, nodes=[*model.nodes[:-1], off]))


@pytest.mark.parametrize(("name", "granularity", "format_name"), [
    ("net", "per_tensor", None), ("bnnet", "per_tensor", None), ("resnet20", "per_channel", None),
    ("mobilenet", "per_channel", None), ("resnet20", "per_channel", "unsigned-a4"), ("net", "per_tensor", "a4"),
])
def test_the_built_in_models_run_in_tflm_as_in_the_engine(name, granularity, format_name):
    """The pipeline's own models, built as the quantize-biases stage builds them (double rounding, int8 logits)."""
    model = cifar_model(name, granularity, activation_format=FORMATS[format_name] if format_name else ActivationFormat(),
                        logits="int8")
    x = images(model, 6, seed=3)
    assert torch.equal(run_tflm(T.build_tflite(model), x, progress=False), run_integer(model, x).to(torch.int64))
