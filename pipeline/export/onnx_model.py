"""ONNX graphs of an ``IntegerModel``, built node by node with ``onnx.helper`` (no tracing).

Both graphs take the float32 normalized images "input" (N, C, H, W) and give
the int32 "logits" (N, classes) of ``run_integer``, at the same scale. Every
activation is one byte (4..8-bit activations in the same types): a signed code q is the
int8 q at zero point 0; an unsigned one (``TensorInfo.signed`` False, q in [0, 2^bits - 1])
is the uint8 q at zero point 0 in the integer style and the int8 q - 128 at zero point -128
in the QLinear style (below: onnxruntime's uint8 x int8 QLinearConv saturates on some x86
CPUs), the same real values either way. A flat tensor (K,) is (N, K, 1, 1), so a linear
layer is a 1x1 convolution (QLinearMatMul has no bias input) and a flatten moves no data
(``pipeline.export.plan``). docs/onnx_runtimes.md says on which runtimes and CPUs each
style is exact (the kernels named below are onnxruntime 1.32's). Two styles:

- ``"integer"``: bit-exact with ``run_integer``, with integer ops only after
  the input. The input is quantized in float64 like ``quantize_input`` (Div,
  Round half to even, Clip to the input's range, Cast to int8). Every ``Requantize`` is
  ``fixed_point.requantize`` in int64 with the model's rounding rule: double (TFLite's)
  as Mul by multiplier * 2^max(shift, 0), then each rounding on the magnitude (Abs; Div of a
  non-negative integer) with the sign put back; single as Mul by the multiplier, Add
  2^(30 - shift), floor division by 2^(31 - shift) as (p - Mod(p, d)) / d (Div truncates
  toward zero). Then Clip to the saturation, Cast to the output's type. On top of it, node by node:

  - conv2d / linear: ConvInteger (``group`` for grouped and depthwise) + the
    int32 bias, then the requantize (per tensor or per channel), or the raw
    int32 logits with ``ops.conv.raw_accumulator_clamp`` (Max 0 for a fused ReLU);
  - add: each input Cast to int64, Mul by 2^left_shift, requantized to the
    common grid; the two summed; the sum requantized to the output;
  - average pool: the exact int32 window sums as a ConvInteger with an all-ones
    (C, 1, kh, kw) kernel and ``group`` C (zero padding adds 0), requantized;
  - concat: each input requantized to the output scale (as it is where its
    ``Requantize`` is None), Concat on channels;
  - max pool (MaxPool on int8/uint8: every window holds a real value, see
    ``check_deployable``), standalone ReLU / ReLU6 (Relu / Clip on the codes) and
    flatten (Reshape) act on the integers as they are.
  - leaky ReLU and hard swish, elementwise on one byte: Gather from a table of the
    engine's output for every input code (``registry.code_table``), the same in both styles.

  ConvInteger reads uint8 activations with int8 weights: onnxruntime's int8 x uint8 GEMM,
  which sums the products in int32 on every x86 CPU (VPMADDUBSW's int16 pairs are only in
  its uint8 x int8 kernels).

- ``"qlinear"``: the standard quantized ONNX form other runtimes accelerate.
  QuantizeLinear on the input; QLinearConv for every hidden conv2d and linear
  layer (``group`` included; int8 input, weights and output: onnxruntime's s8s8 kernels, which sum
  the products in int32 on every x86 CPU; its u8s8 kernels sum pairs of them in saturating
  int16 on AVX2 and AVX-512 without VNNI, so a uint8 activation up to 255 would be wrong there),
  its fused ReLU / ReLU6, or an activation narrower than 8 bits, as Relu / Clip on the output codes;
  the last layer ConvInteger + int32 bias (its input zero point -128 after an unsigned tensor), then the
  engine's integer rescale when it has one (per-channel weights) or the raw clamp, exactly as in
  the integer style. Add, average pool and concat are in QDQ form:
  DequantizeLinear -> float Add / AveragePool / Concat -> QuantizeLinear, then
  the ``Requantize`` saturation as Relu / Clip on the result where it is
  not the full range of its type (a fused ReLU after an add). MaxPool, Relu, Clip and
  Reshape act on the codes; leaky ReLU and hard swish are the exact table lookups of the integer
  style. It is NOT bit-exact with the engine:

  1. QuantizeLinear divides in float32 by a float32 scale; the engine divides
     in float64 by the float64 input scale (both round half to even);
  2. QLinearConv rescales by the float32 product x_scale * w_scale / y_scale,
     the engine by the 31-bit fixed-point multiplier;
  3. onnxruntime rounds half to even, the engine half up (``fixed_point``);
  4. add: the QDQ form sums the dequantized inputs in float32 and rounds once;
     the engine rounds each input to the common grid S_c = 2 max(S_a, S_b) / 2^20
     first, then the sum to the output scale;
  5. average pool: float32 mean of the dequantized window, rounded; the engine
     rescales the exact int32 window sum by one fixed-point multiplier;
  6. concat: an input at another scale is dequantized and quantized in
     float32; the engine requantizes it with a fixed-point multiplier.

  onnxruntime fuses the QDQ groups into its QLinearAdd, QLinearAveragePool and
  QLinearConcat kernels, which rescale in float32 in their own order, so 4-6
  hold in spirit, not to the last bit. Each difference moves an activation by
  one step, rarely, and the step can propagate to later layers; on random
  images the predictions agree (``artifacts.export_agreement`` measures it on
  the test set) while whole logit vectors differ more often the deeper the model.

Accumulators are int32 in both styles; ``check_deployable`` checks that none can overflow.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from pipeline.export.plan import as_array, channel_values, check_deployable
from pipeline.graph.nodes import numel
from pipeline.io import atomic_path
from pipeline.progress import progress_items
from pipeline.quant.ir import IntegerModel
from pipeline.quant.ops.add import IntAdd
from pipeline.quant.ops.avgpool import IntAvgPool
from pipeline.quant.ops.base import Requantize, TensorInfo
from pipeline.quant.ops.clamp import IntClamp
from pipeline.quant.ops.concat import IntConcat
from pipeline.quant.ops.conv import IntConv, multiplier_scale, raw_accumulator_clamp
from pipeline.quant.ops.hardswish import IntHardSwish
from pipeline.quant.ops.leaky_relu import IntLeakyReLU
from pipeline.quant.ops.maxpool import IntMaxPool
from pipeline.quant.ops.registry import code_table
from pipeline.quant.ops.reshape import IntReshape

STYLES = ("qlinear", "integer")
OPSET = 21
IR_VERSION = 10  # the IR version of opset 21; onnxruntime >= 1.20 reads it
INPUT_NAME, OUTPUT_NAME = "input", "logits"


@dataclass(frozen=True)
class _Storage:
    """How a one-byte activation's code q is an ONNX value: q + ``zero_point`` in ``dtype``."""

    dtype: type  # np.int8 or np.uint8
    zero_point: int

    @property
    def onnx_type(self) -> int:
        return helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))

    @property
    def code_range(self) -> tuple[int, int]:
        """The codes the type holds: its full range less the zero point (what QuantizeLinear saturates to)."""
        info = np.iinfo(self.dtype)
        return int(info.min) - self.zero_point, int(info.max) - self.zero_point


