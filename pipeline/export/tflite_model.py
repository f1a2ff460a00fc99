"""A TensorFlow Lite int8 flatbuffer of an ``IntegerModel``, which TensorFlow Lite Micro runs bit-exact with the engine.

The file's input is the signed int8 normalized image (1, H, W, C) at ``model.input_scale``, zero point 0:
exactly the integers ``engine.quantize_model_input`` gives, moved to NHWC. Its output is the int8 logits
(1, classes). Every activation is one int8 tensor in NHWC with its float32 scale: a signed code q is
stored as q at zero point 0; an unsigned one (``TensorInfo.signed`` False, q in [0, 2^bits - 1]) as
q - 128 at zero point -128, the same real value. A tensor narrower than 8 bits is stored the same way.

TFLite's kernels derive every fixed-point multiplier themselves, at Prepare time, from the float32 scales
in the file (``QuantizeMultiplier`` of a double ratio), and round twice (``MultiplyByQuantizedMultiplier``:
a rounding doubling high multiply, then a rounding right shift). So before writing a node this module
computes what TFLite Micro will derive, from the float32 scales it writes, with each kernel's own formula
(below), and raises ``ValueError`` naming the node unless every (multiplier, shift) equals the node's
``Requantize`` and that rounds "double": a file TFLite would run differently is never written. Each fused
activation's clamp is computed as TFLite does (``CalculateActivationRangeQuantized``: f / scale in float32,
rounded half away from zero); where it is wider than the engine's clamp (4-bit activations, a ReLU6 that
rounds otherwise) a MAXIMUM and/or MINIMUM with an int8 constant follows, so the result is the engine's.

Node by node (the kernels are tflite-micro's ``tensorflow/lite/micro/kernels``):

- conv2d: CONV_2D (any groups: the reference kernel reads ``filter_input_depth < input_depth`` as groups)
  or DEPTHWISE_CONV_2D (groups == in_channels); M_c = (double)s_in * s_w[c] / s_out (``kernel_util.cc``
  ``PopulateConvolutionQuantizationParams``). PyTorch's symmetric padding is SAME where TFLite's SAME gives
  the same pads and output size, else a PAD (with the zero point: real 0) and VALID;
- linear: FULLY_CONNECTED; per-channel as conv, per-tensor M = (double)(float32 s_in * s_w) / s_out
  (``GetQuantizedConvolutionMultipler`` multiplies the scales in float32). After a flatten of a (C, H, W)
  map, TFLite's flat order is (H, W, C), so the weight's columns are permuted to it;
- weights whose every value is in [-7, 7] are written as packed int4 (two per byte, low nibble first:
  ``UnpackDenseInt4IntoInt8``) where TFLite Micro reads int4: CONV_2D and DEPTHWISE_CONV_2D, and
  FULLY_CONNECTED with per-tensor scales only (``fully_connected_common.cc``);
- add: ADD, left shift 20, M_i = s_i / (2 max s), M_out = 2 max s / (2^20 s_out) (``add_common.cc``);
- max pool: MAX_POOL_2D, padding VALID, SAME where it matches, else PADV2 with -128 (a window always holds
  a real value, so the pad never wins);
- global average pool: MEAN over H, W, keep_dims; M = s_in / s_out, then (multiplier << s) / n and
  shift - s with s = min(floor(log2 n), 32, 31 + shift) (``reference/reduce.h`` ``QuantizedMeanOrSum``);
  a window pool: AVERAGE_POOL_2D (the stored values' mean rounded half away from zero, at the input's
  scale and zero point: ``reference/integer_ops/pooling.h``) then QUANTIZE to the output's scale, which is
  the engine's window pool with double rounding and no padding (``ops.avgpool``); others are refused;
- concat: CONCATENATION on channels, which requires its inputs at the output's scale and zero point
  (``concatenation.cc``): an input the engine requantizes goes through QUANTIZE (int8 to int8, M = s_in /
  s_out, ``quantize_common.cc``) first;
- standalone ReLU / ReLU6: MAXIMUM / MINIMUM with constants; flatten: RESHAPE (after TRANSPOSE to (C, H, W)
  order when something other than a linear layer reads it).

- leaky ReLU: LEAKY_RELU where its multipliers are the engine's; it derives them from float32 ratios,
  s_in / s_out and s_in * alpha / s_out, widened to double only after (``leaky_relu_common.cc``), so a 31-bit
  multiplier matches only when its low 7 bits are 0 (power-of-two ratios; alpha is f32(slope) or a float32
  neighbour). Otherwise the non-negative side is QUANTIZE (M_pos = (double)s_in / s_out, the engine's) and, where
  the input has negative codes, the negative side is MUL by an int8 constant 1 (M = (double)s_in * s_c / s_y,
  ``mul_common.cc``; s_c near the slope and the product's scale s_y near s_out are chosen so the multiplier is
  M_neg exactly), combined by MAXIMUM (slope <= 1; MINIMUM for a slope > 1), which is checked to equal the engine's
  choice by sign for every input code (neither reads scales). Refused where no float32 pair (s_c, s_y) reaches
  M_neg (M_neg / s_in within 2^-31 of, but not, a fraction with small terms such as 1/7);
- hard swish: HARD_SWISH, whose int16 arithmetic (``reference/hard_swish.h``) is the engine's; its int16
  multipliers come from float32 ratios (``hard_swish_common.cc``) and must equal the node's, which the engine
  rounds from float64 ratios (they differ for about 1 random scale pair in 1,300: refused).

Every kernel clamps to the int8 storage range; a 4-bit output gets the MAXIMUM / MINIMUM above. int32 logits are
refused (FULLY_CONNECTED's output type is its input's).
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import flatbuffers
import numpy as np
import tflite
import torch

from pipeline.export.plan import as_array
from pipeline.io import atomic_path
from pipeline.quant.fixed_point import quantize_multiplier, requantize
from pipeline.quant.ir import IntegerModel, int_node_inputs
from pipeline.quant.ops.add import IntAdd
from pipeline.quant.ops.avgpool import IntAvgPool
from pipeline.quant.ops.base import Requantize, TensorInfo
from pipeline.quant.ops.clamp import IntClamp
from pipeline.quant.ops.concat import IntConcat
from pipeline.quant.ops.conv import IntConv
from pipeline.quant.ops.hardswish import IntHardSwish, int16_multiplier
from pipeline.quant.ops.leaky_relu import IntLeakyReLU
from pipeline.quant.ops.maxpool import IntMaxPool
from pipeline.quant.ops.registry import OP_OF
from pipeline.quant.ops.reshape import IntReshape

INT8_MIN, INT8_MAX = -128, 127
UNSIGNED_ZERO_POINT = -128  # an unsigned code q is stored as q - 128
ADD_LEFT_SHIFT = 20  # add_common.cc: left_shift for int8 outputs
INT4_WEIGHT_LIMIT = 7  # weights in [-7, 7] are written as int4
SCHEMA_VERSION = 3
_OP = tflite.BuiltinOperator
_ACT = tflite.ActivationFunctionType
_TYPE = tflite.TensorType


# ---------------------------------------------------------------- what TFLite derives from the file


def f32(value: Any) -> float:
    """``value`` rounded to float32, as the file stores it, back as a Python float (a C double)."""
    return float(np.float32(value))


def tflite_round(value: float) -> int:
    """TfLiteRound (std::round): half away from zero."""
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def conv_multipliers(s_in: float, weight_scales: list[float], s_out: float) -> list[tuple[int, int]]:
    """PopulateConvolutionQuantizationParams: M_c = (double)s_in * (double)s_w[c] / (double)s_out, per channel."""
    return [quantize_multiplier(f32(s_in) * f32(s_w) / f32(s_out)) for s_w in weight_scales]


def fully_connected_multiplier(s_in: float, s_w: float, s_out: float) -> tuple[int, int]:
    """Per-tensor FULLY_CONNECTED (GetQuantizedConvolutionMultipler): the scales' product is taken in float32."""
    return quantize_multiplier(float(np.float32(s_in) * np.float32(s_w)) / f32(s_out))


