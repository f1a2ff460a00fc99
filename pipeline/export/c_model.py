"""C99 sources for an ``IntegerModel``: ``model.h`` (the API), ``model_data.h`` (constants), ``model.c`` (the network).

The generated C is bit-exact with ``pipeline.quant.engine.run_integer``, node by node, because
every kernel computes the integer semantics of ``pipeline.quant.integer_ops`` with integer
arithmetic that cannot overflow or round differently:

- integer arithmetic only (no float, no malloc), freestanding headers only (``stdint.h``,
  ``stddef.h``), so it builds for a microcontroller as it is;
- conv2d (any groups: output channel oc reads the in_c / groups input channels of its group;
  depthwise is groups == in_c) and linear (a 1x1 convolution on a (K, 1, 1) map) accumulate
  bias + sum(w * x) in int32: ``check_deployable`` proves every layer's worst-case |acc| below
  2^31, and every partial sum, in any order, is bounded by that worst case, so none overflows.
  A layer accumulates one output row at a time (4 bytes x the widest output row, on the stack),
  each kernel tap sweeping the row, so the innermost loop is a contiguous multiply-add a
  compiler vectorizes;
- every rescaling is ``fixed_point.requantize``: int64 product acc * multiplier, + 2^(30 - shift),
  floor division by 2^(31 - shift) (one rounding, half up), then the Requantize's own
  saturation [clamp_min, clamp_max] (a fused ReLU / ReLU6 is that clamp). |acc| <= 2^31 and
  multiplier < 2^31 keep the sum below 2^63. C99 leaves ``>>`` of a negative value
  implementation-defined, so the code never shifts one: ``ptq_floor_shift`` floors a negative
  x as ``~(~x >> n)``, exact because ``int64_t`` is two's complement by definition
  (C99 7.18.1.1). Per-channel layers index one multiplier and shift per output channel;
- the last layer writes int32 logits straight into the caller's ``logits``: requantized
  (per-channel weights) or the raw accumulators clamped by ``build.raw_accumulator_clamp``
  (at 0 below for a fused ReLU, else int32);
- max pool takes the max over each window clipped to the map, which is PyTorch's -inf padding
  (``check_deployable`` keeps padding <= kernel / 2, so every window holds a real value);
- average pool sums each window clipped to the map in int32 (zero padding adds 0 but counts
  in the area, which is inside the multiplier S_in / (S_out * area)), then requantizes;
- add lifts each input to q * 2^left_shift by a multiplication (never a shift of a
  negative value), requantizes it to the common grid (int32 saturation), sums the two in
  int32 and requantizes the sum to the output. The generator proves, from the multipliers,
  that neither q * 2^left_shift nor the sum can leave int32 (``_check_c_limits``);
- concat writes each input into its channel slice of the output (NCHW: a contiguous run),
  requantized to the output's scale, or copied where its Requantize is None;
- a standalone ReLU / ReLU6 is a clamp; a flatten moves no data: its output is its input's bytes.

Types: every activation is one byte, ``int8_t`` where signed and ``uint8_t`` where unsigned (full
range [0, 2^b - 1], a tensor non-negative by construction: ``TensorInfo.signed``), 4..8-bit tensors
in the same bytes; each kernel is generated for the types it reads and writes (``ptq_conv_s8``:
int8 in and out, ``ptq_conv_u8``: int8 in, uint8 out, ``ptq_conv_u8_s32``: uint8 in, int32 out),
and only those the model calls. Products and sums promote a byte to int32 either way.

Memory: the caller owns the input image and the logits. Every other one-byte tensor lives in ONE
static arena, ``ptq_arena``, at an offset planned by tensor liveness: a tensor is live from the
node that writes it to the last node that reads it (a flatten's output is the same bytes as
its input, so the flatten's readers extend the input's life). Two tensors whose lives overlap
never share a byte, which also means no node writes over one of its own inputs (its output's
life starts at the node, its inputs' lives end there at the earliest). Offsets come from a
greedy first fit, largest tensor first, at the lowest offset that no overlapping placed tensor
occupies (the algorithm of tflite-micro's GreedyMemoryPlanner, ``plan_arena``); the arena is
at most the sum of the tensors and at least the largest set of them live at one node. The
arena's size is the model's static RAM (``PTQ_MODEL_STATIC_RAM_BYTES``), and model.c lists every
tensor's offset, size and life in a comment.

Input: one image, int8, NCHW order (C, H, W), as ``quantize_input`` makes it.
Output: int32 logits at ``model.output_scale``, as ``run_integer``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.export.plan import as_array, channel_values, check_deployable, numel
from pipeline.io import atomic_path
from pipeline.quant.build import raw_accumulator_clamp
from pipeline.quant.fixed_point import requantize_reference
from pipeline.quant.ir import (
    IntAdd,
    IntAvgPool,
    IntClamp,
    IntConcat,
    IntConv,
    IntegerModel,
    IntMaxPool,
    IntNode,
    IntReshape,
    Requantize,
    TensorInfo,
    int_node_inputs,
    parameter_bytes,
)
from pipeline.quant.ranges import INT32_MAX, INT32_MIN, largest_magnitude

C_FILES = ("model.h", "model_data.h", "model.c")
VALUES_PER_LINE = 16
ARENA = "ptq_arena"
MAX_ADD_LEFT_SHIFT = 24  # 128 * 2^24 = 2^31: -128 * 2^24 and 127 * 2^24 still fit int32


# ---------------------------------------------------------------- the arena


@dataclass(frozen=True)
class Lifetime:
    """One arena buffer: ``size`` bytes, live from node ``first`` (which writes it) to node ``last`` (its last read)."""

    name: str
    size: int
    first: int
    last: int

    def overlaps(self, other: Lifetime) -> bool:
        """Whether both are live at some node (lives are closed intervals of node indices)."""
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class ArenaPlan:
    """Byte offsets of the arena buffers, and the arena's size (the end of the highest buffer)."""

    lifetimes: tuple[Lifetime, ...]
    offsets: dict[str, int]
    size: int

    def tensor_bytes(self) -> int:
        """The sum of all buffers: what one buffer per tensor would take."""
        return sum(lifetime.size for lifetime in self.lifetimes)


