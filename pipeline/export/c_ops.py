"""The C backend's ops: one ``CEmitter`` per integer node type (``C_EMITTERS``), with the C kernels it needs.

The kernels are the ``.c`` files of ``c_kernels/``, read with ``importlib.resources`` and filled
with ``string.Template`` (``${name}``, ``${in_t}``, ...). Each kernel computes the integer
semantics of its ``pipeline.quant.ops`` module with integer arithmetic that cannot overflow or
round differently. An emitter gives everything the generator needs of its op: the kernels (for
the C types its tensors are stored in), shared definitions, its constants, its calls in
``ptq_model_run``, and the checks that the C's int8/int32 types hold every value it computes
beyond what ``check_deployable`` proves. ``pipeline.export.c_model`` names no node type: a new op
is one emitter here and its ``.c`` templates.

Every rescaling is ``fixed_point.requantize`` with the model's rounding rule: ``requantize_double.c``
(TFLite's double rounding, in int64 with C99's truncating division) or ``requantize.c`` (single: int64
product acc * multiplier, + 2^(30 - shift), floor division by 2^(31 - shift), one rounding, half up),
then the Requantize's own saturation [clamp_min, clamp_max] (a fused ReLU / ReLU6 is that clamp). |acc| <= 2^31 and
multiplier < 2^31 keep the sum below 2^63. C99 leaves ``>>`` of a negative value
implementation-defined, so the code never shifts one: ``ptq_floor_shift`` floors a negative
x as ``~(~x >> n)``, exact because ``int64_t`` is two's complement by definition (C99 7.18.1.1).

Types: every activation is one byte, ``int8_t`` where signed and ``uint8_t`` where unsigned (full
range [0, 2^b - 1], a tensor non-negative by construction: ``TensorInfo.signed``), 4..8-bit tensors
in the same bytes; each kernel is generated for the types it reads and writes (``ptq_conv_s8``:
int8 in and out, ``ptq_conv_u8``: int8 in, uint8 out, ``ptq_conv_u8_s32``: uint8 in, int32 out),
and only those the model calls. Products and sums promote a byte to int32 either way.
"""
from __future__ import annotations

import functools
import string
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.export.plan import as_array, channel_values, logits_tensors
from pipeline.graph.nodes import numel
from pipeline.quant.fixed_point import requantize_reference
from pipeline.quant.ir import IntegerModel, int_node_inputs
from pipeline.quant.ops.add import IntAdd
from pipeline.quant.ops.avgpool import IntAvgPool
from pipeline.quant.ops.base import Requantize, TensorInfo
from pipeline.quant.ops.clamp import IntClamp
from pipeline.quant.ops.concat import IntConcat
from pipeline.quant.ops.conv import IntConv, raw_accumulator_clamp
from pipeline.quant.ops.hardswish import (
    INT16_MAX,
    INT16_MIN,
    MIN_EXPONENT,
    IntHardSwish,
)
from pipeline.quant.ops.leaky_relu import IntLeakyReLU
from pipeline.quant.ops.maxpool import IntMaxPool
from pipeline.quant.ops.reshape import IntReshape
from pipeline.quant.ranges import INT32_MAX, INT32_MIN, largest_magnitude

if TYPE_CHECKING:
    from pipeline.export.c_arena import TensorStorage

VALUES_PER_LINE = 16
C_TYPES = {"s8": "int8_t", "u8": "uint8_t", "s32": "int32_t"}
TYPE_MIN = {"s8": "INT8_MIN", "u8": "0"}  # a max-pool's start: the least value of the type
MAX_ADD_LEFT_SHIFT = 24  # 128 * 2^24 = 2^31: -128 * 2^24 and 127 * 2^24 still fit int32
MAX_HARDSWISH_EXPONENT = 30  # the reluish left shift by exponent - 1 <= 29 stays below 2^45 in int64


# ---------------------------------------------------------------- the templates and the C text helpers


@functools.cache
def template(name: str) -> string.Template:
    """``c_kernels/<name>.c`` as a ``string.Template``."""
    return string.Template(resources.files("pipeline.export").joinpath("c_kernels", f"{name}.c").read_text())


