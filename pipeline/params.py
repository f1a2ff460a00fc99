"""Typed, validated parameter sections.

``params.yaml`` is parsed once into frozen dataclasses before any work. An
unknown key, a wrong type or an out-of-range value raises ``ParamsError``
naming the key, the value and what is allowed. One section per stage; each
stage reads its own. Only names and rules are imported (``pipeline.model_spec``,
``pipeline.quant.settings``): validating loads no torch, model or method.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML, YAMLError

from pipeline.model_spec import (
    ModelSpecError,
    check_model_spec,
    check_weights_spec,
    is_onnx_model,
)
from pipeline.normalization import SEED_MEAN, SEED_STD
from pipeline.quant.settings import (
    ACTIVATION_CALIBRATOR_SETTINGS,
    GRANULARITY_NAMES,
    LOGITS_TYPES,
    REQUANTIZE_ROUNDINGS,
    ROUNDING_NAMES,
    ROUNDING_SETTINGS,
    WEIGHT_CALIBRATOR_SETTINGS,
    AdaRoundSettings,
    CalibrationImages,
    EntropySettings,
    HistogramMseSettings,
    NoSettings,
    PercentileSettings,
    SigmaSettings,
    WeightCalibration,
    WeightMseSettings,
    WeightQuantization,
)
from pipeline.validation import bounds, choice, non_empty, problem


class ParamsError(ValueError):
    """A parameter is missing, unknown, of the wrong type or out of range."""


# Seeds feed torch.manual_seed and numpy's generators; torch takes at most an unsigned 64-bit value,
# so a larger one would pass here and overflow in the stage.
MAX_SEED = 2**64 - 1
# Adam steps per layer: the AdaRound paper's 10000 are ample; the quantize-weights stage's time grows linearly with
# them, so far more only makes it run for hours or days to no gain.
MAX_ADAROUND_ITERATIONS = 100_000


@dataclasses.dataclass(frozen=True)
class DownloadParams:
    # "official": download the official binary archive (md5-verified). Otherwise a local
    # path: the official archive on disk, or an image-folder archive or folder
    # laid out train|test/<class>/<image>.
    source: str = dataclasses.field(default="official", metadata=non_empty())  # "" would read the working folder
    # Optional sha256 of a local archive; without it a SHA256SUMS file beside the archive is used.
    sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class TrainParams:
    # A built-in name (pipeline.model_spec.MODEL_NAMES), models/<file>.py:<factory>, <package.module>:<factory>, or a
    # float ONNX model models/<file>.onnx (its weights are the model's).
    model: str = dataclasses.field(default="net", metadata={"check": check_model_spec})
    # Weights trained elsewhere for train.model, loaded before training: models/<file>.pt|.pth (a state_dict),
    # .safetensors, or a checkpoint of this pipeline. None: train.model's fresh initial weights.
    weights: str | None = dataclasses.field(default=None, metadata={"check": check_weights_spec})
    # 0: the imported weights (train.weights or the ONNX file's) as they are; more: fine-tune them (or train).
    epochs: int = dataclasses.field(default=2, metadata=bounds(0))
    # The normalization the model is trained with, or was trained with elsewhere, per channel on [0, 1] pixels:
    # x = (pixel / 255 - mean) / std. Every later stage and export reads it from the checkpoint.
    mean: tuple[float, ...] = dataclasses.field(default=SEED_MEAN, metadata=bounds(0.0, 1.0) | {"floats": 3})
    std: tuple[float, ...] = dataclasses.field(default=SEED_STD, metadata=bounds(0.0, low_open=True) | {"floats": 3})
    batch_size: int = dataclasses.field(default=4, metadata=bounds(1))
    optimizer: str = dataclasses.field(default="sgd", metadata=choice("sgd", "adam"))
    lr: float = dataclasses.field(default=0.001, metadata=bounds(0.0, low_open=True))  # peak lr for onecycle
    momentum: float = dataclasses.field(default=0.9, metadata=bounds(0.0, 1.0))
    nesterov: bool = False  # SGD only: Nesterov momentum
    weight_decay: float = dataclasses.field(default=0.0, metadata=bounds(0.0))
    schedule: str = dataclasses.field(default="constant", metadata=choice("constant", "onecycle"))
    label_smoothing: float = dataclasses.field(default=0.0, metadata=bounds(0.0, 1.0))  # cross-entropy targets
    augment: bool = False  # random crop (4 px padding) + horizontal flip, on the training device
    seed: int = dataclasses.field(default=0, metadata=bounds(0, MAX_SEED))
    device: str = dataclasses.field(default="auto", metadata=choice("auto", "cpu", "cuda"))
    threads: int = dataclasses.field(default=1, metadata=bounds(1))  # CPU threads for torch


@dataclasses.dataclass(frozen=True)
class GraphParams:
    # Cross-layer equalization (pipeline.quant.equalization) of the float graph: every later stage reads the graph
    # stage's file, so profile, sensitivity and the quantizers all see the equalized weights and tensors.
    equalize: bool = False


@dataclasses.dataclass(frozen=True)
class ProfileParams:
    num_samples: int = dataclasses.field(default=2000, metadata=bounds(1))  # calibration images from the training split
    seed: int = dataclasses.field(default=0, metadata=bounds(0, MAX_SEED))  # picks the calibration subset
    batch_size: int = dataclasses.field(default=500, metadata=bounds(1))
    calibrator: str = dataclasses.field(default="seed", metadata=choice(*ACTIVATION_CALIBRATOR_SETTINGS))
    # Activation width (stored in one byte): signed [-2^(b-1), 2^(b-1)-1], S_a = range / (2^(b-1)-1).
    activation_bits: int = dataclasses.field(default=8, metadata=bounds(4, 8))
    # Full range [0, 2^b-1], S_a = range / (2^b-1), for tensors non-negative by construction (after a ReLU, ...).
    unsigned_activations: bool = False
    # Each calibrator's settings, under its name; only the chosen calibrator's are used.
    percentile: PercentileSettings = dataclasses.field(default_factory=PercentileSettings)
    mse: HistogramMseSettings = dataclasses.field(default_factory=HistogramMseSettings)
    entropy: EntropySettings = dataclasses.field(default_factory=EntropySettings)

    @property
    def calibrator_settings(self) -> Any:
        return chosen_settings(self, self.calibrator, ACTIVATION_CALIBRATOR_SETTINGS)


@dataclasses.dataclass(frozen=True)
class SensitivityParams:
    # The weight widths measured per layer (at least two, the narrowest left out of the size-accuracy curve);
    # with a quantize_weights size budget, the widths a layer may get.
    bits: tuple[int, ...] = dataclasses.field(default=(2, 3, 4, 6, 8), metadata=bounds(2, 8) | {"list": 2})
    num_samples: int = dataclasses.field(default=1000, metadata=bounds(1))  # held-out images from the training split
    seed: int = dataclasses.field(default=0, metadata=bounds(0, MAX_SEED))  # picks them
    # The weight quantizer measured: keep it quantize_weights' (a size budget refuses a sensitivity measured with
    # another one). Each calibrator's settings, under its name; only the chosen calibrator's are used.
    calibrator: str = dataclasses.field(default="sigma", metadata=choice(*WEIGHT_CALIBRATOR_SETTINGS))
    granularity: str = dataclasses.field(default="per_tensor", metadata=choice(*GRANULARITY_NAMES))
    sigma: SigmaSettings = dataclasses.field(default_factory=SigmaSettings)
    mse: WeightMseSettings = dataclasses.field(default_factory=WeightMseSettings)

    @property
    def weight_calibration(self) -> WeightCalibration:
        """The weight quantizer measured: the calibrator with its settings, and the granularity."""
        return weight_calibration(self)


@dataclasses.dataclass(frozen=True)
class QuantizeWeightsParams:
    # integer range [-(2^(bits-1)-1), 2^(bits-1)-1]; one width, or a mapping of every layer's name to its width
    bits: int | dict[str, int] = dataclasses.field(default=8, metadata=bounds(2, 8) | {"per_layer": True})
    # A budget for the packed weights (each layer ceil(weights x bits / 8) bytes): in bytes, or as a fraction of the
    # int8 size (0.5: the uniform-4-bit size). Set (one of them, bits left at 8), each layer's bits are chosen among
    # sensitivity.bits, with the least summed output noise the sensitivity stage measured.
    size_budget_bytes: int | None = dataclasses.field(default=None, metadata=bounds(1))
    size_budget_fraction: float | None = dataclasses.field(default=None, metadata=bounds(0.0, 1.0, low_open=True))
    calibrator: str = dataclasses.field(default="sigma", metadata=choice(*WEIGHT_CALIBRATOR_SETTINGS))
    granularity: str = dataclasses.field(default="per_tensor", metadata=choice(*GRANULARITY_NAMES))
    # Each calibrator's settings, under its name; only the chosen calibrator's are used.
    sigma: SigmaSettings = dataclasses.field(default_factory=SigmaSettings)
    mse: WeightMseSettings = dataclasses.field(default_factory=WeightMseSettings)
    # nearest (round half to even, the seed's) or adaround (learned, pipeline.quant.adaround) at the calibrator's scales
    # (pipeline.quant.rounding); a method with settings reads them under its name.
    rounding: str = dataclasses.field(default="nearest", metadata=choice(*ROUNDING_NAMES))
    adaround: AdaRoundSettings = dataclasses.field(default_factory=AdaRoundSettings)  # adaround only
    # Subtract each layer's mean output shift caused by weight quantization from its float bias.
    bias_correction: bool = False
    # The training images that adaround and bias_correction learn from.
    calibration: CalibrationImages = dataclasses.field(default_factory=CalibrationImages)

    @property
    def weight_calibration(self) -> WeightCalibration:
        """How the weight scales are chosen: the calibrator with its settings, and the granularity."""
        return weight_calibration(self)

    @property
    def weight_quantization(self) -> WeightQuantization:
        """The weight quantization at ``bits`` (a size budget's chosen bits replace them: ``dataclasses.replace``)."""
        return WeightQuantization(self.bits, self.weight_calibration, self.rounding,
                                  chosen_settings(self, self.rounding, ROUNDING_SETTINGS))

    @property
    def size_budget_key(self) -> str | None:
        """The budget key that is set (``size_budget_bytes`` or ``size_budget_fraction``), None without a budget."""
        return next((key for key in SIZE_BUDGET_KEYS if getattr(self, key) is not None), None)

    def size_budget(self, num_weights: int) -> int | None:
        """The budget in bytes for ``num_weights`` weights (size_budget_bytes, or the fraction of their int8 size,
        rounded down), None without a budget."""
        if self.size_budget_fraction is not None:
            return math.floor(self.size_budget_fraction * num_weights)
        return self.size_budget_bytes


SIZE_BUDGET_KEYS = ("size_budget_bytes", "size_budget_fraction")


def chosen_settings(section: Any, name: str, settings_by_name: Mapping[str, type]) -> Any:
    """The settings of the method ``name`` (a calibrator, a rounding): the section's field of that name, NoSettings
    for one without options."""
    if settings_by_name[name] is NoSettings:
        return NoSettings()
    return getattr(section, name)


def weight_calibration(section: SensitivityParams | QuantizeWeightsParams) -> WeightCalibration:
    """The section's weight calibrator, the settings under its name, and its granularity."""
    return WeightCalibration(section.calibrator, chosen_settings(section, section.calibrator, WEIGHT_CALIBRATOR_SETTINGS),
                             section.granularity)


@dataclasses.dataclass(frozen=True)
class QuantizeBiasesParams:
    # How every rescale rounds (pipeline.quant.fixed_point): double (TFLite / TFLM / CMSIS-NN) or single.
    rounding: str = dataclasses.field(default="double", metadata=choice(*REQUANTIZE_ROUNDINGS))
    # int8: the last layer requantized to int8 at the profiled logits range (TFLite's FULLY_CONNECTED writes int8);
    # int32: its accumulators (the rule before int8 logits).
    logits: str = dataclasses.field(default="int8", metadata=choice(*LOGITS_TYPES))


@dataclasses.dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = dataclasses.field(default=1000, metadata=bounds(1))


@dataclasses.dataclass(frozen=True)
class Params:
    download: DownloadParams
    train: TrainParams
    graph: GraphParams
    profile: ProfileParams
    sensitivity: SensitivityParams
    quantize_weights: QuantizeWeightsParams
    quantize_biases: QuantizeBiasesParams
    evaluate: EvaluateParams


# Section name -> its dataclass; the order is the order of params.yaml.
SECTIONS: dict[str, type] = {
    "download": DownloadParams,
    "train": TrainParams,
    "graph": GraphParams,
    "profile": ProfileParams,
    "sensitivity": SensitivityParams,
    "quantize_weights": QuantizeWeightsParams,
    "quantize_biases": QuantizeBiasesParams,
    "evaluate": EvaluateParams,
}


def _type_name(annotation: str) -> str:
    return annotation.replace(" | None", " or null")


def _check_type(key: str, value: Any, annotation: str) -> Any:
    """Return ``value`` converted to the annotated type, or raise ParamsError."""
    if value is None:
        if "None" in annotation:
            return None
        raise ParamsError(f"{key}: value null is not allowed; expected {_type_name(annotation)}")
    base = annotation.split(" | ")[0]
    # bool is a subclass of int in Python; reject it where a number is expected and vice versa.
    if base == "bool":
        ok = isinstance(value, bool)
    elif base == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ParamsError(f"{key}: value {value!r} has the wrong type; expected {_type_name(annotation)}")
    return value


def _check_metadata(key: str, value: Any, metadata: Mapping[str, Any]) -> None:
    if value is not None and "check" in metadata:
        try:
            metadata["check"](value)
        except ModelSpecError as error:
            raise ParamsError(str(error)) from None
    broken = problem(value, metadata)
    if broken is not None:
        raise ParamsError(f"{key}: value {value!r} {broken}")


def _nested_type(field: dataclasses.Field) -> type | None:
    """The settings dataclass a field nests (its default factory), or None for a plain value."""
    factory = field.default_factory
    return factory if factory is not dataclasses.MISSING and dataclasses.is_dataclass(factory) else None


def _per_layer(key: str, raw: Mapping[str, Any], metadata: Mapping[str, Any]) -> dict[str, int]:
    """A mapping of layer name to an integer, each checked like the single value (names are checked by the stage)."""
    if not raw:
        raise ParamsError(f"{key}: an empty mapping names no layer; give one integer or every layer's name")
    values = {}
    for layer, value in raw.items():
        if not isinstance(layer, str):
            raise ParamsError(f"{key}: layer name {layer!r} is not a string")
        values[layer] = _check_type(f"{key}.{layer}", value, "int")
        _check_metadata(f"{key}.{layer}", values[layer], metadata)
    return values


def _int_list(key: str, raw: Any, metadata: Mapping[str, Any]) -> tuple[int, ...]:
    """A list of at least ``metadata["list"]`` distinct integers, each checked like a single value; in ascending order."""
    least = metadata["list"]
    if not isinstance(raw, list) or len(raw) < least:
        raise ParamsError(f"{key}: value {raw!r} is not allowed; expected a list of at least {least} integers")
    values = [_check_type(f"{key}[{index}]", value, "int") for index, value in enumerate(raw)]
    for index, value in enumerate(values):
        _check_metadata(f"{key}[{index}]", value, metadata)
    if len(set(values)) != len(values):
        raise ParamsError(f"{key}: value {raw!r} repeats a value; allowed: distinct integers")
    return tuple(sorted(values))


def _float_list(key: str, raw: Any, metadata: Mapping[str, Any]) -> tuple[float, ...]:
    """A list of exactly ``metadata["floats"]`` numbers (one per image channel), each checked like a single value."""
    count = metadata["floats"]
    if not isinstance(raw, list) or len(raw) != count:
        raise ParamsError(f"{key}: value {raw!r} is not allowed; expected a list of {count} numbers, one per channel")
    values = tuple(_check_type(f"{key}[{index}]", value, "float") for index, value in enumerate(raw))
    for index, value in enumerate(values):
        _check_metadata(f"{key}[{index}]", value, metadata)
    return values


def parse_section(name: str, section_type: type, raw: Any) -> Any:
    """Validate one section's mapping (or a calibrator's settings nested in it) into its dataclass."""
    fields = {field.name: field for field in dataclasses.fields(section_type)}
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{name}: expected a mapping of keys to values (keys: {', '.join(fields)}), got {raw!r}")
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(f"{name}.{unknown[0]}: unknown key; allowed keys: {', '.join(fields)}")
    values = {}
    for field_name, field in fields.items():
        if field_name not in raw:
            continue
        key = f"{name}.{field_name}"
        nested = _nested_type(field)
        if nested is not None:
            values[field_name] = parse_section(key, nested, raw[field_name])
            continue
        if field.metadata.get("per_layer") and isinstance(raw[field_name], Mapping):
            values[field_name] = _per_layer(key, raw[field_name], field.metadata)
            continue
        if "list" in field.metadata:
            values[field_name] = _int_list(key, raw[field_name], field.metadata)
            continue
        if "floats" in field.metadata:
            values[field_name] = _float_list(key, raw[field_name], field.metadata)
            continue
        value = _check_type(key, raw[field_name], field.type)
        _check_metadata(key, value, field.metadata)
        values[field_name] = value
    return section_type(**values)


def parse_params(raw: Any) -> Params:
    """Validate a whole parsed ``params.yaml`` into ``Params``."""
    if not isinstance(raw, Mapping):
        raise ParamsError(f"params: expected a mapping of sections, got {raw!r}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(f"{unknown[0]}: unknown section; allowed sections: {', '.join(SECTIONS)}")
    params = Params(**{name: parse_section(name, section_type, raw.get(name)) for name, section_type in SECTIONS.items()})
    train = params.train
    if train.nesterov and (train.optimizer != "sgd" or train.momentum == 0):
        raise ParamsError(
            f"train.nesterov: value true needs train.optimizer sgd and train.momentum > 0, got "
            f"{train.optimizer!r} and {train.momentum}"
        )
    _check_imported_weights(train)
    _check_size_budget(params.quantize_weights)
    _check_adaround_iterations(params.quantize_weights)
    return params


def _check_imported_weights(train: TrainParams) -> None:
    """An ONNX model carries its weights (no train.weights beside it); 0 epochs needs weights to import."""
    if train.weights is not None and is_onnx_model(train.model):
        raise ParamsError(
            f"train.weights: value {train.weights!r} is set together with the ONNX model train.model {train.model!r}, "
            "whose weights are in the file; allowed: null with an ONNX model"
        )
    if train.epochs == 0 and train.weights is None and not is_onnx_model(train.model):
        raise ParamsError(
            f"train.epochs: value 0 trains nothing and {train.model!r} has no weights to import; allowed: >= 1, or 0 "
            "with train.weights (models/<file>.pt, .pth or .safetensors) or an ONNX model (models/<file>.onnx)"
        )


def _check_size_budget(weights: QuantizeWeightsParams) -> None:
    """A size budget chooses every layer's bits: one budget key at most, and ``bits`` left at 8, not a width or mapping."""
    if weights.size_budget_bytes is not None and weights.size_budget_fraction is not None:
        raise ParamsError(
            f"quantize_weights.size_budget_fraction: value {weights.size_budget_fraction} is set together with "
            f"quantize_weights.size_budget_bytes {weights.size_budget_bytes}; allowed: one of them"
        )
    key = weights.size_budget_key
    if key is not None and weights.bits != 8:
        raise ParamsError(
            f"quantize_weights.{key}: value {getattr(weights, key)} chooses each layer's bits among sensitivity.bits, "
            f"so quantize_weights.bits must stay 8; got {weights.bits!r}"
        )


def _check_adaround_iterations(weights: QuantizeWeightsParams) -> None:
    """At most ``MAX_ADAROUND_ITERATIONS`` AdaRound steps per layer in params.yaml (``AdaRoundSettings`` itself takes
    any positive count)."""
    iterations = weights.adaround.iterations
    if iterations > MAX_ADAROUND_ITERATIONS:
        raise ParamsError(
            f"quantize_weights.adaround.iterations: value {iterations} is out of range; allowed: "
            f"1..{MAX_ADAROUND_ITERATIONS} (Adam steps per layer; the AdaRound paper's 10000 are ample)"
        )


def read_params_file(path: str | Path = "params.yaml") -> Any:
    """Parse ``params.yaml`` as DVC does (ruamel.yaml, YAML 1.2: ``1e-3`` is a float, ``yes`` a string)."""
    try:
        with open(path) as handle:
            return YAML(typ="safe").load(handle)
    except OSError as error:
        raise ParamsError(f"{path}: cannot be read ({error.strerror})") from error
    except YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from error


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    return parse_params(read_params_file(path))