def plan_arena(lifetimes: Iterable[Lifetime]) -> ArenaPlan:
    """Offsets for ``lifetimes`` such that no two buffers live at the same node share a byte.

    Greedy first fit, as tflite-micro's GreedyMemoryPlanner: buffers in decreasing size (ties:
    earlier first use, then name), each at the lowest offset that leaves it clear of every
    already placed buffer whose life overlaps its own.
    """
    lifetimes = tuple(lifetimes)
    names = [lifetime.name for lifetime in lifetimes]
    if len(set(names)) != len(names):
        raise ValueError(f"arena buffer names must be unique, got {names}")
    for lifetime in lifetimes:
        if lifetime.size < 0 or lifetime.first > lifetime.last:
            raise ValueError(f"arena buffer {lifetime} needs size >= 0 and first <= last")
    offsets: dict[str, int] = {}
    placed: list[Lifetime] = []
    for lifetime in sorted(lifetimes, key=lambda item: (-item.size, item.first, item.name)):
        offset = 0
        neighbours = sorted((other for other in placed if other.overlaps(lifetime)), key=lambda o: offsets[o.name])
        for other in neighbours:
            if offsets[other.name] >= offset + lifetime.size:
                break  # the gap below ``other`` holds this buffer
            offset = max(offset, offsets[other.name] + other.size)
        offsets[lifetime.name] = offset
        placed.append(lifetime)
    size = max((offsets[item.name] + item.size for item in lifetimes), default=0)
    return ArenaPlan(lifetimes, offsets, size)


def peak_live_bytes(lifetimes: Iterable[Lifetime]) -> int:
    """The largest total size of the buffers live at one node: no plan's arena is smaller."""
    lifetimes = list(lifetimes)
    times = {lifetime.first for lifetime in lifetimes}  # the live set only grows at a first use
    return max((sum(item.size for item in lifetimes if item.first <= time <= item.last) for time in times), default=0)


@dataclass(frozen=True)
class TensorStorage:
    """Where each tensor's values are: ``root[name]`` is the tensor whose bytes it is (flattens resolved)."""

    root: dict[str, str]
    arena: ArenaPlan
    input: str  # the model input's root: the caller's ``input``
    logits: str  # the int32 logits' root: the caller's ``logits``
    unsigned: frozenset[str]  # the arena tensors stored as uint8_t (the arena itself is int8_t)

    def place(self, name: str, extra: int = 0) -> str:
        """The C expression of a pointer to tensor ``name``, ``extra`` values in.

        An unsigned tensor's pointer is the arena's bytes as ``uint8_t *``: C99 (6.5p7) lets a
        value be accessed through the unsigned type of its signed type, and both are character types.
        """
        root = self.root[name]
        if root == self.input:
            base, offset = "input", extra
        elif root == self.logits:
            base, offset = "logits", extra
        else:
            base, offset = ARENA, self.arena.offsets[root] + extra
        pointer = f"{base} + {offset}" if offset else base
        if root in self.unsigned:
            return f"(uint8_t *)({pointer})" if offset else f"(uint8_t *){pointer}"
        return pointer


def tensor_storage(model: IntegerModel) -> TensorStorage:
    """Every tensor's buffer, and the arena plan of the one-byte activations (module docstring)."""
    root = {model.input: model.input}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, node in enumerate(model.nodes):
        for name in int_node_inputs(node):
            last[root[name]] = index
        if isinstance(node, IntReshape):
            root[node.output] = root[node.input]
        else:
            root[node.output] = node.output
            first[node.output] = index
    logits = root[model.output]
    int32_roots = {root[name] for name, info in model.tensors.items() if name in root and info.bits == 32}
    if int32_roots - {logits}:  # check_deployable's rule; the caller's logits hold one int32 tensor
        raise ValueError(f"int32 tensors {sorted(int32_roots - {logits})} are not the model's logits")
    lifetimes = [
        Lifetime(name, numel(model.tensors[name].shape), index, max(index, last.get(name, index)))
        for name, index in first.items()
        if name not in (model.input, logits)
    ]
    unsigned = frozenset(name for name in first if not model.tensors[name].signed)
    return TensorStorage(root, plan_arena(lifetimes), model.input, logits, unsigned)


# ---------------------------------------------------------------- what the C kernels need beyond check_deployable


def _requantized_range(low: int, high: int, rq: Requantize) -> tuple[int, int]:
    """The least and largest requantize(v) for v in [low, high] (requantize is monotonic: the ends suffice)."""
    pairs = list(zip(channel_values(rq.multiplier).tolist(), channel_values(rq.shift).tolist(), strict=True))
    ends = [requantize_reference(value, multiplier, shift, rq.clamp_min, rq.clamp_max)
            for multiplier, shift in pairs for value in (low, high)]
    return min(ends), max(ends)