def fill(template_name: str, /, **fields: str) -> str:
    """The text of ``c_kernels/<template_name>.c`` with its ``${field}``s filled (``KeyError`` for one not given)."""
    return template(template_name).substitute(fields)


def c_comment(text: str) -> str:
    """``text`` safe inside a C comment."""
    return str(text).replace("*/", "* /").replace("/*", "/ *")


def c_int(value: int) -> str:
    """An int32 value as a C constant expression of type int32_t's range (INT32_MIN has no literal)."""
    value = int(value)
    if value == INT32_MIN:
        return "INT32_MIN"
    if value == INT32_MAX:
        return "INT32_MAX"
    return str(value)


def c_array(c_type: str, name: str, values: np.ndarray) -> str:
    # Every value fits its type with a literal: weights int8, |bias| < 2^31 (the accumulator bound), multipliers < 2^31.
    flat = [str(int(value)) for value in np.asarray(values).reshape(-1)]
    lines = [", ".join(flat[start : start + VALUES_PER_LINE]) for start in range(0, len(flat), VALUES_PER_LINE)]
    body = ",\n    ".join(lines)
    return f"static const {c_type} {name}[{len(flat)}] = {{\n    {body}\n}};\n"


def scale_text(scale: Any) -> str:
    values = as_array(scale, np.float64).reshape(-1)
    if values.size == 1:
        return f"{values[0]:.9g} (per tensor)"
    return f"per output channel, {values.size} values in [{values.min():.9g}, {values.max():.9g}]"


def type_tag(info: TensorInfo) -> str:
    """The C storage of a tensor: "s8" (int8_t, 2..8-bit signed), "u8" (uint8_t, unsigned), "s32" (int32_t logits)."""
    if info.bits == 32:
        return "s32"
    return "s8" if info.signed else "u8"


def _tags(model: IntegerModel, node: Any) -> tuple[list[str], str]:
    """The type tags of ``node``'s inputs and of its output; the logits are the caller's int32_t array (int8
    logits widened into it)."""
    logits = logits_tensors(model)

    def tag(name: str) -> str:
        return "s32" if name in logits else type_tag(model.tensors[name])

    return [tag(name) for name in int_node_inputs(node)], tag(node.output)


def _struct(c_type: str, name: str, lines: list[dict[str, Any]]) -> str:
    """A static const struct with C99 designated initializers, one group of fields a line."""
    body = ",\n    ".join(", ".join(f".{key} = {value}" for key, value in line.items()) for line in lines)
    return f"static const {c_type} {name} = {{\n    {body}\n}};\n"


def _rescale_fields(rq: Requantize) -> str:
    return (f"{{ {int(channel_values(rq.multiplier)[0])}, {int(channel_values(rq.shift)[0])}, "
            f"{c_int(rq.clamp_min)}, {c_int(rq.clamp_max)} }}")


def _rescale_struct(name: str, rq: Requantize) -> str:
    return f"static const ptq_rescale {name} = {_rescale_fields(rq)};\n"


def _clamp(rq: Requantize) -> tuple[int, int]:
    return rq.clamp_min, rq.clamp_max


