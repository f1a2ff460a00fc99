"""Sensitivity per layer and bits, and the exact bit allocation under a size budget."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from pipeline.graph import run as graph_run
from pipeline.graph.capture import capture
from pipeline.models import build_model
from pipeline.quant import mixed_precision
from pipeline.quant.mixed_precision import (
    DP_CELLS,
    CurvePoint,
    allocate_bits,
    allocation_noise,
    choose_bits,
    curve_json,
    curve_rows,
    heat_map_rows,
    layer_sensitivity,
    layer_sizes,
    noise_by_layer,
    packed_model_bytes,
    packed_weight_bytes,
    sensitivity_table,
    size_accuracy_curve,
    sqnr_db,
    table_json,
    weight_quantized_accuracy,
)
from pipeline.quant.settings import WeightCalibration
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize

MINMAX_PER_CHANNEL = WeightCalibration("minmax", granularity="per_channel")


def test_packed_bytes_round_up_to_whole_bytes():
    assert [packed_weight_bytes(10, bits) for bits in (2, 3, 4, 8)] == [3, 4, 5, 10]
    assert packed_weight_bytes(0, 4) == 0


def test_a_models_packed_size_sums_its_layers_at_one_width_or_each_ones_own():
    num_weights = {"a": 10, "b": 6}
    assert packed_model_bytes(num_weights, 8) == 16
    assert packed_model_bytes(num_weights, {"a": 3, "b": 4}) == 4 + 3  # ceil(30 / 8) + 24 / 8


def test_sqnr_is_signal_power_over_noise_in_decibels():
    assert sqnr_db(torch.full((4,), 10.0), 1.0) == pytest.approx(20.0)
    assert sqnr_db(torch.ones(3), 0.0) == math.inf


def _brute_force(num_weights, noise, budget):
    layers = list(num_weights)
    best = None
    for bits in itertools.product(*(sorted(noise[layer]) for layer in layers)):
        size = sum(packed_weight_bytes(num_weights[layer], b) for layer, b in zip(layers, bits))
        if size <= budget:
            total = sum(noise[layer][b] for layer, b in zip(layers, bits))
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_allocation_is_the_least_noise_that_fits_as_brute_force_finds(seed):
    rng = random.Random(seed)
    num_weights = {f"layer{i}": rng.randint(1, 60) for i in range(rng.randint(1, 4))}
    noise = {}
    for layer in num_weights:
        values = sorted((rng.random() for _ in range(4)), reverse=True)  # fewer bits, more noise (not required)
        noise[layer] = dict(zip((2, 3, 4, 8), values))
    smallest = sum(packed_weight_bytes(n, 2) for n in num_weights.values())
    largest = sum(packed_weight_bytes(n, 8) for n in num_weights.values())
    budget = rng.randint(smallest, largest + 5)
    chosen = allocate_bits(num_weights, noise, budget)
    assert list(chosen) == list(num_weights)
    assert sum(packed_weight_bytes(num_weights[layer], bits) for layer, bits in chosen.items()) <= budget
    assert sum(noise[layer][bits] for layer, bits in chosen.items()) == pytest.approx(_brute_force(num_weights, noise, budget))


@pytest.mark.parametrize("seed", range(5))
def test_a_model_of_millions_of_weights_fits_its_budget_in_bounded_tables(seed):
    # ResNet-18-sized layers: the DP counts bytes in cells of ceil(budget / DP_CELLS) (one byte a cell took
    # 1.8 GB and minutes); the allocation still fits and, on these spreads of noise, is the brute-force optimum.
    rng = random.Random(seed)
    num_weights = {f"layer{i}": rng.randint(100_000, 5_000_000) for i in range(4)}
    noise = {layer: dict(zip((2, 3, 4, 8), sorted((rng.random() for _ in range(4)), reverse=True)))
             for layer in num_weights}
    smallest = sum(packed_weight_bytes(n, 2) for n in num_weights.values())
    largest = sum(packed_weight_bytes(n, 8) for n in num_weights.values())
    budget = rng.randint(smallest + largest // 100, largest)
    assert budget > DP_CELLS
    chosen = allocate_bits(num_weights, noise, budget)
    assert sum(packed_weight_bytes(num_weights[layer], bits) for layer, bits in chosen.items()) <= budget
    assert sum(noise[layer][bits] for layer, bits in chosen.items()) == pytest.approx(_brute_force(num_weights, noise, budget))


def test_a_large_budget_keeps_every_layer_at_its_quietest_bits():
    noise = {"a": {4: 2.0, 8: 0.1}, "b": {4: 1.0, 8: 0.5}}
    assert allocate_bits({"a": 10, "b": 10}, noise, 10**6) == {"a": 8, "b": 8}


def test_an_impossible_budget_names_the_smallest_size():
    noise = {"a": {2: 2.0, 8: 0.1}, "b": {4: 1.0, 8: 0.5}}
    # a at 2 bits: ceil(10 * 2 / 8) = 3 bytes, b at 4 bits: 3 bytes
    with pytest.raises(ValueError, match=r"size budget 5 bytes is below the smallest size possible, 6 bytes \(every "
                                         r"layer at its fewest bits, a 2, b 4\)"):
        allocate_bits({"a": 10, "b": 6}, noise, 5)
    assert sum(packed_weight_bytes(n, b) for n, b in zip((10, 6), allocate_bits({"a": 10, "b": 6}, noise, 6).values())) == 6


def test_per_layer_bits_quantize_each_layer_to_its_width():
    graph = capture(build_model("net", seed=0).eval())
    names = [node.name for node in graph.layers()]
    bits = dict(zip(names, (2, 3, 4, 6, 8)))
    quantized = quantize_model_weights(graph, bits, "minmax", "per_channel")
    for name, (q_weight, _) in quantized.items():
        assert int(q_weight.abs().max()) == 2 ** (bits[name] - 1) - 1  # minmax: the largest weight hits qmax
    with pytest.raises(ValueError, match=r"^weight bits per layer: missing layers fc3, unknown layers fc9; allowed: one "
                                         r"width for every layer, or one for each of the model's layers conv1, conv2, "
                                         r"fc1, fc2, fc3$"):
        quantize_model_weights(graph, {**{name: 4 for name in names[:-1]}, "fc9": 4})
    with pytest.raises(ValueError, match=r"^weight bits per layer: missing layers fc1, fc2, fc3; allowed: one width"):
        quantize_model_weights(graph, {"conv1": 8, "conv2": 4})  # no "unknown layers []"


def test_sensitivity_grows_as_bits_shrink_and_is_measured_per_layer():
    graph = capture(build_model("net", seed=0).eval())
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    table = layer_sensitivity(graph, normalize(images, SEED_MEAN, SEED_STD), labels, (2, 4, 8),
                              MINMAX_PER_CHANNEL, progress=False)
    assert list(table) == [node.name for node in graph.layers()]
    for layer, by_bits in table.items():
        assert list(by_bits) == [2, 4, 8]
        assert by_bits[2]["noise"] > by_bits[4]["noise"] > by_bits[8]["noise"] > 0, layer
        assert by_bits[2]["sqnr_db"] < by_bits[4]["sqnr_db"] < by_bits[8]["sqnr_db"]
        assert all(0.0 <= entry["accuracy"] <= 100.0 for entry in by_bits.values())


def test_passes_that_change_one_layer_start_there_and_give_the_full_passes_logits_exactly(monkeypatch):
    monkeypatch.setattr(mixed_precision, "FORWARD_BATCH", 8)  # two batches, the last one partial
    graph = capture(build_model("resnet20", seed=0).eval())  # residual adds read tensors from before a changed layer
    images = normalize(torch.randint(0, 256, (12, 32, 32, 3), dtype=torch.uint8,
                                     generator=torch.Generator().manual_seed(3)), SEED_MEAN, SEED_STD)
    layers = list(graph.layers())
    base = {node.name: node.weight.round() for node in layers[::3]}
    variants = [(node.name, node.weight * 0.5) for node in (layers[0], layers[7], layers[8], layers[-1])]
    calls = []
    run_node = graph_run._float_node
    monkeypatch.setattr(graph_run, "_float_node", lambda node, *args: calls.append(node.name) or run_node(node, *args))
    each = mixed_precision._logits_with_each(graph, images, base, variants, "test", progress=False)
    full_passes = 2 * (1 + len(variants)) * len(graph.nodes)  # two batches, the base pass and one per variant
    assert len(calls) < full_passes - 2 * len(graph.nodes)  # the variants' passes skipped their layers' prefixes
    for (layer, weight), logits in zip(variants, each):
        assert torch.equal(logits, mixed_precision._logits(graph, images, {**base, layer: weight})), layer


@pytest.fixture(scope="module")
def measured():
    """The seed's LeNet (untrained) on 64 random images: the graph, the images, and its sensitivity at 2, 4 and 8 bits."""
    graph = capture(build_model("net", seed=0).eval())
    generator = torch.Generator().manual_seed(2)
    images = normalize(torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=generator), SEED_MEAN, SEED_STD)
    labels = torch.randint(0, 10, (64,), generator=generator)
    table = layer_sensitivity(graph, images, labels, (2, 4, 8), MINMAX_PER_CHANNEL, progress=False)
    return graph, images, labels, table