def _check_c_limits(model: IntegerModel) -> None:
    """Raise ``ValueError`` (``OverflowError`` for int32 overflow) where the C's int8/int32 types cannot hold a value.

    ``check_deployable`` covers the layers' accumulators; this covers the other int32
    intermediates (add, average pool) and the saturation of every output within its own range.
    """
    for index, node in enumerate(model.nodes):
        where = f"node {index} ({node.name!r}, {type(node).__name__})"
        out = model.tensors[node.output]
        low, high = out.range
        clamps: list[tuple[int, int]] = []
        if isinstance(node, IntConv) and node.requantize is not None:
            clamps.append((node.requantize.clamp_min, node.requantize.clamp_max))
        elif isinstance(node, IntAdd):
            clamps.append((node.output_requantize.clamp_min, node.output_requantize.clamp_max))
            if not 0 <= node.left_shift <= MAX_ADD_LEFT_SHIFT:
                raise ValueError(f"{where}: left_shift {node.left_shift} must be in [0, {MAX_ADD_LEFT_SHIFT}] "
                                 "for int32")
            if any(not INT32_MIN <= rq.clamp_min <= rq.clamp_max <= INT32_MAX for rq in node.input_requantize):
                raise ValueError(f"{where}: the inputs' saturation must lie in int32")
            input_ranges = [model.tensors[name].range for name in node.inputs]
            if any(qmax << node.left_shift > INT32_MAX for _, qmax in input_ranges):
                raise OverflowError(f"{where}: an input lifted by 2^{node.left_shift} leaves int32")
            ranges = [_requantized_range(qmin << node.left_shift, qmax << node.left_shift, rq)
                      for (qmin, qmax), rq in zip(input_ranges, node.input_requantize, strict=True)]
            least, largest = sum(low_ for low_, _ in ranges), sum(high_ for _, high_ in ranges)
            if least < INT32_MIN or largest > INT32_MAX:
                raise OverflowError(
                    f"{where}: the sum of the rescaled inputs can reach [{least}, {largest}], beyond int32"
                )
        elif isinstance(node, IntAvgPool):
            clamps.append((node.requantize.clamp_min, node.requantize.clamp_max))
            area = node.kernel[0] * node.kernel[1]
            if largest_magnitude(model.tensors[node.input].range) * area > INT32_MAX:
                raise OverflowError(f"{where}: a window of {area} values can sum beyond int32")
        elif isinstance(node, IntConcat):
            clamps += [(rq.clamp_min, rq.clamp_max) for rq in node.input_requantize if rq is not None]
        elif isinstance(node, IntClamp):
            clamps.append((node.clamp_min, node.clamp_max))
        for clamp_min, clamp_max in clamps:
            if not low <= clamp_min <= clamp_max <= high:
                raise ValueError(
                    f"{where} saturates to [{clamp_min}, {clamp_max}], which is not a range within its "
                    f"{'' if out.signed else 'u'}int{out.bits} output [{low}, {high}]"
                )


# ---------------------------------------------------------------- the generated files


@dataclass(frozen=True)
class CSources:
    """The three generated files' text, and the memory figures the generator knows without a compiler."""

    header: str  # model.h
    data: str  # model_data.h
    source: str  # model.c
    static_ram_bytes: int  # the activation arena
    parameter_bytes: int  # weights, biases, multipliers and shifts (const: flash, not RAM)
    arena: ArenaPlan

    def files(self) -> dict[str, str]:
        """File name -> text."""
        return {"model.h": self.header, "model_data.h": self.data, "model.c": self.source}


def generate_c(model: IntegerModel) -> CSources:
    """The C sources of ``model`` (input shape ``model.tensors[model.input].shape``); see the module docstring."""
    check_deployable(model)
    _check_c_limits(model)
    storage = tensor_storage(model)
    names = _identifiers(model)
    data, parameter_bytes = _data_header(model, names)
    header = _api_header(model, storage.arena.size, parameter_bytes)
    source = _source(model, names, storage)
    return CSources(header, data, source, storage.arena.size, parameter_bytes, storage.arena)


def write_c_sources(model: IntegerModel, directory: str | os.PathLike) -> CSources:
    """``generate_c`` and write ``model.h``, ``model_data.h``, ``model.c`` into ``directory``, each atomically."""
    sources = generate_c(model)
    for name, text in sources.files().items():
        with atomic_path(Path(directory) / name) as tmp:
            tmp.write_text(text)
    return sources


# ---------------------------------------------------------------- naming


def _identifiers(model: IntegerModel) -> dict[str, str]:
    """A C identifier prefix per node: its name where that is one (``conv1``), else ``node<index>_<name>``.

    Every identifier made from a prefix ends in a suffix (``_op``, ``_weight``, ...), so a prefix
    never collides with a C keyword, a parameter (``input``, ``logits``) or another prefix's names.
    """
    names: dict[str, str] = {}
    used: set[str] = set()
    for index, node in enumerate(model.nodes):
        base = re.sub(r"\W", "_", node.name)
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", base) or base.startswith("ptq") or base in used:
            base = f"node{index}_{base}".rstrip("_")
        while base in used:
            base += "_"
        names[node.name] = base
        used.add(base)
    return names


def _comment(text: str) -> str:
    """``text`` safe inside a C comment."""
    return str(text).replace("*/", "* /").replace("/*", "/ *")


def _c_int(value: int) -> str:
    """An int32 value as a C constant expression of type int32_t's range (INT32_MIN has no literal)."""
    value = int(value)
    if value == INT32_MIN:
        return "INT32_MIN"
    if value == INT32_MAX:
        return "INT32_MAX"
    return str(value)


# ---------------------------------------------------------------- model_data.h


def _c_array(c_type: str, name: str, values: np.ndarray) -> str:
    # Every value fits its type with a literal: weights int8, |bias| < 2^31 (the accumulator bound), multipliers < 2^31.
    flat = [str(int(value)) for value in np.asarray(values).reshape(-1)]
    lines = [", ".join(flat[start : start + VALUES_PER_LINE]) for start in range(0, len(flat), VALUES_PER_LINE)]
    body = ",\n    ".join(lines)
    return f"static const {c_type} {name}[{len(flat)}] = {{\n    {body}\n}};\n"


def _scale_text(scale: Any) -> str:
    values = as_array(scale, np.float64).reshape(-1)
    if values.size == 1:
        return f"{values[0]:.9g} (per tensor)"
    return f"per output channel, {values.size} values in [{values.min():.9g}, {values.max():.9g}]"


