"""Bias correction: the corrected biases remove each layer's mean output shift from weight quantization."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from pipeline.graph.capture import capture
from pipeline.graph.nodes import folded_state_dict, with_biases, with_weights
from pipeline.graph.run import tensor_values
from pipeline.models import build_model
from pipeline.quant.bias_correction import corrected_biases, output_shift
from pipeline.quant.build import build_integer_model
from pipeline.quant.weights import dequantized_weights, quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize
from pipeline.weights_file import (
    load_corrected_biases,
    load_quantized_weights,
    save_quantized_weights,
)
from tests.model_fixtures import randomize_batchnorm


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_output_shift_is_the_mean_pre_activation_change_per_channel():
    generator = torch.Generator().manual_seed(0)
    graph = capture(build_model("net", seed=0).eval())
    conv = graph.layers()[0]
    inputs = torch.randn(5, 3, 32, 32, generator=generator)
    error = 0.01 * torch.randn(conv.weight.shape, generator=generator)
    change = F.conv2d(inputs.double(), conv.weight.double() + error.double(), None, conv.stride, conv.padding) - F.conv2d(
        inputs.double(), conv.weight.double(), None, conv.stride, conv.padding)
    expected = change.mean(dim=(0, 2, 3))  # the fused ReLU plays no part: the shift is before it
    assert torch.allclose(output_shift(conv, inputs, error), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["net", "resnet20"])
def test_every_corrected_layer_keeps_its_float_mean_output_on_the_calibration_images(name):
    model = build_model(name, seed=0).eval()
    randomize_batchnorm(model, seed=1)
    graph = capture(model)
    images = _images(48 if name == "net" else 16, seed=2)
    quantized = quantize_model_weights(graph, 4, "sigma", "per_tensor")
    biases = corrected_biases(graph, quantized, images, SEED_MEAN, SEED_STD, progress=False)
    assert list(biases) == [node.name for node in graph.layers()]
    dequantized = dequantized_weights(quantized)
    corrected_graph = with_weights(with_biases(graph, biases), folded_state_dict(with_biases(graph, biases), dequantized))
    x = normalize(images, SEED_MEAN, SEED_STD)
    shifts_before, shifts_after = [], []
    for float_node, quantized_node in zip(graph.layers(), corrected_graph.layers()):
        inputs = tensor_values(corrected_graph, x, float_node.input).double()  # as the corrected model sees them
        linear = {"activation": "none"}
        float_out = _layer(replace(float_node, **linear), inputs)
        uncorrected = _layer(replace(quantized_node, bias=float_node.bias, **linear), inputs)
        corrected = _layer(replace(quantized_node, **linear), inputs)
        shifts_before.append(float((uncorrected - float_out).mean(dim=_positions(float_out)).abs().max()))
        shifts_after.append(float((corrected - float_out).mean(dim=_positions(float_out)).abs().max()))
    assert max(shifts_after) < 1e-4  # float32 biases: the shift left is rounding
    assert min(shifts_before) > 10 * max(shifts_after)  # 4-bit weights did shift every layer


def _layer(node, inputs: torch.Tensor) -> torch.Tensor:
    weight, bias = node.weight.double(), None if node.bias is None else node.bias.double()
    if inputs.ndim == 4:
        return F.conv2d(inputs, weight, bias, node.stride, node.padding, 1, node.groups)
    return F.linear(inputs, weight, bias)


def _positions(output: torch.Tensor) -> tuple[int, ...]:
    return (0, 2, 3) if output.ndim == 4 else (0,)


def test_a_layer_without_a_bias_gets_one():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 30 * 30, 10))
    graph = capture(model.eval())
    quantized = quantize_model_weights(graph, 3, "minmax", "per_tensor")
    biases = corrected_biases(graph, quantized, _images(8, seed=4), SEED_MEAN, SEED_STD, progress=False)
    first = graph.layers()[0]
    assert first.bias is None and biases[first.name].shape == (4,) and biases[first.name].abs().max() > 0
    assert torch.equal(with_biases(graph, biases).layers()[0].bias, biases[first.name])


def test_corrected_biases_are_stored_beside_the_weights_and_reach_the_integer_model(tmp_path):
    graph = capture(build_model("net", seed=0).eval())
    quantized = quantize_model_weights(graph, 4, "sigma", "per_tensor")
    biases = corrected_biases(graph, quantized, _images(32, seed=5), SEED_MEAN, SEED_STD, progress=False)
    save_quantized_weights(quantized, {"bits": 4}, tmp_path / "plain.npz")
    save_quantized_weights(quantized, {"bits": 4}, tmp_path / "corrected.npz", biases)
    assert load_corrected_biases(tmp_path / "plain.npz") == {}
    loaded = load_corrected_biases(tmp_path / "corrected.npz")
    assert list(loaded) == list(biases) and all(torch.equal(loaded[name], biases[name]) for name in biases)
    assert load_quantized_weights(tmp_path / "corrected.npz")[1]["corrected_biases"] == list(biases)
    ranges = {"input_1": 2.5, "relu1": 3.0, "relu2": 3.0, "relu3": 3.0, "relu4": 3.0}
    plain = build_integer_model(graph, ranges, quantized, list(SEED_MEAN), list(SEED_STD))
    corrected = build_integer_model(with_biases(graph, loaded), ranges, quantized, list(SEED_MEAN), list(SEED_STD))
    assert [torch.equal(a.weight, b.weight) for a, b in zip(plain.layers(), corrected.layers())] == [True] * 5
    assert not all(torch.equal(a.bias, b.bias) for a, b in zip(plain.layers(), corrected.layers()))
