"""Accuracy drop of this project's PTQ settings and of four other PTQ tools on one checkpoint, same calibration images.

One run takes one fp32 checkpoint and the calibration images the profile stage used
(``--profile``'s ``indices``, from the TRAINING split), the same images for every method,
and measures on the 10,000 TEST images:

- fp32: the PyTorch model in eval mode;
- this project, through the integer engine (``engine_predictions``, i.e. metrics.json's ``accuracy.integer``):
  every activation calibrator (seed, minmax, percentile 99.99, mse, entropy) x weight
  calibrator (sigma k=3, minmax, mse) x granularity (per_tensor, per_channel), 30 settings,
  ``--bits`` weight bits, each calibrator with its default options (those of params.yaml);
  ``--activation-calibrators`` / ``--weight-calibrators`` run a subset (the two reported
  settings below are always run);
- torch.ao FX static PTQ (``prepare_fx`` / ``convert_fx``) with the x86 qconfig: real int8
  kernels (``torch.backends.quantized.engine = "x86"``);
- ONNX Runtime ``quantize_static`` in QDQ format, int8 activations and int8 weights
  (S8S8, ONNX Runtime's defaults otherwise: asymmetric activations, symmetric weights),
  calibrate_method MinMax and Percentile (ONNX Runtime's default 99.999, symmetric), each
  per-tensor and per-channel (4 runs), on the fp32 model exported with ``torch.onnx.export``
  (the torch.export-based exporter, which needs onnxscript; the legacy TorchScript exporter
  when that fails) and pre-processed with ``quant_pre_process``; run by onnxruntime's CPU
  provider, which fuses the QDQ pairs into its int8 kernels;
- torchao PT2E: ``torch.export.export(...).module()``, ``prepare_pt2e`` with
  ``X86InductorQuantizer`` (its default static config), calibration, ``convert_pt2e``; the
  converted module runs in eager mode, i.e. as a reference model (quantize / dequantize
  around float ops: the int8 numerics, not Inductor's int8 kernels);
- NNCF ``nncf.quantize`` with its defaults (min-max ranges, fast bias correction, per-channel
  symmetric weights, unsigned activations after ReLU), target device ANY, every calibration image;
  the quantized module runs its fake-quantize operations in PyTorch (the int8 numerics).

``--bits`` below 8 narrows the peers' weights too, to the same symmetric range as this
project's, [-(2^(b-1)-1), 2^(b-1)-1] (stored in int8): torch.ao FX and torchao PT2E through
their per-channel min-max weight observer's quant_min/quant_max (quant_min -7 at 4 bits:
with -8 torch.ao's convert stores 17 levels), ONNX Runtime only at 4 bits, with
``weight_type=QInt4`` (its only weight type below 8 bits; other widths print why not), NNCF only
at 4 bits, through its NPU hardware config (its only one with 4-bit quantizers: symmetric
weights over -8..7, one level more than this project's).

``--activation-bits`` below 8 narrows activations: this project's to the signed range
[-2^(b-1), 2^(b-1)-1] (``--unsigned-activations``: [0, 2^b-1] for tensors non-negative by
construction, as ``profile.unsigned_activations``), each calibrator fitting its range to that
qmax; the peers' to their own unsigned asymmetric [0, 2^b-1] (torch.ao FX and torchao PT2E:
their histogram observers' quant_max; ONNX Runtime: ``activation_type=QUInt4``, at 4 bits only;
NNCF: 4 bits only, its NPU config's symmetric quantizers, [0, 15] after ReLU).
``--unsigned-activations`` alone changes this project's rows only (the peers' activations are
unsigned already).

``--equalize`` adds the chosen setting on the cross-layer-equalized graph
(``pipeline.quant.equalization``): its activations profiled again on the same calibration
images (the tensors between equalized layers change), its weights quantized with the same
calibrator and granularity.

``--adaround`` and ``--bias-correction`` add the weight methods that learn from images
(``pipeline.quant.adaround`` and ``pipeline.quant.bias_correction``, params.yaml's defaults) to
the setting chosen on held-out images: the same weight calibrator, granularity and
activation ranges, learning from ``quantize_weights.calibration.num_samples`` of the
calibration images (a seeded subset); ``--quantized-activations`` has AdaRound learn from inputs
with the chosen setting's activations quantized (``quantize_weights.adaround.quantized_activations``).
Each enabled method, and both together when both are
given, is one more row with its held-out and test accuracy (the choice itself is made among
the round-to-nearest settings).

``--mixed-precision`` adds the chosen setting with per-layer weight bits from
``pipeline.quant.mixed_precision``: each layer's sensitivity (output noise with only that layer
quantized, at 2, 3, 4, 6 and 8 bits) on the first ``--sensitivity-images`` held-out images, then
the bits with the least summed noise whose packed weights fit the packed size of uniform
``--bits`` weights (exact dynamic programming), refined against the noise of whole allocations
measured on the same images (``choose_bits``); the row names the bits it chose.

``--skip fx onnxruntime pt2e nncf`` leaves peers out; a peer that cannot run here (a missing
package, an export or quantization error) prints why and the run goes on.

"Chosen on held-out": ``--validation`` training images that are not calibration images
(a seeded sample, ``--validation-seed``, of the training split minus the profile indices)
are held out; every setting of this project is run on them, and the setting with the best
held-out accuracy is chosen (ties: the higher agreement with the fp32 model's held-out
predictions, then the first in the order the settings are listed in above). Only that
setting's TEST accuracy is reported as "chosen on held-out": the test set plays no part in
the choice. The held-out images are held out of calibration, not of training (the train
stage trains on the whole training split), so held-out accuracies are near training
accuracy and higher than test accuracies; they serve to rank settings, not to estimate
test accuracy. Two settings are always reported besides it: the defaults (seed activation
rule, sigma k=3 per-tensor weights) and max-abs per-channel (minmax activations, minmax
per-channel weights). Drop = fp32 test accuracy minus the method's test accuracy, in points
(negative: the int8 model scored higher).

Noise: one accuracy on 10,000 test images has a binomial standard error of about 0.4-0.5
points, but a drop compares two models on the same images, and only the images where exactly
one of them is right move it: each drop is printed with that paired standard error
(``pipeline.evaluation.paired_difference_error``), 0.1-0.4 points here. Two methods' drops
are a measurable difference only well beyond their standard errors (a different calibration
subset reorders close ones); the held-out ranking is as noisy.

Prints a markdown table (fp32 on top; image counts, seconds per method), then every
setting of this project sorted by held-out accuracy.

    python -m benchmarks.ptq_compare [--checkpoint data/model.pt] [--data data/dataset.npz]
        [--profile data/profile.json] [--model NAME] [--bits 8] [--validation 5000]
        [--skip PEER ...] [--activation-calibrators ...] [--weight-calibrators ...] [--adaround [--quantized-activations]] [--bias-correction]
        [--mixed-precision [--sensitivity-images 1000]] [--equalize] [--activation-bits 8] [--unsigned-activations]

Run it after ``dvc repro`` (the defaults are the pipeline's artifacts). ``--model NAME``
names the architecture of a checkpoint that is a bare state_dict (it is then normalized
with the seed's mean and std). The peers need the ``bench`` extra (``pip install -e
'.[bench]'``: onnxscript, torchao, nncf).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import itertools
import logging
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import stages  # noqa: F401, I001  (first: importing stages pins the CPU kernels before torch loads, as in the pipeline)
from pipeline.arrays import load_arrays
from pipeline.evaluation import (
    engine_predictions,
    paired_difference_error,
    percent_equal,
)
from pipeline.graph.capture import capture
from pipeline.graph.nodes import FloatGraph, with_biases
from pipeline.io import load_checkpoint, read_json
from pipeline.models import CheckpointError, predict, restore_model
from pipeline.profile import calibrate_ranges, profile_activations
from pipeline.quant.bias_correction import corrected_biases
from pipeline.quant.build import build_integer_model
from pipeline.quant.calibrators import (
    ACTIVATION_CALIBRATORS,
    GRANULARITIES,
    WEIGHT_CALIBRATORS,
)
from pipeline.quant.equalization import equalize
from pipeline.quant.mixed_precision import (
    choose_bits,
    layer_sensitivity,
    noise_by_layer,
    packed_weight_bytes,
)
from pipeline.quant.ranges import ActivationFormat, int_range
from pipeline.quant.rounding import RoundingInputs, round_weights
from pipeline.quant.scale_groups import activation_quantizer, group_ranges
from pipeline.quant.settings import (
    AdaRoundSettings,
    CalibrationImages,
    WeightCalibration,
    WeightQuantization,
)
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize, sample_indices
from stages.common import ARRAYS, CHECKPOINT, PROFILE

PEERS = ("fx", "onnxruntime", "pt2e", "nncf")
BATCH = 1000  # images per inference batch
CALIBRATION_BATCH = 500  # images per calibration batch (the profile stage's default)
ORT_CALIBRATION_CHUNK = 200  # images per onnxruntime calibration pass (it keeps a pass's every tensor in memory)


@dataclass(frozen=True)
class Setting:
    activation: str
    weight: str
    granularity: str

    @property
    def weight_calibration(self) -> WeightCalibration:
        """The weight calibrator (default options) and granularity."""
        return WeightCalibration(self.weight, granularity=self.granularity)

    def label(self) -> str:
        weight = "sigma k=3" if self.weight == "sigma" else self.weight
        return f"act {self.activation}, w {weight} {self.granularity}"


DEFAULT = Setting("seed", "sigma", "per_tensor")
MAX_ABS = Setting("minmax", "minmax", "per_channel")


@dataclass
class Result:
    """One setting of this project: accuracies in percent (None: not measured), seconds, and why it failed."""

    setting: Setting
    held_out: float | None = None
    agreement: float | None = None  # with the fp32 model's held-out predictions
    test: float | None = None
    seconds: float = 0.0
    same_as: Setting | None = None  # an earlier setting that built the same integer model
    error: str | None = None
    test_predictions: Tensor | None = None


@dataclass
class Row:
    method: str
    test: float | None
    held_out: float | None = None
    seconds: float | None = None
    note: str = ""
    test_predictions: Tensor | None = None  # for the drop's paired standard error


@dataclass
class Inputs:
    """Everything every method shares: the fp32 model, normalization, and the three image sets."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]
    calibration: Tensor  # uint8 (N, 32, 32, 3), training split, the profile indices
    held_out: Tensor
    held_out_labels: Tensor
    test: Tensor
    test_labels: Tensor
    threads: int
    # This project's activation format (--activation-bits, --unsigned-activations); the peers' follow --activation-bits.
    activation_format: ActivationFormat = ActivationFormat()

    def normalized(self, images: Tensor) -> Tensor:
        return normalize(images, self.mean, self.std)


