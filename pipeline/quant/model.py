"""The integer model: int8 weights, int32 biases, fixed-point requantization.

The scheme (r ~= S * q, symmetric, zero point 0):

- weights: int8 in [-127, 127], S_w = range / 127 (per tensor, or per output channel);
- activations: int8 in [-128, 127], S_a = range / 127, where range is the
  calibrated range of the INPUT of each Conv2d/Linear layer;
- biases: int32, q_b = round(b / (S_in * S_w)) (round half to even); a bias
  outside int32 is an ``OverflowError`` naming the layer, never a clamp;
- accumulator: acc = sum(q_w * q_x) + q_b in int32. Every layer is checked at
  build time so that sum(|q_w|) * 128 + |q_b| < 2^31 for each output channel:
  no input can overflow the int32 accumulator;
- requantization to the next layer's int8: M = S_in * S_w / S_out as a
  fixed-point multiplier and shift (``pipeline.quant.fixed_point``: M ~=
  multiplier * 2^(shift - 31), round half up), then saturation to [-128, 127],
  or [0, 127] when a ReLU follows (the ReLU is fused into the clamp);
- max-pool and flatten act on the integers directly;
- the last Conv2d/Linear gives int32 logits: its accumulators at scale
  S_in * S_w with per-tensor weights; with per-channel weights they are
  requantized (same rule, saturating to int32) to one common scale, the
  largest S_in * S_w_c, so the class is always the argmax of integers.

``IntegerModel.ops`` is a list of plain dicts, in forward order:

    {"op": "conv2d" | "linear", "name": str,
     "weight": int8 tensor (out, in[, kh, kw]), "bias": int32 tensor (out,),
     "stride": [sh, sw], "padding": [ph, pw],          # conv2d only
     "input_scale": float, "weight_scale": float64 tensor, () or (out,),
     "output_scale": float64 tensor, () or (out,),
     "output_bits": 8 | 32,     # int8 activations; int32 logits for the last layer
     "requantize": bool, "multiplier": int32 tensor or None, "shift": int32 tensor or None,
     "relu": bool}
    {"op": "maxpool2d", "name": str, "kernel": [kh, kw], "stride": [sh, sw], "padding": [ph, pw]}
    {"op": "flatten", "name": str}

Saved as a self-contained ``.npz`` (no pickle): every tensor is an array,
everything else is one JSON string entry.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.io import atomic_path
from pipeline.quant.calibrators import Granularity, PerChannel, parse_granularity, weight_range
from pipeline.quant.fixed_point import INT32_MAX, INT32_MIN, quantize_multipliers
from pipeline.quant.graph import fold_batchnorm, quantized_layer_names
from pipeline.quant.ranges import ACTIVATION_QMAX, ACTIVATION_QMIN, int_range, quantize, scale_from_range

FORMAT_NAME = "cifar10-ptq-integer-model"
FORMAT_VERSION = 1
SCHEME = (
    "r ~= S*q, symmetric, zero point 0; weights int8 [-127,127] S_w=range/127 (per tensor or per output "
    "channel); activations int8 [-128,127] S_a=range/127; bias int32 round_half_even(b/(S_in*S_w)); "
    "acc int32; requantize M=S_in*S_w/S_out ~= multiplier*2^(shift-31), "
    "y=(acc*multiplier + 2^(30-shift)) >> (31-shift) (round half up), clamp [-128,127] or [0,127] with ReLU; "
    "last layer outputs int32 accumulators at scale S_in*S_w"
)


@dataclass
class IntegerModel:
    """An integer-only network: the input scale and the ops in forward order (see the module docstring).

    ``input_mean``/``input_std`` are the per-channel normalization applied to
    [0, 1] images before ``quantize_input``, recorded so the artifact is self-contained.
    """

    input_scale: float
    ops: list[dict[str, Any]]
    input_mean: list[float] | None = field(default=None)
    input_std: list[float] | None = field(default=None)


# ---------------------------------------------------------------- weights and biases


def quantize_layer_weights(
    weight: Tensor,
    bits: int = 8,
    calibrator: str = "sigma",
    granularity: str | Granularity = "per_tensor",
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """(q_weight int8, weight_scale float64) with weight ~= q_weight * weight_scale.

    q_weight is in the narrow range [-(2^(bits-1) - 1), 2^(bits-1) - 1];
    weight_scale is 0-D per tensor or one value per index of the PerChannel axis.
    The seed's default: 8 bits, 3-sigma range, per tensor.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8] (weights are stored as int8), got {bits!r}")
    granularity = parse_granularity(granularity)
    qmin, qmax = int_range(bits, narrow=True)
    weight_scale = scale_from_range(weight_range(weight, qmax, calibrator, granularity, **options), qmax)
    axis = granularity.axis if isinstance(granularity, PerChannel) else 0
    return quantize(weight, weight_scale, qmin, qmax, axis).to(torch.int8), weight_scale


