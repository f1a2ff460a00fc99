"""C99 sources for an ``IntegerModel``: ``model.h`` (the API), ``model_data.h`` (constants), ``model.c`` (the network).

The generated C is bit-exact with ``pipeline.quant.engine.run_integer``, node by node, because
every kernel computes the integer semantics of ``pipeline.quant.ops`` with integer
arithmetic that cannot overflow or round differently:

- integer arithmetic only (no float, no malloc), freestanding headers only (``stdint.h``,
  ``stddef.h``), so it builds for a microcontroller as it is;
- each op runs as its emitter in ``pipeline.export.c_ops`` says (``C_EMITTERS``, keyed by node
  type: its kernels, from the ``.c`` templates of ``c_kernels/``, its constants, its calls and the
  limits of its C types, each explained there); this module names no node type;
- every tensor but the caller's input and logits lives in one static arena, planned by tensor
  liveness (``pipeline.export.c_arena``);
- the generator checks, beyond ``check_deployable``, that the C's int8/int32 types hold every
  value a kernel computes (``_check_c_limits``), and defines only the kernels the model calls.

Input: one image, int8, NCHW order (C, H, W), as ``quantize_input`` makes it.
Output: int32 logits at ``model.output_scale`` (int8 logits widened into them), as ``run_integer``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.export.c_arena import ARENA, ArenaPlan, TensorStorage, tensor_storage
from pipeline.export.c_ops import (
    C_EMITTERS,
    KERNEL_ORDER,
    CallSite,
    Kernel,
    c_comment,
    emitter_of,
    fill,
    scale_text,
)
from pipeline.export.plan import check_deployable
from pipeline.graph.nodes import numel
from pipeline.io import atomic_path
from pipeline.quant.ir import IntegerModel, parameter_bytes

C_FILES = ("model.h", "model_data.h", "model.c")


def _check_c_limits(model: IntegerModel) -> None:
    """Raise ``ValueError`` (``OverflowError`` for int32 overflow) where the C's int8/int32 types cannot hold a value.

    ``check_deployable`` covers the layers' accumulators; each emitter's ``check`` the other int32
    intermediates of its op, and here every saturation of an output must lie within the output's own range.
    """
    for index, node in enumerate(model.nodes):
        where = f"node {index} ({node.name!r}, {type(node).__name__})"
        emitter = emitter_of(node)
        if emitter.check is not None:
            emitter.check(node, model, where)
        out = model.tensors[node.output]
        low, high = out.range
        for clamp_min, clamp_max in emitter.saturations(node):
            if not low <= clamp_min <= clamp_max <= high:
                raise ValueError(
                    f"{where} saturates to [{clamp_min}, {clamp_max}], which is not a range within its "
                    f"{out.type_name} output [{low}, {high}]"
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


# ---------------------------------------------------------------- model_data.h


def _data_header(model: IntegerModel, names: dict[str, str]) -> tuple[str, int]:
    """The text of model_data.h and the bytes of constants the model has (``parameter_bytes``)."""
    chunks = [emitter_of(node).data(node, model, names[node.name]) for node in model.nodes]
    total = parameter_bytes(model)
    head = (
        "/* model_data.h: the constants of the integer model. Generated by pipeline.export.c_model; do not edit.\n"
        " * Included by model.c only (the arrays are static). Scheme: r ~= S * q, symmetric, zero point 0;\n"
        f" * weights int8, biases int32; {total} bytes of constants in all, with the rescalings of the\n"
        " * other nodes, which model.c keeps beside them. */\n"
        "#ifndef PTQ_MODEL_DATA_H\n#define PTQ_MODEL_DATA_H\n\n#include <stdint.h>\n\n"
    )
    return head + "\n".join(chunk for chunk in chunks if chunk) + "\n#endif /* PTQ_MODEL_DATA_H */\n", total


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
    output = model.tensors[model.output]
    logits_kind = "int32 logits" if output.bits == 32 else f"int32 logits holding int{output.bits} values [-128, 127]"
    return f"""/* model.h: the integer CIFAR-10 network. Generated by pipeline.export.c_model; do not edit.
 *
 * Input: one image as int8 {layout}
 *   q = clamp(round_half_to_even(x_normalized / S_in), {input_min}, {input_max}), S_in = {model.input_scale!r},
 *   x_normalized = (pixel / 255 - mean[c]) / std[c] ({normalization})
 *   (pipeline.quant.engine.quantize_input).
 * Output: {output_size} {logits_kind} at scale {scale_text(model.output_scale)};
 *   the predicted class is the index of the largest (the first of equal ones).
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


# ---------------------------------------------------------------- model.c


def _arena_comment(storage: TensorStorage) -> str:
    plan = storage.arena
    lines = [
        f"/* The activation arena: {plan.size} bytes for {len(plan.lifetimes)} one-byte tensors of "
        f"{plan.tensor_bytes()} bytes in all.",
        " * A tensor is live from the node that writes it to the last node that reads it (node indices",
        " * of ptq_model_run, a flatten's readers counting for its input); tensors live at the same",
        " * node never share a byte (greedy first fit, largest first: pipeline.export.c_arena.plan_arena).",
        f" * {'tensor':<32} {'offset':>8} {'bytes':>8}  nodes",
    ]
    for lifetime in sorted(plan.lifetimes, key=lambda item: (plan.offsets[item.name], item.first)):
        lines.append(
            f" * {c_comment(lifetime.name):<32} {plan.offsets[lifetime.name]:>8} {lifetime.size:>8}  "
            f"{lifetime.first}..{lifetime.last}"
        )
    aliases = [f"{c_comment(name)} = {c_comment(root)}" for name, root in storage.root.items() if name != root]
    lines.append(f" * Not in the arena: {c_comment(storage.input)} (the caller's input), "
                 f"{c_comment(storage.logits)} (the caller's logits).")
    if aliases:
        lines.append(f" * Flattens (no data moves): {', '.join(aliases)}.")
    return "\n".join(lines) + "\n */\n"