def _storage(info: TensorInfo, style: str) -> _Storage:
    """int8 for a signed code; for an unsigned one uint8 in the integer style, int8 at zero point -128 in the
    QLinear style (module docstring: onnxruntime's uint8 x int8 QLinearConv saturates on some x86 CPUs)."""
    if info.signed:
        return _Storage(np.int8, 0)
    return _Storage(np.uint8, 0) if style == "integer" else _Storage(np.int8, -128)


def _onnx_type(info: TensorInfo, style: str) -> int:
    return TensorProto.INT32 if info.bits == 32 else _storage(info, style).onnx_type


class _Graph:
    """Nodes and initializers being collected, with unique value names; shared constants made once."""

    def __init__(self, style: str) -> None:
        self.style = style  # how activations are stored (``_storage``)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._shared: dict[tuple[str, str, bytes, tuple[int, ...]], str] = {}
        self.relu_inputs: dict[str, str] = {}  # output -> input of each Relu on int8 (``_clamp_bytes``)
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, hint: str, value: np.ndarray) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def shared(self, hint: str, value: np.ndarray) -> str:
        """A small constant (a zero point, a bound), one initializer for every use of the same value."""
        value = np.asarray(value)
        key = (hint, value.dtype.str, value.tobytes(), value.shape)
        if key not in self._shared:
            self._shared[key] = self.constant(hint, value)
        return self._shared[key]

    def node(self, op_type: str, inputs: list[str], hint: str, output: str | None = None, **attributes: Any) -> str:
        output = output or self._name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self._name(op_type), **attributes))
        return output

    def prune(self, outputs: list[str]) -> None:
        """Drop the nodes and initializers nothing reads on the way to ``outputs``."""
        needed = set(outputs)
        kept = []
        for node in reversed(self.nodes):
            if any(output in needed for output in node.output):
                kept.append(node)
                needed.update(node.input)
        self.nodes = kept[::-1]
        self.initializers = [init for init in self.initializers if init.name in needed]


