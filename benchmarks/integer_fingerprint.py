"""Fingerprints of the integer models and of everything made from them, to check that a refactoring changes nothing.

For each built-in model (net, bnnet, resnet20, mobilenet: seeded random weights, BatchNorm running
statistics warmed by train-mode passes on seeded random images, so folding them changes the weights)
and each quantization setting of ``SETTINGS`` (per-tensor sigma int8, per-channel mse and minmax,
4-bit weights and activations, unsigned activations with entropy calibration, mixed weight bits with
unsigned 6-bit activations, cross-layer equalization, AdaRound with bias correction), it calibrates
the activation ranges on seeded random images and builds the ``IntegerModel`` with library calls
only (what the profile, quantize-weights and quantize-biases stages call), then records a sha256 of:

- ``ir.<field>``: every value of that dataclass field anywhere in the IntegerModel (weights, biases,
  multipliers, shifts, clamp bounds, tensor scales/bits/signedness, names, attributes, ...), found by
  walking the dataclasses with ``dataclasses.fields``, so a new node layout still hashes its values;
  ``ir.types`` the node and tensor classes in order, ``ir.layout`` the field names and container
  sizes, ``ir.all`` everything together;
- ``engine.input``, ``engine.logits`` (``run_integer``) and ``simulated.logits`` (``run_simulated``) on
  ``--images`` seeded images, ``engine.tensor_outputs`` (``integer_tensor_outputs``) on the first 16 of them;
- ``c.model.h``, ``c.model_data.h``, ``c.model.c``, ``c.memory`` (the generated C and its arena plan)
  and, for the one setting per model marked ``compile_c`` when gcc is on PATH, ``c.logits``;
- ``onnx.<style>.graph`` and ``onnx.<style>.logits`` for the integer and QLinear ONNX exports (onnxruntime).

The JSON is ``{model: {setting: {item: sha256}}}``. ``--compare A.json B.json`` prints every item that
differs or is missing on one side, and exits 1 if there is any.

    python -m benchmarks.integer_fingerprint --out FILE.json [--images 64] [--models net,bnnet,resnet20,mobilenet]
    python -m benchmarks.integer_fingerprint --compare A.json B.json
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------- project imports (the only ones: re-point them here)
from pipeline.export.c_build import c_logits, find_compiler
from pipeline.export.c_model import write_c_sources
from pipeline.export.onnx_model import onnx_predictions, save_onnx_model
from pipeline.graph.capture import capture
from pipeline.graph.nodes import FloatGraph, with_biases
from pipeline.models import build_model
from pipeline.profile import calibrate_ranges, profile_activations
from pipeline.quant.adaround import adaround_model_weights
from pipeline.quant.bias_correction import corrected_biases
from pipeline.quant.build import build_integer_model
from pipeline.quant.engine import (
    integer_tensor_outputs,
    quantize_model_input,
    run_integer,
    run_simulated,
)
from pipeline.quant.equalization import equalize
from pipeline.quant.ir import IntegerModel
from pipeline.quant.ranges import ActivationFormat
from pipeline.quant.scale_groups import activation_quantizer, group_ranges
from pipeline.quant.settings import AdaRoundSettings, WeightCalibration
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize

# ---------------------------------------------------------------- end of project imports

MODELS = ("net", "bnnet", "resnet20", "mobilenet")
MODEL_SEED = 0
# Each set of images has its own seed, so changing one count leaves the others' images as they were.
WARMUP_SEED, CALIBRATION_SEED, LEARNING_SEED, EVALUATION_SEED = 1, 2, 3, 4
WARMUP_PASSES, WARMUP_BATCH = 2, 32  # train-mode passes that set the BatchNorm running statistics (their average)
CALIBRATION_IMAGES = 128
LEARNING_IMAGES = 64  # what AdaRound and bias correction learn from
TENSOR_OUTPUT_IMAGES = 16  # integer_tensor_outputs keeps every tensor (int64): on the first images only
PROFILE_BATCH = 64
THREADS = 2  # fixed, so the float calibration sums in the same order whatever the machine's core count


@dataclass(frozen=True)
class Setting:
    """One way of quantizing: the profile and quantize-weights stages' choices, as library arguments."""

    weight_calibrator: str = "sigma"
    granularity: str = "per_tensor"
    weight_bits: int | tuple[int, ...] = 8  # a tuple: each layer's bits in turn, cycled (mixed precision)
    activation_calibrator: str = "seed"
    activation_format: ActivationFormat = field(default_factory=ActivationFormat)  # signed int8
    equalize: bool = False
    adaround_iterations: int = 0  # 0: round to nearest
    bias_correction: bool = False
    models: tuple[str, ...] = MODELS
    compile_c: bool = False  # compile and run the C too (the slow part: one setting per model)