def test_the_curve_puts_each_mixed_allocation_within_the_uniform_size_with_no_more_measured_noise(measured):
    graph, images, labels, table = measured
    noise = noise_by_layer(table)
    num_weights = layer_sizes(graph)
    curve = size_accuracy_curve(graph, images, labels, noise, (8, 4), MINMAX_PER_CHANNEL)
    assert [(point.series, point.width) for point in curve] == [("uniform", 8), ("mixed", 8), ("uniform", 4), ("mixed", 4)]
    for uniform, mixed in zip(curve[::2], curve[1::2]):
        assert uniform.bits == dict.fromkeys(num_weights, uniform.width)
        assert uniform.packed_bytes == packed_model_bytes(num_weights, uniform.width)
        assert mixed.packed_bytes == packed_model_bytes(num_weights, mixed.bits) <= uniform.packed_bytes  # the budget holds
        assert set(mixed.bits.values()) <= {2, 4, 8}
        assert allocation_noise(graph, images, mixed.bits, MINMAX_PER_CHANNEL) <= allocation_noise(
            graph, images, uniform.bits, MINMAX_PER_CHANNEL)  # measured, not predicted
        assert mixed.accuracy == weight_quantized_accuracy(graph, images, labels, mixed.bits, MINMAX_PER_CHANNEL)
    assert curve[1].bits == dict.fromkeys(num_weights, 8)  # with room for every layer at 8 bits, the quietest