def build_onnx_model(model: IntegerModel, style: str = "qlinear") -> onnx.ModelProto:
    """The ONNX graph of ``model`` in ``style`` ("qlinear" or "integer", see the module docstring), checked."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    check_deployable(model)
    input_shape = model.tensors[model.input].shape
    if len(input_shape) != 3:
        raise ValueError(f"the input {model.input!r} must be one (C, H, W) image, got shape {input_shape}")
    graph = _Graph(style)
    values = {model.input: _quantize_input(graph, model, style)}
    emitters = INTEGER_EMITTERS if style == "integer" else QLINEAR_EMITTERS
    for node in model.nodes:
        emit = emitters.get(type(node))
        if emit is None:
            raise TypeError(f"unknown integer node {node!r}; the {style} exporter has {sorted(e.__name__ for e in emitters)}")
        values[node.output] = emit(graph, model, node, values)
    logits = values[model.output]
    if model.tensors[model.output].bits != 32:  # int8 logits: the output stays int32, as the C's, widened
        logits = graph.node("Cast", [logits], "logits_int32", to=TensorProto.INT32)
    graph.node("Flatten", [logits], "logits", output=OUTPUT_NAME, axis=1)
    graph.prune([OUTPUT_NAME])
    classes = numel(model.tensors[model.output].shape)
    onnx_graph = helper.make_graph(
        graph.nodes,
        f"cifar10_ptq_{style}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.INT32, ["N", classes])],
        graph.initializers,
    )
    onnx_model = helper.make_model(
        onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pipeline.export.onnx_model"
    )
    onnx_model.ir_version = IR_VERSION
    onnx_model.doc_string = __doc__ or ""
    helper.set_model_props(onnx_model, _metadata(model, style))
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def save_onnx_model(model: IntegerModel, path: str | os.PathLike, style: str = "qlinear") -> onnx.ModelProto:
    """``build_onnx_model`` and write it to ``path`` atomically."""
    onnx_model = build_onnx_model(model, style)
    with atomic_path(path) as tmp:
        onnx.save_model(onnx_model, tmp)
    return onnx_model


def _metadata(model: IntegerModel, style: str) -> dict[str, str]:
    return {
        "style": style,
        "input_scale": repr(model.input_scale),
        "input_mean": repr(model.input_mean),
        "input_std": repr(model.input_std),
        "logits_scale": repr(as_array(model.output_scale, np.float64).tolist()),
    }


# ---------------------------------------------------------------- shared pieces


def _per_channel(values: Any, dtype: type) -> np.ndarray:
    """A per-tensor value as a scalar; per-channel values as (C, 1, 1), to line up with dim 1 of (N, C, H, W)."""
    array = as_array(values, dtype).reshape(-1)
    return array.reshape(()) if array.size == 1 else array.reshape(-1, 1, 1)


def _scalar_or_vector(values: Any, dtype: type) -> np.ndarray:
    """A per-tensor value as a scalar, per-channel values as (C,): the QLinearConv weight-parameter shapes."""
    array = as_array(values, dtype).reshape(-1)
    return array.reshape(()) if array.size == 1 else array


def _scale(model: IntegerModel, name: str) -> float:
    return float(model.tensors[name].scale)


def _zero(graph: _Graph, info: TensorInfo) -> str:
    """The tensor's zero point in its ONNX type (QLinear and QDQ ops take the data's type)."""
    storage = _storage(info, graph.style)
    return graph.shared("zero", np.array(storage.zero_point, storage.dtype))


def _quantize_input(graph: _Graph, model: IntegerModel, style: str) -> str:
    info = model.tensors[model.input]
    if style == "qlinear":
        scale = graph.constant("input_scale", np.array(model.input_scale, dtype=np.float32))
        x = graph.node("QuantizeLinear", [INPUT_NAME, scale, _zero(graph, info)], "x_q")
        return _clamp_bytes(graph, x, *info.range, "x_q", info)
    # quantize_input: float64 x / float64 scale, round half to even (ONNX Round), saturate.
    x = graph.node("Cast", [INPUT_NAME], "x64", to=TensorProto.DOUBLE)
    x = graph.node("Div", [x, graph.constant("input_scale", np.array(model.input_scale, dtype=np.float64))], "x_div")
    x = graph.node("Round", [x], "x_round")
    qmin, qmax = info.range
    bounds = [graph.constant("qmin", np.array(float(qmin))), graph.constant("qmax", np.array(float(qmax)))]
    x = graph.node("Clip", [x, *bounds], "x_clip")
    return graph.node("Cast", [x], "x_q", to=TensorProto.INT8)


def _window_attributes(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> dict[str, Any]:
    return {"kernel_shape": list(kernel), "strides": list(stride), "pads": [*padding, *padding]}  # (t, l, b, r)


def _conv_attributes(node: IntConv) -> dict[str, Any]:
    if node.kind == "linear":
        return {}
    return {"strides": list(node.stride), "pads": [*node.padding, *node.padding], "group": node.groups}


def _conv_weight(node: IntConv) -> np.ndarray:
    weight = as_array(node.weight, np.int8)
    return weight if weight.ndim == 4 else weight.reshape(weight.shape + (1, 1))


def _clamp_bytes(graph: _Graph, x: str, low: int, high: int, hint: str, info: TensorInfo) -> str:
    """The saturation [low, high] of ``info``'s codes on their one-byte values: nothing for all the codes the type
    holds, Relu for [0, 127] on int8 at zero point 0, else Clip at low and high plus the zero point (a narrower
    activation width, a ReLU6, any clamp of an unsigned tensor).

    A clamp of a Relu's output is one Clip of the Relu's input (the Relu is pruned where nothing else
    reads it): onnxruntime's Relu -> Clip fusion fails on an int8 Clip ("Unexpected data type for Clip
    'min' input of 3", onnxruntime 1.32).
    """
    storage = _storage(info, graph.style)
    type_min, type_max = storage.code_range
    if x in graph.relu_inputs:
        if low <= 0 and high >= type_max:
            return x
        x, low = graph.relu_inputs[x], max(low, 0)
    if (low, high) == (type_min, type_max):
        return x
    if storage == _Storage(np.int8, 0) and (low, high) == (0, type_max):  # ONNX Relu has no uint8 form
        y = graph.node("Relu", [x], f"{hint}_relu")
        graph.relu_inputs[y] = x
        return y
    bounds = [graph.shared("byte_bound", np.array(code + storage.zero_point, storage.dtype)) for code in (low, high)]
    return graph.node("Clip", [x, *bounds], f"{hint}_clip")


def _requantize(graph: _Graph, x: str, rq: Requantize, hint: str, to: int | None, is_int64: bool = False) -> str:
    """``fixed_point.requantize`` of ``x`` by ``rq`` in int64 ONNX ops, bit-exact.

    ``x`` holds int32 values (int64 when ``is_int64``); the result is Cast ``to`` (a TensorProto
    type), or left int64 when ``to`` is None.
    """

    def constant(name: str, values: Any) -> str:
        return graph.constant(f"{hint}_{name}", _per_channel(values, np.int64))

    shift = channel_values(rq.shift).astype(np.int64)
    product = x if is_int64 else graph.node("Cast", [x], f"{hint}_acc64", to=TensorProto.INT64)
    if rq.rounding == "double":
        y = _double_rounding(graph, product, rq, hint, constant)
    else:
        total_shift = 31 - shift
        product = graph.node("Mul", [product, constant("multiplier", rq.multiplier)], f"{hint}_product")
        # + 2^(total_shift - 1), one half in units of the divisor: round half up
        rounding = constant("rounding", np.left_shift(np.int64(1), total_shift - 1))
        product = graph.node("Add", [product, rounding], f"{hint}_rounded")
        divisor = constant("divisor", np.left_shift(np.int64(1), total_shift))  # 2^(31 - shift) <= 2^62: fits int64
        # Mod with fmod=0 takes the divisor's sign, so p - Mod(p, d) is the multiple of d at or below p:
        # the exact division is the floor, as the engine's arithmetic shift.
        remainder = graph.node("Mod", [product, divisor], f"{hint}_remainder", fmod=0)
        floored = graph.node("Sub", [product, remainder], f"{hint}_floored")
        y = graph.node("Div", [floored, divisor], f"{hint}_scaled")
    bounds = [graph.shared("int64_bound", np.array(rq.clamp_min, np.int64)),
              graph.shared("int64_bound", np.array(rq.clamp_max, np.int64))]
    y = graph.node("Clip", [y, *bounds], f"{hint}_clip")
    return y if to is None else graph.node("Cast", [y], f"{hint}_out", to=to)


def _double_rounding(graph: _Graph, x: str, rq: Requantize, hint: str, constant: Callable[[str, Any], str]) -> str:
    """``fixed_point``'s double rounding of int64 ``x`` (before saturation), on magnitudes: every Div divides a
    non-negative integer, where truncation and floor agree, and the sign of x is put back after each rounding."""
    shift = channel_values(rq.shift).astype(np.int64)
    # x * 2^max(shift, 0) * multiplier as one int64 factor (the engine checks that x * 2^shift fits int32)
    factor = channel_values(rq.multiplier).astype(np.int64) << np.maximum(shift, 0)
    product = graph.node("Mul", [x, constant("factor", factor)], f"{hint}_product")
    negative = graph.node("Cast", [graph.node("Less", [product, graph.shared("int64_bound", np.array(0, np.int64))],
                                              f"{hint}_is_negative")], f"{hint}_negative", to=TensorProto.INT64)
    # SaturatingRoundingDoublingHighMul: |high| = (|p| + 2^30 - [p < 0]) / 2^31 (ties go up, toward +infinity)
    nudged = graph.node("Sub", [graph.node("Add", [graph.node("Abs", [product], f"{hint}_magnitude"),
                                                   constant("nudge", np.int64(1 << 30))], f"{hint}_nudged_up"),
                                negative], f"{hint}_nudged")
    high = graph.node("Div", [nudged, constant("high_divisor", np.int64(1 << 31))], f"{hint}_high")
    # RoundingDivideByPOT: (|high| + 2^(e-1)) / 2^e, half away from zero
    exponent = np.maximum(-shift, 0)
    half = graph.node("Add", [high, constant("half", np.left_shift(np.int64(1), exponent) >> 1)], f"{hint}_halved")
    magnitude = graph.node("Div", [half, constant("divisor", np.left_shift(np.int64(1), exponent))],
                           f"{hint}_rounded")
    # the sign: 1 - 2 [p < 0]
    sign = graph.node("Sub", [constant("one", np.int64(1)),
                              graph.node("Add", [negative, negative], f"{hint}_twice_negative")], f"{hint}_sign")
    return graph.node("Mul", [magnitude, sign], f"{hint}_scaled")


def _integer_layer(graph: _Graph, model: IntegerModel, node: IntConv, x: str) -> str:
    """ConvInteger + int32 bias, then the engine's rescale: to int8/uint8, to int32 logits, or raw accumulators."""
    name = node.name
    inputs = [x, graph.constant(f"{name}_weight", _conv_weight(node))]
    if _storage(model.tensors[node.input], graph.style).zero_point != 0:
        inputs.append(_zero(graph, model.tensors[node.input]))
    acc = graph.node("ConvInteger", inputs, name, **_conv_attributes(node))
    bias = graph.constant(f"{name}_bias", as_array(node.bias, np.int32).reshape(-1, 1, 1))
    acc = graph.node("Add", [acc, bias], f"{name}_acc")
    if node.requantize is not None:
        return _requantize(graph, acc, node.requantize, name, _onnx_type(model.tensors[node.output], graph.style))
    low, _ = raw_accumulator_clamp(node)  # the upper bound is int32's own
    if low == 0:
        return graph.node("Max", [acc, graph.shared("zero32", np.array(0, np.int32))], f"{name}_relu")
    return acc


