import math

import pytest
import torch

from pipeline.evaluation import (
    engine_predictions,
    float_model_bytes,
    integer_model_bytes,
    output_sqnr,
    packed_integer_model_bytes,
    paired_difference_error,
    percent_equal,
    simulated_predictions,
    sqnr_db,
    weight_sqnr,
)
from pipeline.graph.capture import capture
from pipeline.models import Net, build_model
from pipeline.profile import calibrate_ranges, profile_activations
from pipeline.quant.build import build_integer_model
from pipeline.quant.engine import QuantizedNet
from pipeline.quant.mixed_precision import packed_model_bytes
from pipeline.quant.observers import ActivationStats, clipped_fraction
from pipeline.quant.scale_groups import scale_groups
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD, calibration_indices, normalize
from tests.integer_graphs import toy_model


def test_sqnr_db_hand_worked():
    reference = torch.tensor([3.0, 4.0])  # signal energy 25
    assert sqnr_db(reference, torch.tensor([3.0, 3.5])) == pytest.approx(10 * math.log10(25 / 0.25))
    assert sqnr_db(reference, reference) == math.inf


@pytest.fixture
def quantized(synthetic_images):
    images, _ = synthetic_images
    graph = capture(build_model("net", seed=0))
    stats = profile_activations(graph, images, SEED_MEAN, SEED_STD, batch_size=16, progress=False)
    ranges = {name: chosen["range"] for name, chosen in calibrate_ranges(stats, "seed").items()}
    return graph, build_integer_model(graph, ranges, quantize_model_weights(graph)), images


def test_engine_predictions_are_quantized_net_argmax_and_agree_with_simulation(quantized):
    model, integer_model, images = quantized
    engine = engine_predictions(integer_model, images, SEED_MEAN, SEED_STD, batch_size=10)
    assert torch.equal(engine, QuantizedNet(integer_model)(normalize(images, SEED_MEAN, SEED_STD)).argmax(1))
    simulated = simulated_predictions(integer_model, images, SEED_MEAN, SEED_STD, batch_size=7)
    assert (engine == simulated).float().mean() >= 0.95


def test_sqnr_per_layer_is_high_at_8_bits(quantized):
    model, integer_model, images = quantized
    weights = weight_sqnr(model, integer_model)
    outputs = output_sqnr(model, integer_model, normalize(images, SEED_MEAN, SEED_STD))
    assert list(weights) == list(outputs) == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert all(value > 20 for value in weights.values())  # 8-bit 3-sigma weights: ~30-40 dB
    assert outputs["conv1"] > 20


def test_model_sizes():
    graph = capture(Net())
    assert float_model_bytes(graph) == 4 * 62006
    # int8 weights + int32 biases + int32 multiplier and shift for each of the 4 requantized per-tensor layers.
    ranges = {root: 1.0 for root in scale_groups(graph)}
    integer_model = build_integer_model(graph, ranges, quantize_model_weights(graph))
    weights = 6 * 3 * 25 + 16 * 6 * 25 + 400 * 120 + 120 * 84 + 84 * 10
    biases = 4 * (6 + 16 + 120 + 84 + 10)
    assert integer_model_bytes(integer_model) == weights + biases + 4 * 2 * 4


def test_calibration_indices_are_a_reproducible_subset():
    first = calibration_indices(100, 30, seed=1)
    assert len(set(first.tolist())) == 30 and first.max() < 100 and list(first) == sorted(first)
    assert (first == calibration_indices(100, 30, seed=1)).all()
    with pytest.raises(ValueError, match=r"profile.num_samples: value 101 is out of range; allowed: 1..100"):
        calibration_indices(100, 101, seed=1)


def test_clipped_fraction_from_histogram():
    stats = ActivationStats(count=10, min=-3.5, max=3.9, abs_max=3.9, mean=0.0, std=1.0, num_bins=8, hist_span=4.0,
                            hist_counts=(1, 0, 0, 2, 3, 0, 0, 4))
    # bin centres -3.5 ... 3.5; |centre| > 3 only for the two outer bins: (1 + 4) / 10.
    assert clipped_fraction(stats, 3.0) == pytest.approx(0.5)
    assert clipped_fraction(stats, 3.9) == 0.0


def test_percent_equal_is_rounded_to_hundredths():
    assert percent_equal(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 0])) == 66.67
    assert percent_equal(torch.tensor([4]), torch.tensor([4])) == 100.0


def test_accuracy_table_is_the_short_flat_row_dvc_metrics_show_prints():
    from pipeline.evaluation import accuracy_table

    metrics = {
        "accuracy": {"fp32": 53.23, "weights_only": 53.26, "integer": 53.34, "simulated": 53.34,
                     "c": 53.34, "onnx_qlinear": 53.3, "onnx_integer": 53.34, "tflite_int8": 53.34},
        "mismatches": {"c_logits": 0, "onnx_integer_logits": 0, "onnx_qlinear_logits": 0, "tflite_logits": 0},
        "size_bytes": {"fp32": 248024, "stored": 62746, "packed": 31998},
        "sqnr_db": {"weights": {"conv1": 40.0}},
        "quantization": {"weight_bits": 4, "activation_bits": 8},
    }
    assert accuracy_table(metrics) == {"fp32": 53.23, "weights_only": 53.26, "integer": 53.34, "c": 53.34,
                                       "onnx_qlinear": 53.3, "drop": -0.11, "c_mismatches": 0, "tflite_int8": 53.34,
                                       "tflite_mismatches": 0, "packed_bytes": 31998}


def test_model_size_counts_the_multipliers_of_adds_and_pools():
    model = toy_model("residual", "per_tensor")
    layers = sum(layer.weight.numel() + 4 * layer.bias.numel() + 8 * (layer.requantize is not None)
                 for layer in model.layers())
    # two adds (three multiplier-shift pairs each) and one average pool (one pair)
    assert integer_model_bytes(model) == layers + 2 * 3 * 8 + 8


def test_the_packed_size_counts_each_layers_weights_at_its_bits_and_the_rest_as_stored():
    model = toy_model("residual", "per_tensor")
    weights = {layer.name: layer.weight.numel() for layer in model.layers()}
    bits = {name: (2, 3, 5)[index % 3] for index, name in enumerate(weights)}
    packed_weights = sum(math.ceil(count * bits[name] / 8) for name, count in weights.items())
    stored = integer_model_bytes(model)
    assert packed_integer_model_bytes(model, packed_model_bytes(weights, bits)) == (
        stored - sum(weights.values()) + packed_weights)
    assert packed_integer_model_bytes(model, packed_model_bytes(weights, 8)) == stored  # int8: one byte each


def test_the_paired_difference_error_is_the_standard_error_of_the_per_image_differences():
    generator = torch.Generator().manual_seed(0)
    reference_correct = torch.rand(10_000, generator=generator) < 0.7
    flipped = torch.rand(10_000, generator=generator) < 0.05  # the other model differs on about 5% of the images
    correct = reference_correct ^ flipped
    differences = reference_correct.double() - correct.double()
    expected = 100.0 * float(differences.std(unbiased=False)) / math.sqrt(len(differences))
    assert paired_difference_error(reference_correct, correct) == pytest.approx(expected, rel=1e-12)
    assert 0.15 < expected < 0.3  # about 500 discordant images of 10,000: far below one accuracy's 0.46
    assert paired_difference_error(reference_correct, reference_correct) == 0.0
