"""Sensitivity per layer and bits, and the exact bit allocation under a size budget."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from pipeline.graph import capture
from pipeline.models import build_model
from pipeline.quant.build import quantize_model_weights
from pipeline.quant.mixed_precision import allocate_bits, layer_sensitivity, packed_weight_bytes, sqnr_db
from pipeline.train import SEED_MEAN, SEED_STD, normalize


def test_packed_bytes_round_up_to_whole_bytes():
    assert [packed_weight_bytes(10, bits) for bits in (2, 3, 4, 8)] == [3, 4, 5, 10]
    assert packed_weight_bytes(0, 4) == 0


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
    with pytest.raises(ValueError, match=r"missing layers \['fc3'\], unknown layers \['fc9'\]"):
        quantize_model_weights(graph, {**{name: 4 for name in names[:-1]}, "fc9": 4})


def test_sensitivity_grows_as_bits_shrink_and_is_measured_per_layer():
    graph = capture(build_model("net", seed=0).eval())
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (64,), generator=generator)
    table = layer_sensitivity(graph, normalize(images, SEED_MEAN, SEED_STD), labels, (2, 4, 8), "minmax",
                              "per_channel", progress=False)
    assert list(table) == [node.name for node in graph.layers()]
    for layer, by_bits in table.items():
        assert list(by_bits) == [2, 4, 8]
        assert by_bits[2]["noise"] > by_bits[4]["noise"] > by_bits[8]["noise"] > 0, layer
        assert by_bits[2]["sqnr_db"] < by_bits[4]["sqnr_db"] < by_bits[8]["sqnr_db"]
        assert all(0.0 <= entry["accuracy"] <= 100.0 for entry in by_bits.values())
