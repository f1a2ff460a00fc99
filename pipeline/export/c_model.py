"""C99 sources for an ``IntegerModel``: ``model.h`` (the API), ``model_data.h`` (constants), ``model.c`` (the network).

The generated C is bit-exact with ``pipeline.quant.engine.run_integer``:

- integer arithmetic only (no float, no malloc), freestanding headers only
  (``stdint.h``, ``stddef.h``), so it builds for a microcontroller as it is;
- int32 accumulators: every layer's worst-case |acc| is checked below 2^31
  before generating (``plan_model``), so no partial sum overflows;
- requantization exactly as ``pipeline.quant.fixed_point.requantize``:
  int64 product, + 2^(30 - shift), floor division by 2^(31 - shift)
  (round half up), saturation. C99 leaves ``>>`` of a negative value
  implementation-defined, so the generated code never shifts one: it floors
  negative x as ``~(~x >> n)``, exact because ``int64_t`` is two's complement
  by definition (C99 7.18.1.1);
- activations live in two static int8 ping-pong buffers (each op reads one
  and writes the other); their total is the model's static RAM. A layer
  accumulates one output row at a time in int32 on the stack
  (4 bytes x the widest output row), each kernel tap sweeping the row, so the
  innermost loop is a contiguous multiply-add a compiler can vectorize.

Input: one image, int8, NCHW order (C, H, W), as ``quantize_input`` makes it.
Output: int32 logits at the last layer's output scale, as ``run_integer``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.export.plan import CIFAR10_INPUT_SHAPE, Step, as_array, channel_values, layer_steps, plan_model
from pipeline.io import atomic_path
from pipeline.quant.model import IntegerModel

C_FILES = ("model.h", "model_data.h", "model.c")
VALUES_PER_LINE = 16
BUFFER_NAMES = ("ptq_buffer_a", "ptq_buffer_b")


@dataclass(frozen=True)
class CSources:
    """The three generated files' text, and the memory figures the generator knows without a compiler."""

    header: str  # model.h
    data: str  # model_data.h
    source: str  # model.c
    static_ram_bytes: int  # the two activation buffers
    parameter_bytes: int  # weights, biases, multipliers and shifts (const: flash, not RAM)

    def files(self) -> dict[str, str]:
        """File name -> text."""
        return {"model.h": self.header, "model_data.h": self.data, "model.c": self.source}


def generate_c(model: IntegerModel, input_shape: tuple[int, int, int] = CIFAR10_INPUT_SHAPE) -> CSources:
    """The C sources of ``model`` for inputs of ``input_shape`` (C, H, W); see the module docstring."""
    steps = plan_model(model, input_shape)
    names = _identifiers(steps)
    routing, buffer_sizes = _route_buffers(steps)
    data, parameter_bytes = _data_header(steps, names)
    static_ram = sum(buffer_sizes)
    header = _api_header(model, steps, static_ram, parameter_bytes)
    source = _source(steps, names, routing, buffer_sizes)
    return CSources(header, data, source, static_ram, parameter_bytes)


def write_c_sources(
    model: IntegerModel, directory: str | os.PathLike, input_shape: tuple[int, int, int] = CIFAR10_INPUT_SHAPE
) -> CSources:
    """``generate_c`` and write ``model.h``, ``model_data.h``, ``model.c`` into ``directory``, each atomically."""
    sources = generate_c(model, input_shape)
    for name, text in sources.files().items():
        with atomic_path(Path(directory) / name) as tmp:
            tmp.write_text(text)
    return sources


# ---------------------------------------------------------------- naming and memory


def _identifiers(steps: list[Step]) -> dict[int, str]:
    """A C identifier prefix per op: its name where that is one (``conv1``), else ``op<index>_<name>``."""
    names: dict[int, str] = {}
    for step in steps:
        base = re.sub(r"\W", "_", str(step.op.get("name", "")))
        if not re.fullmatch(r"[A-Za-z_]\w*", base) or base in names.values():
            base = f"op{step.index}_{base}"
        names[step.index] = base
    return names


def _route_buffers(steps: list[Step]) -> tuple[dict[int, tuple[str, str]], list[int]]:
    """(source, destination) of every data-moving op, and the size in bytes each ping-pong buffer needs.

    Each op writes the buffer its input is not in; the last layer writes the
    caller's logits and the first op reads the caller's input, so the buffers
    only hold int8 activations between ops. Flatten moves nothing.
    """
    routing: dict[int, tuple[str, str]] = {}
    sizes = [0, 0]
    last_layer = layer_steps(steps)[-1].index
    current = "input"
    for step in steps:
        if step.op["op"] == "flatten":
            continue
        if step.index == last_layer:
            routing[step.index] = (current, "logits")
            break
        target = 1 if current == BUFFER_NAMES[0] else 0
        sizes[target] = max(sizes[target], step.out_size)  # int8: one byte per value
        routing[step.index] = (current, BUFFER_NAMES[target])
        current = BUFFER_NAMES[target]
    return routing, sizes