def test_with_no_layer_quantized_the_accuracy_is_the_float_models(measured):
    graph, images, labels, _ = measured
    with torch.no_grad():
        predictions = build_model("net", seed=0).eval()(images).argmax(1)
    expected = 100.0 * float((predictions == labels).double().mean())
    assert weight_quantized_accuracy(graph, images, labels, {}) == pytest.approx(expected)


def test_the_json_table_keeps_the_noise_and_writes_an_infinite_sqnr_as_null():
    table = {"conv1": {2: {"accuracy": 50.0, "noise": 0.5, "sqnr_db": 3.0}, 8: {"accuracy": 60.0, "noise": 0.0,
                                                                                 "sqnr_db": math.inf}}}
    written = table_json(table)
    assert written == {"conv1": {"2": {"accuracy": 50.0, "noise": 0.5, "sqnr_db": 3.0},
                                 "8": {"accuracy": 60.0, "noise": 0.0, "sqnr_db": None}}}
    assert noise_by_layer(written) == noise_by_layer(table) == {"conv1": {2: 0.5, 8: 0.0}}
    assert heat_map_rows(table, 61.0) == [
        {"layer": "conv1", "bits": 2, "sqnr_db": 3.0, "accuracy": 50.0, "accuracy_drop": 11.0},
        {"layer": "conv1", "bits": 8, "sqnr_db": None, "accuracy": 60.0, "accuracy_drop": 1.0},
    ]
    text = sensitivity_table(table, {"conv1": 450}, 61.0)
    assert "float 61.00%" in text and "2 bits" in text and "8 bits" in text
    assert text.splitlines()[-1].split() == ["conv1", "450", "50.00", "/", "3.0", "60.00", "/", "inf"]


