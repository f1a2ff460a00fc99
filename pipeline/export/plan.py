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

from pipeline.quant.ir import IntegerModel, int_node_inputs
from pipeline.quant.ops.conv import IntConv
from pipeline.quant.ops.registry import OP_OF, IntNode
from pipeline.quant.ops.reshape import IntReshape


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


def logits_tensors(model: IntegerModel) -> list[str]:
    """The output and the tensors it flattens, back to the last layer's: the one logits buffer the exporters write
    (int32, or int8 logits widened into it in C)."""
    producer = {node.output: node for node in model.nodes}
    logits = [model.output]
    while isinstance(producer.get(logits[-1]), IntReshape):
        logits.append(producer[logits[-1]].input)
    return logits


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
        op = OP_OF.get(type(node))
        if op is None:
            raise ValueError(f"{where} is not supported by the exporters")
        expected = op.output_shape(node, [model.tensors[name].shape for name in int_node_inputs(node)], where)
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
        if (op.keeps_integers and out_info.bits <= 8
                and (in_info.bits, in_info.signed) != (out_info.bits, out_info.signed)):
            raise ValueError(f"{where} changes {in_info.type_name} to {out_info.type_name}; it moves the "
                             "integers as they are")
        if op.check is not None:
            op.check(node, model, where)
        known.add(node.output)
    output = model.tensors[model.output]
    if output.bits != 32 and (output.bits != 8 or not output.signed):
        raise ValueError(f"the output {model.output!r} must be the int32 or int8 logits of the last layer, "
                         f"got {output.type_name}")
    int32_tensors = [name for name, info in model.tensors.items() if info.bits == 32]
    producer = {node.output: node for node in model.nodes}
    logits = logits_tensors(model)
    last_layer = producer.get(logits[-1])
    if not isinstance(last_layer, IntConv):
        raise ValueError(f"the output {model.output!r} must be the logits of the last layer (a conv or linear layer, "
                         f"through flattens), not of {type(last_layer).__name__ if last_layer else 'the input'}")
    for name in int32_tensors:
        node = producer.get(name)
        if not isinstance(node, (IntConv, IntReshape)):
            raise ValueError(f"tensor {name!r} is int32 but not produced by the last layer")
        if name not in logits:
            raise ValueError(f"tensor {name!r} is int32 but not the model's logits {model.output!r}")