# ---------------------------------------------------------------- model_data.h


def _c_array(c_type: str, name: str, values: np.ndarray) -> str:
    # Every value fits the C type's literal range: weights int8, biases and multipliers in (-2^31, 2^31).
    flat = [str(int(value)) for value in np.asarray(values).reshape(-1)]
    lines = [", ".join(flat[start : start + VALUES_PER_LINE]) for start in range(0, len(flat), VALUES_PER_LINE)]
    body = ",\n    ".join(lines)
    return f"static const {c_type} {name}[{len(flat)}] = {{\n    {body}\n}};\n"


def _scale_text(scale: Any) -> str:
    values = as_array(scale, np.float64).reshape(-1)
    if values.size == 1:
        return f"{values[0]:.9g} (per tensor)"
    return f"per output channel, {values.size} values in [{values.min():.9g}, {values.max():.9g}]"


def _layer_data(step: Step, name: str) -> tuple[str, int]:
    op = step.op
    weight = as_array(op["weight"], np.int8)
    bias = as_array(op["bias"], np.int32)
    accumulator_scale = op["input_scale"] * as_array(op["weight_scale"], np.float64)
    layout = "(out, in, kernel_h, kernel_w)" if weight.ndim == 4 else "(out, in)"
    parts = [
        f"/* {name} ({op['op']}): input {step.in_shape} -> output {step.out_shape} */\n",
        f"/* weight {tuple(weight.shape)} int8, row-major {layout}; scale S_w = {_scale_text(op['weight_scale'])} */\n",
        _c_array("int8_t", f"{name}_weight", weight),
        f"/* bias ({bias.size},) int32 at the accumulator scale S_in*S_w = {_scale_text(accumulator_scale)} */\n",
        _c_array("int32_t", f"{name}_bias", bias),
    ]
    size = weight.size + 4 * bias.size
    if op["requantize"]:
        multiplier, shift = channel_values(op["multiplier"]), channel_values(op["shift"])
        target = f"int{op['output_bits']} at S_out = {_scale_text(op['output_scale'])}"
        parts += [
            f"/* requantization to {target}: M = S_in*S_w/S_out ~= multiplier * 2^(shift - 31), "
            f"multiplier Q0.31 in [2^30, 2^31) or 0 */\n",
            _c_array("int32_t", f"{name}_multiplier", multiplier),
            "/* shift: power-of-two exponent of M, in [-31, 30] */\n",
            _c_array("int32_t", f"{name}_shift", shift),
        ]
        size += 4 * (multiplier.size + shift.size)
    return "".join(parts), size


def _data_header(steps: list[Step], names: dict[int, str]) -> tuple[str, int]:
    """The text of model_data.h and the bytes of constants it defines."""
    chunks, total = [], 0
    for step in layer_steps(steps):
        text, size = _layer_data(step, names[step.index])
        chunks.append(text)
        total += size
    head = (
        "/* model_data.h: the constants of the integer model. Generated by pipeline.export.c_model; do not edit.\n"
        " * Included by model.c only (the arrays are static). Scheme: r ~= S * q, symmetric, zero point 0;\n"
        f" * weights int8, biases int32, {total} bytes of constants in all. */\n"
        "#ifndef PTQ_MODEL_DATA_H\n#define PTQ_MODEL_DATA_H\n\n#include <stdint.h>\n\n"
    )
    return head + "\n".join(chunks) + "\n#endif /* PTQ_MODEL_DATA_H */\n", total


# ---------------------------------------------------------------- model.h


