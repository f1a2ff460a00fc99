"""The integer model and engine: weights and biases, building from a graph, the engine, save/load."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.graph.capture import capture
from pipeline.graph.nodes import numel
from pipeline.graph.run import run_float
from pipeline.model_files import (
    ROUNDING_TEXT,
    SCHEME,
    load_integer_model,
    save_integer_model,
)
from pipeline.models import Net, build_model
from pipeline.quant import engine
from pipeline.quant.build import build_integer_model
from pipeline.quant.engine import (
    QuantizedNet,
    dequantize_logits,
    integer_tensor_outputs,
    quantize_input,
    quantize_model_input,
    run_integer,
    run_simulated,
)
from pipeline.quant.fixed_point import requantize_reference
from pipeline.quant.ops.conv import IntConv, PreparedLayer, layer_plan, quantize_bias
from pipeline.quant.ranges import (
    ActivationFormat,
    accumulator_bound,
    check_accumulator,
    dequantize,
)
from pipeline.quant.scale_groups import group_ranges, scale_groups, tensor_signedness
from pipeline.quant.weights import (
    dequantized_weights,
    quantize_layer_weights,
    quantize_model_weights,
    run_weight_only,
)
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize
from tests.integer_graphs import (
    FORMATS,
    TOYS,
    MixedSignToy,
    cifar_model,
    random_uint8_images,
    toy_model,
)

# ---------------------------------------------------------------- weights and biases


def test_quantize_layer_weights_seed_rule():
    weight = torch.randn(16, 6, 5, 5, generator=torch.Generator().manual_seed(2)) * 0.1
    q_weight, weight_scale = quantize_layer_weights(weight)
    mean, std = float(weight.double().mean()), float(weight.double().std())
    assert float(weight_scale) == pytest.approx((abs(mean) + 3 * std) / 127, rel=1e-12)
    assert q_weight.dtype == torch.int8 and int(q_weight.abs().max()) == 127  # 3 sigma clips the tails
    assert torch.equal(q_weight.long(), torch.round(weight.double() / weight_scale).clamp(-127, 127).long())


@pytest.mark.parametrize("bits", range(2, 9))
def test_quantize_layer_weights_per_channel_bits(bits):
    weight = torch.randn(8, 20, generator=torch.Generator().manual_seed(bits))
    q_weight, weight_scale = quantize_layer_weights(weight, bits, "minmax", "per_channel")
    qmax = 2 ** (bits - 1) - 1
    assert weight_scale.shape == (8,)
    assert q_weight.abs().amax(dim=1).tolist() == [qmax] * 8  # every channel reaches its max
    error = (weight.double() - dequantize(q_weight, weight_scale)).abs()
    assert bool((error <= weight_scale.reshape(-1, 1) / 2 + 1e-12).all())


def test_quantize_layer_weights_rejects_wide_bits():
    with pytest.raises(ValueError, match=r"bits \(weights are stored as int8\): value 9 is not allowed; allowed: an "
                                         r"integer in \[2, 8\]"):
        quantize_layer_weights(torch.ones(2, 2), bits=9)


def test_bias_rule_rounds_half_to_even():
    # S_in * S_w = 0.125 exactly, so 0.3125 / 0.125 = 2.5 is an exact tie
    bias = torch.tensor([0.3125, 0.4375, -0.1875, 1.0, 0.0])
    assert quantize_bias(bias, 0.25, torch.tensor(0.5), "fc1").tolist() == [2, 4, -2, 8, 0]
    per_channel = quantize_bias(torch.tensor([1.0, 1.0]), 0.5, torch.tensor([0.25, 0.5]), "fc1")
    assert per_channel.dtype == torch.int32 and per_channel.tolist() == [8, 4]


def test_bias_overflow_names_the_layer():
    with pytest.raises(OverflowError, match=r"layer 'conv2': bias\[1\] = 5.0 .* outside int32"):
        quantize_bias(torch.tensor([0.0, 5.0]), 1e-5, torch.tensor(1e-5), "conv2")


def test_depthwise_weights_are_quantized_per_output_channel():
    graph = capture(TOYS["depthwise"]().eval())
    weights = quantize_model_weights(graph, 8, "minmax", "per_channel")
    depthwise = next(node for node in graph.layers() if node.groups == node.weight.shape[0])
    q_weight, scale = weights[depthwise.name]
    assert q_weight.shape == depthwise.weight.shape and scale.shape == (depthwise.weight.shape[0],)
    assert q_weight.abs().reshape(len(scale), -1).amax(1).tolist() == [127] * len(scale)


# ---------------------------------------------------------------- building from a graph


@pytest.fixture(scope="module")
def net_and_data():
    graph = capture(build_model("net", seed=7))
    images = random_uint8_images(200, seed=8)
    x = normalize(images, SEED_MEAN, SEED_STD)
    ranges = {root: 4.0 for root in scale_groups(graph)}
    return graph, x, ranges


def test_scale_groups_join_tensors_that_keep_their_scale():
    graph = capture(Net())
    groups = scale_groups(graph)
    # conv1's output (after its fused ReLU, "relu1") and pool1's are one group, observed where conv2 reads it
    assert {root: (group.members, group.observed, group.read_by) for root, group in groups.items()} == {
        "input_1": (("input_1",), ("input_1",), ("conv1",)),
        "relu1": (("relu1", "pool1"), ("pool1",), ("conv2",)),
        "relu2": (("relu2", "pool2", "flatten"), ("flatten",), ("fc1",)),
        "relu3": (("relu3",), ("relu3",), ("fc2",)),
        "relu4": (("relu4",), ("relu4",), ("fc3",)),
    }


def test_integer_model_structure(net_and_data):
    graph, _, ranges = net_and_data
    model = build_integer_model(graph, ranges, quantize_model_weights(graph))
    assert [type(node).__name__ for node in model.nodes] == [
        "IntConv", "IntMaxPool", "IntConv", "IntMaxPool", "IntReshape", "IntConv", "IntConv", "IntConv"
    ]
    layers = model.layers()
    assert [layer.activation for layer in layers] == ["relu", "relu", "relu", "relu", "none"]
    assert [layer.requantize is None for layer in layers] == [False] * 4 + [True]
    assert model.input_scale == pytest.approx(4.0 / 127)
    for layer in layers[:-1]:
        product = model.input_scale_of(layer) * float(layer.weight_scale)
        if layer.kind == "linear":  # TFLite's per-tensor FULLY_CONNECTED takes S_in * S_w in float32
            product = float(np.float32(product))
        real = product / float(model.tensors[layer.output].scale)
        fixed = int(layer.requantize.multiplier) * 2.0 ** (int(layer.requantize.shift) - 31)
        assert fixed == pytest.approx(real, rel=2**-30)
        assert (layer.requantize.clamp_min, layer.requantize.clamp_max) == (0, 127)  # the fused ReLU
    last = layers[-1]
    assert model.tensors[model.output].bits == 32
    assert float(model.output_scale) == pytest.approx(model.input_scale_of(last) * float(last.weight_scale))


def test_build_reports_missing_and_bad_ranges(net_and_data):
    graph, _, ranges = net_and_data
    weights = quantize_model_weights(graph)
    partial = {name: value for name, value in ranges.items() if name != "relu3"}
    with pytest.raises(ValueError, match=r"activation_ranges lacks \['relu3'\]"):
        build_integer_model(graph, partial, weights)
    with pytest.raises(ValueError, match=r"activation_ranges\['relu3'\] must be finite and >= 0, got -1.0"):
        build_integer_model(graph, ranges | {"relu3": -1.0}, weights)


def test_a_model_whose_output_is_not_a_layer_is_an_error():
    from pipeline.graph.nodes import UnsupportedModelError

    class AddOut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return (self.conv(x) + x).flatten(1)

    graph = capture(AddOut())
    with pytest.raises(UnsupportedModelError, match="must come from a Conv2d or Linear layer"):
        build_integer_model(graph, {root: 1.0 for root in scale_groups(graph)}, quantize_model_weights(graph))


# ---------------------------------------------------------------- the engine


def conv2d_reference(x: np.ndarray, weight: np.ndarray, stride: int, padding: int, groups: int) -> np.ndarray:
    """Direct int64 grouped convolution, one output element at a time."""
    x = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    batch, _, height, width = x.shape
    out_channels, group_in, kernel_h, kernel_w = weight.shape
    per_group = out_channels // groups
    out_h, out_w = (height - kernel_h) // stride + 1, (width - kernel_w) // stride + 1
    out = np.zeros((batch, out_channels, out_h, out_w), dtype=np.int64)
    for b, c, i, j in np.ndindex(batch, out_channels, out_h, out_w):
        first = (c // per_group) * group_in
        patch = x[b, first : first + group_in, i * stride : i * stride + kernel_h, j * stride : j * stride + kernel_w]
        out[b, c, i, j] = int((patch * weight[c].astype(np.int64)).sum())
    return out


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_a_grouped_conv_layer_matches_an_independent_int64_reference(groups):
    model = toy_model("depthwise", "per_channel", seed=groups)
    generator = torch.Generator().manual_seed(groups)
    weight = torch.randint(-127, 128, (4, 4 // groups, 3, 3), generator=generator, dtype=torch.int8)
    layer = next(node for node in model.layers() if node.kind == "conv2d")
    multiplier = torch.tensor([1 << 30, 1555555555, 1 << 30, 2000000000], dtype=torch.int32)
    shift = torch.tensor([-5, -7, 1, -9], dtype=torch.int32)  # M above and below 1
    rq = dataclasses.replace(layer.requantize, multiplier=multiplier, shift=shift, clamp_min=-128, clamp_max=127)
    conv = IntConv("conv", "conv2d", "x", "y", weight, torch.tensor([-900, 15, 300, -7], dtype=torch.int32),
                   torch.ones(4, dtype=torch.float64), (2, 2), (1, 1), groups, "none", rq)
    x = torch.randint(-128, 128, (2, 4, 7, 7), generator=generator, dtype=torch.int8)
    acc = conv2d_reference(x.numpy(), weight.numpy(), 2, 1, groups) + conv.bias.numpy().reshape(1, -1, 1, 1)
    expected = np.empty_like(acc)
    for index in np.ndindex(acc.shape):
        c = index[1]
        expected[index] = requantize_reference(int(acc[index]), int(multiplier[c]), int(shift[c]), -128, 127)
    values = {"x": x.to(torch.int64)}
    prepared = PreparedLayer.prepare(conv, (-128, 127), x.device)
    assert engine._integer_node(conv, prepared, values).tolist() == expected.tolist()


@pytest.mark.parametrize("name", sorted(TOYS))
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_engine_agrees_with_its_float64_simulation_and_the_float_model(name, granularity):
    model = toy_model(name, granularity)
    x = normalize(random_uint8_images(64, seed=11), SEED_MEAN, SEED_STD)
    logits = run_integer(model, quantize_model_input(model, x))
    assert logits.dtype == torch.int32
    simulated = run_simulated(model, x)
    assert (logits.argmax(1) == simulated.argmax(1)).double().mean() >= 0.95
    real = dequantize_logits(model, logits)
    assert float((real - simulated).abs().max()) < 0.05 * float(simulated.abs().max())


@pytest.mark.parametrize("name", sorted(TOYS))
@pytest.mark.parametrize("form", sorted(FORMATS))
def test_engine_with_other_activation_formats_agrees_with_its_float64_simulation(name, form):
    # Single rounding, the simulation's rule: with 4-bit activations, double rounding (TFLite's) of an elementwise
    # rescale of a few small integers (a leaky ReLU's, a concat's) first rounds x * M * 2^e to an integer, which
    # moves many values by a step (docs/scheme.md); 8-bit models are compared with double rounding above.
    model = toy_model(name, "per_channel", activation_format=FORMATS[form], rounding="single")
    x = normalize(random_uint8_images(64, seed=11), SEED_MEAN, SEED_STD)
    logits = run_integer(model, quantize_model_input(model, x))
    simulated = run_simulated(model, x)  # fake quantization at the same (unsigned, narrower) ranges
    assert (logits.argmax(1) == simulated.argmax(1)).double().mean() >= 0.9
    real = dequantize_logits(model, logits)
    assert float((real - simulated).abs().max()) < 0.1 * float(simulated.abs().max())


@pytest.mark.parametrize("form", [None, *sorted(FORMATS)])
def test_every_tensor_of_the_engine_is_within_its_integer_type(form):
    activation_format = ActivationFormat() if form is None else FORMATS[form]
    model = toy_model("depthwise", "per_channel", activation_format=activation_format)
    x = normalize(random_uint8_images(16, seed=3), SEED_MEAN, SEED_STD) * 2  # saturates
    outputs = integer_tensor_outputs(model, quantize_model_input(model, x))
    for name, value in outputs.items():
        qmin, qmax = model.tensors[name].range
        assert qmin <= int(value.min()) and int(value.max()) <= qmax, name
        if model.tensors[name].bits != 32:
            assert model.tensors[name].bits == activation_format.bits
    clamp = next(node for node in model.nodes if type(node).__name__ == "IntClamp")
    assert int(outputs[clamp.output].min()) >= 0 and int(outputs[clamp.output].max()) <= clamp.clamp_max
    if activation_format.unsigned:  # the unsigned tensors use their top half: beyond the signed qmax
        unsigned = [name for name, info in model.tensors.items() if not info.signed]
        assert any(int(outputs[name].max()) > 2 ** (activation_format.bits - 1) - 1 for name in unsigned)


# ---------------------------------------------------------------- unsigned activations and narrower widths


def test_tensors_non_negative_by_construction_are_unsigned_and_scale_groups_agree():
    graph = capture(MixedSignToy().eval())
    signed = tensor_signedness(graph, FORMATS["unsigned"])
    assert all(tensor_signedness(graph, ActivationFormat()).values())  # the default: every tensor signed
    unsigned = sorted(name for name, is_signed in signed.items() if not is_signed)
    assert unsigned == ["avg_pool2d", "flatten", "relu", "relu_1"]  # after ReLUs, their pool and flatten
    assert signed[graph.input] and signed["cat"] and signed["add"]  # the input; a concat and an add of both kinds
    for group in scale_groups(graph).values():
        assert len({signed[member] for member in group.members}) == 1, group
    ranges = group_ranges(graph, ActivationFormat(4, unsigned=True))
    assert ranges["relu"] == (0, 15) and ranges[graph.input] == (-8, 7) and ranges["cat"] == (-8, 7)
    # A standalone ReLU of a signed tensor shares its input's (signed) group.
    shared = capture(TOYS["shared-relu"]().eval())
    assert all(tensor_signedness(shared, FORMATS["unsigned"]).values())


def test_unsigned_tensors_map_their_range_onto_the_unsigned_qmax():
    graph = capture(MixedSignToy().eval())
    ranges = {root: 1.0 for root in scale_groups(graph)}
    weights = quantize_model_weights(graph, 8, "minmax", "per_channel")
    signed = build_integer_model(graph, ranges, weights)
    unsigned = build_integer_model(graph, ranges, weights, activation_format=ActivationFormat(8, unsigned=True))
    # scales are float32 values, as a .tflite stores them
    assert float(signed.tensors["relu"].scale) == float(np.float32(1 / 127))
    assert float(unsigned.tensors["relu"].scale) == float(np.float32(1 / 255))
    assert (unsigned.tensors["relu"].range, unsigned.tensors["cat"].range) == ((0, 255), (-128, 127))
    conv1 = unsigned.nodes[0]
    assert (conv1.requantize.clamp_min, conv1.requantize.clamp_max) == (0, 255)  # the fused ReLU's clamp
    cat = next(node for node in unsigned.nodes if node.name == "cat")
    # Into the signed concat, the unsigned input is requantized (M = 255/127, saturating at 127) and the
    # signed one of the same scale and range copied; with equal scales the unsigned one still needs M = 1.
    unsigned_rq, signed_rq = cat.input_requantize
    assert signed_rq is None and (unsigned_rq.clamp_min, unsigned_rq.clamp_max) == (-128, 127)
    same_scale = build_integer_model(graph, ranges | {"relu": 255.0, "cat": 127.0}, weights,
                                     activation_format=ActivationFormat(8, unsigned=True))
    assert float(same_scale.tensors["relu"].scale) == float(same_scale.tensors["cat"].scale) == 1.0
    rq = next(node for node in same_scale.nodes if node.name == "cat").input_requantize[0]
    assert (int(rq.multiplier), int(rq.shift), rq.clamp_max) == (2**30, 1, 127)  # M = 1, saturating
    narrow = build_integer_model(graph, ranges, weights, activation_format=ActivationFormat(4))
    assert float(narrow.tensors["relu"].scale) == float(np.float32(1 / 7)) and narrow.tensors["cat"].range == (-8, 7)
    assert narrow.tensors[narrow.input].range == (-8, 7) and narrow.tensors[narrow.output].bits == 32


def test_the_accumulator_bound_uses_the_input_range():
    weight = torch.tensor([[3, -4], [0, 1]], dtype=torch.int8)
    bias = torch.tensor([10, -2], dtype=torch.int32)
    assert accumulator_bound(weight, bias, (-128, 127)).tolist() == [7 * 128 + 10, 128 + 2]
    assert accumulator_bound(weight, bias, (0, 255)).tolist() == [7 * 255 + 10, 255 + 2]  # uint8: about double
    assert accumulator_bound(weight, bias, (-8, 7)).tolist() == [7 * 8 + 10, 8 + 2]
    # A bias that fits with int8 inputs overflows with uint8 ones.
    big = torch.tensor([2**31 - 1 - 7 * 200, 0], dtype=torch.int32)
    assert check_accumulator("layer", weight, big, (-128, 127)) == 2**31 - 1 - 7 * 200 + 7 * 128
    with pytest.raises(OverflowError, match=r"layer: worst-case accumulator \d+ for inputs in \[0, 255\] exceeds"):
        check_accumulator("layer", weight, big, (0, 255))


def test_the_engine_proves_each_layer_exact_with_its_inputs_range():
    signed = toy_model("residual", "per_channel")
    unsigned = toy_model("residual", "per_channel", activation_format=FORMATS["unsigned"])
    for layer in unsigned.layers():
        plan = layer_plan(unsigned, layer)
        assert plan["accumulator_bound"] == int(accumulator_bound(layer.weight, layer.bias,
                                                                  unsigned.tensors[layer.input].range).max())
    conv2 = next(layer for layer in unsigned.layers() if layer.name == "conv2")
    assert not unsigned.tensors[conv2.input].signed
    base = int(conv2.weight.to(torch.int64).abs().reshape(conv2.weight.shape[0], -1).sum(1).max())
    assert layer_plan(unsigned, conv2)["accumulator_bound"] >= 255 * base > 128 * base
    # An unsigned model whose bias leaves room for int8 inputs only: building refuses it, so does the engine.
    bound = int(accumulator_bound(conv2.weight, torch.zeros_like(conv2.bias), (0, 255)).max())
    too_big = dataclasses.replace(conv2, bias=torch.full_like(conv2.bias, 2**31 - 1 - bound // 2))
    unsigned.nodes[unsigned.nodes.index(conv2)] = too_big
    with pytest.raises(OverflowError, match=r"layer 'conv2': worst-case accumulator .* \[0, 255\] exceeds"):
        run_integer(unsigned, torch.zeros(1, 3, 32, 32, dtype=torch.int8))
    assert signed.tensors[conv2.input].signed


def test_narrow_inputs_are_quantized_to_their_width_and_checked():
    x = torch.tensor([0.25, 0.75, -0.25, 100.0, -100.0, 0.1])
    assert quantize_input(x, 0.5, bits=4).tolist() == [0, 2, 0, 7, -8, 0]
    model = toy_model("residual", "per_channel", activation_format=FORMATS["a4"])
    with pytest.raises(ValueError, match=r"x_int8 holds values in \[-128, 127\], outside the input's range \[-8, 7\]"):
        run_integer(model, torch.tensor([-128, 127], dtype=torch.int8).repeat(1, 3, 32, 16))


@pytest.mark.parametrize(("bits", "unsigned"), [(3, False), (9, False), (8, "yes")])
def test_activation_format_is_checked(bits, unsigned):
    with pytest.raises(ValueError, match="allowed"):
        ActivationFormat(bits, unsigned)


def test_run_integer_requires_int8_input():
    with pytest.raises(TypeError, match="x_int8 must have dtype torch.int8, got torch.float32"):
        run_integer(toy_model("residual"), torch.zeros(1, 3, 32, 32))


def test_run_integer_guards_the_accumulator_bound():
    model = toy_model("residual", "per_tensor")
    last = model.layers()[-1]
    model.nodes[-1] = dataclasses.replace(last, bias=torch.full_like(last.bias, 2**31 - 1))
    with pytest.raises(OverflowError, match=f"layer '{last.name}': worst-case accumulator .* exceeds int32 max"):
        run_integer(model, torch.zeros(1, 3, 32, 32, dtype=torch.int8))


def test_quantize_input_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, -0.25, 100.0, -100.0, 0.1])
    assert quantize_input(x, 0.5).tolist() == [0, 2, 0, 127, -128, 0]
    assert quantize_input(x, 0.5).dtype == torch.int8


def test_per_channel_last_layer_gives_integer_logits_at_one_common_scale():
    model = cifar_model("net", "per_channel")
    last = model.layers()[-1]
    accumulator_scale = model.input_scale_of(last) * last.weight_scale
    assert last.requantize is not None and model.output_scale.ndim == 0
    assert float(model.output_scale) == float(accumulator_scale.max())
    assert (last.requantize.clamp_min, last.requantize.clamp_max) == (-(2**31), 2**31 - 1)


def test_engine_results_do_not_depend_on_the_pass_size(monkeypatch):
    model = toy_model("residual", "per_channel")
    x = normalize(random_uint8_images(136, seed=4), SEED_MEAN, SEED_STD)
    monkeypatch.setattr(engine, "PASS_VALUES", 64 * max(numel(t.shape) for t in model.tensors.values()))
    assert engine.pass_images(model) == 64  # two passes of 64 and one of 8
    x_int8 = quantize_input(x, model.input_scale)
    in_passes = (run_integer(model, x_int8), run_simulated(model, x), integer_tensor_outputs(model, x_int8))
    monkeypatch.setattr(engine, "PASS_VALUES", 2**40)  # one pass
    whole = (run_integer(model, x_int8), run_simulated(model, x), integer_tensor_outputs(model, x_int8))
    assert torch.equal(in_passes[0], whole[0]) and torch.equal(in_passes[1], whole[1])
    assert in_passes[2].keys() == whole[2].keys()
    assert all(torch.equal(in_passes[2][name], whole[2][name]) for name in whole[2])
    assert run_integer(model, x_int8[:0]).shape == (0, 10)  # an empty batch is one empty pass


# ---------------------------------------------------------------- files, weight-only, the seed's wrapper


def test_save_load_round_trip(tmp_path):
    model = toy_model("depthwise", "per_channel")
    model.input_mean, model.input_std = [0.5] * 3, [0.25] * 3
    path = tmp_path / "models" / "integer.npz"
    save_integer_model(model, path)
    assert [p.name for p in path.parent.iterdir()] == ["integer.npz"]  # no temporary file left behind
    loaded = load_integer_model(path)
    assert (loaded.input, loaded.output, loaded.input_mean, loaded.input_std) == (
        model.input, model.output, [0.5] * 3, [0.25] * 3)
    assert loaded.tensors.keys() == model.tensors.keys()
    for name, info in model.tensors.items():
        assert (loaded.tensors[name].shape, loaded.tensors[name].bits) == (info.shape, info.bits)
        assert float(loaded.tensors[name].scale) == float(info.scale)
    for original, restored in zip(model.nodes, loaded.nodes, strict=True):
        assert type(original) is type(restored)
        for field in dataclasses.fields(original):
            a, b = getattr(original, field.name), getattr(restored, field.name)
            assert repr(a) == repr(b), field.name
    x_int8 = quantize_input(normalize(random_uint8_images(8, 1), SEED_MEAN, SEED_STD), model.input_scale)
    assert torch.equal(run_integer(loaded, x_int8), run_integer(model, x_int8))


def test_unsigned_tensors_survive_save_and_load_and_signed_files_keep_their_form(tmp_path):
    model = toy_model("mixed-sign", "per_channel", activation_format=FORMATS["unsigned-a6"])
    save_integer_model(model, tmp_path / "unsigned.npz")
    loaded = load_integer_model(tmp_path / "unsigned.npz")
    assert {name: (info.bits, info.signed) for name, info in loaded.tensors.items()} == {
        name: (info.bits, info.signed) for name, info in model.tensors.items()}
    x_int8 = quantize_model_input(model, normalize(random_uint8_images(8, 1), SEED_MEAN, SEED_STD))
    assert torch.equal(run_integer(loaded, x_int8), run_integer(model, x_int8))
    meta = json.loads(str(np.load(tmp_path / "unsigned.npz")["meta"]))
    assert "unsigned [0,2^b-1]" in meta["scheme"] and meta["tensors"]["relu"]["signed"] is False
    # A signed int8 model's file has no "signed" key and the seed's scheme text: default files are unchanged.
    save_integer_model(toy_model("mixed-sign", "per_channel"), tmp_path / "signed.npz")
    meta = json.loads(str(np.load(tmp_path / "signed.npz")["meta"]))
    assert meta["scheme"] == SCHEME.replace("{rounding}", ROUNDING_TEXT["double"])
    assert not any("signed" in info for info in meta["tensors"].values())


def test_load_names_an_old_or_foreign_file_and_its_version(tmp_path):
    path = tmp_path / "old.npz"
    np.savez(path, meta=np.array('{"format": "cifar10-ptq-integer-model", "version": 1}'))
    with pytest.raises(ValueError, match=r"file of version 1; this pipeline reads cifar10-ptq-integer-model version 2 "
                                         r"\(the graph IR\): rerun the quantize-biases stage"):
        load_integer_model(path)


def test_weight_only_model_uses_dequantized_weights(net_and_data):
    graph, x, _ = net_and_data
    weights = quantize_model_weights(graph, 8, "minmax", "per_channel")
    dequantized = dequantized_weights(weights)
    q_weight, weight_scale = quantize_layer_weights(graph.layers()[1].weight, 8, "minmax", "per_channel")
    assert torch.equal(dequantized["conv2"], dequantize(q_weight, weight_scale).float())
    x32 = x.float()
    expected = run_float(graph, x32)
    weight_only = run_weight_only(graph, x32, weights)
    assert torch.allclose(weight_only, expected, atol=0.05) and not torch.equal(weight_only, expected)


def test_quantized_net_forward_is_the_integer_engine(net_and_data):
    graph, x, ranges = net_and_data
    model = build_integer_model(graph, ranges, quantize_model_weights(graph))
    logits = QuantizedNet(model)(x)
    expected = dequantize_logits(model, run_integer(model, quantize_input(x, model.input_scale)))
    assert logits.dtype == torch.float32 and torch.equal(logits, expected.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_integer_engine_on_cuda_matches_cpu():
    model = toy_model("residual", "per_channel")
    x = normalize(random_uint8_images(32, seed=2), SEED_MEAN, SEED_STD)
    x_int8 = quantize_input(x, model.input_scale)
    assert torch.equal(run_integer(model, x_int8.cuda()).cpu(), run_integer(model, x_int8))
    assert torch.allclose(run_simulated(model, x.cuda()).cpu(), run_simulated(model, x))