def _layer_data(model: IntegerModel, layer: IntConv, name: str) -> str:
    weight = as_array(layer.weight, np.int8)
    bias = as_array(layer.bias, np.int32)
    accumulator_scale = model.input_scale_of(layer) * as_array(layer.weight_scale, np.float64)
    layout = "(out, in / groups, kernel_h, kernel_w)" if weight.ndim == 4 else "(out, in)"
    in_shape, out_shape = model.tensors[layer.input].shape, model.tensors[layer.output].shape
    parts = [
        f"/* {_comment(layer.name)} ({layer.kind}, groups {layer.groups}): input {in_shape} -> output {out_shape} */\n",
        f"/* weight {tuple(weight.shape)} int8, row-major {layout}; scale S_w = {_scale_text(layer.weight_scale)} */\n",
        _c_array("int8_t", f"{name}_weight", weight),
        f"/* bias ({bias.size},) int32 at the accumulator scale S_in*S_w = {_scale_text(accumulator_scale)} */\n",
        _c_array("int32_t", f"{name}_bias", bias),
    ]
    if layer.requantize is not None:
        out = model.tensors[layer.output]
        parts += [
            f"/* requantization to int{out.bits} at S_out = {_scale_text(out.scale)}: M = S_in*S_w/S_out ~= "
            "multiplier * 2^(shift - 31), multiplier Q0.31 in [2^30, 2^31) or 0 */\n",
            _c_array("int32_t", f"{name}_multiplier", channel_values(layer.requantize.multiplier)),
            "/* shift: power-of-two exponent of M, in [-31, 30] */\n",
            _c_array("int32_t", f"{name}_shift", channel_values(layer.requantize.shift)),
        ]
    return "".join(parts)


def _data_header(model: IntegerModel, names: dict[str, str]) -> tuple[str, int]:
    """The text of model_data.h and the bytes of constants the model has (``parameter_bytes``)."""
    chunks = [_layer_data(model, layer, names[layer.name]) for layer in model.layers()]
    total = parameter_bytes(model)
    head = (
        "/* model_data.h: the constants of the integer model. Generated by pipeline.export.c_model; do not edit.\n"
        " * Included by model.c only (the arrays are static). Scheme: r ~= S * q, symmetric, zero point 0;\n"
        f" * weights int8, biases int32; {total} bytes of constants in all, with the rescalings of the\n"
        " * adds, pools and concats, which model.c keeps beside their nodes. */\n"
        "#ifndef PTQ_MODEL_DATA_H\n#define PTQ_MODEL_DATA_H\n\n#include <stdint.h>\n\n"
    )
    return head + "\n".join(chunks) + "\n#endif /* PTQ_MODEL_DATA_H */\n", total


# ---------------------------------------------------------------- model.h


def _api_header(model: IntegerModel, static_ram: int, parameters: int) -> str:
    shape = model.tensors[model.input].shape
    input_size, output_size = numel(shape), numel(model.tensors[model.output].shape)
    if len(shape) == 3:
        channels, height, width = shape
        layout = (
            f"in NCHW order, (C, H, W) = ({channels}, {height}, {width}),\n"
            f" *   value (c, y, x) at index (c * {height} + y) * {width} + x:"
        )
    else:
        layout = f"of shape {shape}, row-major:"
    input_min, input_max = model.tensors[model.input].range
    normalization = (
        f"mean {model.input_mean}, std {model.input_std}" if model.input_mean is not None else "as in training"
    )
    return f"""/* model.h: the integer CIFAR-10 network. Generated by pipeline.export.c_model; do not edit.
 *
 * Input: one image as int8 {layout}
 *   q = clamp(round_half_to_even(x_normalized / S_in), {input_min}, {input_max}), S_in = {model.input_scale!r},
 *   x_normalized = (pixel / 255 - mean[c]) / std[c] ({normalization})
 *   (pipeline.quant.engine.quantize_input).
 * Output: {output_size} int32 logits at scale {_scale_text(model.output_scale)};
 *   the predicted class is the index of the largest.
 * Bit-exact with pipeline.quant.engine.run_integer. Not reentrant: activations
 * live in one static arena of PTQ_MODEL_STATIC_RAM_BYTES bytes.
 */
#ifndef PTQ_MODEL_H
#define PTQ_MODEL_H

#include <stdint.h>

#define PTQ_MODEL_INPUT_SIZE {input_size} /* int8 values per image */
#define PTQ_MODEL_OUTPUT_SIZE {output_size} /* int32 logits per image */
#define PTQ_MODEL_STATIC_RAM_BYTES {static_ram} /* the activation arena */
#define PTQ_MODEL_PARAMETER_BYTES {parameters} /* const weights, biases, multipliers, shifts */

void ptq_model_run(const int8_t input[PTQ_MODEL_INPUT_SIZE], int32_t logits[PTQ_MODEL_OUTPUT_SIZE]);

#endif /* PTQ_MODEL_H */
"""


# ---------------------------------------------------------------- model.c: kernels

_PREAMBLE = """\
/* model.c: the integer CIFAR-10 network, integer arithmetic only. Generated by
 * pipeline.export.c_model; do not edit. Bit-exact with pipeline.quant.engine.run_integer.
 *
 * Portability: needs the exact-width int8_t/int32_t/int64_t of <stdint.h>, which C99
 * (7.18.1.1) defines as two's complement without padding bits; ptq_floor_shift relies on it.
 * Sizes and indices are int32_t, not int, because a 16-bit int cannot hold them.
 */
#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "model_data.h"
"""

_REQUANTIZE = """
/* floor(x / 2^n) for 0 < n < 63: the arithmetic right shift of the Python engine.
 * C99 leaves >> of a negative value implementation-defined, so a negative x is
 * shifted as ~x = -x - 1 >= 0 (two's complement): floor(x / 2^n) = ~(~x >> n). */
static int64_t ptq_floor_shift(int64_t x, int32_t n)
{
    return x >= 0 ? x >> n : ~(~x >> n);
}

/* pipeline.quant.fixed_point.requantize: y = floor((acc * multiplier + 2^(30 - shift)) / 2^(31 - shift)),
 * i.e. acc * M rounded half up, then saturated to [out_min, out_max]. |acc * multiplier| < 2^62 and
 * the rounding term is at most 2^61, so the int64 sum cannot overflow. */
static int32_t ptq_requantize(int32_t acc, int32_t multiplier, int32_t shift, int32_t out_min, int32_t out_max)
{
    const int32_t total_shift = 31 - shift;
    const int64_t rounding = (int64_t)1 << (total_shift - 1);
    const int64_t y = ptq_floor_shift((int64_t)acc * multiplier + rounding, total_shift);
    return (int32_t)(y < out_min ? out_min : (y > out_max ? out_max : y));
}

/* One scalar requantization: M = multiplier * 2^(shift - 31), saturation [out_min, out_max]. */
typedef struct {
    int32_t multiplier, shift, out_min, out_max;
} ptq_rescale;
"""