SETTINGS: dict[str, Setting] = {
    "w8a8_sigma_per_tensor": Setting(compile_c=True),  # params.yaml's defaults
    "w8a8_minmax_per_channel_percentile": Setting(weight_calibrator="minmax", granularity="per_channel",
                                                  activation_calibrator="percentile"),
    # The weight mse search costs 15-20 s of CPU on resnet20 and mobilenet: the small models only.
    "w8a8_mse_per_channel": Setting(weight_calibrator="mse", granularity="per_channel", activation_calibrator="mse",
                                    models=("net", "bnnet")),
    "w4a4_sigma_mse": Setting(weight_bits=4, activation_calibrator="mse", activation_format=ActivationFormat(4)),
    "w8a8_unsigned_entropy_per_channel": Setting(weight_calibrator="minmax", granularity="per_channel",
                                                 activation_calibrator="entropy",
                                                 activation_format=ActivationFormat(8, unsigned=True)),
    "mixed_bits_unsigned_a6": Setting(weight_bits=(8, 6, 4, 5), weight_calibrator="minmax",
                                      activation_calibrator="minmax", activation_format=ActivationFormat(6, unsigned=True)),
    "equalized_w8a8_sigma_per_tensor": Setting(equalize=True),
    "adaround_bias_correction_a4": Setting(weight_bits=4, granularity="per_channel", activation_calibrator="mse",
                                           activation_format=ActivationFormat(4), adaround_iterations=20,
                                           bias_correction=True, models=("net",)),  # 27 s of CPU on bnnet
}


# ---------------------------------------------------------------- hashing


def sha256(chunks: Iterator[bytes] | list[bytes]) -> str:
    """The sha256 of ``chunks``, each prefixed by its length so that no two chunk sequences give one stream."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    return digest.hexdigest()


def array_bytes(value: torch.Tensor | np.ndarray) -> bytes:
    """dtype, shape and contents: two arrays give the same bytes only if they are equal and alike."""
    array = value.detach().cpu().contiguous().numpy() if isinstance(value, torch.Tensor) else np.ascontiguousarray(value)
    return f"{array.dtype.str}{array.shape}".encode() + array.tobytes()


def leaf_bytes(value: Any) -> bytes:
    """A leaf value as bytes, its Python type included (1, 1.0, True and a 0-D tensor all differ)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return b"array:" + array_bytes(value)
    if isinstance(value, type) or callable(value):
        return f"callable:{getattr(value, '__qualname__', type(value).__qualname__)}".encode()
    return f"{type(value).__name__}:{value!r}".encode()


def walk(value: Any, field: str = "root") -> Iterator[tuple[str, bytes]]:
    """(group, bytes) events of ``value``, depth first: a leaf's group is the dataclass field it sits under
    (through any lists, tuples and dicts); "types" gets each dataclass's class name, "layout" the field
    names and container sizes, "<field>.keys" a dict's keys."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield "types", type(value).__name__.encode()
        names = [f.name for f in dataclasses.fields(value)]
        yield "layout", ",".join(names).encode()
        for name in names:
            yield from walk(getattr(value, name), name)
    elif isinstance(value, Mapping):
        yield "layout", f"{field}:dict[{len(value)}]".encode()
        for key, item in value.items():
            yield f"{field}.keys", leaf_bytes(key)
            yield from walk(item, field)
    elif isinstance(value, (list, tuple)):
        yield "layout", f"{field}:{type(value).__name__}[{len(value)}]".encode()
        for item in value:
            yield from walk(item, field)
    elif hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, np.ndarray)) and not callable(value):
        # a plain object a restructuring might add: its attributes, not its repr (which may hold an address)
        yield "types", type(value).__qualname__.encode()
        yield from walk(vars(value), field)
    else:
        yield field, leaf_bytes(value)


def structure_hashes(value: Any, prefix: str) -> dict[str, str]:
    """``prefix.<group>`` for each group of ``walk(value)``, and ``prefix.all`` over every event in order."""
    events = list(walk(value))
    groups: dict[str, list[bytes]] = {}
    for group, chunk in events:
        groups.setdefault(group, []).append(chunk)
    hashes = {f"{prefix}.{group}": sha256(chunks) for group, chunks in sorted(groups.items())}
    hashes[f"{prefix}.all"] = sha256([group.encode() + b"=" + chunk for group, chunk in events])
    return hashes


def tensors_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    return sha256([chunk for name, tensor in tensors.items() for chunk in (name.encode(), array_bytes(tensor))])


# ---------------------------------------------------------------- models and images


def random_images(count: int, seed: int) -> torch.Tensor:
    """Seeded uniform random uint8 images (N, 32, 32, 3), the layout of the dataset's arrays."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)