def add_multipliers(s_a: float, s_b: float, s_out: float) -> list[tuple[int, int]]:
    """CalculateOpDataAdd: M_a, M_b = s / (2 max s), M_out = 2 max s / (2^20 s_out), each in (0, 1)."""
    twice_max = 2 * max(f32(s_a), f32(s_b))
    reals = [f32(s_a) / twice_max, f32(s_b) / twice_max, twice_max / ((1 << ADD_LEFT_SHIFT) * f32(s_out))]
    return [quantize_multiplier(real) for real in reals]


def mean_multiplier(s_in: float, s_out: float, count: int) -> tuple[int, int]:
    """QuantizedMeanOrSum (reference/reduce.h): M = s_in / s_out, then the 1/count folded in by integer division."""
    multiplier, shift = quantize_multiplier(f32(s_in) / f32(s_out))
    lift = min(count.bit_length() - 1, 32, 31 + shift)
    return (multiplier << lift) // count, shift - lift


def requantize_multiplier(s_in: float, s_out: float) -> tuple[int, int]:
    """QUANTIZE int8 -> int8 (quantize_common.cc): M = (double)s_in / (double)s_out."""
    return quantize_multiplier(f32(s_in) / f32(s_out))


def leaky_relu_multipliers(s_in: float, alpha: float, s_out: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """CalculateOpDataLeakyRelu (leaky_relu_common.cc): (identity, alpha) multipliers, each ratio computed in
    float32 (``s_in / s_out`` and ``s_in * alpha / s_out``, left to right) and only then widened to double."""
    a, b, c = np.float32(s_in), np.float32(alpha), np.float32(s_out)
    return quantize_multiplier(float(a / c)), quantize_multiplier(float(a * b / c))


def mul_multiplier(s_a: float, s_b: float, s_out: float) -> tuple[int, int]:
    """CalculateOpDataMul (mul_common.cc): M = (double)s_a * (double)s_b / (double)s_out."""
    return quantize_multiplier(f32(s_a) * f32(s_b) / f32(s_out))


def hard_swish_multipliers(s_in: float, s_out: float) -> tuple[tuple[int, int], tuple[int, int]]:
    """HardSwishPrepare (hard_swish_common.cc): the int16 (multiplier, exponent) of the output and of the
    "reluish" rescale, from float32 ratios: hires = (1.0f / 128) * s_in, hires / s_out and hires / (3.0f / 32768),
    then QuantizeMultiplier and DownScaleInt32ToInt16Multiplier (``hardswish.int16_multiplier``)."""
    hires = np.float32(1.0 / 128.0) * np.float32(s_in)
    reluish_scale = np.float32(3.0) / np.float32(32768.0)
    return int16_multiplier(float(hires / np.float32(s_out))), int16_multiplier(float(hires / reluish_scale))


def zero_point(info: TensorInfo) -> int:
    """The stored value of code 0: 0 for a signed tensor, -128 for an unsigned one."""
    return 0 if info.signed else UNSIGNED_ZERO_POINT


def storage_range(info: TensorInfo) -> tuple[int, int]:
    """The codes an int8 tensor at this zero point holds: [-128, 127] less the zero point."""
    return INT8_MIN - zero_point(info), INT8_MAX - zero_point(info)


def fused_clamp(activation: int, info: TensorInfo) -> tuple[int, int] | None:
    """The codes TFLite's fused ``activation`` keeps (CalculateActivationRangeQuantized), or None where its
    Prepare would fail (6 / scale out of int32). f / scale is a float32 division, rounded half away from zero."""
    low, high = storage_range(info)
    if activation == _ACT.NONE:
        return low, high
    low = max(low, 0)
    if activation == _ACT.RELU:
        return low, high
    six = float(np.float32(6.0) / np.float32(f32(info.scale)))
    if not -(2.0**31) <= six <= 2.0**31 - 1:
        return None
    return low, min(high, tflite_round(six))


# ---------------------------------------------------------------- the flatbuffer being built


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: int  # tflite.TensorType
    buffer: int
    scales: list[float] | None = None
    zero_points: list[int] | None = None
    quantized_dimension: int = 0


@dataclass
class _Operator:
    code: int  # tflite.BuiltinOperator
    inputs: list[int]
    outputs: list[int]
    options: tuple[str, dict[str, Any]] | None = None  # (options table name, its fields)


@dataclass
class _Graph:
    """Tensors, buffers and operators being collected; ``values`` maps an engine tensor to its TFLite tensor."""

    model: IntegerModel
    tensors: list[_Tensor] = field(default_factory=list)
    buffers: list[bytes] = field(default_factory=lambda: [b""])  # buffer 0: the empty one, by convention
    operators: list[_Operator] = field(default_factory=list)
    values: dict[str, int] = field(default_factory=dict)
    hwc_flat: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # flat tensor -> its map's (C, H, W)
    readers: dict[str, list[Any]] = field(default_factory=dict)

    def add_tensor(self, tensor: _Tensor, data: bytes | None = None) -> int:
        if data is not None:
            self.buffers.append(data)
            tensor.buffer = len(self.buffers) - 1
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def activation(self, name: str, hint: str = "", shape: tuple[int, ...] | None = None) -> int:
        """A new int8 tensor with the engine tensor ``name``'s scale and zero point (NHWC shape by default)."""
        info = self.model.tensors[name]
        return self.add_tensor(_Tensor(f"{name}{hint}", shape or nhwc(info.shape), _TYPE.INT8, 0,
                                       [f32(info.scale)], [zero_point(info)]))

    def like(self, index: int, hint: str, shape: tuple[int, ...] | None = None) -> int:
        """A new tensor with tensor ``index``'s type and quantization."""
        t = self.tensors[index]
        return self.add_tensor(_Tensor(t.name + hint, shape or t.shape, t.dtype, 0, t.scales, t.zero_points,
                                       t.quantized_dimension))

    def constant(self, name: str, values: np.ndarray, dtype: int, scales: list[float] | None = None,
                 zero_points: list[int] | None = None, quantized_dimension: int = 0, packed: bytes | None = None
                 ) -> int:
        data = packed if packed is not None else np.ascontiguousarray(values).tobytes()
        return self.add_tensor(_Tensor(name, tuple(values.shape), dtype, 0, scales, zero_points,
                                       quantized_dimension), data)

    def op(self, code: int, inputs: list[int], outputs: list[int], options: str | None = None, **fields: Any
           ) -> None:
        self.operators.append(_Operator(code, inputs, outputs, (options, fields) if options else None))


def nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A per-image engine shape (C, H, W) or (K,) as TFLite's batch-1 (1, H, W, C) or (1, K)."""
    return (1, *shape[1:], shape[0]) if len(shape) == 3 else (1, *shape)


def _where(index: int, node: Any) -> str:
    return f"node {index} ({node.name!r}, {type(node).__name__})"


# ---------------------------------------------------------------- checks shared by the emitters


def _check_double(rq: Requantize, where: str) -> None:
    rounding = getattr(rq, "rounding", "double")
    if rounding != "double":
        raise ValueError(f"{where} requantizes with {rounding!r} rounding; TFLite's kernels round twice "
                         "(MultiplyByQuantizedMultiplier), so only rounding 'double' can be written")


def _check_multipliers(where: str, what: str, expected: list[tuple[int, int]], rq: Requantize) -> None:
    """``ValueError`` unless ``rq``'s (multiplier, shift) per channel are what TFLite derives (``expected``)."""
    _check_double(rq, where)
    multipliers = as_array(rq.multiplier, np.int64).reshape(-1)
    shifts = as_array(rq.shift, np.int64).reshape(-1)
    count = max(len(expected), len(multipliers))
    got = np.broadcast_to(np.stack([multipliers, shifts], 1), (count, 2)).tolist()
    want = np.broadcast_to(np.array(expected, np.int64).reshape(-1, 2), (count, 2)).tolist()
    bad = [index for index, (g, w) in enumerate(zip(got, want, strict=True)) if g != w]
    if bad:
        index = bad[0]
        raise ValueError(
            f"{where}: TFLite derives the {what} (multiplier, shift) {tuple(want[index])} from the float32 scales "
            f"written to the file, but the model's Requantize has {tuple(got[index])} (channel {index}; "
            f"{len(bad)} of {count} differ); rebuild the model with TFLite's multipliers"
        )


def _clamp_ops(graph: _Graph, x: int, name: str, have: tuple[int, int], want: tuple[int, int], where: str) -> int:
    """MAXIMUM / MINIMUM with int8 constants, so codes clamped to ``have`` end clamped to ``want`` (within it)."""
    if not have[0] <= want[0] <= want[1] <= have[1]:
        raise ValueError(f"{where}: clamp {want} is not within {have}, what TFLite's kernel leaves")
    info = graph.model.tensors[name]
    zp = zero_point(info)
    for bound, code, keeps in ((want[0], _OP.MAXIMUM, have[0]), (want[1], _OP.MINIMUM, have[1])):
        if bound == keeps:
            continue
        kind = "min" if code == _OP.MAXIMUM else "max"
        constant = graph.constant(f"{name}/{kind}", np.array([bound + zp], np.int8), _TYPE.INT8,
                                  [f32(info.scale)], [zp])
        y = graph.like(x, f"/clamp_{kind}")
        graph.op(code, [x, constant], [y])
        x = y
    return x


def _fused_activation(activation: str, info: TensorInfo, want: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """The fused activation to write and the codes it keeps: the node's own where TFLite's clamp contains the
    engine's ``want`` (extra clamps then narrow it), else none (the type's range always contains it)."""
    own = {"none": _ACT.NONE, "relu": _ACT.RELU, "relu6": _ACT.RELU6}.get(activation, _ACT.NONE)
    for code in (own, _ACT.NONE):
        have = fused_clamp(code, info)
        if have is not None and have[0] <= want[0] and want[1] <= have[1]:
            return code, have
    raise ValueError(f"clamp {want} is outside the int8 storage {storage_range(info)}")


def _padding(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], pad: tuple[int, int]) -> str:
    """"VALID" without padding, "SAME" where TFLite's SAME pads (extra at the end) and output size equal PyTorch's
    symmetric padding, else "explicit" (a pad op before a VALID window)."""
    if pad == (0, 0):
        return "VALID"
    for n, k, s, p in zip(size, kernel, stride, pad, strict=True):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        if (n + 2 * p - k) // s + 1 != out or total // 2 != p:
            return "explicit"
    return "SAME"


def _pad(graph: _Graph, x: int, name: str, pad: tuple[int, int], fill: int | None) -> int:
    """PAD (with the zero point: real 0) or PADV2 with ``fill``, symmetric in H and W, of NHWC tensor ``x``."""
    n, h, w, c = graph.tensors[x].shape
    pads = graph.constant(f"{name}/pads", np.array([[0, 0], [pad[0], pad[0]], [pad[1], pad[1]], [0, 0]], np.int32),
                          _TYPE.INT32)
    y = graph.like(x, "/padded", (n, h + 2 * pad[0], w + 2 * pad[1], c))
    if fill is None:
        graph.op(_OP.PAD, [x, pads], [y], "PadOptions")
    else:
        t = graph.tensors[x]
        value = graph.constant(f"{name}/pad_value", np.array([fill], np.int8), _TYPE.INT8, t.scales, t.zero_points)
        graph.op(_OP.PADV2, [x, pads, value], [y], "PadV2Options")
    return y


def _pack_int4(values: np.ndarray) -> bytes:
    """Two int4 values a byte, the first in the low nibble (UnpackDenseInt4IntoInt8)."""
    nibbles = (values.reshape(-1).astype(np.int16) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def _weight(graph: _Graph, name: str, weight: np.ndarray, scales: list[float], dimension: int, int4: bool) -> int:
    """The int8 (or packed int4) weight tensor, symmetric: zero points 0, per channel along ``dimension``."""
    zeros = [0] * len(scales)
    if int4:
        return graph.constant(f"{name}/weight", weight, _TYPE.INT4, scales, zeros, dimension, _pack_int4(weight))
    return graph.constant(f"{name}/weight", weight.astype(np.int8), _TYPE.INT8, scales, zeros, dimension)


# ---------------------------------------------------------------- emitters
# Each takes (graph, node, where) and returns the TFLite tensor holding the node's output.


def _layer_requantize(graph: _Graph, node: IntConv, where: str) -> Requantize:
    out = graph.model.tensors[node.output]
    if node.requantize is None or out.bits > 8:
        raise ValueError(
            f"{where} writes int{out.bits} logits; TFLite's FULLY_CONNECTED and CONV_2D output int8 (their output "
            "type must equal their input type), so the model needs int8 logits: requantize its last layer to int8"
        )
    return node.requantize


def _conv(graph: _Graph, node: IntConv, where: str) -> int:
    rq = _layer_requantize(graph, node, where)
    model = graph.model
    in_info, out_info = model.tensors[node.input], model.tensors[node.output]
    weight = as_array(node.weight, np.int64)
    weight_scales = [f32(s) for s in as_array(node.weight_scale, np.float64).reshape(-1)]
    fits_int4 = bool(np.abs(weight).max(initial=0) <= INT4_WEIGHT_LIMIT)
    if node.kind == "linear":
        return _fully_connected(graph, node, where, rq, weight, weight_scales, fits_int4)
    _check_multipliers(where, "output", conv_multipliers(f32(in_info.scale), weight_scales, f32(out_info.scale)), rq)
    x = graph.values[node.input]
    kernel = (weight.shape[2], weight.shape[3])
    padding = _padding(in_info.shape[1:], kernel, node.stride, node.padding)
    if padding == "explicit":
        x, padding = _pad(graph, x, node.name, node.padding, None), "VALID"
    activation, have = _fused_activation(node.activation, out_info, (rq.clamp_min, rq.clamp_max))
    channels = in_info.shape[0]
    depthwise = node.groups == channels and channels > 1
    if depthwise:
        w = _weight(graph, node.name, weight.transpose(1, 2, 3, 0), weight_scales, 3, fits_int4)  # (1, kh, kw, out)
    else:
        w = _weight(graph, node.name, weight.transpose(0, 2, 3, 1), weight_scales, 0, fits_int4)  # (out, kh, kw, in/g)
    bias = graph.constant(f"{node.name}/bias", as_array(node.bias, np.int32).reshape(-1), _TYPE.INT32,
                          [f32(in_info.scale) * s for s in weight_scales], [0] * len(weight_scales))
    y = graph.activation(node.output, "/conv")
    common = {"Padding": getattr(tflite.Padding, padding), "StrideW": node.stride[1], "StrideH": node.stride[0],
              "FusedActivationFunction": activation, "DilationWFactor": 1, "DilationHFactor": 1}
    if depthwise:
        graph.op(_OP.DEPTHWISE_CONV_2D, [x, w, bias], [y], "DepthwiseConv2DOptions",
                 DepthMultiplier=weight.shape[0] // channels, **common)
    else:
        graph.op(_OP.CONV_2D, [x, w, bias], [y], "Conv2DOptions", **common)
    return _clamp_ops(graph, y, node.output, have, (rq.clamp_min, rq.clamp_max), where)


def _fully_connected(graph: _Graph, node: IntConv, where: str, rq: Requantize, weight: np.ndarray,
                     weight_scales: list[float], fits_int4: bool) -> int:
    model = graph.model
    in_info, out_info = model.tensors[node.input], model.tensors[node.output]
    s_in, s_out = f32(in_info.scale), f32(out_info.scale)
    if len(weight_scales) == 1:
        expected = [fully_connected_multiplier(s_in, weight_scales[0], s_out)]
    else:
        expected = conv_multipliers(s_in, weight_scales, s_out)
    _check_multipliers(where, "output", expected, rq)
    source = graph.hwc_flat.get(node.input)
    if source is not None:  # the flat input is in (H, W, C) order: reorder the weight's columns to it
        weight = weight.reshape(weight.shape[0], *source).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)
    activation, have = _fused_activation(node.activation, out_info, (rq.clamp_min, rq.clamp_max))
    # TFLite Micro reads int4 weights of a FULLY_CONNECTED only with one scale (fully_connected_common.cc)
    w = _weight(graph, node.name, weight, weight_scales, 0, fits_int4 and len(weight_scales) == 1)
    bias = graph.constant(f"{node.name}/bias", as_array(node.bias, np.int32).reshape(-1), _TYPE.INT32,
                          [f32(np.float32(s_in) * np.float32(s)) for s in weight_scales], [0] * len(weight_scales))
    y = graph.activation(node.output, "/fc")
    graph.op(_OP.FULLY_CONNECTED, [graph.values[node.input], w, bias], [y], "FullyConnectedOptions",
             FusedActivationFunction=activation, KeepNumDims=False)
    return _clamp_ops(graph, y, node.output, have, (rq.clamp_min, rq.clamp_max), where)


def _add(graph: _Graph, node: IntAdd, where: str) -> int:
    tensors = graph.model.tensors
    if node.left_shift != ADD_LEFT_SHIFT:
        raise ValueError(f"{where} lifts its inputs by 2^{node.left_shift}; TFLite's int8 ADD by 2^{ADD_LEFT_SHIFT}")
    for rq in node.input_requantize:
        if (rq.clamp_min, rq.clamp_max) != (-(2**31), 2**31 - 1):
            raise ValueError(f"{where} saturates an input to [{rq.clamp_min}, {rq.clamp_max}]; TFLite's ADD does not")
    scales = [f32(tensors[name].scale) for name in (*node.inputs, node.output)]
    expected = add_multipliers(*scales)
    if not all(0 < m and s <= 0 for m, s in expected):  # QuantizeMultiplierSmallerThanOneExp would abort TFLite
        raise ValueError(f"{where}: TFLite's ADD needs every multiplier in (0, 1), but the scales {scales} give "
                         f"{expected}")
    for what, rq, want in zip(("first input", "second input", "output"), node.requantizations(), expected,
                              strict=True):
        _check_multipliers(where, what, [want], rq)
    out_rq = node.output_requantize
    want = (out_rq.clamp_min, out_rq.clamp_max)
    activation, have = _fused_activation(node.activation, tensors[node.output], want)
    y = graph.activation(node.output, "/add")
    graph.op(_OP.ADD, [graph.values[name] for name in node.inputs], [y], "AddOptions",
             FusedActivationFunction=activation)
    return _clamp_ops(graph, y, node.output, have, want, where)


def _same_storage(graph: _Graph, a: str, b: str) -> bool:
    """Whether engine tensors ``a`` and ``b`` are stored alike: one float32 scale, one zero point."""
    ta, tb = graph.model.tensors[a], graph.model.tensors[b]
    return f32(ta.scale) == f32(tb.scale) and zero_point(ta) == zero_point(tb)


def _maxpool(graph: _Graph, node: IntMaxPool, where: str) -> int:
    if not _same_storage(graph, node.input, node.output):  # pooling_common.cc: one scale and zero point
        raise ValueError(f"{where}: TFLite's MAX_POOL_2D keeps its input's scale and zero point; the output's differ")
    x = graph.values[node.input]
    padding = _padding(graph.model.tensors[node.input].shape[1:], node.kernel, node.stride, node.padding)
    if padding == "explicit":  # -128 never wins: PyTorch's padding is at most half the kernel
        x, padding = _pad(graph, x, node.name, node.padding, INT8_MIN), "VALID"
    y = graph.activation(node.output)
    graph.op(_OP.MAX_POOL_2D, [x], [y], "Pool2DOptions", Padding=getattr(tflite.Padding, padding),
             StrideW=node.stride[1], StrideH=node.stride[0], FilterWidth=node.kernel[1],
             FilterHeight=node.kernel[0], FusedActivationFunction=_ACT.NONE)
    return y


def _avgpool(graph: _Graph, node: IntAvgPool, where: str) -> int:
    in_info, out_info = graph.model.tensors[node.input], graph.model.tensors[node.output]
    rq = node.requantize
    _check_double(rq, where)
    want = (rq.clamp_min, rq.clamp_max)
    if tuple(node.kernel) == tuple(in_info.shape[1:]) and tuple(node.padding) == (0, 0):
        count = node.kernel[0] * node.kernel[1]
        _check_multipliers(where, "mean", [mean_multiplier(f32(in_info.scale), f32(out_info.scale), count)], rq)
        axes = graph.constant(f"{node.name}/axes", np.array([1, 2], np.int32), _TYPE.INT32)
        y = graph.activation(node.output, "/mean")
        graph.op(_OP.MEAN, [graph.values[node.input], axes], [y], "ReducerOptions", KeepDims=True)
        return _clamp_ops(graph, y, node.output, storage_range(out_info), want, where)
    if node.mean_zero_point is None or tuple(node.padding) != (0, 0):
        raise ValueError(f"{where} rescales its window sums in one rounding (single rounding, or padding "
                         f"{node.padding}); TFLite's AVERAGE_POOL_2D takes a rounded mean at the input's scale, which "
                         "the engine computes for an unpadded window pool with double rounding (ops.avgpool)")
    if node.mean_zero_point != -zero_point(in_info):
        raise ValueError(f"{where} takes its mean less {node.mean_zero_point}, but the file stores its input at zero "
                         f"point {zero_point(in_info)}")
    # AVERAGE_POOL_2D (reference/integer_ops/pooling.h): the stored values' mean, rounded half away from zero, at
    # the input's scale and zero point; then QUANTIZE to the output's scale, M = s_in / s_out.
    _check_multipliers(where, "output", [requantize_multiplier(f32(in_info.scale), f32(out_info.scale))], rq)
    mean = graph.like(graph.values[node.input], f"/{node.name}/mean", nhwc(out_info.shape))
    graph.op(_OP.AVERAGE_POOL_2D, [graph.values[node.input]], [mean], "Pool2DOptions", Padding=tflite.Padding.VALID,
             StrideW=node.stride[1], StrideH=node.stride[0], FilterWidth=node.kernel[1],
             FilterHeight=node.kernel[0], FusedActivationFunction=_ACT.NONE)
    y = graph.activation(node.output, "/avgpool")
    graph.op(_OP.QUANTIZE, [mean], [y])
    return _clamp_ops(graph, y, node.output, storage_range(out_info), want, where)


def _concat(graph: _Graph, node: IntConcat, where: str) -> int:
    out_info = graph.model.tensors[node.output]
    parts = []
    for index, (name, rq) in enumerate(zip(node.inputs, node.input_requantize, strict=True)):
        x = graph.values[name]
        if rq is None:
            if not _same_storage(graph, name, node.output):
                raise ValueError(f"{where} copies {name!r} as it is, but TFLite's CONCATENATION needs it at the "
                                 "output's float32 scale and zero point")
            parts.append(x)
            continue
        in_info = graph.model.tensors[name]
        _check_multipliers(where, f"input {index}", [requantize_multiplier(f32(in_info.scale), f32(out_info.scale))],
                           rq)
        y = graph.activation(node.output, f"/in{index}", nhwc(in_info.shape))
        graph.op(_OP.QUANTIZE, [x], [y])
        parts.append(_clamp_ops(graph, y, node.output, storage_range(out_info), (rq.clamp_min, rq.clamp_max), where))
    y = graph.activation(node.output)
    graph.op(_OP.CONCATENATION, parts, [y], "ConcatenationOptions", Axis=3, FusedActivationFunction=_ACT.NONE)
    return y


def _clamp(graph: _Graph, node: IntClamp, where: str) -> int:
    info = graph.model.tensors[node.input]
    return _clamp_ops(graph, graph.values[node.input], node.output, storage_range(info),
                      (node.clamp_min, node.clamp_max), where)


def _reshape(graph: _Graph, node: IntReshape, where: str) -> int:
    """RESHAPE to (1, K). A (C, H, W) map flattens in (H, W, C) order in NHWC: linear readers take it so
    (``_fully_connected`` reorders their weights); for any other reader it is transposed to (C, H, W) first."""
    shape = graph.model.tensors[node.input].shape
    x = graph.values[node.input]
    if len(shape) == 1:
        if node.input in graph.hwc_flat:
            graph.hwc_flat[node.output] = graph.hwc_flat[node.input]
    elif shape[0] > 1 and shape[1] * shape[2] > 1:
        readers = graph.readers.get(node.output, [])
        if readers and all(isinstance(r, IntConv) and r.kind == "linear" for r in readers):
            graph.hwc_flat[node.output] = shape
        else:
            perm = graph.constant(f"{node.name}/perm", np.array([0, 3, 1, 2], np.int32), _TYPE.INT32)
            transposed = graph.like(x, "/chw", (1, *shape))
            graph.op(_OP.TRANSPOSE, [x, perm], [transposed], "TransposeOptions")
            x = transposed
    y = graph.activation(node.output)
    new_shape = graph.constant(f"{node.name}/shape", np.array(nhwc(graph.model.tensors[node.output].shape), np.int32),
                               _TYPE.INT32)
    graph.op(_OP.RESHAPE, [x, new_shape], [y])
    return y


def _float32_neighbours(value: float, count: int) -> list[float]:
    """``value`` as float32, then its float32 neighbours out to ``count`` steps, nearest first."""
    centre = np.float32(value)
    found = [float(centre)]
    up = down = centre
    for _ in range(count):
        up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(0))
        found += [float(up), float(down)]
    return found[:1] + [v for v in found[1:] if v > 0]


def _leaky_relu_alpha(s_in: float, s_out: float, slope: float, positive: tuple[int, int],
                      negative: tuple[int, int] | None) -> float | None:
    """A float32 alpha (``slope`` itself, else one of its nearest float32 neighbours) for which LEAKY_RELU derives
    the engine's multipliers, or None: its identity multiplier is a float32 ratio, so only a multiplier with its
    low 7 bits zero (24 significant bits) can match. ``negative`` None: the input has no negative codes."""
    identity, _ = leaky_relu_multipliers(s_in, slope, s_out)
    if identity != positive:
        return None
    if negative is None:
        return f32(slope)
    for alpha in _float32_neighbours(slope, 64):
        if leaky_relu_multipliers(s_in, alpha, s_out)[1] == negative:
            return alpha
    return None


def _simplest_fraction(lo: Fraction, hi: Fraction) -> Fraction:
    """The fraction with the smallest denominator in [lo, hi] (0 < lo < hi), by continued fractions."""
    whole = math.floor(lo)
    if whole + 1 <= hi or whole == lo:
        return Fraction(math.ceil(lo))
    return whole + 1 / _simplest_fraction(1 / (hi - whole), 1 / (lo - whole))


def _mul_scales(s_in: float, s_out: float, negative: tuple[int, int]) -> tuple[float, float] | None:
    """Float32 scales (s_c, s_y) of a constant 1 and of the product for which MUL derives the engine's negative
    multiplier (M = s_in * s_c / s_y in double), s_y near the output's scale (so s_c is near the slope), or None.

    With s_in fixed, neighbouring float32 s_c and s_y reach only a lattice of multipliers, so the ratio s_c / s_y is
    found as C / Y * 2^-j: the simplest fraction (smallest Y) in the interval of ratios that round to the multiplier,
    for each j; C and Y are then scaled by one integer k (k C, k Y below 2^24: exact in float32) to bring s_y near
    s_out. None where every such Y is 2^24 or more (the ratio lies too close to a simple fraction, e.g. a slope of
    0.01 at s_out = 0.07 asks for 1/7 to within 2^-31 but not exactly): no float32 pair reaches it."""
    multiplier, shift = negative
    unit = Fraction(2) ** (shift - 31) / Fraction(s_in)
    limit = 1 << 24
    fractions = []
    for j in range(-4, 5):
        lo, hi = (multiplier - Fraction(49, 100)) * unit * 2**j, (multiplier + Fraction(49, 100)) * unit * 2**j
        ratio = _simplest_fraction(lo, hi)
        if max(ratio.numerator, ratio.denominator) < limit:
            fractions.append((max(ratio.numerator, ratio.denominator), j, ratio.numerator, ratio.denominator))
    for _, j, c, y in sorted(fractions):
        exponent = math.floor(math.log2(s_out / y))  # y * 2^exponent <= s_out
        ks = sorted(range(1, limit // max(c, y)), key=lambda k: abs(math.log2(k * y * 2.0**exponent / s_out)))
        for k in ks[:16]:
            s_y, s_c = math.ldexp(k * y, exponent), math.ldexp(k * c, exponent - j)
            if f32(s_y) == s_y and f32(s_c) == s_c and mul_multiplier(s_in, s_c, s_y) == negative:
                return s_c, s_y
    return None


def _leaky_relu(graph: _Graph, node: IntLeakyReLU, where: str) -> int:
    """LEAKY_RELU where TFLite derives the engine's two multipliers from the float32 scales and alpha; else
    QUANTIZE (M_pos, derived in double as the engine) combined by MAXIMUM (MINIMUM for a slope > 1) with MUL by a
    constant 1 (M_neg = s_in * s_c / s_y in double, with s_c and s_y searched among float32 values near the slope
    and the output's scale), which equals the engine's per-sign choice for every input code (checked)."""
    in_info, out_info = graph.model.tensors[node.input], graph.model.tensors[node.output]
    s_in, s_out = f32(in_info.scale), f32(out_info.scale)
    pos, neg = node.positive, node.negative
    _check_double(pos, where)
    _check_double(neg, where)
    if (pos.clamp_min, pos.clamp_max) != (neg.clamp_min, neg.clamp_max):
        raise ValueError(f"{where} clamps its two signs differently; TFLite's LEAKY_RELU clamps the output once")
    want, have = (pos.clamp_min, pos.clamp_max), storage_range(out_info)
    positive = (int(pos.multiplier), int(pos.shift))
    negative = (int(neg.multiplier), int(neg.shift)) if in_info.range[0] < 0 else None
    x = graph.values[node.input]
    alpha = _leaky_relu_alpha(s_in, s_out, node.negative_slope, positive, negative)
    if alpha is not None:
        y = graph.activation(node.output, "/leaky_relu")
        graph.op(_OP.LEAKY_RELU, [x], [y], "LeakyReluOptions", Alpha=alpha)
        return _clamp_ops(graph, y, node.output, have, want, where)
    _check_multipliers(where, "non-negative side's", [requantize_multiplier(s_in, s_out)], pos)
    scaled = graph.activation(node.output, "/identity")
    graph.op(_OP.QUANTIZE, [x], [scaled])
    if negative is None:  # no negative codes: the identity side is all of it
        return _clamp_ops(graph, scaled, node.output, have, want, where)
    codes = torch.arange(in_info.range[0], in_info.range[1] + 1, dtype=torch.int64)
    try:
        engine = torch.where(codes >= 0, requantize(codes, *positive, *want), requantize(codes, *negative, *want))
        sides = [requantize(codes, *pair, *have) for pair in (positive, negative)]
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    combine = next((code for code, pick in ((_OP.MAXIMUM, torch.maximum), (_OP.MINIMUM, torch.minimum))
                    if torch.equal(pick(*sides).clamp(*want), engine)), None)
    if combine is None:
        raise ValueError(f"{where}: neither the larger nor the smaller of the two signs' rescales is the engine's "
                         "choice by sign for every input code, so TFLite has no exact form of it")
    zp = zero_point(out_info)
    if negative == (0, 0):  # slope 0: the negative side is 0
        other = graph.constant(f"{node.name}/zero", np.array([zp], np.int8), _TYPE.INT8, [s_out], [zp])
    else:
        scales = _mul_scales(s_in, s_out, negative)
        if scales is None:
            raise ValueError(f"{where}: TFLite derives neither LEAKY_RELU's float32 multipliers nor a MUL multiplier "
                             f"equal to the engine's negative (multiplier, shift) {negative}")
        s_c, s_y = scales
        one = graph.constant(f"{node.name}/slope", np.array([1], np.int8), _TYPE.INT8, [s_c], [0])
        other = graph.add_tensor(_Tensor(f"{node.output}/negative", nhwc(out_info.shape), _TYPE.INT8, 0, [s_y], [zp]))
        graph.op(_OP.MUL, [x, one], [other], "MulOptions", FusedActivationFunction=_ACT.NONE)
    y = graph.activation(node.output, "/leaky_relu")
    graph.op(combine, [scaled, other], [y])
    return _clamp_ops(graph, y, node.output, have, want, where)


def _hardswish(graph: _Graph, node: IntHardSwish, where: str) -> int:
    """HARD_SWISH, whose int16 arithmetic (reference/hard_swish.h) is the engine's; its multipliers come from float32
    ratios (``hard_swish_multipliers``), which must equal the node's (the engine derives them in double)."""
    in_info, out_info = graph.model.tensors[node.input], graph.model.tensors[node.output]
    derived = hard_swish_multipliers(f32(in_info.scale), f32(out_info.scale))
    fields = ((node.output_multiplier, node.output_exponent), (node.reluish_multiplier, node.reluish_exponent))
    for what, want, got in zip(("output", "reluish"), derived, fields, strict=True):
        if tuple(want) != tuple(got):
            raise ValueError(f"{where}: TFLite's HARD_SWISH derives the {what} int16 (multiplier, exponent) {want} "
                             f"from the float32 scales written to the file, but the node has {got}")
    if derived[0][1] > 0:  # HardSwishPrepare: TF_LITE_ENSURE(output_multiplier_exponent <= 0)
        raise ValueError(f"{where}: TFLite's HARD_SWISH needs an output exponent <= 0, got {derived[0][1]}")
    y = graph.activation(node.output, "/hard_swish")
    graph.op(_OP.HARD_SWISH, [graph.values[node.input]], [y], "HardSwishOptions")
    return _clamp_ops(graph, y, node.output, storage_range(out_info), (node.clamp_min, node.clamp_max), where)


Emitter = Callable[[_Graph, Any, str], int]

EMITTERS: dict[type, Emitter] = {
    IntConv: _conv,
    IntAdd: _add,
    IntAvgPool: _avgpool,
    IntConcat: _concat,
    IntMaxPool: _maxpool,
    IntClamp: _clamp,
    IntReshape: _reshape,
    IntLeakyReLU: _leaky_relu,
    IntHardSwish: _hardswish,
}


# ---------------------------------------------------------------- the model


def _check_graph(model: IntegerModel) -> None:
    """Inputs written before they are read, output shapes that follow from the inputs, each op's own checks, a
    signed input of at most 8 bits, and int8 logits."""
    info = model.tensors[model.input]
    if info.bits > 8 or not info.signed or len(info.shape) != 3:
        raise ValueError(f"the input {model.input!r} must be one signed (C, H, W) image of at most 8 bits, got "
                         f"{info.type_name} {info.shape}")
    known = {model.input}
    for index, node in enumerate(model.nodes):
        where = _where(index, node)
        missing = [name for name in int_node_inputs(node) if name not in known]
        if missing:
            raise ValueError(f"{where} reads {missing}, which no earlier node writes")
        op = OP_OF.get(type(node))
        if op is None or type(node) not in EMITTERS:
            raise ValueError(f"{where}: TFLite has no exact form of {type(node).__name__}; the TFLite exporter "
                             f"writes {sorted(t.__name__ for t in EMITTERS)}")
        expected = op.output_shape(node, [model.tensors[name].shape for name in int_node_inputs(node)], where)
        if model.tensors[node.output].shape != expected:
            raise ValueError(f"{where} outputs {model.tensors[node.output].shape}, but its inputs give {expected}")
        if model.tensors[node.output].bits > 8 and node.output != model.output:
            raise ValueError(f"{where} writes int{model.tensors[node.output].bits}; TFLite activations are int8")
        known.add(node.output)
    logits = model.tensors[model.output]
    if logits.bits > 8:
        raise ValueError(f"the logits {model.output!r} are int{logits.bits}; TFLite's FULLY_CONNECTED outputs int8 "
                         "(its output type must equal its input type), so the model needs int8 logits: "
                         "requantize its last layer to an int8 output")


def build_tflite(model: IntegerModel) -> bytes:
    """The .tflite flatbuffer of ``model`` (module docstring); ``ValueError`` naming the node for anything TFLite
    would not compute exactly as the engine does."""
    _check_graph(model)
    graph = _Graph(model)
    for node in model.nodes:
        for name in int_node_inputs(node):
            graph.readers.setdefault(name, []).append(node)
    graph.values[model.input] = graph.activation(model.input)
    for index, node in enumerate(model.nodes):
        graph.values[node.output] = EMITTERS[type(node)](graph, node, _where(index, node))
    return _serialize(graph, [graph.values[model.input]], [graph.values[model.output]], _description(model))


def save_tflite(model: IntegerModel, path: str | os.PathLike) -> bytes:
    """``build_tflite`` and write it to ``path`` atomically; returns the bytes."""
    blob = build_tflite(model)
    with atomic_path(path) as tmp:
        tmp.write_bytes(blob)
    return blob


def _description(model: IntegerModel) -> str:
    """What a reader needs to feed the file: how the int8 input is made, and the rounding it computes with."""
    return json.dumps({
        "producer": "pipeline.export.tflite_model",
        "input": "int8 NHWC = round_half_even(((x / 255 - mean) / std) / input_scale), clamped, zero point 0",
        "input_scale": f32(model.input_scale), "input_mean": model.input_mean, "input_std": model.input_std,
        "rounding": "double",
    })


# ---------------------------------------------------------------- serialization


def _vector(b: flatbuffers.Builder, start: Callable, items: list, prepend: Callable) -> int:
    start(b, len(items))
    for item in reversed(items):
        prepend(item)
    return b.EndVector()


def _bytes(b: flatbuffers.Builder, data: bytes) -> int:
    """A byte vector aligned to 16 bytes, so int32 (and wider) constants are read in place."""
    b.StartVector(1, len(data), 16)
    b.head -= len(data)
    b.Bytes[b.head:b.head + len(data)] = data
    return b.EndVector()


def _options(b: flatbuffers.Builder, table: str, fields: dict[str, Any]) -> int:
    getattr(tflite, f"{table}Start")(b)
    for key, value in fields.items():
        getattr(tflite, f"{table}Add{key}")(b, value)
    return getattr(tflite, f"{table}End")(b)


def _quantization(b: flatbuffers.Builder, t: _Tensor) -> int:
    scale = b.CreateNumpyVector(np.array(t.scales, np.float32))
    zero = b.CreateNumpyVector(np.array(t.zero_points, np.int64))
    tflite.QuantizationParametersStart(b)
    tflite.QuantizationParametersAddScale(b, scale)
    tflite.QuantizationParametersAddZeroPoint(b, zero)
    tflite.QuantizationParametersAddQuantizedDimension(b, t.quantized_dimension)
    return tflite.QuantizationParametersEnd(b)


def _tensor(b: flatbuffers.Builder, t: _Tensor) -> int:
    name = b.CreateString(t.name)
    shape = b.CreateNumpyVector(np.array(t.shape, np.int32))
    quantization = _quantization(b, t) if t.scales is not None else None
    tflite.TensorStart(b)
    tflite.TensorAddShape(b, shape)
    tflite.TensorAddType(b, t.dtype)
    tflite.TensorAddBuffer(b, t.buffer)
    tflite.TensorAddName(b, name)
    if quantization is not None:
        tflite.TensorAddQuantization(b, quantization)
    return tflite.TensorEnd(b)


def _operator(b: flatbuffers.Builder, op: _Operator, opcode_index: int) -> int:
    inputs = b.CreateNumpyVector(np.array(op.inputs, np.int32))
    outputs = b.CreateNumpyVector(np.array(op.outputs, np.int32))
    options = _options(b, op.options[0], op.options[1]) if op.options else None
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, opcode_index)
    tflite.OperatorAddInputs(b, inputs)
    tflite.OperatorAddOutputs(b, outputs)
    if options is not None:
        tflite.OperatorAddBuiltinOptionsType(b, getattr(tflite.BuiltinOptions, op.options[0]))
        tflite.OperatorAddBuiltinOptions(b, options)
    return tflite.OperatorEnd(b)


def _opcode(b: flatbuffers.Builder, code: int) -> int:
    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))  # 127: "see builtin_code"
    tflite.OperatorCodeAddBuiltinCode(b, code)
    tflite.OperatorCodeAddVersion(b, 1)
    return tflite.OperatorCodeEnd(b)


