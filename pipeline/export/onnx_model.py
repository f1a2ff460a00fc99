"""ONNX graphs of an ``IntegerModel``, built node by node with ``onnx.helper`` (no tracing).

Both graphs take the float32 normalized images "input" (N, C, H, W) and give
the int32 "logits" (N, classes) of ``run_integer``, at the same scale. Two styles:

- ``"qlinear"``: the standard quantized ONNX form other runtimes accelerate.
  QuantizeLinear on the input; QLinearConv for every hidden conv2d and linear
  layer (a linear layer is a 1x1 QLinearConv on a (N, K, 1, 1) map, because
  QLinearMatMul has no bias input), followed by Relu on the int8 output where
  the layer has one; MaxPool on int8; the last layer is ConvInteger + int32
  bias, then the engine's integer rescale when it has one. It is NOT
  bit-exact with the engine, in three ways:
  1. QuantizeLinear divides in float32 by a float32 scale; the engine
     divides in float64 by the float64 input scale (both round half to even);
  2. QLinearConv rescales by the float32 product x_scale * w_scale / y_scale,
     the engine by the 31-bit fixed-point multiplier;
  3. onnxruntime rounds that product half to even; the engine rounds half up.
  Each moves an activation by one step, rarely; ``onnx_agreement`` measures it.
- ``"integer"``: bit-exact with ``run_integer``, with integer ops only after
  the input: the input quantized in float64 (Div, Round half to even, Clip,
  like ``quantize_input``), ConvInteger + int32 bias for every layer, and the
  fixed-point rescale in int64 exactly as ``fixed_point.requantize`` (Mul by
  the multiplier, Add 2^(30 - shift), floor division by 2^(31 - shift) as
  (p - Mod(p, d)) / d, because Div truncates toward zero, then Clip).

Accumulators are int32 in both styles; ``plan_model`` checks that none can overflow.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor

from pipeline.export.plan import CIFAR10_INPUT_SHAPE, Step, as_array, channel_values, layer_steps, plan_model
from pipeline.io import atomic_path
from pipeline.progress import progress_bar
from pipeline.quant.model import IntegerModel

STYLES = ("qlinear", "integer")
OPSET = 21
IR_VERSION = 10  # the IR version of opset 21; onnxruntime >= 1.20 reads it
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class _Graph:
    """Nodes and initializers being collected, with unique value names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, hint: str, value: np.ndarray) -> str:
        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op_type: str, inputs: list[str], hint: str, output: str | None = None, **attributes: Any) -> str:
        output = output or self._name(hint)
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self._name(op_type), **attributes))
        return output