_CONV = """
/* A conv2d (any groups), or a linear layer as a 1x1 convolution on a (K, 1, 1) map. */
typedef struct {
    const int8_t *weight;      /* (out_c, group_in_c, kernel_h, kernel_w), row-major */
    const int32_t *bias;       /* (out_c), at the accumulator scale S_in * S_w */
    const int32_t *multiplier; /* Q0.31, 1 or out_c values; NULL: output the raw accumulator */
    const int32_t *shift;      /* M = multiplier * 2^(shift - 31) */
    int32_t channel_step;      /* 1: one multiplier and shift per output channel; 0: one for all */
    int32_t out_min, out_max;  /* saturation: the Requantize's, or the raw logits' (out_min 0: ReLU) */
    int32_t group_in_c, group_out_c; /* input and output channels per group (depthwise: 1 and 1) */
    int32_t in_h, in_w, out_c, out_h, out_w;
    int32_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
} ptq_conv;

/* One output value from its accumulator: requantized and saturated, or the raw accumulator. */
static int32_t ptq_output(const ptq_conv *l, int32_t acc, int32_t oc)
{
    if (l->multiplier == NULL) {
        return acc < l->out_min ? l->out_min : acc; /* raw logits: out_min is INT32_MIN, or 0 for a ReLU */
    }
    return ptq_requantize(acc, l->multiplier[oc * l->channel_step], l->shift[oc * l->channel_step],
                          l->out_min, l->out_max);
}
"""

_ACCUMULATE_ROW = """
/* bias + sum of weight * input over the windows of output row (oc, oy), into acc[0 .. out_w), for
 * {in_t} inputs. Output channel oc reads the group_in_c input channels of its group, oc / group_out_c.
 * Zero padding adds nothing, so each kernel tap visits only the outputs whose input lies in the
 * map. Every partial sum, in any order of the terms, is at most sum|w| * max|x| + |bias| < 2^31
 * (max|x| from the input's range: 128 for int8, 255 for uint8; checked by the generator): no int32 overflow. */
static void {name}(const ptq_conv *l, const {in_t} *in, int32_t oc, int32_t oy, int32_t *acc)
{{
    /* Locals, not l->...: acc is written in the inner loop and could alias *l as far as the compiler knows. */
    const int32_t group_in_c = l->group_in_c, in_h = l->in_h, in_w = l->in_w, out_w = l->out_w;
    const int32_t kernel_h = l->kernel_h, kernel_w = l->kernel_w, stride_w = l->stride_w;
    const int32_t y0 = oy * l->stride_h - l->pad_h;
    const int32_t ky_begin = y0 < 0 ? -y0 : 0;
    const int32_t ky_end = in_h - y0 < kernel_h ? in_h - y0 : kernel_h;
    const int8_t *weights = l->weight + oc * group_in_c * kernel_h * kernel_w;
    const {in_t} *group_in = in + (oc / l->group_out_c) * group_in_c * in_h * in_w;
    const int32_t bias = l->bias[oc];
    for (int32_t ox = 0; ox < out_w; ++ox) {{
        acc[ox] = bias;
    }}
    for (int32_t kx = 0; kx < kernel_w; ++kx) {{
        /* Input column ox * stride_w + offset must lie in [0, in_w): ox in [ox_begin, ox_end). */
        const int32_t offset = kx - l->pad_w;
        const int32_t ox_begin = offset >= 0 ? 0 : (stride_w - 1 - offset) / stride_w;
        const int32_t last = in_w - 1 - offset; /* the largest ox * stride_w allowed */
        const int32_t ox_stop = last < 0 ? 0 : last / stride_w + 1;
        const int32_t ox_end = ox_stop < out_w ? ox_stop : out_w;
        for (int32_t ic = 0; ic < group_in_c; ++ic) {{
            for (int32_t ky = ky_begin; ky < ky_end; ++ky) {{
                const int32_t w = weights[(ic * kernel_h + ky) * kernel_w + kx];
                const {in_t} *row = group_in + (ic * in_h + y0 + ky) * in_w;
                if (stride_w == 1) {{ /* the common case, a separate loop so the compiler can vectorize it */
                    for (int32_t ox = ox_begin; ox < ox_end; ++ox) {{
                        acc[ox] += w * row[ox + offset];
                    }}
                }} else {{
                    for (int32_t ox = ox_begin; ox < ox_end; ++ox) {{
                        acc[ox] += w * row[ox * stride_w + offset];
                    }}
                }}
            }}
        }}
    }}
}}
"""

_CONV_OUT = """
static void {name}(const ptq_conv *l, const {in_t} *in, {out_t} *out)
{{
    int32_t acc[PTQ_ROW_MAX]; /* one output row of accumulators, on the stack */
    for (int32_t oc = 0; oc < l->out_c; ++oc) {{
        for (int32_t oy = 0; oy < l->out_h; ++oy) {{
            {accumulate_row}(l, in, oc, oy, acc);
            for (int32_t ox = 0; ox < l->out_w; ++ox) {{
                *out++ = {store}; {store_comment}
            }}
        }}
    }}
}}
"""

_POOL_TYPE = """
typedef struct {
    int32_t channels, in_h, in_w, out_h, out_w;
    int32_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
} ptq_pool;
"""

