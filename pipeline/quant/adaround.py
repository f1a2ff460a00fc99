"""AdaRound (Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Round-to-nearest rounds every weight on its own. AdaRound instead learns, per weight,
whether to round down or up, so that each layer's output, not each weight, stays close
to the float model's. For weight w at scale S the quantized weight is

    q = clamp(floor(w / S) + h(v), qmin, qmax),  h(v) = clamp(sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)

(a rectified sigmoid that reaches 0 and 1 exactly). The logits v start where h(v) is the
fractional part of w / S, so the soft weights start at the float weights, and Adam
minimizes

    || f(W x) - f(W_soft x_q) ||^2 + regularizer * sum(1 - |2 h(v) - 1|^beta)

where x are the layer's float inputs and f(W x) its float output (fused ReLU included), and
x_q the inputs the same images give when every earlier layer already has its chosen integer
weights (the paper's asymmetric reconstruction); with ``quantized_activations`` also with every
activation quantized as in the integer model (BRECQ's and QDrop's inputs), so that the rounding
makes up for activation quantization too, which matters at 4-bit activations. The rounding term is off for the first
``WARMUP`` share of the iterations, then beta is annealed from ``BETA_START`` to ``BETA_END``,
which pushes every h(v) to 0 or 1. The result is hard: round up where v >= 0 (h(v) >= 1/2).

A learned rounding is kept only where it reconstructs the layer's output at least as well as
round-to-nearest on the same inputs (it minimizes a regularized soft surrogate on mini-batches and,
with few iterations or a large learning rate, or at 2 bits, can end worse); otherwise the layer
keeps round-to-nearest, and the errors say which was kept.

Scales are those of the weight calibrator (AdaRound chooses only the rounding), so the
result is the same artifact as round-to-nearest: int weights and scales per layer, and the
bias quantization, the integer engine, C and ONNX are unchanged. Layers are learned one at a
time in the graph's topological order, on calibration images of the training split only;
with a seed the run is deterministic on CPU.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.graph.nodes import Conv, FloatGraph, Linear
from pipeline.graph.run import run_layer, tensor_values
from pipeline.progress import progress_items
from pipeline.quant.ranges import dequantize, int_range, layer_bits, quantize
from pipeline.quant.settings import (
    SEED_WEIGHT_CALIBRATION,
    AdaRoundSettings,
    WeightCalibration,
)
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import normalize

# The rectified sigmoid's stretch, the paper's values: h reaches 0 and 1 at finite logits.
ZETA, GAMMA = 1.1, -0.1
# The rounding regularizer: off for the first WARMUP share of the iterations, then its
# exponent falls linearly from BETA_START (flat: rounding still free) to BETA_END (steep).
WARMUP, BETA_START, BETA_END = 0.2, 20.0, 2.0


# ---------------------------------------------------------------- the math


def rectified_sigmoid(logits: Tensor) -> Tensor:
    """h(v) = clamp(sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1): the soft rounding, 0 (down) to 1 (up)."""
    return (torch.sigmoid(logits) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def initial_logits(fraction: Tensor) -> Tensor:
    """The logits v with h(v) = ``fraction`` (in [0, 1)): the soft weights start at the float weights."""
    return -torch.log((ZETA - GAMMA) / (fraction - GAMMA) - 1)


def rounding_regularizer(soft: Tensor, beta: float) -> Tensor:
    """sum(1 - |2 h - 1|^beta): 0 exactly when every h is 0 or 1, largest at h = 1/2."""
    return (1 - (2 * soft - 1).abs().pow(beta)).sum()


def beta_at(step: int, iterations: int) -> float | None:
    """The regularizer's exponent at ``step`` (0-based), or None during the warm-up (regularizer off)."""
    warmup_steps = int(WARMUP * iterations)
    if step < warmup_steps:
        return None
    progress = (step - warmup_steps) / max(iterations - warmup_steps - 1, 1)
    return BETA_START + (BETA_END - BETA_START) * progress


def hard_rounding(weight_floor: Tensor, logits: Tensor, qmin: int, qmax: int) -> Tensor:
    """The learned integers: floor(w / S) + 1 where h(v) >= 1/2 (v >= 0), clamped to [qmin, qmax] (int64)."""
    return (weight_floor + (logits >= 0).to(weight_floor.dtype)).clamp(qmin, qmax).to(torch.int64)


def reconstruction_error(output: Tensor, target: Tensor) -> Tensor:
    """Squared error summed over channels (dim 1), averaged over the batch and positions."""
    return (output - target).pow(2).sum(dim=1).mean()


# ---------------------------------------------------------------- one layer


@dataclass(frozen=True)
class LayerRounding:
    """One layer's learned rounding: the integers, the final soft rounding h(v), and both reconstruction errors."""

    q_weight: Tensor  # int64, in [qmin, qmax]
    soft: Tensor  # h(v) at the last step, in [0, 1]
    nearest_error: float  # reconstruction error of round-to-nearest on all the inputs
    learned_error: float  # ... of the learned integers

    @property
    def kept(self) -> str:
        """The rounding to keep: "adaround" unless round-to-nearest reconstructs better, then "nearest"."""
        return "adaround" if self.learned_error <= self.nearest_error else "nearest"


