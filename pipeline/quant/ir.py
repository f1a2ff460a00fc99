"""The integer graph: what an integer-only runtime executes, as typed nodes over named integer tensors.

Every tensor has a ``TensorInfo`` (``pipeline.quant.ops.base``): its per-image shape, its integer type
and its scale (r ~= scale * q, zero point 0), and its range (signed, or unsigned where non-negative by
construction). Nodes read and write tensors by name, in topological order. Each node type and its
integer semantics live in one module of ``pipeline.quant.ops`` (``ops.registry`` lists them); the
engine (``pipeline.quant.engine``), the C generator and both ONNX exporters (``pipeline.export``)
implement exactly those.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pipeline.quant.ops.base import TensorInfo
from pipeline.quant.ops.conv import IntConv
from pipeline.quant.ops.registry import IntNode


def int_node_inputs(node: Any) -> tuple[str, ...]:
    """The tensors a node reads: its ``inputs``, or its one ``input``."""
    inputs = getattr(node, "inputs", None)
    return tuple(inputs) if inputs is not None else (node.input,)


@dataclass
class IntegerModel:
    """An integer-only network: signed input ``input`` at its scale, nodes in order, int32 logits ``output``.

    ``input_mean``/``input_std`` are the per-channel normalization applied to
    [0, 1] images before ``quantize_input``, recorded so the artifact is self-contained.
    """

    input: str
    output: str
    tensors: dict[str, TensorInfo]
    nodes: list[IntNode]
    input_mean: list[float] | None = None
    input_std: list[float] | None = None

    @property
    def input_scale(self) -> float:
        return float(self.tensors[self.input].scale)

    @property
    def output_scale(self) -> Tensor:
        """The int32 logits' scale (with per-channel weights, the largest accumulator scale: see ``ops.conv``)."""
        return self.tensors[self.output].scale

    @property
    def rounding(self) -> str:
        """The requantization rule of every rescale (``fixed_point.ROUNDINGS``); ``ValueError`` if they mix."""
        rules = {rq.rounding for node in self.nodes for rq in node.requantizations()}
        if len(rules) > 1:
            raise ValueError(f"the model mixes rounding rules {sorted(rules)}; one model has one rule")
        return rules.pop() if rules else "double"

    def layers(self) -> list[IntConv]:
        return [node for node in self.nodes if isinstance(node, IntConv)]

    def input_scale_of(self, node: IntNode, index: int = 0) -> float:
        return float(self.tensors[int_node_inputs(node)[index]].scale)


def parameter_bytes(model: IntegerModel) -> int:
    """Bytes of what an integer runtime stores: int8 weights, int32 biases, an int32 multiplier and shift per
    rescale value (one per tensor, or one per output channel)."""
    total = 0
    for node in model.nodes:
        if isinstance(node, IntConv):
            total += node.weight.numel() + 4 * node.bias.numel()
        total += sum(8 * rq.multiplier.numel() for rq in node.requantizations())
    return total


__all__ = ["IntegerModel", "int_node_inputs", "parameter_bytes"]
