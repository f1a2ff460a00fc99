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
over bytes (``allocate_bits``), not a greedy approximation. The model is then checked against
measurement (``choose_bits``): the noise of whole allocations is measured, and the allocation is
refined with each layer's noise measured in the context of the others' bits. The noise is measured, not the
accuracy, because on a few thousand held-out images one layer's accuracy change is mostly
sampling noise while its logit error is not.

Size-accuracy curve (``size_accuracy_curve``): the held-out accuracy of every layer at one
width against the packed bytes, and of the allocation at that same packed size, weights
only (activations float, round to nearest), so the two series differ in the bits alone.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from pipeline.graph.nodes import FloatGraph
from pipeline.graph.run import run_float
from pipeline.progress import progress_items
from pipeline.quant.ranges import dequantize, layer_bits
from pipeline.quant.settings import SEED_WEIGHT_CALIBRATION, WeightCalibration
from pipeline.quant.weights import quantize_layer_weights
from pipeline.transforms import calibration_indices, normalize

FORWARD_BATCH = 500  # held-out images per forward pass
REFINEMENT_ROUNDS = 2  # rounds of choose_bits' in-context refinement (each a forward pass per layer and width)


def held_out_images(
    images: np.ndarray, labels: np.ndarray, num_samples: int, seed: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """The sensitivity's held-out images, a seeded subset of the training split (``sensitivity.num_samples``,
    ``sensitivity.seed``), normalized, and their labels; a ValueError names the param when the count is out of range."""
    indices = calibration_indices(len(images), num_samples, seed, "sensitivity.num_samples")
    return normalize(torch.from_numpy(images[indices]), mean, std), torch.from_numpy(labels[indices]).long()


def packed_weight_bytes(num_weights: int, bits: int) -> int:
    """Bytes of ``num_weights`` weights of ``bits`` bits each, packed without padding between them."""
    return math.ceil(num_weights * bits / 8)


def layer_sizes(graph: FloatGraph) -> dict[str, int]:
    """The number of weights of each quantized layer, in graph order."""
    return {node.name: node.weight.numel() for node in graph.layers()}


def packed_model_bytes(num_weights: Mapping[str, int], bits: int | Mapping[str, int]) -> int:
    """Bytes of every layer's weights packed at its width (one width, or one per layer)."""
    return sum(packed_weight_bytes(count, layer_bits(bits, layer)) for layer, count in num_weights.items())


def sqnr_db(signal: Tensor, noise_power: float) -> float:
    """10 log10(mean(signal^2) / noise_power); infinite for zero noise."""
    if noise_power == 0:
        return math.inf
    return 10 * math.log10(float(signal.to(torch.float64).pow(2).mean()) / noise_power)


@torch.no_grad()
def _logits(graph: FloatGraph, x: Tensor, weights: Mapping[str, Tensor]) -> Tensor:
    return torch.cat([run_float(graph, x[s : s + FORWARD_BATCH], weights) for s in range(0, len(x), FORWARD_BATCH)])


@torch.no_grad()
def _logits_with_each(graph: FloatGraph, x: Tensor, base: Mapping[str, Tensor], variants: Sequence[tuple[str, Tensor]],
                      desc: str, progress: bool | None) -> list[Tensor]:
    """For each ``(layer, weight)`` of ``variants``, the logits with ``base``'s weights and that layer's weight in place.

    The same logits as ``_logits`` with ``{**base, layer: weight}``, computed with less: per batch, one pass with
    ``base`` keeps every tensor, and each variant's pass starts at its layer (the tensors before it are the same).
    """
    position = {node.name: index for index, node in enumerate(graph.nodes)}
    parts: list[list[Tensor]] = [[] for _ in variants]
    base_values: dict[str, Tensor] = {}
    steps = [(start, index) for start in range(0, len(x), FORWARD_BATCH) for index in range(len(variants))]
    for start, index in progress_items(steps, desc, progress, every_item=False):
        batch = x[start : start + FORWARD_BATCH]
        if index == 0:
            base_values = {}
            run_float(graph, batch, base, observe=base_values.__setitem__)
        layer, weight = variants[index]
        before = {node.output: base_values[node.output] for node in graph.nodes[: position[layer]]}
        parts[index].append(run_float(graph, batch, {**base, layer: weight}, computed=before))
    return [torch.cat(logits) for logits in parts]


def _accuracy(logits: Tensor, labels: Tensor) -> float:
    return 100.0 * float((logits.argmax(1) == labels).to(torch.float64).mean())


def _fake_quantized(weight: Tensor, bits: int, calibration: WeightCalibration) -> Tensor:
    """``weight`` quantized to ``bits`` and back to float32: the values the integer model computes with."""
    q_weight, weight_scale = quantize_layer_weights(weight, bits, calibration.calibrator, calibration.granularity,
                                                    calibration.settings)
    return dequantize(q_weight, weight_scale, axis=0).to(torch.float32)


def _quantized_weights(graph: FloatGraph, bits: Mapping[str, int], calibration: WeightCalibration) -> dict[str, Tensor]:
    """The layers in ``bits``, by name: their weights quantized to their widths and back to float32."""
    return {node.name: _fake_quantized(node.weight, bits[node.name], calibration)
            for node in graph.layers() if node.name in bits}


def output_noise(logits: Tensor, float_logits: Tensor) -> float:
    """The output noise of a quantized model: its logits' mean squared error against the float model's."""
    return float((logits.to(torch.float64) - float_logits.to(torch.float64)).pow(2).mean())


def allocation_noise(
    graph: FloatGraph,
    x_normalized: Tensor,
    bits: Mapping[str, int],
    calibration: WeightCalibration = SEED_WEIGHT_CALIBRATION,
) -> float:
    """The measured ``output_noise`` with the layers in ``bits`` quantized to their widths (activations float)."""
    weights = _quantized_weights(graph, bits, calibration)
    return output_noise(_logits(graph, x_normalized, weights), _logits(graph, x_normalized, {}))


def weight_quantized_accuracy(
    graph: FloatGraph,
    x_normalized: Tensor,
    labels: Tensor,
    bits: Mapping[str, int],
    calibration: WeightCalibration = SEED_WEIGHT_CALIBRATION,
) -> float:
    """Accuracy (%) with the weights of the layers in ``bits`` quantized to their widths, the rest and activations float."""
    weights = _quantized_weights(graph, bits, calibration)
    return _accuracy(_logits(graph, x_normalized, weights), labels)


def layer_sensitivity(
    graph: FloatGraph,
    x_normalized: Tensor,
    labels: Tensor,
    bits_choices: Sequence[int],
    calibration: WeightCalibration = SEED_WEIGHT_CALIBRATION,
    progress: bool | None = None,
) -> dict[str, dict[int, dict[str, float]]]:
    """``{layer: {bits: {"accuracy", "noise", "sqnr_db"}}}`` with only that layer's weights quantized.

    ``x_normalized`` and ``labels`` are held-out images of the training split (never the test split);
    accuracy is in percent, noise the logits' mean squared error against the float model's.
    """
    float_logits = _logits(graph, x_normalized, {})
    table: dict[str, dict[int, dict[str, float]]] = {}
    pairs = [(node.name, bits) for node in graph.layers() for bits in bits_choices]
    layers = {node.name: node for node in graph.layers()}
    variants = [(name, _fake_quantized(layers[name].weight, bits, calibration))
                for name, bits in pairs]
    for (name, bits), logits in zip(pairs, _logits_with_each(graph, x_normalized, {}, variants, "sensitivity", progress)):
        noise = output_noise(logits, float_logits)
        table.setdefault(name, {})[bits] = {"accuracy": _accuracy(logits, labels), "noise": noise,
                                            "sqnr_db": sqnr_db(float_logits, noise)}
    return table


DP_CELLS = 1 << 20  # most entries of allocate_bits' tables per layer (8 MB of float64)


def allocate_bits(
    num_weights: Mapping[str, int], noise: Mapping[str, Mapping[int, float]], budget_bytes: int
) -> dict[str, int]:
    """Bits per layer whose packed weights fit ``budget_bytes`` with the least summed ``noise``.

    ``noise[layer][bits]`` is the predicted output noise of that layer at those bits (the
    candidates are its keys). Dynamic programming over the bytes used, layer by layer; among allocations of equal
    noise, the fewest bytes. Exact for budgets up to ``DP_CELLS`` bytes; above (ResNet-18's 11 MB), bytes are counted in
    cells of ceil(budget / DP_CELLS) bytes, each layer's size rounded up, so the allocation still fits the budget and
    the tables stay ~1 M entries a layer (not one per byte: 1.8 GB and minutes for 11 MB). A budget below the smallest
    size the candidates allow is a ValueError naming that size.
    """
    layers = list(num_weights)
    choices = {layer: sorted(noise[layer], reverse=True) for layer in layers}
    smallest = sum(packed_weight_bytes(num_weights[layer], min(choices[layer])) for layer in layers)
    if budget_bytes < smallest:
        raise ValueError(f"size budget {budget_bytes} bytes is below the smallest size possible, {smallest} bytes "
                         f"(every layer at its fewest bits, {', '.join(f'{l} {min(choices[l])}' for l in layers)})")
    budget_bytes = min(budget_bytes, sum(packed_weight_bytes(num_weights[l], max(choices[l])) for l in layers))
    cell = -(-budget_bytes // DP_CELLS)  # bytes per DP cell: 1 (exact) up to DP_CELLS bytes

    def cells(layer: str, bits: int) -> int:
        return -(-packed_weight_bytes(num_weights[layer], bits) // cell)

    budget = budget_bytes // cell
    if sum(cells(layer, min(choices[layer])) for layer in layers) > budget:
        # Only within one cell per layer of the smallest size (cell > 1): the fewest bits everywhere, which fits.
        return {layer: min(choices[layer]) for layer in layers}
    # best[c] = least noise of the layers so far in exactly c cells (inf: impossible)
    best = np.full(budget + 1, np.inf)
    best[0] = 0.0
    picks = []
    for layer in layers:
        new = np.full(budget + 1, np.inf)
        pick = np.full(budget + 1, -1, dtype=np.int8)  # index into choices[layer]
        for index, bits in enumerate(choices[layer]):
            size = cells(layer, bits)
            if size > budget:
                continue
            candidate = np.full(budget + 1, np.inf)
            candidate[size:] = best[: budget + 1 - size] + noise[layer][bits]
            better = candidate < new
            new[better], pick[better] = candidate[better], index
        best = new
        picks.append(pick)
    used = int(np.argmin(best))  # the first minimum: the fewest cells among equal noise
    chosen: dict[str, int] = {}
    for layer, pick in zip(reversed(layers), reversed(picks)):
        bits = choices[layer][int(pick[used])]
        chosen[layer] = bits
        used -= cells(layer, bits)
    return {layer: chosen[layer] for layer in layers}


def choose_bits(
    graph: FloatGraph,
    x_normalized: Tensor,
    noise: Mapping[str, Mapping[int, float]],
    budget_bytes: int,
    calibration: WeightCalibration = SEED_WEIGHT_CALIBRATION,
    rounds: int = REFINEMENT_ROUNDS,
    progress: bool | None = None,
) -> dict[str, int]:
    """Bits per layer within ``budget_bytes``: ``allocate_bits`` on the sensitivity's ``noise``, then refined
    against the measured noise of whole allocations on ``x_normalized`` (held-out images of the training split).

    The sum of each layer's noise alone is a prediction: quantizing several layers can add more
    noise than that, or less (measured on the 25-epoch Net with 3-sigma per-tensor weights at the
    4-bit size: the allocation predicted at 0.53 measured 0.65, uniform 4 bits measured 0.63). So the
    search starts from whichever of that allocation and the widest uniform width within the budget
    measures less noise, and each of at most ``rounds`` rounds re-measures every layer's noise at every
    width of ``noise`` with every other layer at its current bits (in context), solves
    ``allocate_bits`` on those marginal noises, and keeps the result only when its measured noise is
    lower. Each round costs a forward pass per layer and width.
    """
    num_weights = layer_sizes(graph)
    widths = sorted({bits for by_bits in noise.values() for bits in by_bits}, reverse=True)
    float_logits = _logits(graph, x_normalized, {})
    layers = {node.name: node for node in graph.layers()}
    quantized: dict[tuple[str, int], Tensor] = {}

    def weights(bits: Mapping[str, int]) -> dict[str, Tensor]:
        for key in bits.items():
            if key not in quantized:
                quantized[key] = _fake_quantized(layers[key[0]].weight, key[1], calibration)
        return {name: quantized[name, width] for name, width in bits.items()}

    def measured(bits: Mapping[str, int]) -> float:
        return output_noise(_logits(graph, x_normalized, weights(bits)), float_logits)

    starts = [allocate_bits(num_weights, noise, budget_bytes)]
    uniform = next((width for width in widths if packed_model_bytes(num_weights, width) <= budget_bytes), None)
    if uniform is not None:
        starts.append(dict.fromkeys(num_weights, uniform))
    start_noise = [measured(bits) for bits in starts]
    current_noise = min(start_noise)
    current = starts[start_noise.index(current_noise)]  # the first on a tie: the allocation
    for _ in range(rounds):
        marginal: dict[str, dict[int, float]] = {name: {current[name]: 0.0} for name in num_weights}
        changes = [(name, width) for name in num_weights for width in widths if width != current[name]]
        variants = [(name, weights({name: width})[name]) for name, width in changes]
        for (name, width), logits in zip(changes, _logits_with_each(graph, x_normalized, weights(current), variants,
                                                                     "mixed precision", progress)):
            marginal[name][width] = output_noise(logits, float_logits) - current_noise
        candidate = allocate_bits(num_weights, marginal, budget_bytes)
        candidate_noise = measured(candidate)
        if candidate == current or candidate_noise >= current_noise:
            break
        current, current_noise = candidate, candidate_noise
    return current


def noise_by_layer(table: Mapping[str, Mapping[Any, Mapping[str, float]]]) -> dict[str, dict[int, float]]:
    """The output noise alone, ``{layer: {bits: noise}}``, what ``allocate_bits`` minimizes, of ``layer_sensitivity``'s
    table or of ``table_json``'s (bits as strings)."""
    return {layer: {int(bits): entry["noise"] for bits, entry in by_bits.items()} for layer, by_bits in table.items()}


def table_json(table: Mapping[str, Mapping[int, Mapping[str, float]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """``layer_sensitivity``'s table for a JSON file: the bits as string keys, an infinite SQNR (no noise) as null."""
    return {layer: {str(bits): {**entry, "sqnr_db": _finite_or_none(entry["sqnr_db"])} for bits, entry in by_bits.items()}
            for layer, by_bits in table.items()}


class CurvePoint(NamedTuple):
    """One point of the size-accuracy curve: a series' weight bits, their packed size and held-out accuracy."""

    series: str  # "uniform" (every layer at ``width``) or "mixed" (allocated at the uniform one's packed size)
    width: int  # the uniform width whose packed size this point has (mixed: at most)
    packed_bytes: int
    accuracy: float  # percent, weights quantized, activations float
    bits: dict[str, int]


def size_accuracy_curve(
    graph: FloatGraph,
    x_normalized: Tensor,
    labels: Tensor,
    noise: Mapping[str, Mapping[int, float]],
    widths: Sequence[int],
    calibration: WeightCalibration = SEED_WEIGHT_CALIBRATION,
    progress: bool | None = None,
) -> list[CurvePoint]:
    """For each of ``widths``: every layer at that width, and ``choose_bits``' choice at the same packed size.

    ``noise`` is ``noise_by_layer`` of the sensitivity; its bits are the widths a layer may get. ``progress`` shows
    the widths done (``progress_items``), not each allocation's refinement.
    """
    num_weights = layer_sizes(graph)
    measured: dict[tuple[int, ...], float] = {}  # by allocation: mixed often equals uniform (at the widest always)
    points = []
    for width in progress_items(widths, "size-accuracy curve", progress, name=lambda width: f"{width}-bit size"):
        budget = packed_model_bytes(num_weights, width)
        mixed = choose_bits(graph, x_normalized, noise, budget, calibration, progress=False)
        for series, bits in (("uniform", dict.fromkeys(num_weights, width)), ("mixed", mixed)):
            key = tuple(bits.values())
            if key not in measured:
                measured[key] = weight_quantized_accuracy(graph, x_normalized, labels, bits, calibration)
            points.append(CurvePoint(series, width, packed_model_bytes(num_weights, bits), measured[key], bits))
    return points


def curve_json(points: Sequence[CurvePoint]) -> dict[str, dict[str, dict[str, Any]]]:
    """The curve for a JSON file: ``{series: {width: {"packed_bytes", "accuracy", "bits"}}}``."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for point in points:
        result.setdefault(point.series, {})[str(point.width)] = {
            "packed_bytes": point.packed_bytes, "accuracy": point.accuracy, "bits": point.bits}
    return result


def sensitivity_table(table: Mapping[str, Mapping[int, Mapping[str, float]]], num_weights: Mapping[str, int],
                      float_accuracy: float) -> str:
    """The sensitivity as a text table, a row per layer, a column per width: "accuracy % / SQNR dB"."""
    widths = list(next(iter(table.values())))
    lines = [f"held-out accuracy (%) / output SQNR (dB) with only that layer's weights quantized; "
             f"float {float_accuracy:.2f}%",
             f"{'layer':<10} {'weights':>9}" + "".join(f"{f'{bits} bits':>16}" for bits in widths)]
    for layer, by_bits in table.items():
        cells = "".join(f"{by_bits[bits]['accuracy']:>8.2f} / {by_bits[bits]['sqnr_db']:>5.1f}" for bits in widths)
        lines.append(f"{layer:<10} {num_weights[layer]:>9,}{cells}")
    return "\n".join(lines)


def heat_map_rows(table: Mapping[str, Mapping[int, Mapping[str, float]]], float_accuracy: float) -> list[dict[str, Any]]:
    """One row per layer and width, in graph order: the data of the layers x bits heat maps (SQNR, accuracy)."""
    return [{"layer": layer, "bits": bits, "sqnr_db": _finite_or_none(entry["sqnr_db"]),
             "accuracy": entry["accuracy"], "accuracy_drop": float_accuracy - entry["accuracy"]}
            for layer, by_bits in table.items() for bits, entry in by_bits.items()]


def curve_rows(points: Sequence[CurvePoint]) -> list[dict[str, Any]]:
    """One row per curve point: series, width, packed bytes, accuracy and the bits per layer (for the tooltip)."""
    return [{"series": point.series, "width": point.width, "packed_bytes": point.packed_bytes,
             "accuracy": point.accuracy, "bits": " ".join(f"{layer}:{bits}" for layer, bits in point.bits.items())}
            for point in points]


def _finite_or_none(value: float) -> float | None:
    """JSON and the plots have no infinity: an exact layer's SQNR (no noise at all) is None."""
    return value if math.isfinite(value) else None


__all__ = ["CurvePoint", "allocate_bits", "allocation_noise", "choose_bits", "curve_json", "curve_rows", "heat_map_rows", "held_out_images", "layer_sensitivity", "layer_sizes",
           "noise_by_layer", "output_noise", "packed_model_bytes", "packed_weight_bytes", "sensitivity_table", "size_accuracy_curve",
           "sqnr_db", "table_json", "weight_quantized_accuracy"]