def _broadcast(scale: Tensor, ndim: int) -> Tensor:
    return scale.reshape(-1, *([1] * (ndim - 1))) if scale.ndim == 1 else scale


def learn_layer_rounding(
    node: Conv | Linear,
    weight_scale: Tensor,
    bits: int,
    inputs: Tensor,
    targets: Tensor,
    settings: AdaRoundSettings,
    progress: bool | None = None,
) -> LayerRounding:
    """One layer's learned rounding at ``weight_scale`` (0-D, or one per output channel).

    ``inputs`` are the layer's inputs with the earlier layers quantized, ``targets`` its float
    outputs on the same images.
    """
    qmin, qmax = int_range(bits, narrow=True)
    scale = _broadcast(weight_scale.to(torch.float32), node.weight.ndim)
    weight_over_scale = node.weight.detach().to(torch.float32) / scale
    weight_floor = torch.floor(weight_over_scale)
    logits = initial_logits(weight_over_scale - weight_floor).requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=settings.lr)
    generator = torch.Generator().manual_seed(settings.seed)
    for step in progress_items(range(settings.iterations), f"adaround {node.name}", progress, every_item=False):
        batch = torch.randint(len(inputs), (min(settings.batch_size, len(inputs)),), generator=generator)
        soft = rectified_sigmoid(logits)
        output = run_layer(node, inputs[batch], (weight_floor + soft).clamp(qmin, qmax) * scale)
        loss = reconstruction_error(output, targets[batch])
        beta = beta_at(step, settings.iterations)
        if beta is not None:
            loss = loss + settings.regularizer * rounding_regularizer(soft, beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    learned = hard_rounding(weight_floor, logits.detach(), qmin, qmax)
    nearest = quantize(node.weight.detach(), weight_scale, qmin, qmax)  # exactly quantize_layer_weights' integers
    with torch.no_grad():
        nearest_error, learned_error = (
            float(reconstruction_error(run_layer(node, inputs, q.to(torch.float32) * scale), targets))
            for q in (nearest, learned)
        )
        return LayerRounding(learned, rectified_sigmoid(logits), nearest_error, learned_error)


# ---------------------------------------------------------------- the model

def adaround_model_weights(
    graph: FloatGraph,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    bits: int | Mapping[str, int] = 8,
    calibration: WeightCalibration = SEED_WEIGHT_CALIBRATION,
    settings: AdaRoundSettings | None = None,
    progress: bool | None = None,
    activations: Callable[[str, Tensor], Tensor] | None = None,
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, dict[str, float | str]]]:
    """``quantize_model_weights``' result with learned rounding, and each layer's reconstruction errors
    (``{"nearest": ..., "adaround": ..., "kept": "adaround" or "nearest"}``, each on its inputs with the earlier
    layers' kept weights): a layer keeps round-to-nearest where that reconstructs better (``LayerRounding.kept``).

    ``images`` are uint8 calibration images (N, 32, 32, 3) of the training split; the
    scales are ``calibration``'s (``quantize_model_weights`` with the same calibrator, settings and granularity).
    ``activations`` (``scale_groups.activation_quantizer``) quantizes the activations of the inputs each layer
    learns from, as the integer model will (``settings.quantized_activations``); the targets stay float.
    """
    settings = settings or AdaRoundSettings()
    nearest = quantize_model_weights(graph, bits, calibration.calibrator, calibration.granularity, calibration.settings)
    x = normalize(images, mean, std)
    kept: dict[str, tuple[Tensor, Tensor]] = {}
    errors: dict[str, dict[str, float | str]] = {}
    for node in progress_items(graph.layers(), "adaround", progress, name=lambda layer: layer.name):
        nearest_weight, weight_scale = nearest[node.name]
        quantized_so_far = {
            name: dequantize(q_weight, scale).to(torch.float32) for name, (q_weight, scale) in kept.items()
        }
        inputs = tensor_values(graph, x, node.input, quantized_so_far, activations=activations)
        targets = tensor_values(graph, x, node.output)
        rounding = learn_layer_rounding(node, weight_scale, layer_bits(bits, node.name), inputs, targets, settings,
                                        progress)
        kept_weight = rounding.q_weight.to(torch.int8) if rounding.kept == "adaround" else nearest_weight
        kept[node.name] = (kept_weight, weight_scale)
        errors[node.name] = {"nearest": rounding.nearest_error, "adaround": rounding.learned_error,
                             "kept": rounding.kept}
    return kept, errors


__all__ = [
    "LayerRounding", "adaround_model_weights", "beta_at", "hard_rounding", "initial_logits",
    "learn_layer_rounding", "rectified_sigmoid", "reconstruction_error", "rounding_regularizer",
]