def _used_kernels(model: IntegerModel) -> list[Kernel]:
    """Every kernel the nodes call, once each, each after the kernels it calls, in the table's order."""
    kernels: dict[str, Kernel] = {}
    for node in model.nodes:
        for kernel in emitter_of(node).kernels(node, model):
            kernels.setdefault(kernel.name, kernel)
    return sorted(kernels.values(), key=lambda kernel: (KERNEL_ORDER.index(kernel.template), kernel.name))


def _definitions(model: IntegerModel) -> list[str]:
    """The shared C text (types, helpers) of the ops the model uses, in the table's order, each text once."""
    types = {type(node) for node in model.nodes}
    texts = [text for node_type, emitter in C_EMITTERS.items() if node_type in types
             for text in emitter.definitions(model)]
    return list(dict.fromkeys(texts))


def _source(model: IntegerModel, names: dict[str, str], storage: TensorStorage) -> str:
    # Only the kernels the model uses: an unused static function fails -Wall -Werror.
    parts = [fill("preamble"), "\n", _arena_comment(storage)]
    if storage.arena.size:
        parts.append(f"static int8_t {ARENA}[{storage.arena.size}];\n")
    # ptq_requantize with the model's rounding rule (fixed_point.ROUNDINGS)
    parts.append("\n" + fill("requantize" if model.rounding == "single" else "requantize_double"))
    parts += ["\n" + text for text in _definitions(model)]
    parts += [kernel.text() for kernel in _used_kernels(model)]
    parts.append("\n")
    parts += [emitter_of(node).structs(node, model, names[node.name]) for node in model.nodes]
    parts.append(
        "\nvoid ptq_model_run(const int8_t input[PTQ_MODEL_INPUT_SIZE], int32_t logits[PTQ_MODEL_OUTPUT_SIZE])\n{\n"
    )
    for index, node in enumerate(model.nodes):
        site = CallSite(model, index, names[node.name], storage)
        parts += [f"    {line}\n" for line in emitter_of(node).calls(node, site)]
    parts.append("}\n")
    return "".join(parts)


__all__ = ["C_FILES", "CSources", "generate_c", "write_c_sources"]