def warmed_model(name: str) -> nn.Module:
    """``build_model(name)`` with seeded weights and BatchNorm running statistics from train-mode passes on seeded
    images (their cumulative average: ``momentum=None``), so folding BatchNorm changes every layer it follows."""
    model = build_model(name, seed=MODEL_SEED)
    batchnorms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [module.momentum for module in batchnorms]
    for module in batchnorms:
        module.momentum = None
    images = normalize(random_images(WARMUP_PASSES * WARMUP_BATCH, WARMUP_SEED), SEED_MEAN, SEED_STD)
    model.train()
    with torch.no_grad():
        for batch in images.split(WARMUP_BATCH):
            model(batch)
    for module, momentum in zip(batchnorms, momenta):
        module.momentum = momentum
    return model.eval()


def layer_bits(graph: FloatGraph, bits: int | tuple[int, ...]) -> int | dict[str, int]:
    """One width, or the widths of a tuple given to the layers in turn, cycled."""
    if isinstance(bits, int):
        return bits
    return {layer.name: bits[index % len(bits)] for index, layer in enumerate(graph.layers())}


# ---------------------------------------------------------------- quantizing


def integer_model(graph: FloatGraph, group_stats: dict[str, dict[str, Any]], setting: Setting) -> IntegerModel:
    """What the profile, quantize-weights and quantize-biases stages make of ``graph`` with ``setting``."""
    integer_ranges = group_ranges(graph, setting.activation_format)
    calibrated = calibrate_ranges(group_stats, setting.activation_calibrator, None, integer_ranges)
    ranges = {root: chosen["range"] for root, chosen in calibrated.items()}
    bits = layer_bits(graph, setting.weight_bits)
    learning_images = random_images(LEARNING_IMAGES, LEARNING_SEED)
    if setting.adaround_iterations:
        adaround = AdaRoundSettings(iterations=setting.adaround_iterations, batch_size=16,
                                    quantized_activations=True)
        quantized, _ = adaround_model_weights(
            graph, learning_images, SEED_MEAN, SEED_STD, bits,
            WeightCalibration(setting.weight_calibrator, granularity=setting.granularity), adaround, progress=False,
            activations=activation_quantizer(graph, ranges, setting.activation_format),
        )
    else:
        quantized = quantize_model_weights(graph, bits, setting.weight_calibrator, setting.granularity)
    if setting.bias_correction:
        graph = with_biases(graph, corrected_biases(graph, quantized, learning_images, SEED_MEAN, SEED_STD,
                                                    progress=False))
    return build_integer_model(graph, ranges, quantized, list(SEED_MEAN), list(SEED_STD), setting.activation_format)


# ---------------------------------------------------------------- fingerprints


def output_hashes(model: IntegerModel, x: torch.Tensor, work: Path, compile_c: bool) -> dict[str, str]:
    """Hashes of what the engine, the float simulation, the C and both ONNX exports make of images ``x``."""
    x_int8 = quantize_model_input(model, x)
    hashes = {
        "engine.input": sha256([array_bytes(x_int8)]),
        "engine.logits": sha256([array_bytes(run_integer(model, x_int8))]),
        "engine.tensor_outputs": tensors_hash(integer_tensor_outputs(model, x_int8[:TENSOR_OUTPUT_IMAGES])),
        "simulated.logits": sha256([array_bytes(run_simulated(model, x))]),
    }
    c_dir = work / "c"
    c_dir.mkdir()
    sources = write_c_sources(model, c_dir)
    hashes |= {f"c.{name}": sha256([text.encode()]) for name, text in sources.files().items()}
    hashes["c.memory"] = structure_hashes(
        (sources.static_ram_bytes, sources.parameter_bytes, sources.arena), "memory")["memory.all"]
    if compile_c:
        hashes["c.logits"] = sha256([array_bytes(c_logits(c_dir, x_int8, progress=False))])
    for style in ("integer", "qlinear"):
        path = work / f"model_{style}.onnx"
        proto = save_onnx_model(model, path, style)
        _, logits = onnx_predictions(path, x, progress=False)
        hashes[f"onnx.{style}.graph"] = sha256([proto.graph.SerializeToString()])
        hashes[f"onnx.{style}.logits"] = sha256([array_bytes(logits)])
    return hashes