def quantize_bias(bias: Tensor, input_scale: float, weight_scale: Tensor, layer_name: str) -> Tensor:
    """q_b = round(b / (S_in * S_w)) (half to even) as int32; ``OverflowError`` naming the layer if out of int32."""
    bias_scale = input_scale * torch.as_tensor(weight_scale, dtype=torch.float64)
    q_bias = torch.round(bias.detach().to(torch.float64) / bias_scale)
    out_of_range = (q_bias < INT32_MIN) | (q_bias > INT32_MAX)
    if bool(out_of_range.any()):
        channel = int(out_of_range.nonzero()[0, 0])
        raise OverflowError(
            f"layer {layer_name!r}: bias[{channel}] = {float(bias[channel])} at scale S_in*S_w = "
            f"{float(bias_scale.expand_as(q_bias)[channel])} quantizes to "
            f"{float(q_bias[channel])}, outside int32 [{INT32_MIN}, {INT32_MAX}]; "
            "the input or weight scale is too small for this bias"
        )
    return q_bias.to(torch.int32)


def quantize_model_biases(
    model: nn.Sequential, input_scales: dict[str, float], weight_scales: dict[str, Tensor]
) -> dict[str, Tensor]:
    """The seed's bias step: ``quantize_bias`` for every Conv2d/Linear child that has a bias, by layer name."""
    layers = dict(model.named_children())
    return {
        name: quantize_bias(layers[name].bias, input_scales[name], weight_scales[name], name)
        for name in quantized_layer_names(model)
        if layers[name].bias is not None
    }


def accumulator_bound(q_weight: Tensor, q_bias: Tensor) -> int:
    """The largest |acc| any int8 input can produce: max over channels of sum(|q_w|) * 128 + |q_b|."""
    weight_abs_sum = q_weight.to(torch.int64).abs().reshape(q_weight.shape[0], -1).sum(dim=1)
    return int((weight_abs_sum * -ACTIVATION_QMIN + q_bias.to(torch.int64).abs()).max())


# ---------------------------------------------------------------- building


def _conv_geometry(name: str, conv: nn.Conv2d) -> dict[str, Any]:
    plain = conv.groups == 1 and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
    if isinstance(conv.padding, str) or not plain:
        raise ValueError(
            f"Conv2d {name!r} must have numeric zero padding, groups=1 and dilation=1; got padding={conv.padding!r}, "
            f"padding_mode={conv.padding_mode!r}, groups={conv.groups}, dilation={conv.dilation}"
        )
    return {"stride": list(conv.stride), "padding": list(conv.padding)}


def _maxpool_op(name: str, pool: nn.MaxPool2d) -> dict[str, Any]:
    if pool.dilation not in (1, (1, 1)) or pool.ceil_mode or pool.return_indices:
        raise ValueError(f"MaxPool2d {name!r} must have dilation=1, ceil_mode=False, return_indices=False")
    return {
        "op": "maxpool2d",
        "name": name,
        "kernel": _pair(pool.kernel_size),
        "stride": _pair(pool.stride),
        "padding": _pair(pool.padding),
    }


def _pair(value: int | tuple[int, int]) -> list[int]:
    return list(value) if isinstance(value, tuple) else [value, value]