# ---------------------------------------------------------------- emitters both styles share
# Each emitter takes (graph, model, node, values: tensor name -> ONNX value name) and returns its output's value.


def _maxpool(graph: _Graph, model: IntegerModel, node: IntMaxPool, values: dict[str, str]) -> str:
    return graph.node("MaxPool", [values[node.input]], node.name,
                      **_window_attributes(node.kernel, node.stride, node.padding))


def _clamp(graph: _Graph, model: IntegerModel, node: IntClamp, values: dict[str, str]) -> str:
    return _clamp_bytes(graph, values[node.input], node.clamp_min, node.clamp_max, node.name,
                        model.tensors[node.output])


def _reshape(graph: _Graph, model: IntegerModel, node: IntReshape, values: dict[str, str]) -> str:
    # (N, K, 1, 1): linear layers are 1x1 convolutions (module docstring)
    return graph.node("Reshape", [values[node.input], graph.shared("flat_shape", np.array([0, -1, 1, 1], np.int64))],
                      node.name)


def _table_lookup(graph: _Graph, model: IntegerModel, node: IntLeakyReLU | IntHardSwish, values: dict[str, str]) -> str:
    """An elementwise op of one byte as Gather from its table of every input code (``registry.code_table``, the
    engine's own integers): exact in both styles. The byte's value less the type's least value is the index."""
    in_storage = _storage(model.tensors[node.input], graph.style)
    out_storage = _storage(model.tensors[node.output], graph.style)
    qmin, qmax = model.tensors[node.input].range
    low, high = in_storage.code_range  # every code the byte holds; its least value is low + zero point
    table = np.zeros(high - low + 1, out_storage.dtype)
    table[qmin - low : qmax - low + 1] = code_table(node, model).numpy() + out_storage.zero_point
    index = graph.node("Cast", [values[node.input]], f"{node.name}_index", to=TensorProto.INT32)
    offset = graph.shared("type_min", np.array(-(low + in_storage.zero_point), np.int32))
    index = graph.node("Add", [index, offset], f"{node.name}_offset")
    return graph.node("Gather", [graph.constant(f"{node.name}_table", table), index], node.name, axis=0)