def model_fingerprints(name: str, settings: Mapping[str, Setting], x: torch.Tensor, can_compile: bool
                       ) -> dict[str, dict[str, str]]:
    """Every setting's hashes for model ``name``; the activation statistics are profiled once per graph."""
    graph = capture(warmed_model(name))
    graphs = {False: graph, True: equalize(graph).graph}
    calibration = random_images(CALIBRATION_IMAGES, CALIBRATION_SEED)
    stats: dict[bool, dict[str, dict[str, Any]]] = {}
    fingerprints = {}
    for setting_name, setting in settings.items():
        chosen = graphs[setting.equalize]
        if setting.equalize not in stats:
            stats[setting.equalize] = profile_activations(chosen, calibration, SEED_MEAN, SEED_STD, PROFILE_BATCH,
                                                          progress=False)
        model = integer_model(chosen, stats[setting.equalize], setting)
        with tempfile.TemporaryDirectory(prefix="fingerprint_") as work:
            fingerprints[setting_name] = (structure_hashes(model, "ir")
                                          | output_hashes(model, x, Path(work), setting.compile_c and can_compile))
    return fingerprints


def fingerprints(models: list[str], images: int, log: Callable[[str], None]) -> dict[str, dict[str, dict[str, str]]]:
    torch.set_num_threads(THREADS)
    can_compile = find_compiler("gcc") is not None
    if not can_compile:
        log("gcc not on PATH: no c.logits items")
    x = normalize(random_images(images, EVALUATION_SEED), SEED_MEAN, SEED_STD)
    result = {}
    for name in models:
        start = time.perf_counter()
        settings = {key: setting for key, setting in SETTINGS.items() if name in setting.models}
        result[name] = model_fingerprints(name, settings, x, can_compile)
        log(f"{name}: {len(settings)} settings, {time.perf_counter() - start:.1f} s")
    return result


# ---------------------------------------------------------------- comparing


def flatten(report: Mapping[str, Mapping[str, Mapping[str, str]]]) -> dict[str, str]:
    return {f"{model}/{setting}/{item}": digest for model, settings in report.items()
            for setting, items in settings.items() for item, digest in items.items()}


def differences(a: Mapping[str, Any], b: Mapping[str, Any], a_name: str, b_name: str) -> list[str]:
    """One line per item whose hash differs or that only one of the reports has."""
    flat_a, flat_b = flatten(a), flatten(b)
    lines = []
    for key in list(flat_a) + [key for key in flat_b if key not in flat_a]:
        if key not in flat_b:
            lines.append(f"{key}: only in {a_name}")
        elif key not in flat_a:
            lines.append(f"{key}: only in {b_name}")
        elif flat_a[key] != flat_b[key]:
            lines.append(f"{key}: {flat_a[key][:12]} != {flat_b[key][:12]}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--out", type=Path, help="write the fingerprints JSON here")
    action.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"))
    parser.add_argument("--images", type=int, default=64, help="seeded random images the models run on")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    args = parser.parse_args()
    if args.compare:
        a, b = (json.loads(path.read_text()) for path in args.compare)
        lines = differences(a, b, str(args.compare[0]), str(args.compare[1]))
        print("\n".join(lines) or f"0 differences in {len(flatten(a))} items")
        sys.exit(1 if lines else 0)
    models = args.models.split(",")
    unknown = [name for name in models if name not in MODELS]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not allowed; allowed: {', '.join(MODELS)}")
    if args.images < 1:
        parser.error(f"--images: value {args.images} not allowed; allowed: an integer >= 1")
    start = time.perf_counter()
    report = fingerprints(models, args.images, lambda line: print(f"[integer_fingerprint] {line}", file=sys.stderr))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"[integer_fingerprint] {len(flatten(report))} items in {args.out}, {time.perf_counter() - start:.1f} s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