_MAXPOOL = """
/* Max over each window clipped to the map: padding acts as -infinity, as in PyTorch.
 * Every window holds at least one input value (check_deployable: padding <= kernel / 2). */
static void {name}(const ptq_pool *p, const {t} *in, {t} *out)
{{
    for (int32_t c = 0; c < p->channels; ++c) {{
        for (int32_t oy = 0; oy < p->out_h; ++oy) {{
            const int32_t y0 = oy * p->stride_h - p->pad_h;
            const int32_t y_begin = y0 < 0 ? 0 : y0;
            const int32_t y_end = y0 + p->kernel_h < p->in_h ? y0 + p->kernel_h : p->in_h;
            for (int32_t ox = 0; ox < p->out_w; ++ox) {{
                const int32_t x0 = ox * p->stride_w - p->pad_w;
                const int32_t x_begin = x0 < 0 ? 0 : x0;
                const int32_t x_end = x0 + p->kernel_w < p->in_w ? x0 + p->kernel_w : p->in_w;
                {t} best = {t_min};
                for (int32_t y = y_begin; y < y_end; ++y) {{
                    for (int32_t x = x_begin; x < x_end; ++x) {{
                        const {t} value = in[(c * p->in_h + y) * p->in_w + x];
                        if (value > best) {{
                            best = value;
                        }}
                    }}
                }}
                *out++ = best;
            }}
        }}
    }}
}}
"""

_AVGPOOL = """
/* The int32 sum of each window (zero padding adds 0; the area, padding included, is inside the
 * multiplier S_in / (S_out * area)), requantized. |sum| <= max|x| * area < 2^31 (checked). */
static void {name}(const ptq_pool *p, const ptq_rescale *r, const {in_t} *in, {out_t} *out)
{{
    for (int32_t c = 0; c < p->channels; ++c) {{
        for (int32_t oy = 0; oy < p->out_h; ++oy) {{
            const int32_t y0 = oy * p->stride_h - p->pad_h;
            const int32_t y_begin = y0 < 0 ? 0 : y0;
            const int32_t y_end = y0 + p->kernel_h < p->in_h ? y0 + p->kernel_h : p->in_h;
            for (int32_t ox = 0; ox < p->out_w; ++ox) {{
                const int32_t x0 = ox * p->stride_w - p->pad_w;
                const int32_t x_begin = x0 < 0 ? 0 : x0;
                const int32_t x_end = x0 + p->kernel_w < p->in_w ? x0 + p->kernel_w : p->in_w;
                int32_t sum = 0;
                for (int32_t y = y_begin; y < y_end; ++y) {{
                    for (int32_t x = x_begin; x < x_end; ++x) {{
                        sum += in[(c * p->in_h + y) * p->in_w + x];
                    }}
                }}
                *out++ = ({out_t})ptq_requantize(sum, r->multiplier, r->shift, r->out_min, r->out_max);
            }}
        }}
    }}
}}
"""

_ADD_TYPE = """
/* The integer residual add (TFLite's ADD): each input q becomes q * 2^left_shift (a product, never
 * a shift of a negative value), is requantized to the common grid, the two are summed in int32
 * and the sum requantized to the output. The generator checks |q * 2^left_shift| and the sum in int32. */
typedef struct {
    int32_t size;        /* values per input */
    int32_t left_factor; /* 2^left_shift */
    ptq_rescale a, b;    /* each input to the common grid, int32 saturation */
    ptq_rescale out;     /* the sum to the output scale, with the fused activation's clamp */
} ptq_add_op;
"""

_ADD = """
static void {name}(const ptq_add_op *p, const {a_t} *a, const {b_t} *b, {out_t} *out)
{{
    for (int32_t i = 0; i < p->size; ++i) {{
        const int32_t scaled_a = ptq_requantize(a[i] * p->left_factor, p->a.multiplier, p->a.shift,
                                                p->a.out_min, p->a.out_max);
        const int32_t scaled_b = ptq_requantize(b[i] * p->left_factor, p->b.multiplier, p->b.shift,
                                                p->b.out_min, p->b.out_max);
        out[i] = ({out_t})ptq_requantize(scaled_a + scaled_b, p->out.multiplier, p->out.shift,
                                        p->out.out_min, p->out.out_max);
    }}
}}
"""

_COPY = """
/* A concat input already at the output's scale and range: its values as they are. */
static void {name}(const {t} *in, {t} *out, int32_t size)
{{
    for (int32_t i = 0; i < size; ++i) {{
        out[i] = in[i];
    }}
}}
"""

_RESCALE = """
/* A concat input requantized to the output's scale. */
static void {name}(const ptq_rescale *r, const {in_t} *in, {out_t} *out, int32_t size)
{{
    for (int32_t i = 0; i < size; ++i) {{
        out[i] = ({out_t})ptq_requantize(in[i], r->multiplier, r->shift, r->out_min, r->out_max);
    }}
}}
"""

_CLAMP = """
/* A standalone ReLU / ReLU6: the integers clamped to [low, high] at an unchanged scale. */
static void {name}(const {t} *in, {t} *out, int32_t size, int32_t low, int32_t high)
{{
    for (int32_t i = 0; i < size; ++i) {{
        const int32_t value = in[i];
        out[i] = ({t})(value < low ? low : (value > high ? high : value));
    }}
}}
"""

C_TYPES = {"s8": "int8_t", "u8": "uint8_t", "s32": "int32_t"}
TYPE_MIN = {"s8": "INT8_MIN", "u8": "0"}  # a max-pool's start: the least value of the type


def type_tag(info: TensorInfo) -> str:
    """The C storage of a tensor: "s8" (int8_t, 2..8-bit signed), "u8" (uint8_t, unsigned), "s32" (int32_t logits)."""
    if info.bits == 32:
        return "s32"
    return "s8" if info.signed else "u8"


@dataclass(frozen=True)
class Kernel:
    """One generated static function: its name, its template and the C types it is made for."""

    name: str
    template: str
    types: tuple[tuple[str, str], ...]  # (placeholder, tag) pairs

    def text(self) -> str:
        fields = {placeholder: C_TYPES[tag] for placeholder, tag in self.types}
        if self.template is _MAXPOOL:
            fields["t_min"] = TYPE_MIN[dict(self.types)["t"]]
        if self.template is _CONV_OUT:
            in_tag, out_tag = dict(self.types)["in_t"], dict(self.types)["out_t"]
            fields["accumulate_row"] = _accumulate_row(in_tag).name
            fields["store"] = ("ptq_output(l, acc[ox], oc)" if out_tag == "s32"
                               else f"({C_TYPES[out_tag]})ptq_output(l, acc[ox], oc)")
            fields["store_comment"] = ("" if out_tag == "s32"
                                       else f"/* saturated to [out_min, out_max] within {C_TYPES[out_tag]} */")
        return self.template.format(name=self.name, **fields).replace(" \n", "\n")