def test_curve_rows_and_json_name_each_point_by_series_and_width():
    points = [CurvePoint("uniform", 4, 8, 50.0, {"a": 4, "b": 4}), CurvePoint("mixed", 4, 7, 52.5, {"a": 8, "b": 2})]
    assert curve_rows(points)[1] == {"series": "mixed", "width": 4, "packed_bytes": 7, "accuracy": 52.5,
                                     "bits": "a:8 b:2"}
    assert curve_json(points) == {"uniform": {"4": {"packed_bytes": 8, "accuracy": 50.0, "bits": {"a": 4, "b": 4}}},
                                  "mixed": {"4": {"packed_bytes": 7, "accuracy": 52.5, "bits": {"a": 8, "b": 2}}}}


def test_the_chosen_bits_fit_the_budget_and_measure_no_more_noise_than_the_prediction_or_uniform(measured):
    graph, images, _, table = measured
    noise = noise_by_layer(table)
    num_weights = layer_sizes(graph)
    budget = packed_model_bytes(num_weights, 4)
    chosen = choose_bits(graph, images, noise, budget, MINMAX_PER_CHANNEL, progress=False)
    assert packed_model_bytes(num_weights, chosen) <= budget and set(chosen.values()) <= {2, 4, 8}
    measured_noise = allocation_noise(graph, images, chosen, MINMAX_PER_CHANNEL)
    for other in (allocate_bits(num_weights, noise, budget), dict.fromkeys(num_weights, 4)):
        assert measured_noise <= allocation_noise(graph, images, other, MINMAX_PER_CHANNEL)
    # Without refinement rounds: the better measured of the two starts.
    start = choose_bits(graph, images, noise, budget, MINMAX_PER_CHANNEL, rounds=0, progress=False)
    assert start in (allocate_bits(num_weights, noise, budget), dict.fromkeys(num_weights, 4))


def test_refinement_corrects_a_prediction_that_misses_how_layers_add_up(measured):
    """A sensitivity table that lies (every layer says 2 bits cost nothing) makes the DP pick 2 bits wherever the
    budget lets it; measuring whole allocations finds uniform 4 bits quieter and keeps it."""
    graph, images, _, table = measured
    lying = {layer: {2: 0.0, 4: 1.0, 8: 2.0} for layer in noise_by_layer(table)}
    num_weights = layer_sizes(graph)
    budget = packed_model_bytes(num_weights, 4)
    assert set(allocate_bits(num_weights, lying, budget).values()) == {2}
    chosen = choose_bits(graph, images, lying, budget, MINMAX_PER_CHANNEL, progress=False)
    assert allocation_noise(graph, images, chosen, MINMAX_PER_CHANNEL) <= allocation_noise(
        graph, images, dict.fromkeys(num_weights, 4), MINMAX_PER_CHANNEL)
    assert allocation_noise(graph, images, chosen, MINMAX_PER_CHANNEL) < allocation_noise(
        graph, images, allocate_bits(num_weights, lying, budget), MINMAX_PER_CHANNEL)
