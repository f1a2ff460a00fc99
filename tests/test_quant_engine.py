"""The integer model and engine: BN folding, bias rule, bit-exact engine, build, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.models import BNNet, Net
from pipeline.quant import engine
from pipeline.quant.engine import (
    QuantizedNet,
    dequantize_logits,
    integer_layer_outputs,
    quantize_input,
    run_integer,
    run_simulated,
    weight_only_model,
)
from pipeline.quant.fixed_point import quantize_multiplier, requantize_reference
from pipeline.quant.graph import fold_batchnorm
from pipeline.quant.model import (
    IntegerModel,
    build_integer_model,
    load_integer_model,
    quantize_bias,
    quantize_layer_weights,
    quantize_model_biases,
    save_integer_model,
)
from pipeline.quant.ranges import dequantize
from tests.model_fixtures import randomize_batchnorm



# ---------------------------------------------------------------- BatchNorm folding


def test_fold_batchnorm_preserves_eval_output():
    torch.manual_seed(0)
    model = BNNet(width=8)
    randomize_batchnorm(model, seed=1)
    model.eval()
    folded = fold_batchnorm(model)
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in folded.modules())
    assert all(folded.get_submodule(f"conv{i}").bias is not None for i in range(1, 7))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert model.bn1.running_mean.abs().sum() > 0  # the original is untouched


def test_fold_batchnorm_requires_a_preceding_conv():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="BatchNorm2d '1' must directly follow a Conv2d"):
        fold_batchnorm(model)


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
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\] \(weights are stored as int8\), got 9"):
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


def test_quantize_model_biases_maps_each_layer():
    model = Net()
    input_scales = {name: 0.02 for name in ("conv1", "conv2", "fc1", "fc2", "fc3")}
    weight_scales = {name: torch.tensor(0.01, dtype=torch.float64) for name in input_scales}
    biases = quantize_model_biases(model, input_scales, weight_scales)
    assert list(biases) == list(input_scales)
    assert torch.equal(biases["fc2"], quantize_bias(model.fc2.bias, 0.02, weight_scales["fc2"], "fc2"))


# ---------------------------------------------------------------- the engine, bit-exact


def conv2d_reference(x: np.ndarray, weight: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Direct int64 convolution, one output element at a time."""
    x = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    batch, _, height, width = x.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    out_h, out_w = (height - kernel_h) // stride + 1, (width - kernel_w) // stride + 1
    out = np.zeros((batch, out_channels, out_h, out_w), dtype=np.int64)
    for b in range(batch):
        for c in range(out_channels):
            for i in range(out_h):
                for j in range(out_w):
                    patch = x[b, :, i * stride : i * stride + kernel_h, j * stride : j * stride + kernel_w]
                    out[b, c, i, j] = int((patch * weight[c].astype(np.int64)).sum())
    return out


def requantize_array_reference(acc: np.ndarray, multipliers, shifts, qmin: int, qmax: int) -> np.ndarray:
    """Per-channel (axis 1) requantization with the pure-Python reference, element by element."""
    out = np.empty_like(acc)
    for index in np.ndindex(acc.shape):
        channel = index[1]
        out[index] = requantize_reference(int(acc[index]), multipliers[channel], shifts[channel], qmin, qmax)
    return out