# ---------------------------------------------------------------- the integer style


def _integer_conv(graph: _Graph, model: IntegerModel, node: IntConv, values: dict[str, str]) -> str:
    return _integer_layer(graph, model, node, values[node.input])


def _integer_add(graph: _Graph, model: IntegerModel, node: IntAdd, values: dict[str, str]) -> str:
    lifted = graph.shared("left_shift", np.array(1 << node.left_shift, np.int64))
    summands = []
    for index, (name, rq) in enumerate(zip(node.inputs, node.input_requantize, strict=True)):
        hint = f"{node.name}_in{index}"
        x = graph.node("Cast", [values[name]], f"{hint}_64", to=TensorProto.INT64)
        x = graph.node("Mul", [x, lifted], f"{hint}_lifted")
        summands.append(_requantize(graph, x, rq, hint, None, is_int64=True))
    total = graph.node("Add", summands, f"{node.name}_sum")
    output_type = _onnx_type(model.tensors[node.output], graph.style)
    return _requantize(graph, total, node.output_requantize, node.name, output_type, is_int64=True)


def _integer_avgpool(graph: _Graph, model: IntegerModel, node: IntAvgPool, values: dict[str, str]) -> str:
    channels = model.tensors[node.input].shape[0]
    ones = graph.constant(f"{node.name}_ones", np.ones((channels, 1, *node.kernel), np.int8))
    attributes = _window_attributes(node.kernel, node.stride, node.padding)
    sums = graph.node("ConvInteger", [values[node.input], ones], f"{node.name}_sums", group=channels, **attributes)
    output_type = _onnx_type(model.tensors[node.output], graph.style)
    if node.mean_zero_point is None:
        return _requantize(graph, sums, node.requantize, node.name, output_type)
    return _requantize(graph, _window_means(graph, node, sums), node.requantize, node.name, output_type,
                       is_int64=True)