def _accumulate_row(in_tag: str) -> Kernel:
    return Kernel("ptq_accumulate_row" + ("" if in_tag == "s8" else f"_{in_tag}"), _ACCUMULATE_ROW,
                  (("in_t", in_tag),))


def _node_kernel(model: IntegerModel, node: IntNode, part: int = 0) -> Kernel | None:
    """The kernel that runs ``node`` (for a concat: its input ``part``); None for a flatten.

    Names: the int8 kernels keep their plain names (``ptq_conv_s8``: int8 in, int8 out); other
    types name theirs (``ptq_conv_u8`` writes uint8, ``ptq_conv_u8_s32`` reads uint8, writes int32).
    """
    tags = [type_tag(model.tensors[name]) for name in int_node_inputs(node)]
    out = type_tag(model.tensors[node.output])
    if isinstance(node, IntConv):
        return Kernel(f"ptq_conv_{'' if tags[0] == 's8' else tags[0] + '_'}{out}", _CONV_OUT,
                      (("in_t", tags[0]), ("out_t", out)))
    if isinstance(node, IntMaxPool):
        return Kernel("ptq_maxpool" + ("" if out == "s8" else f"_{out}"), _MAXPOOL, (("t", out),))
    if isinstance(node, IntAvgPool):
        suffix = "" if (tags[0], out) == ("s8", "s8") else f"_{tags[0]}_{out}"
        return Kernel("ptq_avgpool" + suffix, _AVGPOOL, (("in_t", tags[0]), ("out_t", out)))
    if isinstance(node, IntAdd):
        suffix = "" if (*tags, out) == ("s8", "s8", "s8") else f"_{tags[0]}_{tags[1]}_{out}"
        return Kernel("ptq_add" + suffix, _ADD, (("a_t", tags[0]), ("b_t", tags[1]), ("out_t", out)))
    if isinstance(node, IntClamp):
        return Kernel(f"ptq_clamp_{out}", _CLAMP, (("t", out),))
    if isinstance(node, IntConcat):
        if node.input_requantize[part] is None:
            return Kernel(f"ptq_copy_{out}", _COPY, (("t", out),))
        suffix = "s8" if (tags[part], out) == ("s8", "s8") else f"{tags[part]}_{out}"
        return Kernel(f"ptq_rescale_{suffix}", _RESCALE, (("in_t", tags[part]), ("out_t", out)))
    return None


# ---------------------------------------------------------------- model.c: node structs and calls


def _struct(c_type: str, name: str, lines: list[dict[str, Any]]) -> str:
    """A static const struct with C99 designated initializers, one group of fields a line."""
    body = ",\n    ".join(", ".join(f".{key} = {value}" for key, value in line.items()) for line in lines)
    return f"static const {c_type} {name} = {{\n    {body}\n}};\n"


def _rescale_fields(rq: Requantize) -> str:
    return (f"{{ {int(channel_values(rq.multiplier)[0])}, {int(channel_values(rq.shift)[0])}, "
            f"{_c_int(rq.clamp_min)}, {_c_int(rq.clamp_max)} }}")


def _rescale_struct(name: str, rq: Requantize) -> str:
    return f"static const ptq_rescale {name} = {_rescale_fields(rq)};\n"