# ---------------------------------------------------------------- inputs


def load_model(path: str, model_name: str | None) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...], str]:
    """The fp32 model in eval mode, its normalization and its architecture name.

    A pipeline checkpoint (dict with "model", "state_dict", "mean", "std") names its model; a bare
    state_dict needs ``model_name`` and is normalized with the seed's mean and std.
    """
    checkpoint = load_checkpoint(path)
    if "state_dict" not in checkpoint:  # a bare state_dict
        if model_name is None:
            sys.exit(f"error: {path} is a bare state_dict (no 'model' or 'state_dict' key): name its model with --model")
        checkpoint = {"model": model_name, "state_dict": checkpoint, "mean": SEED_MEAN, "std": SEED_STD}
    name = model_name or checkpoint.get("model")
    try:
        model = restore_model(checkpoint, name, path)
    except CheckpointError as error:
        sys.exit(f"error: {error}")
    return model.eval(), tuple(checkpoint.get("mean", SEED_MEAN)), tuple(checkpoint.get("std", SEED_STD)), name


def held_out_indices(num_train: int, calibration: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` sorted training indices that are not calibration indices, reproducible from ``seed``."""
    complement = np.setdiff1d(np.arange(num_train), calibration)
    if not 1 <= count <= len(complement):
        sys.exit(f"error: --validation {count} is out of range; allowed: 1..{len(complement)} "
                 "(training images outside the calibration subset)")
    return complement[sample_indices(len(complement), count, seed)]


@torch.no_grad()
def batched_predictions(run: Callable[[Tensor], Tensor], x_normalized: Tensor) -> Tensor:
    """argmax of ``run`` over normalized float images, in batches of ``BATCH``."""
    return torch.cat([torch.as_tensor(run(x_normalized[s : s + BATCH])).argmax(1) for s in range(0, len(x_normalized), BATCH)])


# ---------------------------------------------------------------- this project


def our_settings(activation_calibrators: Iterable[str], weight_calibrators: Iterable[str]) -> list[Setting]:
    """The product of the subsets, in registry order, plus the defaults and max-abs per-channel."""
    chosen = set(activation_calibrators), set(weight_calibrators)
    settings = [
        Setting(a, w, g)
        for a, w, g in itertools.product(ACTIVATION_CALIBRATORS, WEIGHT_CALIBRATORS, GRANULARITIES)
        if a in chosen[0] and w in chosen[1]
    ]
    return settings + [s for s in (DEFAULT, MAX_ABS) if s not in settings]


def run_ours(inputs: Inputs, settings: list[Setting], bits: int, test_all: bool,
             fp32_held_out: Tensor) -> tuple[list[Result], dict[str, dict[str, float]]]:
    """Every setting through the integer engine: held-out accuracy, then test accuracy (all, or the reported ones).

    Also returns each activation calibrator's ranges, by scale-group root.
    """
    graph = capture(inputs.model)
    started = time.perf_counter()
    stats = profile_activations(graph, inputs.calibration, inputs.mean, inputs.std, CALIBRATION_BATCH, progress=False)
    print(f"profiled {len(stats)} scale groups on {len(inputs.calibration)} calibration images "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    ranges = {a: calibrated_ranges(graph, stats, a, inputs.activation_format)
              for a in dict.fromkeys(s.activation for s in settings)}
    weights = {
        (w, g): quantize_model_weights(graph, bits, w, g)
        for w, g in dict.fromkeys((s.weight, s.granularity) for s in settings)
    }
    results: dict[Setting, Result] = {}
    built: dict[tuple, Setting] = {}  # same weights and same ranges: the same integer model, the same predictions
    models = {}
    for setting in settings:
        result = results[setting] = Result(setting)
        key = (setting.weight, setting.granularity, tuple(ranges[setting.activation].values()))
        if key in built:
            twin = results[built[key]]
            result.same_as, result.held_out, result.agreement, result.error = twin.setting, twin.held_out, twin.agreement, twin.error
            continue
        built[key] = setting
        started = time.perf_counter()
        try:
            models[setting] = build_integer_model(graph, ranges[setting.activation], weights[(setting.weight, setting.granularity)],
                                                  list(inputs.mean), list(inputs.std), inputs.activation_format)
        except (OverflowError, ValueError) as error:
            result.error = f"{type(error).__name__}: {error}"
            print(f"  {setting.label()}: cannot be built: {result.error}", flush=True)
            continue
        predictions = engine_predictions(models[setting], inputs.held_out, inputs.mean, inputs.std)
        result.held_out = percent_equal(predictions, inputs.held_out_labels)
        result.agreement = percent_equal(predictions, fp32_held_out)
        result.seconds = time.perf_counter() - started
        print(f"  held-out {result.held_out:6.2f}%  {setting.label()}  ({result.seconds:.1f} s)", flush=True)

    ranked = rank(list(results.values()))
    reported = {ranked[0].setting, DEFAULT, MAX_ABS} if ranked else {DEFAULT, MAX_ABS}
    for setting, result in results.items():
        if result.error is not None or (not test_all and setting not in reported):
            continue
        if result.same_as is not None:
            twin = results[result.same_as]
            if twin.test is None and twin.error is None:  # its twin was not a reported one: measure it here
                _score_test(twin, models[twin.setting], inputs)
            result.test, result.test_predictions = twin.test, twin.test_predictions
            continue
        if result.test is None:
            started = time.perf_counter()
            _score_test(result, models[setting], inputs)
            result.seconds += time.perf_counter() - started
    return list(results.values()), ranges


def run_learned(inputs: Inputs, setting: Setting, ranges: dict[str, float], bits: int, fp32_held_out: Tensor,
                methods: Iterable[str], adaround: AdaRoundSettings, calibration: CalibrationImages) -> dict[str, Result]:
    """``setting`` with each combination of ``methods`` ("adaround", "bias correction") that enables them:
    held-out and test accuracy, by the methods' label ("adaround + bias correction" for both)."""
    methods = list(methods)
    count = min(calibration.num_samples, len(inputs.calibration))
    images = inputs.calibration[sample_indices(len(inputs.calibration), count, calibration.seed)]
    graph = capture(inputs.model)
    weights = {}
    roundings = ["nearest"] * ("bias correction" in methods) + ["adaround"] * ("adaround" in methods)
    # (rounding, bias corrected): each method alone, then both
    combinations = [(rounding, rounding == "nearest") for rounding in roundings]
    if len(methods) == 2:
        combinations.append(("adaround", True))
    results = {}
    for rounding, corrected in combinations:
        started = time.perf_counter()
        if rounding not in weights:
            quantization = WeightQuantization(bits, setting.weight_calibration, rounding,
                                              adaround if rounding == "adaround" else None)
            weights[rounding] = round_weights(graph, quantization, RoundingInputs(
                images, inputs.mean, inputs.std, lambda: activation_quantizer(graph, ranges, inputs.activation_format),
            )).weights
        biases = corrected_biases(graph, weights[rounding], images, inputs.mean, inputs.std) if corrected else {}
        integer_model = build_integer_model(with_biases(graph, biases), ranges, weights[rounding],
                                            list(inputs.mean), list(inputs.std), inputs.activation_format)
        learned_rounding = "adaround (quantized activations)" if adaround.quantized_activations else "adaround"
        label = " + ".join(([learned_rounding] if rounding == "adaround" else []) + (["bias correction"] if corrected else []))
        result = results[label] = _measured(integer_model, setting, inputs, fp32_held_out, started)
        print(f"  {label} on {setting.label()} ({count} calibration images): held-out {result.held_out:.2f}%, "
              f"test {result.test:.2f}% ({result.seconds:.0f} s)", flush=True)
    return results


SENSITIVITY_BITS = (2, 3, 4, 6, 8)


def run_mixed_precision(inputs: Inputs, setting: Setting, ranges: dict[str, float], bits: int, fp32_held_out: Tensor,
                        sensitivity_images: int) -> tuple[Result, dict[str, int]]:
    """``setting`` with per-layer bits at the packed size of uniform ``bits``: held-out and test accuracy, the bits."""
    started = time.perf_counter()
    graph = capture(inputs.model)
    count = min(sensitivity_images, len(inputs.held_out))
    table = layer_sensitivity(graph, inputs.normalized(inputs.held_out[:count]), inputs.held_out_labels[:count],
                              SENSITIVITY_BITS, setting.weight_calibration, progress=False)
    num_weights = {node.name: node.weight.numel() for node in graph.layers()}
    budget = sum(packed_weight_bytes(n, bits) for n in num_weights.values())
    chosen = choose_bits(graph, inputs.normalized(inputs.held_out[:count]), noise_by_layer(table), budget,
                         setting.weight_calibration, progress=False)
    weights = quantize_model_weights(graph, chosen, setting.weight, setting.granularity)
    integer_model = build_integer_model(graph, ranges, weights, list(inputs.mean), list(inputs.std),
                                        inputs.activation_format)
    result = _measured(integer_model, setting, inputs, fp32_held_out, started)
    used = sum(packed_weight_bytes(num_weights[layer], b) for layer, b in chosen.items())
    print(f"  mixed precision on {setting.label()}: {used:,} of {budget:,} packed weight bytes, bits "
          f"{' '.join(f'{layer}:{b}' for layer, b in chosen.items())}; held-out {result.held_out:.2f}%, "
          f"test {result.test:.2f}% ({result.seconds:.0f} s)", flush=True)
    return result, chosen


def calibrated_ranges(graph: FloatGraph, stats: dict[str, dict], calibrator: str,
                      activation_format: ActivationFormat) -> dict[str, float]:
    """Each scale group's range by ``calibrator`` (default options), onto the group's integer range in the format."""
    calibrated = calibrate_ranges(stats, calibrator, None, group_ranges(graph, activation_format))
    return {root: chosen["range"] for root, chosen in calibrated.items()}


def run_equalized(inputs: Inputs, setting: Setting, bits: int, fp32_held_out: Tensor) -> tuple[Result, int]:
    """``setting`` on the cross-layer-equalized graph (``pipeline.quant.equalization``), its activations profiled
    again on the same calibration images (the tensors between equalized layers change): the Result, the pairs."""
    started = time.perf_counter()
    equalized = equalize(capture(inputs.model))
    graph = equalized.graph
    stats = profile_activations(graph, inputs.calibration, inputs.mean, inputs.std, CALIBRATION_BATCH, progress=False)
    ranges = calibrated_ranges(graph, stats, setting.activation, inputs.activation_format)
    weights = quantize_model_weights(graph, bits, setting.weight, setting.granularity)
    integer_model = build_integer_model(graph, ranges, weights, list(inputs.mean), list(inputs.std),
                                        inputs.activation_format)
    result = _measured(integer_model, setting, inputs, fp32_held_out, started)
    print(f"  equalization ({len(equalized.pairs)} layer pairs) on {setting.label()}: held-out {result.held_out:.2f}%, "
          f"test {result.test:.2f}% ({result.seconds:.0f} s)", flush=True)
    return result, len(equalized.pairs)


def _measured(integer_model, setting: Setting, inputs: Inputs, fp32_held_out: Tensor, started: float) -> Result:
    """``setting``'s Result for one integer model: held-out accuracy and fp32 agreement, test accuracy, seconds."""
    predictions = engine_predictions(integer_model, inputs.held_out, inputs.mean, inputs.std)
    result = Result(setting, held_out=percent_equal(predictions, inputs.held_out_labels),
                    agreement=percent_equal(predictions, fp32_held_out))
    _score_test(result, integer_model, inputs)
    result.seconds = time.perf_counter() - started
    return result


def _score_test(result: Result, integer_model, inputs: Inputs) -> None:
    """The integer model's predictions on the test images, and its test accuracy, into ``result``."""
    result.test_predictions = engine_predictions(integer_model, inputs.test, inputs.mean, inputs.std)
    result.test = percent_equal(result.test_predictions, inputs.test_labels)


def _our_row(label: str, result: Result, note: str = "") -> Row:
    """A row of this project: the Result's accuracies and predictions; no seconds for a failed build or a twin's."""
    if result.error is not None or result.same_as is not None:
        return Row(label, result.test, result.held_out, None,
                   result.error or f"same integer model as {result.same_as.label()}", result.test_predictions)
    return Row(label, result.test, result.held_out, result.seconds, note, result.test_predictions)


def rank(results: list[Result]) -> list[Result]:
    """Settings that ran, best held-out accuracy first (ties: higher fp32 agreement, then listing order)."""
    ran = [r for r in results if r.held_out is not None]
    return sorted(ran, key=lambda r: (-r.held_out, -r.agreement))  # sorted is stable: listing order breaks ties


# ---------------------------------------------------------------- peers


def _peer_row(label: str, predictions: Tensor, inputs: Inputs, started: float, note: str = "") -> Row:
    """A peer's row: its test accuracy and predictions, the seconds since ``started``."""
    return Row(label, percent_equal(predictions, inputs.test_labels), seconds=time.perf_counter() - started, note=note,
               test_predictions=predictions)


def fx_peer(inputs: Inputs, bits: int) -> list[Row]:
    """torch.ao.quantization FX static PTQ with the x86 qconfig (its weight and activation observers narrowed below
    8 bits)."""
    from torch.ao.quantization import (
        QConfig,
        QConfigMapping,
        get_default_qconfig,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization.observer import (
        HistogramObserver,
        PerChannelMinMaxObserver,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    started = time.perf_counter()
    torch.backends.quantized.engine = "x86"
    calibration = inputs.normalized(inputs.calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        mapping = get_default_qconfig_mapping("x86")
        activation_bits = inputs.activation_format.bits
        if bits < 8 or activation_bits < 8:
            default = get_default_qconfig("x86")
            weight_min, weight_max = int_range(bits, narrow=True)
            weight = default.weight if bits == 8 else PerChannelMinMaxObserver.with_args(
                dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=weight_min, quant_max=weight_max)
            # Its own histogram observer, unsigned (asymmetric) over the full 2^b levels.
            activation = default.activation if activation_bits == 8 else HistogramObserver.with_args(
                dtype=torch.quint8, quant_min=0, quant_max=2 ** activation_bits - 1, reduce_range=False)
            mapping = QConfigMapping().set_global(QConfig(activation=activation, weight=weight))
        prepared = prepare_fx(copy.deepcopy(inputs.model).eval(), mapping, (calibration[:1],))
        with torch.no_grad():
            for start in range(0, len(calibration), CALIBRATION_BATCH):
                prepared(calibration[start : start + CALIBRATION_BATCH])
        quantized = convert_fx(prepared)
        predictions = batched_predictions(quantized, inputs.normalized(inputs.test))
    label = "torch.ao FX static PTQ, x86 qconfig" + (f", weights {bits}-bit per-channel min-max" if bits < 8 else "") \
        + (f", activations {activation_bits}-bit histogram" if activation_bits < 8 else "")
    return [_peer_row(label, predictions, inputs, started)]


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> str:
    """The fp32 model as ONNX with a dynamic batch; returns which exporter worked."""
    errors = []
    for dynamo in (True, False):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                if dynamo:  # torch.export-based: needs onnxscript
                    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                                      input_names=["input"], output_names=["logits"],
                                      dynamic_shapes=({0: torch.export.Dim("batch")},))
                else:  # the legacy TorchScript exporter (deprecated, needs nothing more)
                    torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["input"],
                                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
            return "torch.export-based (dynamo)" if dynamo else "legacy TorchScript" + (f" (dynamo: {errors[0]})" if errors else "")
        except Exception as error:  # noqa: BLE001  (any exporter failure: try the other one)
            errors.append(f"{type(error).__name__}: {_first_line(error)}")
    raise RuntimeError(f"torch.onnx.export failed: {'; '.join(errors)}")


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader over normalized calibration images, in batches; ``set_range`` counts batches."""

    def __init__(self, input_name: str, x_normalized: Tensor, batch: int) -> None:
        self.input_name = input_name
        self.batches = [x_normalized[s : s + batch].numpy() for s in range(0, len(x_normalized), batch)]
        self.set_range(0, len(self.batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= self.end:
            return None
        self.position += 1
        return {self.input_name: self.batches[self.position - 1]}

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position, self.end = start_index, min(end_index, len(self.batches))


def onnxruntime_peer(inputs: Inputs, bits: int) -> list[Row]:
    """onnxruntime quantize_static, QDQ S8S8 (S4 weights at 4 bits), MinMax and Percentile, per-tensor and per-channel."""
    if bits not in (8, 4):
        raise ValueError(f"ONNX Runtime's weight types are 8 and 4 bits, not {bits}")
    activation_bits = inputs.activation_format.bits
    if activation_bits not in (8, 4):
        raise ValueError(f"ONNX Runtime's activation types are 8 and 4 bits, not {activation_bits}")
    import onnxruntime as ort
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    CalibrationDataReader.register(_CalibrationReader)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = inputs.threads, 1
    options.log_severity_level = 3

    def session(path: Path):
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    rows = []
    with tempfile.TemporaryDirectory(prefix="ptq_compare_") as folder:
        started = time.perf_counter()
        fp32_path, prepared_path = Path(folder, "fp32.onnx"), Path(folder, "fp32_prepared.onnx")
        calibration = inputs.normalized(inputs.calibration)
        exporter = export_onnx(copy.deepcopy(inputs.model).eval(), calibration[:2], fp32_path)
        try:
            with _quiet():
                quant_pre_process(str(fp32_path), str(prepared_path))
            prepared = "pre-processed"
        except Exception as error:  # noqa: BLE001
            prepared_path, prepared = fp32_path, f"not pre-processed ({type(error).__name__}: {_first_line(error)})"
        test_x = inputs.normalized(inputs.test).numpy()
        fp32_session = session(prepared_path)
        input_name = fp32_session.get_inputs()[0].name
        onnx_fp32 = percent_equal(batched_predictions(lambda x: fp32_session.run(None, {input_name: x})[0], test_x),
                                  inputs.test_labels)
        shared_seconds = time.perf_counter() - started
        note = (f"onnxruntime {ort.__version__}; export {exporter}, {prepared}; the fp32 ONNX model scores "
                f"{onnx_fp32:.2f}% ({shared_seconds:.0f} s, not counted)")
        print(f"  {note}", flush=True)
        batch = 100
        reader = _CalibrationReader(input_name, calibration, batch)
        # Calibrate in passes of <= ORT_CALIBRATION_CHUNK images: a pass keeps every observed tensor in
        # memory (4 GB more for MobileNet at 500 images); ONNX Runtime merges the passes' ranges and histograms.
        stride = max(d for d in range(1, len(reader) + 1) if len(reader) % d == 0 and d * batch <= max(batch, ORT_CALIBRATION_CHUNK))
        for method, per_channel in itertools.product((CalibrationMethod.MinMax, CalibrationMethod.Percentile), (False, True)):
            started = time.perf_counter()
            output = Path(folder, f"int8_{method.name}_{per_channel}.onnx")
            reader.set_range(0, len(reader))
            with _quiet():
                quantize_static(str(prepared_path), str(output), reader, quant_format=QuantFormat.QDQ,
                                activation_type=QuantType.QInt8 if activation_bits == 8 else QuantType.QUInt4,
                                per_channel=per_channel,
                                weight_type=QuantType.QInt8 if bits == 8 else QuantType.QInt4,
                                calibrate_method=method, extra_options={"CalibStridedMinMax": stride})
            quantized = session(output)
            predictions = batched_predictions(lambda x: quantized.run(None, {input_name: x})[0], test_x)
            detail = "MinMax" if method == CalibrationMethod.MinMax else "Percentile 99.999"
            formats = f"{'S8' if activation_bits == 8 else 'U4'}{'S8' if bits == 8 else 'S4'}"
            rows.append(_peer_row(f"ONNX Runtime QDQ {formats}, {detail}, {'per-channel' if per_channel else 'per-tensor'}",
                                  predictions, inputs, started))
        rows[0].note = note
    return rows


def pt2e_peer(inputs: Inputs, bits: int) -> list[Row]:
    """torchao PT2E static PTQ with X86InductorQuantizer (weights narrowed below 8 bits); eager converted module."""
    with _quiet():  # torchao's import logs a torch deprecation warning
        import torchao
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )

    started = time.perf_counter()
    calibration = inputs.normalized(inputs.calibration)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(copy.deepcopy(inputs.model).eval(), (calibration[:2],),
                                       dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        config = get_default_x86_inductor_quantization_config()
        if bits < 8:
            weight_min, weight_max = int_range(bits, narrow=True)
            config = dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=weight_min,
                                                                            quant_max=weight_max))
        activation_bits = inputs.activation_format.bits
        if activation_bits < 8:  # its unsigned (asymmetric) histogram-observed activations, over 2^b levels
            narrowed = {key: dataclasses.replace(getattr(config, key), quant_max=2 ** activation_bits - 1)
                        for key in ("input_activation", "output_activation")}
            config = dataclasses.replace(config, **narrowed)
        quantizer = X86InductorQuantizer().set_global(config)
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for start in range(0, len(calibration), CALIBRATION_BATCH):
                prepared(calibration[start : start + CALIBRATION_BATCH])
        converted = convert_pt2e(prepared)
        predictions = batched_predictions(converted, inputs.normalized(inputs.test))
    return [_peer_row("torchao PT2E, X86InductorQuantizer (converted module, eager)"
                      + (f", weights {bits}-bit" if bits < 8 else "")
                      + (f", activations {activation_bits}-bit" if activation_bits < 8 else ""),
                      predictions, inputs, started, note=f"torchao {torchao.__version__}")]


class _Module(nn.Module):
    """The model one level down: NNCF adds a hook storage submodule, which an ``nn.Sequential`` would call as a layer."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def nncf_peer(inputs: Inputs, bits: int) -> list[Row]:
    """NNCF ``quantize`` with its defaults (min-max ranges, fast bias correction); 4-bit through its NPU hardware config."""
    activation_bits = inputs.activation_format.bits
    if bits not in (8, 4) or activation_bits not in (8, 4):
        raise ValueError(f"NNCF's hardware configs quantize weights and activations to 8 or 4 bits, not weights {bits} "
                         f"/ activations {activation_bits}")
    with _quiet():
        import nncf
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters,
            QuantizationParameters,
        )

    started = time.perf_counter()
    calibration = inputs.normalized(inputs.calibration)
    batches = [calibration[s : s + CALIBRATION_BATCH] for s in range(0, len(calibration), CALIBRATION_BATCH)]
    narrowed = {}
    if bits == 4:  # the NPU config's only 4-bit weights: symmetric, -8..7 (narrow_range False)
        narrowed["weights_quantization_params"] = QuantizationParameters(num_bits=4, narrow_range=False)
    if activation_bits == 4:
        narrowed["activations_quantization_params"] = QuantizationParameters(num_bits=4)
    with _quiet(), torch.no_grad():
        quantized = nncf.quantize(_Module(copy.deepcopy(inputs.model).eval()), nncf.Dataset(batches),
                                  subset_size=len(batches),  # NNCF counts dataset items: here batches, so every image
                                  target_device=nncf.TargetDevice.NPU if narrowed else nncf.TargetDevice.ANY,
                                  advanced_parameters=AdvancedQuantizationParameters(**narrowed) if narrowed else None)
        predictions = batched_predictions(quantized, inputs.normalized(inputs.test))
    return [_peer_row("NNCF quantize, defaults" + (f", weights {bits}-bit per-channel (-8..7)" if bits < 8 else "")
                      + (f", activations {activation_bits}-bit" if activation_bits < 8 else "")
                      + (", target NPU" if narrowed else ""),
                      predictions, inputs, started, note=f"nncf {nncf.__version__}")]


PEER_RUNS: dict[str, tuple[str, Callable[[Inputs, int], list[Row]]]] = {
    "fx": ("torch.ao FX static PTQ, x86 qconfig", fx_peer),
    "onnxruntime": ("ONNX Runtime quantize_static", onnxruntime_peer),
    "pt2e": ("torchao PT2E, X86InductorQuantizer", pt2e_peer),
    "nncf": ("NNCF quantize", nncf_peer),
}


@contextlib.contextmanager
def _quiet():
    """Silence a library's prints, warnings and log records (its exceptions still propagate)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


# ---------------------------------------------------------------- report


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[Row], labels: Tensor) -> None:
    """The rows under the first (fp32): test accuracy, drop from fp32 with its paired standard error, seconds."""
    width = max(len(row.method) for row in rows)
    fp32 = rows[0]
    print(f"| {'method':<{width}} | test acc % | drop (points) | drop's s.e. | held-out acc % | seconds | note |")
    print(f"| {'-' * width} | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        drop = None if row.test is None else fp32.test - row.test
        error = None if row.test_predictions is None else paired_difference_error(
            fp32.test_predictions == labels, row.test_predictions == labels)
        print(f"| {row.method:<{width}} | {_number(row.test)} | {_number(drop)} | {_number(error)} | "
              f"{_number(row.held_out)} | {_number(row.seconds, 1)} | {row.note} |")


def print_settings(results: list[Result], fp32: float) -> None:
    ranked = rank(results)
    print(f"\nAll {len(results)} settings of this project, by held-out accuracy (best first; agreement: "
          "with the fp32 model's held-out predictions; seconds: building + engine on held-out and test images):\n")
    print("| # | setting | held-out acc % | held-out agreement % | test acc % | drop (points) | seconds | note |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for index, result in enumerate(ranked, 1):
        drop = None if result.test is None else fp32 - result.test
        notes = [name for setting, name in ((DEFAULT, "defaults"), (MAX_ABS, "max-abs per-channel")) if result.setting == setting]
        if index == 1:
            notes.insert(0, "chosen")
        if result.same_as is not None:
            notes.append(f"same integer model as {result.same_as.label()}")
        print(f"| {index} | {result.setting.label()} | {_number(result.held_out)} | {_number(result.agreement)} | "
              f"{_number(result.test)} | {_number(drop)} | {_number(result.seconds if result.same_as is None else None, 1)} | "
              f"{', '.join(notes)} |")
    for result in results:
        if result.error is not None:
            print(f"| - | {result.setting.label()} | n/a | n/a | n/a | n/a | n/a | {result.error} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(CHECKPOINT))
    parser.add_argument("--data", default=str(ARRAYS), help="the download stage's arrays (train and test splits)")
    parser.add_argument("--profile", default=str(PROFILE), help="the profile stage's output: its 'indices' are the calibration images")
    parser.add_argument("--model", default=None, help="the architecture (net, bnnet, resnet20, mobilenet, file.py:factory) "
                        "of a checkpoint that is a bare state_dict")
    parser.add_argument("--bits", type=int, default=8, choices=range(2, 9), metavar="2..8",
                        help="weight bits, for this project's settings and the peers' weights (activations stay 8-bit)")
    parser.add_argument("--validation", type=int, default=5000, help="held-out training images (not calibration images) "
                        "that choose this project's setting")
    parser.add_argument("--validation-seed", type=int, default=1)
    parser.add_argument("--skip", nargs="*", default=[], choices=PEERS, metavar="PEER", help=f"peers to leave out: {', '.join(PEERS)}")
    parser.add_argument("--activation-calibrators", nargs="+", default=list(ACTIVATION_CALIBRATORS),
                        choices=list(ACTIVATION_CALIBRATORS), metavar="NAME")
    parser.add_argument("--weight-calibrators", nargs="+", default=list(WEIGHT_CALIBRATORS),
                        choices=list(WEIGHT_CALIBRATORS), metavar="NAME")
    parser.add_argument("--reported-only", action="store_true", help="test accuracy only for the chosen, default and "
                        "max-abs settings (the held-out ranking still runs every setting)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for every method")
    parser.add_argument("--adaround", action="store_true", help="also the chosen setting with AdaRound's learned rounding")
    parser.add_argument("--quantized-activations", action="store_true",
                        help="AdaRound learns from inputs with the chosen setting's activations quantized")
    parser.add_argument("--bias-correction", action="store_true", help="also the chosen setting with bias correction")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="also the chosen setting with per-layer bits at the packed size of uniform --bits")
    parser.add_argument("--activation-bits", type=int, default=8, choices=range(4, 9), metavar="4..8",
                        help="activation bits, for this project's settings and the peers' activations")
    parser.add_argument("--unsigned-activations", action="store_true",
                        help="this project's non-negative tensors use the full unsigned range [0, 2^bits - 1]")
    parser.add_argument("--equalize", action="store_true",
                        help="also the chosen setting on the cross-layer-equalized graph (activations profiled again)")
    parser.add_argument("--sensitivity-images", type=int, default=1000,
                        help="held-out images that measure each layer's sensitivity (--mixed-precision)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_started = time.perf_counter()

    model, mean, std, name = load_model(args.checkpoint, args.model)
    arrays = load_arrays(Path(args.data))
    profile = read_json(args.profile)
    if profile.get("split", "train") != "train":
        sys.exit(f"error: {args.profile} calibrated on the {profile['split']!r} split; this comparison needs training images")
    calibration_indices = np.asarray(profile["indices"])
    held_out = held_out_indices(len(arrays.train_images), calibration_indices, args.validation, args.validation_seed)
    inputs = Inputs(
        model=model, mean=mean, std=std,
        calibration=torch.from_numpy(arrays.train_images[calibration_indices]),
        held_out=torch.from_numpy(arrays.train_images[held_out]),
        held_out_labels=torch.from_numpy(arrays.train_labels[held_out]).long(),
        test=torch.from_numpy(arrays.test_images), test_labels=torch.from_numpy(arrays.test_labels).long(),
        threads=args.threads, activation_format=ActivationFormat(args.activation_bits, args.unsigned_activations),
    )
    started = time.perf_counter()
    fp32_held_out = predict(model, inputs.held_out, mean, std)
    fp32_held = percent_equal(fp32_held_out, inputs.held_out_labels)
    fp32_test = predict(model, inputs.test, mean, std)
    fp32 = percent_equal(fp32_test, inputs.test_labels)
    fp32_seconds = time.perf_counter() - started
    print(f"checkpoint {args.checkpoint} ({name}); torch {torch.__version__}, {args.threads} thread(s)\n"
          f"images: {len(inputs.calibration)} calibration ({args.profile} indices, training split), "
          f"{len(inputs.held_out)} held-out (training split minus calibration, seed {args.validation_seed}), "
          f"{len(inputs.test)} test; fp32 {fp32:.2f}% test, {fp32_held:.2f}% held-out\n", flush=True)

    settings = our_settings(args.activation_calibrators, args.weight_calibrators)
    print(f"this project: {len(settings)} settings, {args.bits}-bit weights, {args.activation_bits}-bit "
          f"{'unsigned (full-range) where non-negative' if args.unsigned_activations else 'signed'} activations, "
          "through the integer engine", flush=True)
    started = time.perf_counter()
    results, ranges = run_ours(inputs, settings, args.bits, not args.reported_only, fp32_held_out)
    ours_seconds = time.perf_counter() - started
    by_setting = {result.setting: result for result in results}
    ranked = rank(results)
    methods = [name for name, on in (("adaround", args.adaround), ("bias correction", args.bias_correction)) if on]
    learned = run_learned(inputs, ranked[0].setting, ranges[ranked[0].setting.activation], args.bits, fp32_held_out,
                          methods, AdaRoundSettings(quantized_activations=args.quantized_activations),
                          CalibrationImages()) if methods and ranked else {}
    equalized = run_equalized(inputs, ranked[0].setting, args.bits, fp32_held_out) if args.equalize and ranked else None
    mixed = run_mixed_precision(inputs, ranked[0].setting, ranges[ranked[0].setting.activation], args.bits,
                                fp32_held_out, args.sensitivity_images) if args.mixed_precision and ranked else None

    rows = [Row("fp32 (PyTorch, eval mode)", fp32, fp32_held, fp32_seconds, test_predictions=fp32_test)]
    for label, result in ([(f"this project, chosen on held-out: {ranked[0].setting.label()}", ranked[0])] if ranked else []) + [
        (f"this project, defaults: {DEFAULT.label()}", by_setting[DEFAULT]),
        (f"this project, max-abs per-channel: {MAX_ABS.label()}", by_setting[MAX_ABS]),
    ]:
        rows.append(_our_row(label, result))
    for position, (label, result) in enumerate(learned.items(), 2):
        rows.insert(position, _our_row(f"this project, the chosen setting + {label}: {result.setting.label()}", result))
    if equalized is not None:
        result, pairs = equalized
        rows.insert(2 + len(learned), _our_row(f"this project, the chosen setting + equalization: {result.setting.label()}",
                                               result, f"{pairs} layer pairs"))
    if mixed is not None:
        result, chosen = mixed
        rows.insert(2 + len(learned) + (equalized is not None),
                    _our_row(f"this project, the chosen setting, mixed precision at the uniform {args.bits}-bit size: "
                             f"{result.setting.label()}", result,
                             "bits " + " ".join(f"{layer}:{b}" for layer, b in chosen.items())))

    for peer in PEERS:
        if peer in args.skip:
            continue
        label, run = PEER_RUNS[peer]
        print(f"peer: {label} ...", flush=True)
        try:
            rows += run(inputs, args.bits)
        except Exception as error:  # noqa: BLE001  (a peer that cannot run here must not end the run)
            reason = f"{type(error).__name__}: {_first_line(error)}"
            if isinstance(error, ImportError):
                reason += " (install the bench extra: pip install -e '.[bench]')"
            print(f"  {label} could not run: {reason}", flush=True)
            rows.append(Row(label, None, note=f"could not run: {reason}"))

    print(f"\nPTQ comparison, {args.checkpoint} ({name}): {len(inputs.calibration)} calibration images (training split, "
          f"the same for every method), {len(inputs.held_out)} held-out training images (this project's choice), "
          f"{len(inputs.test)} test images (every accuracy below); this project's {len(settings)} settings took "
          f"{ours_seconds:.0f} s in all (profiling included); drop = fp32 test minus the method's test accuracy, "
          "with its paired standard error (from the test images where only one of the two is right). Seconds: this "
          "project's = building one integer model + the engine on the held-out and test images; a peer's = its "
          "calibration, conversion and test inference.\n")
    print_table(rows, inputs.test_labels)
    print_settings(results, fp32)
    print(f"\ntotal {time.perf_counter() - run_started:.0f} s")


if __name__ == "__main__":
    main()
