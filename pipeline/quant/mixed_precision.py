"""Per-layer sensitivity to weight bits, and per-layer bits chosen to fit a weight-size budget.

Sensitivity: for each quantized layer and each bit width, the model with only that layer's
weights quantized (every other layer and every activation float) on held-out images of the
training split: its accuracy, and the output noise it adds, as the mean squared error of the
logits against the float model's and as SQNR in dB (float logits' power over that error).

Allocation: the bits per layer that fit ``budget_bytes`` of packed weights (each layer
ceil(weights x bits / 8) bytes) with the least predicted output noise, taking the noise of
several quantized layers as the sum of each one's alone (errors of different layers are
close to uncorrelated; ZeroQ's and HAWQ-V3's allocations assume the same additive model).
The choice is exact for that model: a multiple-choice knapsack solved by dynamic programming
over bytes (``allocate_bits``), not a greedy approximation. The noise is measured, not the
accuracy, because on a few thousand held-out images one layer's accuracy change is mostly
sampling noise while its logit error is not.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.graph import FloatGraph, run_float
from pipeline.progress import progress_bar
from pipeline.quant.build import quantize_layer_weights
from pipeline.quant.ranges import dequantize

FORWARD_BATCH = 500  # held-out images per forward pass


def packed_weight_bytes(num_weights: int, bits: int) -> int:
    """Bytes of ``num_weights`` weights of ``bits`` bits each, packed without padding between them."""
    return math.ceil(num_weights * bits / 8)


def sqnr_db(signal: Tensor, noise_power: float) -> float:
    """10 log10(mean(signal^2) / noise_power); infinite for zero noise."""
    if noise_power == 0:
        return math.inf
    return 10 * math.log10(float(signal.to(torch.float64).pow(2).mean()) / noise_power)


@torch.no_grad()
def _logits(graph: FloatGraph, x: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([run_float(graph, x[s : s + FORWARD_BATCH], weights) for s in range(0, len(x), FORWARD_BATCH)])


def layer_sensitivity(
    graph: FloatGraph,
    x_normalized: Tensor,
    labels: Tensor,
    bits_choices: Sequence[int],
    calibrator: str = "sigma",
    granularity: str = "per_tensor",
    calibrator_settings: Any = None,
    progress: bool | None = None,
) -> dict[str, dict[int, dict[str, float]]]:
    """``{layer: {bits: {"accuracy", "noise", "sqnr_db"}}}`` with only that layer's weights quantized.

    ``x_normalized`` and ``labels`` are held-out images of the training split (never the test split);
    accuracy is in percent, noise the logits' mean squared error against the float model's.
    """
    float_logits = _logits(graph, x_normalized, {})
    table: dict[str, dict[int, dict[str, float]]] = {}
    pairs = [(node, bits) for node in graph.layers() for bits in bits_choices]
    for node, bits in progress_bar(pairs, "sensitivity", progress):
        q_weight, weight_scale = quantize_layer_weights(node.weight, bits, calibrator, granularity, calibrator_settings)
        weight = dequantize(q_weight, weight_scale, axis=0).to(torch.float32)
        logits = _logits(graph, x_normalized, {node.name: weight})
        noise = float((logits.to(torch.float64) - float_logits.to(torch.float64)).pow(2).mean())
        accuracy = 100.0 * float((logits.argmax(1) == labels).to(torch.float64).mean())
        table.setdefault(node.name, {})[bits] = {"accuracy": accuracy, "noise": noise,
                                                 "sqnr_db": sqnr_db(float_logits, noise)}
    return table


def allocate_bits(
    num_weights: Mapping[str, int], noise: Mapping[str, Mapping[int, float]], budget_bytes: int
) -> dict[str, int]:
    """Bits per layer whose packed weights fit ``budget_bytes`` with the least summed ``noise``.

    ``noise[layer][bits]`` is the predicted output noise of that layer at those bits (the
    candidates are its keys). Exact: dynamic programming over the bytes used, layer by layer;
    among allocations of equal noise, the fewest bytes. A budget below the smallest size the candidates allow is a ValueError
    naming that size.
    """
    layers = list(num_weights)
    choices = {layer: sorted(noise[layer], reverse=True) for layer in layers}
    smallest = sum(packed_weight_bytes(num_weights[layer], min(choices[layer])) for layer in layers)
    if budget_bytes < smallest:
        raise ValueError(f"size budget {budget_bytes} bytes is below the smallest size possible, {smallest} bytes "
                         f"(every layer at its fewest bits, {', '.join(f'{l} {min(choices[l])}' for l in layers)})")
    budget = min(budget_bytes, sum(packed_weight_bytes(num_weights[l], max(choices[l])) for l in layers))
    # best[b] = least noise of the layers so far in exactly b bytes (inf: impossible)
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    picks = []
    for layer in layers:
        new = np.full(budget + 1, np.inf)
        pick = np.full(budget + 1, -1, dtype=np.int64)
        for index, bits in enumerate(choices[layer]):
            size = packed_weight_bytes(num_weights[layer], bits)
            if size > budget:
                continue
            candidate = np.full(budget + 1, np.inf)
            candidate[size:] = best[: budget + 1 - size] + noise[layer][bits]
            better = candidate < new
            new[better], pick[better] = candidate[better], index
        best = new
        picks.append(pick)
    used = int(np.argmin(best))  # the first minimum: the fewest bytes among equal noise
    chosen: dict[str, int] = {}
    for layer, pick in zip(reversed(layers), reversed(picks)):
        bits = choices[layer][int(pick[used])]
        chosen[layer] = bits
        used -= packed_weight_bytes(num_weights[layer], bits)
    return {layer: chosen[layer] for layer in layers}


__all__ = ["allocate_bits", "layer_sensitivity", "packed_weight_bytes", "sqnr_db"]