def _map_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of a map, or (K, 1, 1) of a flat tensor (a linear layer's 1x1 view)."""
    return (shape[0], shape[1], shape[2]) if len(shape) == 3 else (numel(shape), 1, 1)


def _conv_struct(model: IntegerModel, layer: IntConv, name: str) -> str:
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
        {"channel_step": channel_step, "out_min": _c_int(out_min), "out_max": _c_int(out_max)},
        {"group_in_c": int(layer.weight.shape[1]), "group_out_c": out_c // layer.groups},
        {"in_h": in_h, "in_w": in_w, "out_c": out_c, "out_h": out_h, "out_w": out_w},
        {"kernel_h": kernel_h, "kernel_w": kernel_w, "stride_h": stride_h, "stride_w": stride_w},
        {"pad_h": pad_h, "pad_w": pad_w},
    ]
    return _struct("ptq_conv", f"{name}_op", lines)


def _pool_struct(model: IntegerModel, node: IntMaxPool | IntAvgPool, name: str) -> str:
    channels, in_h, in_w = model.tensors[node.input].shape
    _, out_h, out_w = model.tensors[node.output].shape
    (kernel_h, kernel_w), (stride_h, stride_w), (pad_h, pad_w) = node.kernel, node.stride, node.padding
    lines = [
        {"channels": channels, "in_h": in_h, "in_w": in_w, "out_h": out_h, "out_w": out_w},
        {"kernel_h": kernel_h, "kernel_w": kernel_w, "stride_h": stride_h, "stride_w": stride_w},
        {"pad_h": pad_h, "pad_w": pad_w},
    ]
    text = _struct("ptq_pool", f"{name}_op", lines)
    if isinstance(node, IntAvgPool):
        text += _rescale_struct(f"{name}_rq", node.requantize)
    return text


def _node_structs(model: IntegerModel, node: IntNode, name: str) -> str:
    if isinstance(node, IntConv):
        return _conv_struct(model, node, name)
    if isinstance(node, (IntMaxPool, IntAvgPool)):
        return _pool_struct(model, node, name)
    if isinstance(node, IntAdd):
        rq_a, rq_b = node.input_requantize
        lines = [
            {"size": numel(model.tensors[node.output].shape), "left_factor": 1 << node.left_shift},
            {"a": _rescale_fields(rq_a), "b": _rescale_fields(rq_b)},
            {"out": _rescale_fields(node.output_requantize)},
        ]
        return _struct("ptq_add_op", f"{name}_op", lines)
    if isinstance(node, IntConcat):
        return "".join(
            _rescale_struct(f"{name}_rq{index}", rq) for index, rq in enumerate(node.input_requantize) if rq is not None
        )
    return ""


def _calls(model: IntegerModel, index: int, node: IntNode, name: str, storage: TensorStorage) -> list[str]:
    """The statements of ``ptq_model_run`` for ``node``, the ``index``-th."""
    shapes = [model.tensors[tensor].shape for tensor in int_node_inputs(node)]
    out_shape = model.tensors[node.output].shape
    comment = f"/* node {index} {_comment(node.name)}: {', '.join(map(str, shapes))} -> {out_shape} */"
    place = storage.place
    out = place(node.output)
    kernel = _node_kernel(model, node)
    if isinstance(node, IntConv):
        return [f"{kernel.name}(&{name}_op, {place(node.input)}, {out}); {comment}"]
    if isinstance(node, IntMaxPool):
        return [f"{kernel.name}(&{name}_op, {place(node.input)}, {out}); {comment}"]
    if isinstance(node, IntAvgPool):
        return [f"{kernel.name}(&{name}_op, &{name}_rq, {place(node.input)}, {out}); {comment}"]
    if isinstance(node, IntAdd):
        return [f"{kernel.name}(&{name}_op, {place(node.inputs[0])}, {place(node.inputs[1])}, {out}); {comment}"]
    if isinstance(node, IntClamp):
        size = numel(out_shape)
        return [f"{kernel.name}({place(node.input)}, {out}, {size}, {node.clamp_min}, {node.clamp_max}); {comment}"]
    if isinstance(node, IntConcat):
        lines = [comment]
        start = 0
        for part, (tensor, rq) in enumerate(zip(node.inputs, node.input_requantize, strict=True)):
            size = numel(model.tensors[tensor].shape)
            target = place(node.output, start)
            function = _node_kernel(model, node, part).name
            if rq is None:
                lines.append(f"{function}({place(tensor)}, {target}, {size});")
            else:
                lines.append(f"{function}(&{name}_rq{part}, {place(tensor)}, {target}, {size});")
            start += size
        return lines
    if isinstance(node, IntReshape):
        return [f"/* node {index} {_comment(node.name)}: {shapes[0]} -> {out_shape}, no data moves ({out}) */"]
    raise TypeError(f"unknown integer node {node!r}")


def _arena_comment(model: IntegerModel, storage: TensorStorage) -> str:
    plan = storage.arena
    lines = [
        f"/* The activation arena: {plan.size} bytes for {len(plan.lifetimes)} one-byte tensors of "
        f"{plan.tensor_bytes()} bytes in all.",
        " * A tensor is live from the node that writes it to the last node that reads it (node indices",
        " * of ptq_model_run, a flatten's readers counting for its input); tensors live at the same",
        " * node never share a byte (greedy first fit, largest first: pipeline.export.c_model.plan_arena).",
        f" * {'tensor':<32} {'offset':>8} {'bytes':>8}  nodes",
    ]
    for lifetime in sorted(plan.lifetimes, key=lambda item: (plan.offsets[item.name], item.first)):
        lines.append(
            f" * {_comment(lifetime.name):<32} {plan.offsets[lifetime.name]:>8} {lifetime.size:>8}  "
            f"{lifetime.first}..{lifetime.last}"
        )
    aliases = [f"{_comment(name)} = {_comment(root)}" for name, root in storage.root.items() if name != root]
    lines.append(f" * Not in the arena: {_comment(storage.input)} (the caller's input), "
                 f"{_comment(storage.logits)} (the caller's logits).")
    if aliases:
        lines.append(f" * Flattens (no data moves): {', '.join(aliases)}.")
    return "\n".join(lines) + "\n */\n"


def _used_kernels(model: IntegerModel) -> list[Kernel]:
    """Every kernel the nodes call, once each, a layer's row accumulator before it, in a fixed order."""
    kernels: dict[str, Kernel] = {}
    for node in model.nodes:
        parts = range(len(node.inputs)) if isinstance(node, IntConcat) else range(1)
        for kernel in (_node_kernel(model, node, part) for part in parts):
            if kernel is None:
                continue
            if kernel.template is _CONV_OUT:
                row = _accumulate_row(dict(kernel.types)["in_t"])
                kernels.setdefault(row.name, row)
            kernels.setdefault(kernel.name, kernel)
    order = [_ACCUMULATE_ROW, _CONV_OUT, _MAXPOOL, _AVGPOOL, _ADD, _COPY, _RESCALE, _CLAMP]
    return sorted(kernels.values(), key=lambda kernel: (order.index(kernel.template), kernel.name))


def _source(model: IntegerModel, names: dict[str, str], storage: TensorStorage) -> str:
    types = {type(node) for node in model.nodes}
    convs = model.layers()
    row_max = max(_map_shape(model.tensors[layer.output].shape)[2] for layer in convs)
    # Only the kernels the model uses: an unused static function fails -Wall -Werror.
    parts = [_PREAMBLE, "\n", _arena_comment(model, storage)]
    if storage.arena.size:
        parts.append(f"static int8_t {ARENA}[{storage.arena.size}];\n")
    parts += [_REQUANTIZE, f"\n#define PTQ_ROW_MAX {row_max} /* the widest layer output row: int32 accumulators "
                           "on the stack */\n", _CONV]
    if types & {IntMaxPool, IntAvgPool}:
        parts.append(_POOL_TYPE)
    if IntAdd in types:
        parts.append(_ADD_TYPE)
    parts += [kernel.text() for kernel in _used_kernels(model)]
    parts.append("\n")
    parts += [_node_structs(model, node, names[node.name]) for node in model.nodes]
    parts.append(
        "\nvoid ptq_model_run(const int8_t input[PTQ_MODEL_INPUT_SIZE], int32_t logits[PTQ_MODEL_OUTPUT_SIZE])\n{\n"
    )
    for index, node in enumerate(model.nodes):
        parts += [f"    {line}\n" for line in _calls(model, index, node, names[node.name], storage)]
    parts.append("}\n")
    return "".join(parts)


__all__ = [
    "ARENA", "ArenaPlan", "CSources", "C_FILES", "Lifetime", "TensorStorage", "generate_c",
    "peak_live_bytes", "plan_arena", "tensor_storage", "write_c_sources",
]