def random_integer_model(seed: int, relu: bool) -> IntegerModel:
    """conv2d (stride 2, padding 1, requantized, per-channel multipliers) -> maxpool -> flatten -> linear."""
    generator = torch.Generator().manual_seed(seed)
    conv_weight = torch.randint(-127, 128, (4, 3, 3, 3), generator=generator, dtype=torch.int8)
    conv_weight[2] = conv_weight[2] // 16  # smaller accumulators where M is larger, so few outputs saturate
    conv_weight[3] = 0
    conv_weight[3, 1, 1, 1] = 1
    conv_bias = torch.tensor([-20000, 15000, 300, -7], dtype=torch.int32)
    real_multipliers = [0.0007, 0.003, 0.02, 1.7]  # M < 1 and M > 1: shifts on both sides
    pairs = [quantize_multiplier(m) for m in real_multipliers]
    fc_weight = torch.randint(-127, 128, (5, 4 * 2 * 2), generator=generator, dtype=torch.int8)
    fc_bias = torch.randint(-1000, 1000, (5,), generator=generator, dtype=torch.int32)
    conv = {
        "op": "conv2d", "name": "conv", "weight": conv_weight, "bias": conv_bias, "stride": [2, 2], "padding": [1, 1],
        "input_scale": 0.05, "weight_scale": torch.full((4,), 0.01, dtype=torch.float64),
        "output_scale": torch.tensor(0.1, dtype=torch.float64), "output_bits": 8, "requantize": True, "relu": relu,
        "multiplier": torch.tensor([m for m, _ in pairs], dtype=torch.int32),
        "shift": torch.tensor([s for _, s in pairs], dtype=torch.int32),
    }
    pool = {"op": "maxpool2d", "name": "pool", "kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}
    fc = {
        "op": "linear", "name": "fc", "weight": fc_weight, "bias": fc_bias, "input_scale": 0.1,
        "weight_scale": torch.tensor(0.02, dtype=torch.float64),
        "output_scale": torch.tensor(0.002, dtype=torch.float64), "output_bits": 32,
        "requantize": False, "multiplier": None, "shift": None, "relu": False,
    }
    return IntegerModel(0.05, [conv, pool, {"op": "flatten", "name": "flatten"}, fc])


@pytest.mark.parametrize("relu", [False, True])
def test_run_integer_matches_an_independent_int64_reference(relu):
    model = random_integer_model(seed=3, relu=relu)
    conv, _, _, fc = model.ops
    x = torch.randint(-128, 128, (3, 3, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.int8)

    products = conv2d_reference(x.numpy(), conv["weight"].numpy(), stride=2, padding=1)
    acc = products + conv["bias"].numpy().reshape(1, -1, 1, 1)
    qmin = 0 if relu else -128
    activation = requantize_array_reference(acc, conv["multiplier"].tolist(), conv["shift"].tolist(), qmin, 127)
    assert activation.min() >= qmin and activation.max() <= 127
    pooled = activation.reshape(3, 4, 2, 2, 2, 2).max(axis=(3, 5))  # 2x2 windows of the 4x4 map
    expected = pooled.reshape(3, -1) @ fc["weight"].numpy().astype(np.int64).T + fc["bias"].numpy()

    logits = run_integer(model, x)
    assert logits.dtype == torch.int32
    assert logits.tolist() == expected.tolist()


def test_run_integer_guards_the_accumulator_bound():
    model = random_integer_model(seed=5, relu=False)
    model.ops[-1]["bias"] = torch.full((5,), 2**31 - 1, dtype=torch.int32)
    with pytest.raises(OverflowError, match="layer 'fc': worst-case accumulator .* exceeds int32 max"):
        run_integer(model, torch.zeros(1, 3, 8, 8, dtype=torch.int8))


def test_run_integer_requires_int8_input():
    with pytest.raises(TypeError, match="x_int8 must have dtype torch.int8, got torch.float32"):
        run_integer(random_integer_model(seed=6, relu=False), torch.zeros(1, 3, 8, 8))


def test_quantize_input_rounds_half_to_even_and_saturates():
    x = torch.tensor([0.25, 0.75, -0.25, 100.0, -100.0, 0.1])
    assert quantize_input(x, 0.5).tolist() == [0, 2, 0, 127, -128, 0]
    assert quantize_input(x, 0.5).dtype == torch.int8


# ---------------------------------------------------------------- building a real model


def synthetic_ranges(model: nn.Sequential, x: torch.Tensor) -> dict[str, float]:
    """max|input| of each Conv2d/Linear layer (a minmax calibration without observers)."""
    ranges: dict[str, float] = {}
    with torch.no_grad():
        for name, layer in model.named_children():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                ranges[name] = float(x.abs().max())
            x = layer(x)
    return ranges


def dequantized_integer_logits(integer_model: IntegerModel, x: torch.Tensor) -> torch.Tensor:
    """Real-unit logits of the integer engine for a normalized float input."""
    return dequantize_logits(integer_model, run_integer(integer_model, quantize_input(x, integer_model.input_scale)))


@pytest.fixture(scope="module")
def net_and_data():
    torch.manual_seed(7)
    model = Net().eval()
    x = torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    return model, x, synthetic_ranges(model, x[:50])


@pytest.mark.parametrize(("calibrator", "granularity"), [("sigma", "per_tensor"), ("minmax", "per_channel")])
def test_integer_engine_agrees_with_float_simulation(net_and_data, calibrator, granularity):
    model, x, ranges = net_and_data
    integer_model = build_integer_model(model, ranges, 8, calibrator, granularity)
    integer_logits = dequantized_integer_logits(integer_model, x)
    simulated_logits = run_simulated(integer_model, x)
    agreement = (integer_logits.argmax(dim=1) == simulated_logits.argmax(dim=1)).double().mean()
    assert agreement >= 0.95
    # both stay close to the float model: the scheme, not just the two implementations, is right
    with torch.no_grad():
        float_logits = model(x).double()
    assert float((integer_logits - float_logits).abs().max()) < 0.1 * float(float_logits.abs().max())


def test_integer_model_structure(net_and_data):
    model, _, ranges = net_and_data
    integer_model = build_integer_model(model, ranges)
    assert [op["op"] for op in integer_model.ops] == [
        "conv2d", "maxpool2d", "conv2d", "maxpool2d", "flatten", "linear", "linear", "linear"
    ]
    layers = [op for op in integer_model.ops if op["op"] in ("conv2d", "linear")]
    assert [op["relu"] for op in layers] == [True, True, True, True, False]
    assert [op["requantize"] for op in layers] == [True, True, True, True, False]
    assert integer_model.input_scale == pytest.approx(ranges["conv1"] / 127)
    for op, next_op in zip(layers, layers[1:]):
        assert float(op["output_scale"]) == next_op["input_scale"]
        real_multiplier = op["input_scale"] * float(op["weight_scale"]) / float(op["output_scale"])
        assert float(op["multiplier"]) * 2.0 ** (int(op["shift"]) - 31) == pytest.approx(real_multiplier, rel=2**-30)
    assert layers[-1]["multiplier"] is None
    last = layers[-1]
    assert float(last["output_scale"]) == pytest.approx(last["input_scale"] * float(last["weight_scale"]))


def test_build_reports_missing_ranges(net_and_data):
    model, _, ranges = net_and_data
    partial = {name: value for name, value in ranges.items() if name != "fc2"}
    with pytest.raises(ValueError, match=r"activation_ranges lacks layers \['fc2'\]"):
        build_integer_model(model, partial)
    with pytest.raises(ValueError, match=r"activation_ranges\['fc1'\] must be finite and >= 0, got -1.0"):
        build_integer_model(model, ranges | {"fc1": -1.0})


def test_build_folds_batchnorm():
    torch.manual_seed(9)
    model = BNNet(width=4)
    randomize_batchnorm(model, seed=10)
    model.eval()
    x = torch.randn(16, 3, 32, 32)
    integer_model = build_integer_model(model, synthetic_ranges(fold_batchnorm(model), x), 8, "minmax", "per_channel")
    simulated = run_simulated(integer_model, x)
    integer = dequantized_integer_logits(integer_model, x)
    assert (simulated.argmax(dim=1) == integer.argmax(dim=1)).double().mean() >= 0.9


def test_per_channel_last_layer_gives_integer_logits_at_one_common_scale(net_and_data):
    model, x, ranges = net_and_data
    integer_model = build_integer_model(model, ranges, 8, "minmax", "per_channel")
    last = [op for op in integer_model.ops if op["op"] == "linear"][-1]
    assert last["requantize"] and last["output_bits"] == 32 and last["output_scale"].ndim == 0
    accumulator_scale = last["input_scale"] * last["weight_scale"]
    assert float(last["output_scale"]) == float(accumulator_scale.max())
    logits = run_integer(integer_model, quantize_input(x, integer_model.input_scale))
    # Ranking the integers directly equals ranking the per-class dequantized accumulators
    # up to the rounding of the rescale (one step at the common scale).
    simulated = run_simulated(integer_model, x)
    assert (logits.argmax(1) == simulated.argmax(1)).double().mean() >= 0.95


def test_save_load_round_trip(net_and_data, tmp_path):
    model, x, ranges = net_and_data
    integer_model = build_integer_model(
        model, ranges, 8, "mse", "per_channel", input_mean=[0.5] * 3, input_std=[0.25] * 3
    )
    path = tmp_path / "models" / "integer.npz"
    save_integer_model(integer_model, path)
    assert [p.name for p in path.parent.iterdir()] == ["integer.npz"]  # no temporary file left behind
    loaded = load_integer_model(path)
    assert loaded.input_scale == integer_model.input_scale
    assert (loaded.input_mean, loaded.input_std) == ([0.5] * 3, [0.25] * 3)
    for original, restored in zip(integer_model.ops, loaded.ops, strict=True):
        assert original.keys() == restored.keys()
        for key, value in original.items():
            if isinstance(value, torch.Tensor):
                assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
            else:
                assert restored[key] == value, key
    x_int8 = quantize_input(x, integer_model.input_scale)
    assert torch.equal(run_integer(loaded, x_int8), run_integer(integer_model, x_int8))


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, meta=np.array('{"format": "something-else", "version": 1}'))
    with pytest.raises(ValueError, match="is not a cifar10-ptq-integer-model version 1 file"):
        load_integer_model(path)


# ---------------------------------------------------------------- weight-only and the seed's wrapper


def test_weight_only_model_uses_dequantized_weights(net_and_data):
    model, x, _ = net_and_data
    weight_only = weight_only_model(model, 8, "minmax", "per_channel")
    q_weight, weight_scale = quantize_layer_weights(model.conv2.weight, 8, "minmax", "per_channel")
    assert torch.equal(weight_only.conv2.weight, dequantize(q_weight, weight_scale).float())
    assert torch.equal(weight_only.conv2.bias, model.conv2.bias)
    with torch.no_grad():
        assert torch.allclose(weight_only(x), model(x), atol=0.05)


def test_quantized_net_forward_is_the_integer_engine(net_and_data):
    model, x, ranges = net_and_data
    integer_model = build_integer_model(model, ranges)
    logits = QuantizedNet(integer_model)(x)
    expected = dequantized_integer_logits(integer_model, x)
    assert logits.dtype == torch.float32 and torch.equal(logits, expected.float())


def test_engine_results_do_not_depend_on_the_pass_size(net_and_data, monkeypatch):
    model, x, ranges = net_and_data  # 200 images: three full passes of 64 and a remainder of 8
    integer_model = build_integer_model(model, ranges, 8, "minmax", "per_channel")
    x_int8 = quantize_input(x, integer_model.input_scale)
    in_passes = (run_integer(integer_model, x_int8), run_simulated(integer_model, x),
                 integer_layer_outputs(integer_model, x_int8))
    monkeypatch.setattr(engine, "PASS_IMAGES", len(x))
    whole = (run_integer(integer_model, x_int8), run_simulated(integer_model, x),
             integer_layer_outputs(integer_model, x_int8))
    assert engine.PASS_IMAGES != 64 and len(x) % 64 == 8
    assert torch.equal(in_passes[0], whole[0]) and torch.equal(in_passes[1], whole[1])
    assert in_passes[2].keys() == whole[2].keys() == {"conv1", "conv2", "fc1", "fc2", "fc3"}
    assert all(torch.equal(in_passes[2][name], whole[2][name]) for name in whole[2])
    assert run_integer(integer_model, x_int8[:0]).shape == (0, 10)  # an empty batch is one empty pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_integer_engine_on_cuda_matches_cpu(net_and_data):
    model, x, ranges = net_and_data
    integer_model = build_integer_model(model, ranges, 8, "minmax", "per_channel")
    x_int8 = quantize_input(x, integer_model.input_scale)
    assert torch.equal(run_integer(integer_model, x_int8.cuda()).cpu(), run_integer(integer_model, x_int8))
    assert torch.allclose(run_simulated(integer_model, x.cuda()).cpu(), run_simulated(integer_model, x))
