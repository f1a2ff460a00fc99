"""Every integer op, by node type: the one list a backend's table is checked against.

A new op is one module in this package (its node type and rules, ending in ``OP = IntegerOp(...)``),
one line here, and one emitter in each backend's table (``pipeline.quant.engine`` runs ``OP`` itself;
the C, integer-ONNX and QLinear-ONNX exporters each keep a table keyed by node type, and
``tests/test_op_registry.py`` fails for a node type one of them lacks).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pipeline.quant.ops import (
    add,
    avgpool,
    clamp,
    concat,
    conv,
    hardswish,
    leaky_relu,
    maxpool,
    reshape,
)
from pipeline.quant.ops.base import IntegerOp

OPS: tuple[IntegerOp, ...] = (
    conv.OP, add.OP, avgpool.OP, concat.OP, maxpool.OP, clamp.OP, reshape.OP, leaky_relu.OP, hardswish.OP,
)
OP_OF: dict[type, IntegerOp] = {op.node_type: op for op in OPS}
NODE_TYPES: dict[str, type] = {op.node_type.__name__: op.node_type for op in OPS}
OP_FOR_FLOAT: dict[type, IntegerOp] = {float_type: op for op in OPS for float_type in op.float_types}

IntNode = (conv.IntConv | add.IntAdd | avgpool.IntAvgPool | concat.IntConcat | maxpool.IntMaxPool | clamp.IntClamp
           | reshape.IntReshape | leaky_relu.IntLeakyReLU | hardswish.IntHardSwish)


def op_of(node: Any) -> IntegerOp:
    """The ``IntegerOp`` of an integer node; ``TypeError`` naming the node for a type no op module defines."""
    op = OP_OF.get(type(node))
    if op is None:
        raise TypeError(f"unknown integer node {node!r}; the ops are {sorted(NODE_TYPES)}")
    return op


def code_table(node: Any, model: Any) -> Tensor:
    """The integers an elementwise one-input node gives for every code of its input's range, from qmin up (int64):
    its lookup table, computed by the engine (exporters that write such ops as a table use it)."""
    qmin, qmax = model.tensors[node.input].range
    codes = torch.arange(qmin, qmax + 1, dtype=torch.float32).reshape(1, -1)
    op = op_of(node)
    prepared = op.prepare(node, model, codes.device)
    return op.run(node, prepared, {node.input: codes}).reshape(-1).to(torch.int64)


__all__ = ["NODE_TYPES", "OPS", "OP_FOR_FLOAT", "OP_OF", "IntNode", "code_table", "op_of"]