def build_onnx_model(
    model: IntegerModel, style: str = "qlinear", input_shape: tuple[int, int, int] = CIFAR10_INPUT_SHAPE
) -> onnx.ModelProto:
    """The ONNX graph of ``model`` in ``style`` ("qlinear" or "integer", see the module docstring), checked."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    steps = plan_model(model, input_shape)
    last_layer = layer_steps(steps)[-1].index
    graph = _Graph()
    x = _quantize_input(graph, model.input_scale, style)
    for step in steps:
        op, name = step.op, str(step.op["name"])
        if op["op"] == "maxpool2d":
            pads = [*op["padding"], *op["padding"]]  # (top, left, bottom, right)
            x = graph.node("MaxPool", [x], name, kernel_shape=op["kernel"], strides=op["stride"], pads=pads)
        elif op["op"] == "flatten":
            # (N, K, 1, 1): linear layers are 1x1 convolutions (module docstring)
            x = graph.node("Reshape", [x, graph.constant("flat_shape", np.array([0, -1, 1, 1]))], name)
        elif step.index == last_layer or style == "integer":
            x = _integer_layer(graph, step, x)
        else:
            x = _qlinear_layer(graph, step, x)
    graph.node("Flatten", [x], "logits", output=OUTPUT_NAME, axis=1)
    channels, height, width = input_shape
    onnx_graph = helper.make_graph(
        graph.nodes,
        f"cifar10_ptq_{style}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", channels, height, width])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.INT32, ["N", steps[-1].out_size])],
        graph.initializers,
    )
    onnx_model = helper.make_model(
        onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="pipeline.export.onnx_model"
    )
    onnx_model.ir_version = IR_VERSION
    onnx_model.doc_string = __doc__ or ""
    helper.set_model_props(onnx_model, _metadata(model, style, steps))
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def save_onnx_model(
    model: IntegerModel, path: str | os.PathLike, style: str = "qlinear",
    input_shape: tuple[int, int, int] = CIFAR10_INPUT_SHAPE,
) -> onnx.ModelProto:
    """``build_onnx_model`` and write it to ``path`` atomically."""
    onnx_model = build_onnx_model(model, style, input_shape)
    with atomic_path(path) as tmp:
        onnx.save_model(onnx_model, tmp)
    return onnx_model


def _metadata(model: IntegerModel, style: str, steps: list[Step]) -> dict[str, str]:
    last = layer_steps(steps)[-1].op
    return {
        "style": style,
        "input_scale": repr(model.input_scale),
        "input_mean": repr(model.input_mean),
        "input_std": repr(model.input_std),
        "logits_scale": repr(as_array(last["output_scale"], np.float64).tolist()),
    }


# ---------------------------------------------------------------- pieces


def _per_channel(values: Any, dtype: type) -> np.ndarray:
    """A per-tensor value as a scalar; per-channel values as (C, 1, 1), to line up with dim 1 of (N, C, H, W)."""
    array = as_array(values, dtype).reshape(-1)
    return array.reshape(()) if array.size == 1 else array.reshape(-1, 1, 1)


def _scalar_or_vector(values: Any, dtype: type) -> np.ndarray:
    """A per-tensor value as a scalar, per-channel values as (C,): the QLinearConv weight-parameter shapes."""
    array = as_array(values, dtype).reshape(-1)
    return array.reshape(()) if array.size == 1 else array


def _quantize_input(graph: _Graph, input_scale: float, style: str) -> str:
    if style == "qlinear":
        scale = graph.constant("input_scale", np.array(input_scale, dtype=np.float32))
        return graph.node("QuantizeLinear", [INPUT_NAME, scale, graph.constant("zero", np.array(0, np.int8))], "x_q")
    # quantize_input: float64 x / float64 scale, round half to even (ONNX Round), saturate.
    x = graph.node("Cast", [INPUT_NAME], "x64", to=TensorProto.DOUBLE)
    x = graph.node("Div", [x, graph.constant("input_scale", np.array(input_scale, dtype=np.float64))], "x_div")
    x = graph.node("Round", [x], "x_round")
    bounds = [graph.constant("qmin", np.array(-128.0)), graph.constant("qmax", np.array(127.0))]
    x = graph.node("Clip", [x, *bounds], "x_clip")
    return graph.node("Cast", [x], "x_q", to=TensorProto.INT8)


def _conv_attributes(step: Step) -> dict[str, Any]:
    op = step.op
    if op["op"] == "linear":
        return {}
    return {"strides": op["stride"], "pads": [*op["padding"], *op["padding"]]}  # (top, left, bottom, right)


def _conv_weight(step: Step) -> np.ndarray:
    weight = as_array(step.op["weight"], np.int8)
    return weight if weight.ndim == 4 else weight.reshape(weight.shape + (1, 1))


def _check_scales_match_multipliers(step: Step) -> None:
    """QLinearConv rescales by S_in * S_w / S_out; refuse a model whose fixed-point M says otherwise."""
    op = step.op
    real = op["input_scale"] * as_array(op["weight_scale"], np.float64) / as_array(op["output_scale"], np.float64)
    shift = channel_values(op["shift"])
    fixed = channel_values(op["multiplier"]) * np.exp2(shift.astype(np.float64) - 31)
    # quantize_multiplier's error is at most 2^-31 relative, and M < 2^-32 is stored as 0
    if not np.all(np.abs(fixed - real) <= 2.0**-30 * real + 2.0**-32):
        raise ValueError(
            f"layer {op['name']!r}: multiplier * 2^(shift - 31) = {fixed.tolist()} does not match "
            f"S_in * S_w / S_out = {np.broadcast_to(real, fixed.shape).tolist()}; QLinear ops rescale by the scales, "
            "so this model can only be exported with style='integer'"
        )


def _qlinear_layer(graph: _Graph, step: Step, x: str) -> str:
    """A hidden layer as QLinearConv (int8 out, float32 rescale, half to even), then Relu on int8 if fused."""
    _check_scales_match_multipliers(step)
    op, name = step.op, str(step.op["name"])
    zero = graph.constant("zero", np.array(0, np.int8))
    weight_scale = _scalar_or_vector(op["weight_scale"], np.float32)
    inputs = [
        x,
        graph.constant(f"{name}_x_scale", np.array(op["input_scale"], dtype=np.float32)),
        zero,
        graph.constant(f"{name}_weight", _conv_weight(step)),
        graph.constant(f"{name}_w_scale", weight_scale),
        graph.constant(f"{name}_w_zero", np.zeros(weight_scale.shape, np.int8)),
        graph.constant(f"{name}_y_scale", as_array(op["output_scale"], np.float32)),
        zero,
        graph.constant(f"{name}_bias", as_array(op["bias"], np.int32)),
    ]
    y = graph.node("QLinearConv", inputs, name, **_conv_attributes(step))
    # Zero point 0: Relu on the int8 codes is ReLU on the real values, and with
    # QLinearConv's saturation it is the engine's [0, 127] clamp.
    return graph.node("Relu", [y], f"{name}_relu") if op["relu"] else y


def _integer_layer(graph: _Graph, step: Step, x: str) -> str:
    """ConvInteger + int32 bias, then the engine's rescale: to int8, to int32 logits, or raw accumulators."""
    op, name = step.op, str(step.op["name"])
    weight = graph.constant(f"{name}_weight", _conv_weight(step))
    acc = graph.node("ConvInteger", [x, weight], name, **_conv_attributes(step))
    bias = graph.constant(f"{name}_bias", as_array(op["bias"], np.int32).reshape(-1, 1, 1))
    acc = graph.node("Add", [acc, bias], f"{name}_acc")
    if op["requantize"]:
        return _requantize(graph, step, acc)
    if op["relu"]:
        return graph.node("Max", [acc, graph.constant("zero32", np.array(0, np.int32))], f"{name}_relu")
    return acc