def _layer_op(
    name: str,
    layer: nn.Conv2d | nn.Linear,
    relu: bool,
    input_scale: float,
    next_input_scale: float | None,
    q_weight: Tensor,
    weight_scale: Tensor,
) -> dict[str, Any]:
    """One conv2d/linear op, requantized to int8 at ``next_input_scale``; the last layer (None) gives int32 logits."""
    bias = layer.bias if layer.bias is not None else torch.zeros(q_weight.shape[0])
    q_bias = quantize_bias(bias, input_scale, weight_scale, name)
    bound = accumulator_bound(q_weight, q_bias)
    if bound > INT32_MAX:
        raise OverflowError(f"layer {name!r}: worst-case accumulator {bound} exceeds int32 max {INT32_MAX}")
    accumulator_scale = input_scale * weight_scale
    op: dict[str, Any] = {
        "op": "conv2d" if isinstance(layer, nn.Conv2d) else "linear",
        "name": name,
        "weight": q_weight,
        "bias": q_bias,
    }
    if isinstance(layer, nn.Conv2d):
        op |= _conv_geometry(name, layer)
    op |= {"input_scale": input_scale, "weight_scale": weight_scale, "relu": relu}
    if next_input_scale is None:
        if accumulator_scale.ndim == 0:
            return op | {
                "output_scale": accumulator_scale, "output_bits": 32,
                "requantize": False, "multiplier": None, "shift": None,
            }
        # Per-channel weights give every class its own accumulator scale. Rescale the
        # logits to one common int32 scale (the largest, so every M <= 1 and nothing
        # saturates) so that the class is the argmax of integers, with no float step.
        output_scale = accumulator_scale.max()
        multiplier, shift = quantize_multipliers(accumulator_scale / output_scale)
        output_bits = 32
    else:
        output_scale = torch.tensor(next_input_scale, dtype=torch.float64)
        multiplier, shift = quantize_multipliers(accumulator_scale / next_input_scale)
        output_bits = 8
    return op | {
        "output_scale": output_scale,
        "output_bits": output_bits,
        "requantize": True,
        "multiplier": multiplier.to(torch.int32),
        "shift": shift.to(torch.int32),
    }