def _api_header(model: IntegerModel, steps: list[Step], static_ram: int, parameter_bytes: int) -> str:
    last = layer_steps(steps)[-1].op
    channels, height, width = steps[0].in_shape
    input_size, output_size = channels * height * width, steps[-1].out_size
    normalization = (
        f"mean {model.input_mean}, std {model.input_std}" if model.input_mean is not None else "as in training"
    )
    return f"""/* model.h: the integer CIFAR-10 network. Generated by pipeline.export.c_model; do not edit.
 *
 * Input: one image as int8 in NCHW order, (C, H, W) = ({channels}, {height}, {width}),
 *   value (c, y, x) at index (c * {height} + y) * {width} + x:
 *   q = clamp(round_half_to_even(x_normalized / S_in), -128, 127), S_in = {model.input_scale!r},
 *   x_normalized = (pixel / 255 - mean[c]) / std[c] ({normalization})
 *   (pipeline.quant.engine.quantize_input).
 * Output: {output_size} int32 logits at scale {_scale_text(last["output_scale"])};
 *   the predicted class is the index of the largest.
 * Bit-exact with pipeline.quant.engine.run_integer. Not reentrant: activations
 * live in static buffers.
 */
#ifndef PTQ_MODEL_H
#define PTQ_MODEL_H

#include <stdint.h>

#define PTQ_MODEL_INPUT_SIZE {input_size} /* int8 values per image */
#define PTQ_MODEL_OUTPUT_SIZE {output_size} /* int32 logits per image */
#define PTQ_MODEL_STATIC_RAM_BYTES {static_ram} /* the activation buffers */
#define PTQ_MODEL_PARAMETER_BYTES {parameter_bytes} /* const weights, biases, multipliers, shifts */

void ptq_model_run(const int8_t input[PTQ_MODEL_INPUT_SIZE], int32_t logits[PTQ_MODEL_OUTPUT_SIZE]);

#endif /* PTQ_MODEL_H */
"""


# ---------------------------------------------------------------- model.c

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

_CONV_TYPES = """
/* A conv2d, or a linear layer as a 1x1 convolution on a (K, 1, 1) map. */
typedef struct {
    const int8_t *weight;      /* (out_c, in_c, kernel_h, kernel_w), row-major */
    const int32_t *bias;       /* (out_c), at the accumulator scale S_in * S_w */
    const int32_t *multiplier; /* Q0.31, 1 or out_c values; NULL: output the raw accumulator */
    const int32_t *shift;      /* M = multiplier * 2^(shift - 31) */
    int32_t channel_step;      /* 1: one multiplier and shift per output channel; 0: one for all */
    int32_t out_min, out_max;  /* saturation; out_min 0 is the fused ReLU */
    int32_t in_c, in_h, in_w, out_c, out_h, out_w;
    int32_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
} ptq_conv;

/* floor(x / 2^n) for 0 < n < 63: the arithmetic right shift of the Python engine.
 * C99 leaves >> of a negative value implementation-defined, so a negative x is
 * shifted as ~x = -x - 1 >= 0 (two's complement): floor(x / 2^n) = ~(~x >> n). */
static int64_t ptq_floor_shift(int64_t x, int32_t n)
{
    return x >= 0 ? x >> n : ~(~x >> n);
}

/* pipeline.quant.fixed_point.requantize: y = floor((acc * multiplier + 2^(30 - shift)) / 2^(31 - shift)),
 * i.e. acc * M rounded half up, then saturated. |acc * multiplier| < 2^62 and the
 * rounding term is at most 2^61, so the int64 sum cannot overflow. */
static int32_t ptq_requantize(int32_t acc, int32_t multiplier, int32_t shift, int32_t out_min, int32_t out_max)
{
    const int32_t total_shift = 31 - shift;
    const int64_t rounding = (int64_t)1 << (total_shift - 1);
    const int64_t y = ptq_floor_shift((int64_t)acc * multiplier + rounding, total_shift);
    return (int32_t)(y < out_min ? out_min : (y > out_max ? out_max : y));
}

/* bias + sum of weight * input over the windows of output row (oc, oy), into acc[0 .. out_w).
 * Zero padding adds nothing, so each kernel tap visits only the outputs whose input lies in the
 * image. Every partial sum, in any order of the terms, is at most sum|w| * 128 + |bias| < 2^31
 * (checked by the generator): no int32 overflow. */
static void ptq_accumulate_row(const ptq_conv *l, const int8_t *in, int32_t oc, int32_t oy, int32_t *acc)
{
    /* Locals, not l->...: acc is written in the inner loop and could alias *l as far as the compiler knows. */
    const int32_t in_c = l->in_c, in_h = l->in_h, in_w = l->in_w, out_w = l->out_w;
    const int32_t kernel_h = l->kernel_h, kernel_w = l->kernel_w, stride_w = l->stride_w;
    const int32_t y0 = oy * l->stride_h - l->pad_h;
    const int32_t ky_begin = y0 < 0 ? -y0 : 0;
    const int32_t ky_end = in_h - y0 < kernel_h ? in_h - y0 : kernel_h;
    const int8_t *weights = l->weight + oc * in_c * kernel_h * kernel_w;
    const int32_t bias = l->bias[oc];
    for (int32_t ox = 0; ox < out_w; ++ox) {
        acc[ox] = bias;
    }
    for (int32_t kx = 0; kx < kernel_w; ++kx) {
        /* Input column ox * stride_w + offset must lie in [0, in_w): ox in [ox_begin, ox_end). */
        const int32_t offset = kx - l->pad_w;
        const int32_t ox_begin = offset >= 0 ? 0 : (stride_w - 1 - offset) / stride_w;
        const int32_t last = in_w - 1 - offset; /* the largest ox * stride_w allowed */
        const int32_t ox_stop = last < 0 ? 0 : last / stride_w + 1;
        const int32_t ox_end = ox_stop < out_w ? ox_stop : out_w;
        for (int32_t ic = 0; ic < in_c; ++ic) {
            for (int32_t ky = ky_begin; ky < ky_end; ++ky) {
                const int32_t w = weights[(ic * kernel_h + ky) * kernel_w + kx];
                const int8_t *row = in + (ic * in_h + y0 + ky) * in_w;
                if (stride_w == 1) { /* the common case, a separate loop so the compiler can vectorize it */
                    for (int32_t ox = ox_begin; ox < ox_end; ++ox) {
                        acc[ox] += w * row[ox + offset];
                    }
                } else {
                    for (int32_t ox = ox_begin; ox < ox_end; ++ox) {
                        acc[ox] += w * row[ox * stride_w + offset];
                    }
                }
            }
        }
    }
}

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

_CONV_S8 = """
static void ptq_conv_s8(const ptq_conv *l, const int8_t *in, int8_t *out)
{
    int32_t acc[PTQ_ROW_MAX]; /* one output row of accumulators, on the stack */
    for (int32_t oc = 0; oc < l->out_c; ++oc) {
        for (int32_t oy = 0; oy < l->out_h; ++oy) {
            ptq_accumulate_row(l, in, oc, oy, acc);
            for (int32_t ox = 0; ox < l->out_w; ++ox) {
                *out++ = (int8_t)ptq_output(l, acc[ox], oc); /* saturated to [out_min, out_max] within int8 */
            }
        }
    }
}
"""

_CONV_S32 = """
static void ptq_conv_s32(const ptq_conv *l, const int8_t *in, int32_t *out)
{
    int32_t acc[PTQ_ROW_MAX]; /* one output row of accumulators, on the stack */
    for (int32_t oc = 0; oc < l->out_c; ++oc) {
        for (int32_t oy = 0; oy < l->out_h; ++oy) {
            ptq_accumulate_row(l, in, oc, oy, acc);
            for (int32_t ox = 0; ox < l->out_w; ++ox) {
                *out++ = ptq_output(l, acc[ox], oc);
            }
        }
    }
}
"""

_MAXPOOL = """
typedef struct {
    int32_t channels, in_h, in_w, out_h, out_w;
    int32_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
} ptq_pool;