def _serialize(graph: _Graph, inputs: list[int], outputs: list[int], description: str) -> bytes:
    b = flatbuffers.Builder(1 << 16)
    codes = sorted({op.code for op in graph.operators})
    buffers = []
    for data in graph.buffers:
        vector = _bytes(b, data) if data else None
        tflite.BufferStart(b)
        if vector is not None:
            tflite.BufferAddData(b, vector)
        buffers.append(tflite.BufferEnd(b))
    tensors = [_tensor(b, t) for t in graph.tensors]
    operators = [_operator(b, op, codes.index(op.code)) for op in graph.operators]
    tensor_vector = _vector(b, tflite.SubGraphStartTensorsVector, tensors, b.PrependUOffsetTRelative)
    operator_vector = _vector(b, tflite.SubGraphStartOperatorsVector, operators, b.PrependUOffsetTRelative)
    input_vector = b.CreateNumpyVector(np.array(inputs, np.int32))
    output_vector = b.CreateNumpyVector(np.array(outputs, np.int32))
    name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensor_vector)
    tflite.SubGraphAddInputs(b, input_vector)
    tflite.SubGraphAddOutputs(b, output_vector)
    tflite.SubGraphAddOperators(b, operator_vector)
    tflite.SubGraphAddName(b, name)
    subgraph = tflite.SubGraphEnd(b)
    opcodes = [_opcode(b, code) for code in codes]
    opcode_vector = _vector(b, tflite.ModelStartOperatorCodesVector, opcodes, b.PrependUOffsetTRelative)
    subgraph_vector = _vector(b, tflite.ModelStartSubgraphsVector, [subgraph], b.PrependUOffsetTRelative)
    buffer_vector = _vector(b, tflite.ModelStartBuffersVector, buffers, b.PrependUOffsetTRelative)
    text = b.CreateString(description)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, opcode_vector)
    tflite.ModelAddSubgraphs(b, subgraph_vector)
    tflite.ModelAddDescription(b, text)
    tflite.ModelAddBuffers(b, buffer_vector)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


__all__ = [
    "EMITTERS", "add_multipliers", "build_tflite", "conv_multipliers", "fully_connected_multiplier", "fused_clamp",
    "hard_swish_multipliers", "leaky_relu_multipliers", "mean_multiplier", "mul_multiplier", "requantize_multiplier",
    "save_tflite", "storage_range", "tflite_round", "zero_point",
]