def _window_means(graph: _Graph, node: IntAvgPool, sums: str) -> str:
    """``ops.avgpool.window_means`` of int32 ``sums`` in int64 ops: every Div divides a non-negative value."""
    count, zero_point = node.kernel[0] * node.kernel[1], node.mean_zero_point

    def constant(name: str, value: int) -> str:
        return graph.constant(f"{node.name}_{name}", np.array(value, np.int64))

    sums64 = graph.node("Cast", [sums], f"{node.name}_sums64", to=TensorProto.INT64)
    centered = graph.node("Sub", [sums64, constant("zero_sum", zero_point * count)], f"{node.name}_centered")
    half_up = graph.node("Add", [graph.node("Abs", [centered], f"{node.name}_magnitude"),
                                 constant("half_count", count // 2)], f"{node.name}_half_up")
    magnitude = graph.node("Div", [half_up, constant("count", count)], f"{node.name}_mean_magnitude")
    signed = graph.node("Mul", [magnitude, graph.node("Sign", [centered], f"{node.name}_sign")], f"{node.name}_mean0")
    return graph.node("Add", [signed, constant("zero_point", zero_point)], f"{node.name}_mean")


def _integer_concat(graph: _Graph, model: IntegerModel, node: IntConcat, values: dict[str, str]) -> str:
    output_type = _onnx_type(model.tensors[node.output], graph.style)
    parts = [
        values[name] if rq is None
        else _requantize(graph, values[name], rq, f"{node.name}_in{index}", output_type)
        for index, (name, rq) in enumerate(zip(node.inputs, node.input_requantize, strict=True))
    ]
    return graph.node("Concat", parts, node.name, axis=1)


Emitter = Callable[[_Graph, IntegerModel, Any, dict[str, str]], str]

INTEGER_EMITTERS: dict[type, Emitter] = {
    IntConv: _integer_conv,
    IntAdd: _integer_add,
    IntAvgPool: _integer_avgpool,
    IntConcat: _integer_concat,
    IntMaxPool: _maxpool,
    IntClamp: _clamp,
    IntReshape: _reshape,
    IntLeakyReLU: _table_lookup,
    IntHardSwish: _table_lookup,
}


# ---------------------------------------------------------------- the qlinear style


def _check_scales_match_multipliers(model: IntegerModel, node: IntConv) -> None:
    """QLinearConv rescales by S_in * S_w / S_out; refuse a model whose fixed-point M says otherwise."""
    rq = node.requantize
    assert rq is not None  # a hidden layer (check_deployable)
    # S_in * S_w as the builder took it (a per-tensor linear layer's in float32, as TFLite's FULLY_CONNECTED)
    product = multiplier_scale(node.kind, model.input_scale_of(node) * node.weight_scale.to(torch.float64))
    real = as_array(product, np.float64).reshape(-1) / _scale(model, node.output)
    shift = channel_values(rq.shift)
    fixed = channel_values(rq.multiplier) * np.exp2(shift.astype(np.float64) - 31)
    # quantize_multiplier's error is at most 2^-31 relative, and M < 2^-32 is stored as 0
    if not np.all(np.abs(fixed - real) <= 2.0**-30 * real + 2.0**-32):
        raise ValueError(
            f"layer {node.name!r}: multiplier * 2^(shift - 31) = {fixed.tolist()} does not match "
            f"S_in * S_w / S_out = {np.broadcast_to(real, fixed.shape).tolist()}; QLinear ops rescale by the scales, "
            "so this model can only be exported with style='integer'"
        )


def _qlinear_layer(graph: _Graph, model: IntegerModel, node: IntConv, x: str) -> str:
    """A hidden layer as QLinearConv (int8/uint8 out, float32 rescale, half to even), then its clamp on the codes."""
    _check_scales_match_multipliers(model, node)
    name = node.name
    weight_scale = _scalar_or_vector(node.weight_scale, np.float32)
    inputs = [
        x,
        graph.constant(f"{name}_x_scale", np.array(_scale(model, node.input), dtype=np.float32)),
        _zero(graph, model.tensors[node.input]),
        graph.constant(f"{name}_weight", _conv_weight(node)),
        graph.constant(f"{name}_w_scale", weight_scale),
        graph.constant(f"{name}_w_zero", np.zeros(weight_scale.shape, np.int8)),
        graph.constant(f"{name}_y_scale", np.array(_scale(model, node.output), dtype=np.float32)),
        _zero(graph, model.tensors[node.output]),
        graph.constant(f"{name}_bias", as_array(node.bias, np.int32)),
    ]
    y = graph.node("QLinearConv", inputs, name, **_conv_attributes(node))
    # Relu / Clip on the codes (shifted by the zero point) is ReLU / ReLU6 on the real values, and with
    # QLinearConv's saturation it is the engine's clamp.
    return _clamp_bytes(graph, y, node.requantize.clamp_min, node.requantize.clamp_max, name, model.tensors[node.output])


def _dequantize(graph: _Graph, model: IntegerModel, name: str, x: str, hint: str) -> str:
    scale = graph.constant(f"{hint}_scale", np.array(_scale(model, name), dtype=np.float32))
    return graph.node("DequantizeLinear", [x, scale, _zero(graph, model.tensors[name])], f"{hint}_dq")


def _quantize(graph: _Graph, model: IntegerModel, name: str, x: str, hint: str) -> str:
    scale = graph.constant(f"{hint}_scale", np.array(_scale(model, name), dtype=np.float32))
    return graph.node("QuantizeLinear", [x, scale, _zero(graph, model.tensors[name])], f"{hint}_q")


def _qlinear_conv(graph: _Graph, model: IntegerModel, node: IntConv, values: dict[str, str]) -> str:
    if model.tensors[node.output].bits == 32:  # the logits layer: exact, as in the integer style
        return _integer_layer(graph, model, node, values[node.input])
    return _qlinear_layer(graph, model, node, values[node.input])


def _qlinear_add(graph: _Graph, model: IntegerModel, node: IntAdd, values: dict[str, str]) -> str:
    real = [_dequantize(graph, model, name, values[name], f"{node.name}_in{index}")
            for index, name in enumerate(node.inputs)]
    y = _quantize(graph, model, node.output, graph.node("Add", real, node.name), f"{node.name}_out")
    rq = node.output_requantize
    return _clamp_bytes(graph, y, rq.clamp_min, rq.clamp_max, node.name, model.tensors[node.output])


def _qlinear_avgpool(graph: _Graph, model: IntegerModel, node: IntAvgPool, values: dict[str, str]) -> str:
    real = _dequantize(graph, model, node.input, values[node.input], f"{node.name}_in")
    attributes = _window_attributes(node.kernel, node.stride, node.padding)
    real = graph.node("AveragePool", [real], node.name, count_include_pad=1, **attributes)
    y = _quantize(graph, model, node.output, real, f"{node.name}_out")
    return _clamp_bytes(graph, y, node.requantize.clamp_min, node.requantize.clamp_max, node.name,
                        model.tensors[node.output])


def _qlinear_concat(graph: _Graph, model: IntegerModel, node: IntConcat, values: dict[str, str]) -> str:
    """DequantizeLinear each input -> Concat -> QuantizeLinear; per input when their saturations differ."""
    out = model.tensors[node.output]
    # An input copied as it is has the output's range (check_deployable).
    clamps = [out.range if rq is None else (rq.clamp_min, rq.clamp_max) for rq in node.input_requantize]
    if len(set(clamps)) == 1:
        real = [_dequantize(graph, model, name, values[name], f"{node.name}_in{index}")
                for index, name in enumerate(node.inputs)]
        y = _quantize(graph, model, node.output, graph.node("Concat", real, node.name, axis=1), f"{node.name}_out")
        return _clamp_bytes(graph, y, *clamps[0], node.name, out)
    # Each input saturates its own way (not what build_integer_model makes): quantize each to the
    # output scale (as it is where the scales are equal), clamp it, and concatenate the one-byte parts.
    parts = []
    for index, (name, clamp) in enumerate(zip(node.inputs, clamps, strict=True)):
        hint = f"{node.name}_in{index}"
        x = values[name]
        # the bytes are the output's where scale and storage (type, zero point) are
        same_bytes = _storage(model.tensors[name], graph.style) == _storage(out, graph.style)
        if _scale(model, name) != _scale(model, node.output) or not same_bytes:
            x = _quantize(graph, model, node.output, _dequantize(graph, model, name, x, hint), f"{hint}_out")
        parts.append(_clamp_bytes(graph, x, *clamp, hint, out))
    return graph.node("Concat", parts, node.name, axis=1)


QLINEAR_EMITTERS: dict[type, Emitter] = {
    IntConv: _qlinear_conv,
    IntAdd: _qlinear_add,
    IntAvgPool: _qlinear_avgpool,
    IntConcat: _qlinear_concat,
    IntMaxPool: _maxpool,
    IntClamp: _clamp,
    IntReshape: _reshape,
    IntLeakyReLU: _table_lookup,
    IntHardSwish: _table_lookup,
}


# ---------------------------------------------------------------- running


def onnx_session(onnx_path: str | os.PathLike, threads: int = 0) -> onnxruntime.InferenceSession:
    """An onnxruntime CPU session for ``onnx_path``; ``threads`` 0 lets onnxruntime choose."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(os.fspath(onnx_path), options, providers=["CPUExecutionProvider"])


def onnx_predictions(
    onnx_path: str | os.PathLike,
    x_normalized: Tensor | np.ndarray,
    batch_size: int = 1000,
    progress: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """(predicted class int64 (N,), int32 logits (N, classes)) of the ONNX model at ``onnx_path``.

    ``x_normalized``: float images (N, C, H, W), normalized as in training; run ``batch_size`` at a time.
    ``progress=None`` shows a bar only when stderr is a terminal.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = x_normalized.detach().cpu().numpy() if isinstance(x_normalized, Tensor) else np.asarray(x_normalized)
    images = images.astype(np.float32, copy=False)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"x_normalized must be a non-empty (N, C, H, W) batch, got shape {images.shape}")
    session = onnx_session(onnx_path)
    batches = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[start : start + batch_size]})[0]
        for start in progress_items(range(0, len(images), batch_size), f"ONNX {Path(onnx_path).name}", progress,
                                    every_item=False)
    ]
    logits = torch.from_numpy(np.concatenate(batches))
    return logits.argmax(dim=1), logits


__all__ = [
    "INPUT_NAME", "IR_VERSION", "OPSET", "OUTPUT_NAME", "STYLES", "build_onnx_model", "onnx_predictions",
    "onnx_session", "save_onnx_model",
]