def _requantize(graph: _Graph, step: Step, acc: str) -> str:
    """``fixed_point.requantize`` in int64 ONNX ops, bit-exact; output int8 or int32 per ``output_bits``."""
    op, name = step.op, str(step.op["name"])

    def constant(hint: str, values: Any) -> str:
        return graph.constant(f"{name}_{hint}", _per_channel(values, np.int64))

    total_shift = 31 - channel_values(op["shift"])
    qmin, qmax = (-128, 127) if op["output_bits"] == 8 else (-(2**31), 2**31 - 1)
    product = graph.node("Cast", [acc], f"{name}_acc64", to=TensorProto.INT64)
    product = graph.node("Mul", [product, constant("multiplier", op["multiplier"])], f"{name}_product")
    # + 2^(total_shift - 1), one half in units of the divisor: round half up
    rounding = constant("rounding", np.left_shift(np.int64(1), total_shift - 1))
    product = graph.node("Add", [product, rounding], f"{name}_rounded")
    divisor = constant("divisor", np.left_shift(np.int64(1), total_shift))  # 2^(31 - shift) <= 2^62: fits int64
    # Mod with fmod=0 takes the divisor's sign, so p - Mod(p, d) is the multiple of d at or below p:
    # the exact division is the floor, as the engine's arithmetic shift.
    remainder = graph.node("Mod", [product, divisor], f"{name}_remainder", fmod=0)
    floored = graph.node("Sub", [product, remainder], f"{name}_floored")
    y = graph.node("Div", [floored, divisor], f"{name}_scaled")
    y = graph.node("Clip", [y, constant("qmin", 0 if op["relu"] else qmin), constant("qmax", qmax)], f"{name}_clip")
    return graph.node("Cast", [y], f"{name}_out", to=TensorProto.INT8 if op["output_bits"] == 8 else TensorProto.INT32)


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
        for start in progress_bar(range(0, len(images), batch_size), f"ONNX {Path(onnx_path).name}", progress)
    ]
    logits = torch.from_numpy(np.concatenate(batches))
    return logits.argmax(dim=1), logits