def quantize_model_weights(
    float_model: nn.Sequential,
    weight_bits: int = 8,
    weight_calibrator: str = "sigma",
    granularity: str | Granularity = "per_tensor",
    weight_options: dict[str, Any] | None = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``quantize_layer_weights`` for every Conv2d/Linear child (BatchNorm folded first), by layer name."""
    granularity = parse_granularity(granularity)
    if isinstance(granularity, PerChannel) and granularity.axis != 0:
        raise ValueError(f"granularity must be per tensor or PerChannel(axis=0) (output channels), got {granularity}")
    model = fold_batchnorm(float_model)
    layers = dict(model.named_children())
    return {
        name: quantize_layer_weights(layers[name].weight, weight_bits, weight_calibrator, granularity, **(weight_options or {}))
        for name in quantized_layer_names(model)
    }


def build_integer_model(
    float_model: nn.Sequential,
    activation_ranges: dict[str, float],
    weight_bits: int = 8,
    weight_calibrator: str = "sigma",
    granularity: str | Granularity = "per_tensor",
    weight_options: dict[str, Any] | None = None,
    input_mean: list[float] | None = None,
    input_std: list[float] | None = None,
    quantized_weights: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> IntegerModel:
    """Quantize ``float_model`` (BatchNorm folded first) into an ``IntegerModel``.

    ``activation_ranges[name]`` is the calibrated range of the INPUT of the
    Conv2d/Linear child ``name``; the first layer's is the model input's. Each
    layer is requantized to the input scale of the next Conv2d/Linear layer.
    ``quantized_weights`` is ``quantize_model_weights``' result (the
    quantize-weights stage's output); without it the weights are quantized
    here with the ``weight_*`` and ``granularity`` arguments.
    """
    if quantized_weights is None:
        quantized_weights = quantize_model_weights(
            float_model, weight_bits, weight_calibrator, granularity, weight_options
        )
    model = fold_batchnorm(float_model)
    names = quantized_layer_names(model)
    if not names:
        raise ValueError("float_model has no Conv2d or Linear child to quantize")
    missing = [name for name in names if name not in activation_ranges]
    if missing:
        raise ValueError(f"activation_ranges lacks layers {missing}; it needs the input range of each of {names}")
    for name in names:
        if not 0 <= float(activation_ranges[name]) < float("inf"):
            raise ValueError(f"activation_ranges[{name!r}] must be finite and >= 0, got {activation_ranges[name]!r}")
    input_scales = {name: scale_from_range(float(activation_ranges[name]), ACTIVATION_QMAX) for name in names}
    next_input_scale = {name: input_scales[after] for name, after in zip(names, names[1:])}
    children = list(model.named_children())
    ops: list[dict[str, Any]] = []
    index = 0
    while index < len(children):
        name, layer = children[index]
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            relu = index + 1 < len(children) and isinstance(children[index + 1][1], nn.ReLU)
            q_weight, weight_scale = quantized_weights[name]
            ops.append(_layer_op(name, layer, relu, input_scales[name], next_input_scale.get(name), q_weight, weight_scale))
            index += 2 if relu else 1
            continue
        if isinstance(layer, nn.MaxPool2d):
            ops.append(_maxpool_op(name, layer))
        elif isinstance(layer, nn.Flatten) and layer.start_dim == 1 and layer.end_dim == -1:
            ops.append({"op": "flatten", "name": name})
        else:
            raise ValueError(
                f"child {name!r} ({type(layer).__name__}) is not supported here; allowed: Conv2d/Linear (each "
                "optionally followed by ReLU), BatchNorm2d after Conv2d, MaxPool2d, Flatten(start_dim=1)"
            )
        index += 1
    return IntegerModel(input_scales[names[0]], ops, input_mean, input_std)


# ---------------------------------------------------------------- saving


def save_integer_model(model: IntegerModel, path: str | os.PathLike) -> None:
    """Write ``model`` as an ``.npz`` of arrays plus one JSON entry ``meta``, atomically."""
    arrays: dict[str, np.ndarray] = {}
    op_meta = []
    for index, op in enumerate(model.ops):
        meta: dict[str, Any] = {"arrays": []}
        for key, value in op.items():
            if isinstance(value, Tensor):
                arrays[f"op{index}.{key}"] = value.detach().cpu().numpy()
                meta["arrays"].append(key)
            else:
                meta[key] = value
        op_meta.append(meta)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "scheme": SCHEME,
        "input_scale": model.input_scale,
        "input_mean": model.input_mean,
        "input_std": model.input_std,
        "ops": op_meta,
    }
    arrays["meta"] = np.array(json.dumps(header))
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, **arrays)


def load_integer_model(path: str | os.PathLike) -> IntegerModel:
    """Read a model written by ``save_integer_model`` (no pickle is ever loaded)."""
    with np.load(path, allow_pickle=False) as archive:
        header = json.loads(str(archive["meta"]))
        if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} is not a {FORMAT_NAME} version {FORMAT_VERSION} file "
                f"(format {header.get('format')!r}, version {header.get('version')!r})"
            )
        ops = []
        for index, meta in enumerate(header["ops"]):
            op = {key: value for key, value in meta.items() if key != "arrays"}
            op |= {key: torch.from_numpy(archive[f"op{index}.{key}"].copy()) for key in meta["arrays"]}
            ops.append(op)
    return IntegerModel(header["input_scale"], ops, header["input_mean"], header["input_std"])


def save_quantized_weights(
    quantized_weights: dict[str, tuple[Tensor, Tensor]], meta: dict[str, Any], path: str | os.PathLike
) -> None:
    """Write ``quantize_model_weights``' result (int8 weights and float64 scales, by layer) and a JSON ``meta``."""
    arrays = {}
    for name, (q_weight, weight_scale) in quantized_weights.items():
        arrays[f"{name}.weight"] = q_weight.numpy()
        arrays[f"{name}.scale"] = weight_scale.numpy()
    arrays["meta"] = np.array(json.dumps(meta | {"layers": list(quantized_weights)}))
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, **arrays)


def load_quantized_weights(path: str | os.PathLike) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Any]]:
    """Read ``save_quantized_weights``' file: the weights by layer name, and the meta dict."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        weights = {
            name: (torch.from_numpy(archive[f"{name}.weight"].copy()), torch.from_numpy(archive[f"{name}.scale"].copy()))
            for name in meta["layers"]
        }
    return weights, meta