/* Max over each window clipped to the image: padding acts as -infinity, as in PyTorch.
 * Every window holds at least one input value (the generator checks padding <= kernel / 2). */
static void ptq_maxpool(const ptq_pool *p, const int8_t *in, int8_t *out)
{
    for (int32_t c = 0; c < p->channels; ++c) {
        for (int32_t oy = 0; oy < p->out_h; ++oy) {
            const int32_t y0 = oy * p->stride_h - p->pad_h;
            const int32_t y_begin = y0 < 0 ? 0 : y0;
            const int32_t y_end = y0 + p->kernel_h < p->in_h ? y0 + p->kernel_h : p->in_h;
            for (int32_t ox = 0; ox < p->out_w; ++ox) {
                const int32_t x0 = ox * p->stride_w - p->pad_w;
                const int32_t x_begin = x0 < 0 ? 0 : x0;
                const int32_t x_end = x0 + p->kernel_w < p->in_w ? x0 + p->kernel_w : p->in_w;
                int8_t best = INT8_MIN;
                for (int32_t y = y_begin; y < y_end; ++y) {
                    for (int32_t x = x_begin; x < x_end; ++x) {
                        const int8_t value = in[(c * p->in_h + y) * p->in_w + x];
                        if (value > best) {
                            best = value;
                        }
                    }
                }
                *out++ = best;
            }
        }
    }
}
"""


def _layer_struct(step: Step, name: str) -> str:
    op = step.op
    in_c, in_h, in_w = step.in_shape
    out_c, out_h, out_w = step.out_shape
    if op["op"] == "conv2d":
        (kernel_h, kernel_w), (stride_h, stride_w), (pad_h, pad_w) = op["weight"].shape[2:], op["stride"], op["padding"]
    else:
        kernel_h = kernel_w = stride_h = stride_w = 1
        pad_h = pad_w = 0
    if op["requantize"]:
        multiplier, shift = f"{name}_multiplier", f"{name}_shift"
        channel_step = int(channel_values(op["multiplier"]).size > 1)
        out_min, out_max = (-128, 127) if op["output_bits"] == 8 else ("INT32_MIN", "INT32_MAX")
    else:
        multiplier, shift, channel_step = "NULL", "NULL", 0
        out_min, out_max = "INT32_MIN", "INT32_MAX"
    if op["relu"]:
        out_min = 0
    lines = [
        {"weight": f"{name}_weight", "bias": f"{name}_bias", "multiplier": multiplier, "shift": shift},
        {"channel_step": channel_step, "out_min": out_min, "out_max": out_max},
        {"in_c": in_c, "in_h": in_h, "in_w": in_w, "out_c": out_c, "out_h": out_h, "out_w": out_w},
        {"kernel_h": kernel_h, "kernel_w": kernel_w, "stride_h": stride_h, "stride_w": stride_w},
        {"pad_h": pad_h, "pad_w": pad_w},
    ]
    return _struct("ptq_conv", f"{name}_op", lines)


def _struct(c_type: str, name: str, lines: list[dict[str, Any]]) -> str:
    """A static const struct with C99 designated initializers, one group of fields a line."""
    body = ",\n    ".join(", ".join(f".{key} = {value}" for key, value in line.items()) for line in lines)
    return f"static const {c_type} {name} = {{\n    {body}\n}};\n"


def _pool_struct(step: Step, name: str) -> str:
    op = step.op
    channels, in_h, in_w = step.in_shape
    _, out_h, out_w = step.out_shape
    (kernel_h, kernel_w), (stride_h, stride_w), (pad_h, pad_w) = op["kernel"], op["stride"], op["padding"]
    lines = [
        {"channels": channels, "in_h": in_h, "in_w": in_w, "out_h": out_h, "out_w": out_w},
        {"kernel_h": kernel_h, "kernel_w": kernel_w, "stride_h": stride_h, "stride_w": stride_w},
        {"pad_h": pad_h, "pad_w": pad_w},
    ]
    return _struct("ptq_pool", f"{name}_op", lines)


def _call(step: Step, name: str, source: str, destination: str, last_layer: int) -> str:
    if step.op["op"] == "maxpool2d":
        function = "ptq_maxpool"
    else:
        function = "ptq_conv_s32" if step.index == last_layer else "ptq_conv_s8"
    comment = f"/* {step.in_shape} -> {step.out_shape} */"
    return f"    {function}(&{name}_op, {source}, {destination}); {comment}\n"


def _source(steps: list[Step], names: dict[int, str], routing: dict[int, tuple[str, str]], sizes: list[int]) -> str:
    last_layer = layer_steps(steps)[-1].index
    moving = [step for step in steps if step.index in routing]
    # Only the kernels the model uses: an unused static function fails -Wall -Werror.
    row_max = max(step.out_shape[2] for step in layer_steps(steps))
    parts = [_PREAMBLE, f"\n#define PTQ_ROW_MAX {row_max} /* the widest layer output row: int32 accumulators on the stack */\n",
             _CONV_TYPES]
    if any(step.is_layer and step.index != last_layer for step in moving):
        parts.append(_CONV_S8)
    parts.append(_CONV_S32)
    if any(step.op["op"] == "maxpool2d" for step in moving):
        parts.append(_MAXPOOL)
    parts.append("\n/* Activations: each op reads one buffer and writes the other (bytes). */\n")
    parts += [f"static int8_t {buffer}[{size}];\n" for buffer, size in zip(BUFFER_NAMES, sizes, strict=True) if size]
    parts.append("\n")
    for step in moving:
        parts.append((_layer_struct if step.is_layer else _pool_struct)(step, names[step.index]))
    parts.append(
        "\nvoid ptq_model_run(const int8_t input[PTQ_MODEL_INPUT_SIZE], int32_t logits[PTQ_MODEL_OUTPUT_SIZE])\n{\n"
    )
    for step in steps:
        if step.index in routing:
            parts.append(_call(step, names[step.index], *routing[step.index], last_layer))
        else:
            parts.append(f"    /* {names[step.index]}: {step.in_shape} -> {step.out_shape}, no data moves */\n")
    parts.append("}\n")
    return "".join(parts)
