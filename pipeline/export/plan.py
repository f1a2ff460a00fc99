"""What both exporters (C and ONNX) check before they write anything: the integer graph is deployable.

``check_deployable`` walks the nodes of an ``IntegerModel`` and raises ``ValueError`` naming
the node for anything the exporters do not implement, so a model one of them accepts the
other accepts too. Shapes are per image, (C, H, W) for maps and (K,) after a flatten; in
memory every tensor is NCHW, so a flatten moves no data and a linear layer is a 1x1
convolution on a (K, 1, 1) map.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.graph.nodes import numel
from pipeline.quant.fixed_point import MAX_SHIFT, MIN_SHIFT
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
)
from pipeline.quant.ranges import check_accumulator


def pooled_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window (floor mode, no dilation), as PyTorch computes it."""
    return (size + 2 * padding - kernel) // stride + 1


def as_array(value: Any, dtype: type) -> np.ndarray:
    """A tensor, array or number as a numpy array of ``dtype``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def channel_values(values: Any) -> np.ndarray:
    """A scalar or per-channel tensor as a 1-D int64 array (one value for per-tensor)."""
    return as_array(values, np.int64).reshape(-1)


def _where(index: int, node: IntNode) -> str:
    return f"node {index} ({node.name!r}, {type(node).__name__})"


def _check_requantize(rq: Requantize, channels: int, where: str) -> None:
    multiplier, shift = channel_values(rq.multiplier), channel_values(rq.shift)
    if multiplier.size not in (1, channels) or shift.size != multiplier.size:
        raise ValueError(
            f"{where} needs 1 or {channels} multipliers and as many shifts, got {multiplier.size} and {shift.size}"
        )
    # The rounding term 2^(30 - shift) and the shift 31 - shift must stay in [1, 62] bits of int64.
    valid = (multiplier == 0) | ((multiplier >= 2**30) & (multiplier < 2**31))
    if not valid.all() or not ((shift >= MIN_SHIFT) & (shift <= MAX_SHIFT)).all():
        raise ValueError(
            f"{where} needs multipliers 0 or in [2^30, 2^31) and shifts in [{MIN_SHIFT}, {MAX_SHIFT}], "
            f"got multipliers {multiplier.tolist()}, shifts {shift.tolist()}"
        )
    if rq.clamp_min > rq.clamp_max:
        raise ValueError(f"{where} saturates to an empty range [{rq.clamp_min}, {rq.clamp_max}]")


def _window_shape(shape: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int], where: str) -> tuple[int, int]:
    if len(shape) != 3:
        raise ValueError(f"{where} needs a (C, H, W) input, got {shape}")
    sizes = zip(shape[1:], kernel, stride, padding, strict=True)
    out_h, out_w = (pooled_size(size, k, s, p) for size, k, s, p in sizes)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{where}: kernel {kernel}, stride {stride}, padding {padding} leave no output for {shape}")
    return out_h, out_w


def _expected_shape(model: IntegerModel, node: IntNode, where: str) -> tuple[int, ...]:
    shapes = [model.tensors[name].shape for name in int_node_inputs(node)]
    if isinstance(node, IntConv):
        return _layer_shape(node, shapes[0], where)
    if isinstance(node, (IntMaxPool, IntAvgPool)):
        if isinstance(node, IntMaxPool) and any(2 * p > k for p, k in zip(node.padding, node.kernel, strict=True)):
            # PyTorch's rule; it also means every window holds a real value, so padding (-inf) never wins
            raise ValueError(f"{where}: padding {node.padding} must be at most half the kernel {node.kernel}")
        return (shapes[0][0], *_window_shape(shapes[0], node.kernel, node.stride, node.padding, where))
    if isinstance(node, IntAdd):
        if shapes[0] != shapes[1]:
            raise ValueError(f"{where} adds tensors of different shapes {shapes[0]} and {shapes[1]}")
        return shapes[0]
    if isinstance(node, IntConcat):
        if any(len(shape) != 3 or shape[1:] != shapes[0][1:] for shape in shapes):
            raise ValueError(f"{where} concatenates maps of unequal H, W: {shapes}")
        return (sum(shape[0] for shape in shapes), *shapes[0][1:])
    if isinstance(node, IntReshape):
        return (numel(shapes[0]),)
    return shapes[0]


def _layer_shape(node: IntConv, shape: tuple[int, ...], where: str) -> tuple[int, ...]:
    weight = node.weight
    if node.kind == "linear":
        if len(shape) != 1 or weight.ndim != 2 or weight.shape[1] != shape[0]:
            raise ValueError(f"{where} needs a flat input of {weight.shape[1]} values and a 2-D weight, got {shape}")
        return (int(weight.shape[0]),)
    if weight.ndim != 4 or len(shape) != 3 or weight.shape[1] * node.groups != shape[0]:
        raise ValueError(
            f"{where} has weight {tuple(weight.shape)} with groups {node.groups} for input {shape}"
        )
    if weight.shape[0] % node.groups:
        raise ValueError(f"{where}: {weight.shape[0]} output channels are not a multiple of groups {node.groups}")
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    return (int(weight.shape[0]), *_window_shape(shape, kernel, node.stride, node.padding, where))


def _type_name(info: TensorInfo) -> str:
    return f"{'' if info.signed else 'u'}int{info.bits}"


def check_deployable(model: IntegerModel) -> None:
    """Raise ``ValueError`` naming the node for anything the exporters do not implement.

    Checks: every node's input exists before it and its output shape follows from its inputs;
    multipliers and shifts in range; every layer's worst-case accumulator below 2^31 (the
    exports accumulate in int32); only the logits are int32, and they are the model's output.
    """
    known = {model.input}
    if model.tensors[model.input].bits > 8 or not model.tensors[model.input].signed:
        raise ValueError(f"the input {model.input!r} must be signed and at most 8 bits wide (int8 storage)")
    for index, node in enumerate(model.nodes):
        where = _where(index, node)
        missing = [name for name in int_node_inputs(node) if name not in known]
        if missing:
            raise ValueError(f"{where} reads {missing}, which no earlier node writes")
        if node.output in known:
            raise ValueError(f"{where} writes {node.output!r}, which an earlier node already wrote")
        expected = _expected_shape(model, node, where)
        if model.tensors[node.output].shape != expected:
            raise ValueError(f"{where} outputs {model.tensors[node.output].shape}, but its inputs give {expected}")
        bits = [model.tensors[name].bits for name in int_node_inputs(node)]
        if any(b > 8 for b in bits) and not isinstance(node, IntReshape):
            raise ValueError(f"{where} reads int32 logits; only a flatten may follow the last layer")
        if model.tensors[node.output].bits not in (*range(2, 9), 32):
            raise ValueError(f"{where} writes int{model.tensors[node.output].bits}; the exporters store activations "
                             "in one byte and the logits in int32")
        if isinstance(node, IntReshape) and model.tensors[node.output].bits != bits[0]:
            raise ValueError(f"{where} changes int{bits[0]} to int{model.tensors[node.output].bits}; a flatten moves "
                             "no data")
        in_info, out_info = model.tensors[int_node_inputs(node)[0]], model.tensors[node.output]
        if (isinstance(node, (IntReshape, IntMaxPool, IntClamp)) and out_info.bits <= 8
                and (in_info.bits, in_info.signed) != (out_info.bits, out_info.signed)):
            raise ValueError(f"{where} changes {_type_name(in_info)} to {_type_name(out_info)}; it moves the "
                             "integers as they are")
        if isinstance(node, IntConv):
            check_accumulator(where, node.weight, node.bias, in_info.range)
            if node.requantize is not None:
                _check_requantize(node.requantize, int(node.weight.shape[0]), where)
            elif model.tensors[node.output].bits != 32:
                raise ValueError(f"{where} is not requantized, but only the logits may be raw accumulators")
        elif isinstance(node, IntAdd):
            for rq in (*node.input_requantize, node.output_requantize):
                _check_requantize(rq, 1, where)
        elif isinstance(node, IntAvgPool):
            _check_requantize(node.requantize, 1, where)
        elif isinstance(node, IntConcat):
            for name, rq in zip(node.inputs, node.input_requantize, strict=True):
                if rq is not None:
                    _check_requantize(rq, 1, where)
                elif model.tensors[name].range != out_info.range:
                    raise ValueError(f"{where} copies {name!r} ({_type_name(model.tensors[name])}) as it is into "
                                     f"{_type_name(out_info)}; an input of another range needs a Requantize")
        elif not isinstance(node, (IntMaxPool, IntClamp, IntReshape)):
            raise ValueError(f"{where} is not supported by the exporters")
        known.add(node.output)
    if model.tensors[model.output].bits != 32:
        raise ValueError(f"the output {model.output!r} must be the int32 logits of the last layer")
    int32_tensors = [name for name, info in model.tensors.items() if info.bits == 32]
    producer = {node.output: node for node in model.nodes}
    logits = [model.output]  # the output and the tensors it flattens: the one int32 buffer the exporters write
    while isinstance(producer.get(logits[-1]), IntReshape):
        logits.append(producer[logits[-1]].input)
    for name in int32_tensors:
        node = producer.get(name)
        if not isinstance(node, (IntConv, IntReshape)):
            raise ValueError(f"tensor {name!r} is int32 but not produced by the last layer")
        if name not in logits:
            raise ValueError(f"tensor {name!r} is int32 but not the model's logits {model.output!r}")