def _map_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of a map, or (K, 1, 1) of a flat tensor (a linear layer's 1x1 view)."""
    return (shape[0], shape[1], shape[2]) if len(shape) == 3 else (numel(shape), 1, 1)


# ---------------------------------------------------------------- kernels, call sites, emitters


@dataclass(frozen=True)
class Kernel:
    """One generated static function: its name, its template (a file of ``c_kernels/``) and the template's fields."""

    name: str
    template: str
    fields: tuple[tuple[str, str], ...] = ()

    def text(self) -> str:
        """Its C definition, after a blank line."""
        return "\n" + fill(self.template, name=self.name, **dict(self.fields))


def _typed_kernel(base: str, template_name: str, types: dict[str, str], plain: tuple[str, ...]) -> Kernel:
    """A kernel for the C types ``types`` (placeholder -> tag): named ``base`` when the tags are ``plain`` (the int8
    kernels keep their plain names), else ``base`` and the tags (``ptq_add_s8_u8_s8``)."""
    tags = tuple(types.values())
    name = base if tags == plain else "_".join((base, *tags))
    return Kernel(name, template_name, tuple((placeholder, C_TYPES[tag]) for placeholder, tag in types.items()))


@dataclass(frozen=True)
class CallSite:
    """Where a node runs: its model, its index in ``ptq_model_run``, its C identifier prefix, the tensors' storage."""

    model: IntegerModel
    index: int
    name: str
    storage: TensorStorage

    def place(self, tensor: str, extra: int = 0) -> str:
        return self.storage.place(tensor, extra)

    def size(self, tensor: str) -> int:
        return numel(self.model.tensors[tensor].shape)

    def comment(self, node: Any, note: str = "") -> str:
        """``/* node <index> <name>: <input shapes> -> <output shape><note> */``."""
        shapes = [self.model.tensors[tensor].shape for tensor in int_node_inputs(node)]
        out_shape = self.model.tensors[node.output].shape
        return f"/* node {self.index} {c_comment(node.name)}: {', '.join(map(str, shapes))} -> {out_shape}{note} */"


def _no_kernels(node: Any, model: IntegerModel) -> list[Kernel]:
    return []


def _no_definitions(model: IntegerModel) -> tuple[str, ...]:
    return ()


def _no_text(node: Any, model: IntegerModel, name: str) -> str:
    return ""


def _no_saturations(node: Any) -> list[tuple[int, int]]:
    return []


@dataclass(frozen=True)
class CEmitter:
    """How one integer op runs in the generated C; every callable takes the node first.

    - ``templates``: the ``c_kernels/`` files of its kernels, in the order model.c defines them;
    - ``kernels(node, model)``: the static functions it calls, each after the ones it calls;
    - ``definitions(model)``: the shared C text (types, helpers) its kernels need, once per model;
    - ``data(node, model, name)``: its constants in model_data.h; ``structs(node, model, name)``: its static const
      structs in model.c (``name`` is the node's C identifier prefix);
    - ``calls(node, site)``: its statements in ``ptq_model_run``;
    - ``saturations(node)``: every [low, high] its outputs saturate to, which the C checks lie within the output's
      range (its type); ``check(node, model, where)``: the C's other limits (``OverflowError`` for int32);
    - ``moves_no_data``: its output is its input's bytes (a flatten).
    """

    templates: tuple[str, ...]
    calls: Callable[[Any, CallSite], list[str]]
    kernels: Callable[[Any, IntegerModel], list[Kernel]] = _no_kernels
    definitions: Callable[[IntegerModel], tuple[str, ...]] = _no_definitions
    data: Callable[[Any, IntegerModel, str], str] = _no_text
    structs: Callable[[Any, IntegerModel, str], str] = _no_text
    saturations: Callable[[Any], list[tuple[int, int]]] = _no_saturations
    check: Callable[[Any, IntegerModel, str], None] | None = None
    moves_no_data: bool = False


# ---------------------------------------------------------------- conv2d and linear
#
# conv2d (any groups: output channel oc reads the in_c / groups input channels of its group;
# depthwise is groups == in_c) and linear (a 1x1 convolution on a (K, 1, 1) map) accumulate
# bias + sum(w * x) in int32: ``check_deployable`` proves every layer's worst-case |acc| below
# 2^31, and every partial sum, in any order, is bounded by that worst case, so none overflows.
# A layer accumulates one output row at a time (4 bytes x the widest output row, on the stack),
# each kernel tap sweeping the row, so the innermost loop is a contiguous multiply-add a
# compiler vectorizes. Per-channel layers index one multiplier and shift per output channel.
# The last layer writes int32 logits straight into the caller's ``logits``: requantized
# (per-channel weights) or the raw accumulators clamped by ``raw_accumulator_clamp``
# (at 0 below for a fused ReLU, else int32).


def _row_kernel(in_tag: str) -> Kernel:
    return _typed_kernel("ptq_accumulate_row", "accumulate_row", {"in_t": in_tag}, ("s8",))


def _conv_kernel(node: IntConv, model: IntegerModel) -> Kernel:
    (in_tag,), out_tag = _tags(model, node)
    store, out_t = "ptq_output(l, acc[ox], oc)", C_TYPES[out_tag]
    fields = {
        "in_t": C_TYPES[in_tag], "out_t": out_t, "accumulate_row": _row_kernel(in_tag).name,
        "store": store if out_tag == "s32" else f"({out_t}){store}",
        "store_comment": "" if out_tag == "s32" else f" /* saturated to [out_min, out_max] within {out_t} */",
    }
    return Kernel(f"ptq_conv_{'' if in_tag == 's8' else in_tag + '_'}{out_tag}", "conv_out", tuple(fields.items()))


def _conv_definitions(model: IntegerModel) -> tuple[str, ...]:
    row_max = max(_map_shape(model.tensors[layer.output].shape)[2] for layer in model.layers())
    return (fill("conv_type", row_max=str(row_max)),)


def _conv_data(layer: IntConv, model: IntegerModel, name: str) -> str:
    weight = as_array(layer.weight, np.int8)
    bias = as_array(layer.bias, np.int32)
    accumulator_scale = model.input_scale_of(layer) * as_array(layer.weight_scale, np.float64)
    layout = "(out, in / groups, kernel_h, kernel_w)" if weight.ndim == 4 else "(out, in)"
    in_shape, out_shape = model.tensors[layer.input].shape, model.tensors[layer.output].shape
    parts = [
        f"/* {c_comment(layer.name)} ({layer.kind}, groups {layer.groups}): input {in_shape} -> "
        f"output {out_shape} */\n",
        f"/* weight {tuple(weight.shape)} int8, row-major {layout}; scale S_w = {scale_text(layer.weight_scale)} */\n",
        c_array("int8_t", f"{name}_weight", weight),
        f"/* bias ({bias.size},) int32 at the accumulator scale S_in*S_w = {scale_text(accumulator_scale)} */\n",
        c_array("int32_t", f"{name}_bias", bias),
    ]
    if layer.requantize is not None:
        out = model.tensors[layer.output]
        parts += [
            f"/* requantization to int{out.bits} at S_out = {scale_text(out.scale)}: M = S_in*S_w/S_out ~= "
            "multiplier * 2^(shift - 31), multiplier Q0.31 in [0, 2^31) */\n",
            c_array("int32_t", f"{name}_multiplier", channel_values(layer.requantize.multiplier)),
            "/* shift: power-of-two exponent of M, in [-31, 30] */\n",
            c_array("int32_t", f"{name}_shift", channel_values(layer.requantize.shift)),
        ]
    return "".join(parts)


def _conv_struct(layer: IntConv, model: IntegerModel, name: str) -> str:
    _, in_h, in_w = _map_shape(model.tensors[layer.input].shape)
    out_c, out_h, out_w = _map_shape(model.tensors[layer.output].shape)
    if layer.kind == "conv2d":
        kernel_h, kernel_w = int(layer.weight.shape[2]), int(layer.weight.shape[3])
        (stride_h, stride_w), (pad_h, pad_w) = layer.stride, layer.padding
    else:
        kernel_h = kernel_w = stride_h = stride_w = 1
        pad_h = pad_w = 0
    rq = layer.requantize
    if rq is not None:
        multiplier, shift = f"{name}_multiplier", f"{name}_shift"
        channel_step = int(channel_values(rq.multiplier).size > 1)
        out_min, out_max = rq.clamp_min, rq.clamp_max
    else:
        multiplier, shift, channel_step = "NULL", "NULL", 0
        out_min, out_max = raw_accumulator_clamp(layer)
    lines = [
        {"weight": f"{name}_weight", "bias": f"{name}_bias", "multiplier": multiplier, "shift": shift},
        {"channel_step": channel_step, "out_min": c_int(out_min), "out_max": c_int(out_max)},
        {"group_in_c": int(layer.weight.shape[1]), "group_out_c": out_c // layer.groups},
        {"in_h": in_h, "in_w": in_w, "out_c": out_c, "out_h": out_h, "out_w": out_w},
        {"kernel_h": kernel_h, "kernel_w": kernel_w, "stride_h": stride_h, "stride_w": stride_w},
        {"pad_h": pad_h, "pad_w": pad_w},
    ]
    return _struct("ptq_conv", f"{name}_op", lines)


CONV = CEmitter(
    templates=("accumulate_row", "conv_out"),
    kernels=lambda node, model: [_row_kernel(_tags(model, node)[0][0]), _conv_kernel(node, model)],
    definitions=_conv_definitions,
    data=_conv_data,
    structs=_conv_struct,
    calls=lambda node, site: [f"{_conv_kernel(node, site.model).name}(&{site.name}_op, {site.place(node.input)}, "
                              f"{site.place(node.output)}); {site.comment(node)}"],
    saturations=lambda node: [] if node.requantize is None else [_clamp(node.requantize)],
)


# ---------------------------------------------------------------- max pool and average pool
#
# Max pool takes the max over each window clipped to the map, which is PyTorch's -inf padding
# (``check_deployable`` keeps padding <= kernel / 2, so every window holds a real value).
# Average pool sums each window clipped to the map in int32 (zero padding adds 0 but counts
# in the area, which is inside the multiplier S_in / (S_out * area)), or takes TFLite's rounded window mean
# (``ops.avgpool``), then requantizes.


def _pool_definitions(model: IntegerModel) -> tuple[str, ...]:
    return (fill("pool_type"),)


def _pool_struct(node: IntMaxPool | IntAvgPool, model: IntegerModel, name: str) -> str:
    channels, in_h, in_w = model.tensors[node.input].shape
    _, out_h, out_w = model.tensors[node.output].shape
    (kernel_h, kernel_w), (stride_h, stride_w), (pad_h, pad_w) = node.kernel, node.stride, node.padding
    lines = [
        {"channels": channels, "in_h": in_h, "in_w": in_w, "out_h": out_h, "out_w": out_w},
        {"kernel_h": kernel_h, "kernel_w": kernel_w, "stride_h": stride_h, "stride_w": stride_w},
        {"pad_h": pad_h, "pad_w": pad_w},
    ]
    return _struct("ptq_pool", f"{name}_op", lines)


def _maxpool_kernel(node: IntMaxPool, model: IntegerModel) -> Kernel:
    out = _tags(model, node)[1]
    return Kernel("ptq_maxpool" + ("" if out == "s8" else f"_{out}"), "maxpool",
                  (("t", C_TYPES[out]), ("t_min", TYPE_MIN[out])))


MAXPOOL = CEmitter(
    templates=("maxpool",),
    kernels=lambda node, model: [_maxpool_kernel(node, model)],
    definitions=_pool_definitions,
    structs=_pool_struct,
    calls=lambda node, site: [f"{_maxpool_kernel(node, site.model).name}(&{site.name}_op, {site.place(node.input)}, "
                              f"{site.place(node.output)}); {site.comment(node)}"],
)


def _avgpool_kernel(node: IntAvgPool, model: IntegerModel) -> Kernel:
    (in_tag,), out = _tags(model, node)
    return _typed_kernel("ptq_avgpool", "avgpool", {"in_t": in_tag, "out_t": out}, ("s8", "s8"))


def _mean_arguments(node: IntAvgPool) -> str:
    """The kernel's ``mean_count, mean_zero_point``: 0, 0 to rescale the window sum, else TFLite's rounded mean."""
    if node.mean_zero_point is None:
        return "0, 0"
    return f"{node.kernel[0] * node.kernel[1]}, {node.mean_zero_point}"


def _check_avgpool(node: IntAvgPool, model: IntegerModel, where: str) -> None:
    area = node.kernel[0] * node.kernel[1]
    if largest_magnitude(model.tensors[node.input].range) * area > INT32_MAX:
        raise OverflowError(f"{where}: a window of {area} values can sum beyond int32")


AVGPOOL = CEmitter(
    templates=("avgpool",),
    kernels=lambda node, model: [_avgpool_kernel(node, model)],
    definitions=_pool_definitions,
    structs=lambda node, model, name: _pool_struct(node, model, name) + _rescale_struct(f"{name}_rq", node.requantize),
    calls=lambda node, site: [f"{_avgpool_kernel(node, site.model).name}(&{site.name}_op, &{site.name}_rq, "
                              f"{_mean_arguments(node)}, {site.place(node.input)}, {site.place(node.output)}); "
                              f"{site.comment(node)}"],
    saturations=lambda node: [_clamp(node.requantize)],
    check=_check_avgpool,
)


# ---------------------------------------------------------------- add
#
# Add lifts each input to q * 2^left_shift by a multiplication (never a shift of a negative
# value), requantizes it to the common grid (int32 saturation), sums the two in int32 and
# requantizes the sum to the output. ``_check_add`` proves, from the multipliers, that neither
# q * 2^left_shift nor the sum can leave int32.


def _requantized_range(low: int, high: int, rq: Requantize) -> tuple[int, int]:
    """The least and largest requantize(v) for v in [low, high] (either rounding rule is monotonic: the ends
    suffice)."""
    pairs = list(zip(channel_values(rq.multiplier).tolist(), channel_values(rq.shift).tolist(), strict=True))
    ends = [requantize_reference(value, multiplier, shift, rq.clamp_min, rq.clamp_max, rq.rounding)
            for multiplier, shift in pairs for value in (low, high)]
    return min(ends), max(ends)


def _check_add(node: IntAdd, model: IntegerModel, where: str) -> None:
    if not 0 <= node.left_shift <= MAX_ADD_LEFT_SHIFT:
        raise ValueError(f"{where}: left_shift {node.left_shift} must be in [0, {MAX_ADD_LEFT_SHIFT}] for int32")
    if any(not INT32_MIN <= rq.clamp_min <= rq.clamp_max <= INT32_MAX for rq in node.input_requantize):
        raise ValueError(f"{where}: the inputs' saturation must lie in int32")
    input_ranges = [model.tensors[name].range for name in node.inputs]
    if any(qmax << node.left_shift > INT32_MAX for _, qmax in input_ranges):
        raise OverflowError(f"{where}: an input lifted by 2^{node.left_shift} leaves int32")
    ranges = [_requantized_range(qmin << node.left_shift, qmax << node.left_shift, rq)
              for (qmin, qmax), rq in zip(input_ranges, node.input_requantize, strict=True)]
    least, largest = sum(low for low, _ in ranges), sum(high for _, high in ranges)
    if least < INT32_MIN or largest > INT32_MAX:
        raise OverflowError(f"{where}: the sum of the rescaled inputs can reach [{least}, {largest}], beyond int32")


def _add_kernel(node: IntAdd, model: IntegerModel) -> Kernel:
    (a, b), out = _tags(model, node)
    return _typed_kernel("ptq_add", "add", {"a_t": a, "b_t": b, "out_t": out}, ("s8", "s8", "s8"))


def _add_struct(node: IntAdd, model: IntegerModel, name: str) -> str:
    rq_a, rq_b = node.input_requantize
    lines = [
        {"size": numel(model.tensors[node.output].shape), "left_factor": 1 << node.left_shift},
        {"a": _rescale_fields(rq_a), "b": _rescale_fields(rq_b)},
        {"out": _rescale_fields(node.output_requantize)},
    ]
    return _struct("ptq_add_op", f"{name}_op", lines)


ADD = CEmitter(
    templates=("add",),
    kernels=lambda node, model: [_add_kernel(node, model)],
    definitions=lambda model: (fill("add_type"),),
    structs=_add_struct,
    calls=lambda node, site: [f"{_add_kernel(node, site.model).name}(&{site.name}_op, {site.place(node.inputs[0])}, "
                              f"{site.place(node.inputs[1])}, {site.place(node.output)}); {site.comment(node)}"],
    saturations=lambda node: [_clamp(node.output_requantize)],
    check=_check_add,
)


# ---------------------------------------------------------------- concat
#
# Concat writes each input into its channel slice of the output (NCHW: a contiguous run),
# requantized to the output's scale, or copied where its Requantize is None.


def _concat_part_kernel(node: IntConcat, model: IntegerModel, part: int) -> Kernel:
    tags, out = _tags(model, node)
    if node.input_requantize[part] is None:
        return Kernel(f"ptq_copy_{out}", "copy", (("t", C_TYPES[out]),))
    suffix = "s8" if (tags[part], out) == ("s8", "s8") else f"{tags[part]}_{out}"
    return Kernel(f"ptq_rescale_{suffix}", "rescale", (("in_t", C_TYPES[tags[part]]), ("out_t", C_TYPES[out])))


def _concat_calls(node: IntConcat, site: CallSite) -> list[str]:
    lines = [site.comment(node)]
    start = 0
    for part, (tensor, rq) in enumerate(zip(node.inputs, node.input_requantize, strict=True)):
        size = site.size(tensor)
        function = _concat_part_kernel(node, site.model, part).name
        rescale = "" if rq is None else f"&{site.name}_rq{part}, "
        lines.append(f"{function}({rescale}{site.place(tensor)}, {site.place(node.output, start)}, {size});")
        start += size
    return lines


CONCAT = CEmitter(
    templates=("copy", "rescale"),
    kernels=lambda node, model: [_concat_part_kernel(node, model, part) for part in range(len(node.inputs))],
    structs=lambda node, model, name: "".join(_rescale_struct(f"{name}_rq{index}", rq)
                                              for index, rq in enumerate(node.input_requantize) if rq is not None),
    calls=_concat_calls,
    saturations=lambda node: [_clamp(rq) for rq in node.input_requantize if rq is not None],
)


# ---------------------------------------------------------------- a standalone ReLU / ReLU6: a clamp


def _clamp_kernel(node: IntClamp, model: IntegerModel) -> Kernel:
    out = _tags(model, node)[1]
    return Kernel(f"ptq_clamp_{out}", "clamp", (("t", C_TYPES[out]),))


CLAMP = CEmitter(
    templates=("clamp",),
    kernels=lambda node, model: [_clamp_kernel(node, model)],
    calls=lambda node, site: [f"{_clamp_kernel(node, site.model).name}({site.place(node.input)}, "
                              f"{site.place(node.output)}, {site.size(node.output)}, {node.clamp_min}, "
                              f"{node.clamp_max}); {site.comment(node)}"],
    saturations=lambda node: [(node.clamp_min, node.clamp_max)],
)


# ---------------------------------------------------------------- a flatten: its output is its input's bytes

RESHAPE = CEmitter(
    templates=(),
    calls=lambda node, site: [site.comment(node, f", no data moves ({site.place(node.output)})")],
    moves_no_data=True,
)


# ---------------------------------------------------------------- leaky ReLU
#
# TFLite's LEAKY_RELU: the requantization of the input's sign (``leaky_relu.c``), each Requantize
# saturating to the output's range; an input |q| <= 255 times a multiplier < 2^31 fits int64.


def _leaky_relu_kernel(node: IntLeakyReLU, model: IntegerModel) -> Kernel:
    (in_tag,), out = _tags(model, node)
    return _typed_kernel("ptq_leaky_relu", "leaky_relu", {"in_t": in_tag, "out_t": out}, ("s8", "s8"))


LEAKY_RELU = CEmitter(
    templates=("leaky_relu",),
    kernels=lambda node, model: [_leaky_relu_kernel(node, model)],
    structs=lambda node, model, name: (_rescale_struct(f"{name}_positive", node.positive)
                                       + _rescale_struct(f"{name}_negative", node.negative)),
    calls=lambda node, site: [f"{_leaky_relu_kernel(node, site.model).name}(&{site.name}_positive, "
                              f"&{site.name}_negative, {site.place(node.input)}, {site.place(node.output)}, "
                              f"{site.size(node.output)}); {site.comment(node)}"],
    saturations=lambda node: [_clamp(node.positive), _clamp(node.negative)],
)


# ---------------------------------------------------------------- hard swish
#
# TFLite's int8 HARD_SWISH in int16 fixed point (``hardswish_value.c``), step by step as
# ``hardswish_reference``: the input code |q| <= 255 (one byte: ``check_deployable`` lets only a
# flatten read the int32 logits) lifted by 2^7 stays in int16, every product of two int16 values is
# taken in int32, and the exponents stay where the helpers are defined (``_check_hardswish``).


def _check_hardswish(node: IntHardSwish, model: IntegerModel, where: str) -> None:
    multipliers = (node.reluish_multiplier, node.output_multiplier)
    if not all(INT16_MIN <= multiplier <= INT16_MAX for multiplier in multipliers):
        raise ValueError(f"{where}: multipliers {multipliers} must be int16 values")
    if not MIN_EXPONENT <= node.reluish_exponent <= MAX_HARDSWISH_EXPONENT:
        raise ValueError(f"{where}: reluish_exponent {node.reluish_exponent} must be in "
                         f"[{MIN_EXPONENT}, {MAX_HARDSWISH_EXPONENT}]")
    if not MIN_EXPONENT <= node.output_exponent <= 0:
        raise ValueError(f"{where}: output_exponent {node.output_exponent} must be in [{MIN_EXPONENT}, 0]")


def _hardswish_kernel(node: IntHardSwish, model: IntegerModel) -> Kernel:
    (in_tag,), out = _tags(model, node)
    return _typed_kernel("ptq_hardswish", "hardswish", {"in_t": in_tag, "out_t": out}, ("s8", "s8"))


def _hardswish_struct(node: IntHardSwish, model: IntegerModel, name: str) -> str:
    lines = [
        {"size": numel(model.tensors[node.output].shape)},
        {"reluish_multiplier": node.reluish_multiplier, "reluish_exponent": node.reluish_exponent},
        {"output_multiplier": node.output_multiplier, "output_exponent": node.output_exponent},
        {"out_min": c_int(node.clamp_min), "out_max": c_int(node.clamp_max)},
    ]
    return _struct("ptq_hardswish_op", f"{name}_op", lines)


HARDSWISH = CEmitter(
    templates=("hardswish",),
    kernels=lambda node, model: [_hardswish_kernel(node, model)],
    definitions=lambda model: (fill("hardswish_value"),),
    structs=_hardswish_struct,
    calls=lambda node, site: [f"{_hardswish_kernel(node, site.model).name}(&{site.name}_op, "
                              f"{site.place(node.input)}, {site.place(node.output)}); {site.comment(node)}"],
    saturations=lambda node: [(node.clamp_min, node.clamp_max)],
    check=_check_hardswish,
)


# ---------------------------------------------------------------- the table

# Its order is model.c's: the shared definitions and the kernels of the ops a model uses appear in it.
C_EMITTERS: dict[type, CEmitter] = {
    IntConv: CONV,
    IntMaxPool: MAXPOOL,
    IntAvgPool: AVGPOOL,
    IntAdd: ADD,
    IntConcat: CONCAT,
    IntClamp: CLAMP,
    IntReshape: RESHAPE,
    IntLeakyReLU: LEAKY_RELU,
    IntHardSwish: HARDSWISH,
}
KERNEL_ORDER = tuple(name for emitter in C_EMITTERS.values() for name in emitter.templates)


def emitter_of(node: Any) -> CEmitter:
    """The ``CEmitter`` of an integer node; ``ValueError`` naming the node for a type the C backend lacks."""
    emitter = C_EMITTERS.get(type(node))
    if emitter is None:
        raise ValueError(f"node {node.name!r} ({type(node).__name__}) has no C emitter; the C backend supports "
                         f"{sorted(node_type.__name__ for node_type in C_EMITTERS)}")
    return emitter


__all__ = [
    "C_EMITTERS",
    "C_TYPES",
    "KERNEL_ORDER",
    "CEmitter",
    "CallSite",
    "Kernel",
    "c_array",
    "c_comment",
    "c_int",
    "emitter_of",
    "fill",
    "scale_text",
    "template",
    "type_tag",
]
