"""The integer graph: what an integer-only runtime executes, as typed nodes over named integer tensors.

Every tensor has a ``TensorInfo``: its per-image shape, its integer type and its
scale (r ~= scale * q, zero point 0), and its range (``TensorInfo.range``: signed, or unsigned
where non-negative by construction). Nodes read and write tensors by name, in
topological order. The integer semantics of each node type are in
``pipeline.quant.integer_ops``; the engine (``pipeline.quant.engine``), the C
generator and both ONNX exporters (``pipeline.export``) implement exactly those.

- ``IntConv``: conv2d (any groups) or linear, 4..8-bit in, int32 accumulator, then
  ``Requantize`` to the output's range (or to int32 logits with per-channel weights), or the
  raw int32 accumulator (``requantize is None``: the last layer, per tensor);
- ``IntAdd``: both inputs rescaled to a common fine grid (left shift, then one
  multiplier each), summed, requantized to the output;
- ``IntAvgPool``: int32 window sum, one multiplier for S_in / (S_out * window);
- ``IntConcat``: each input requantized to the output scale (None: same scale);
- ``IntMaxPool``, ``IntClamp`` (a standalone ReLU/ReLU6) and ``IntReshape``
  act on the integers as they are, and keep the scale.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from pipeline.graph.nodes import ActivationKind
from pipeline.quant.ranges import int_range


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: ``bits`` 4..8 (activations, stored in one byte) or 32 (logits), one scale (0-D float64).

    ``signed`` False: the unsigned full range [0, 2^bits - 1] of a tensor non-negative by construction
    (``build.tensor_signedness``); the logits and the input are always signed.
    """

    shape: tuple[int, ...]
    bits: int
    scale: Tensor
    signed: bool = True

    @property
    def range(self) -> tuple[int, int]:
        """[qmin, qmax]: every integer this tensor can hold (``ranges.int_range``, full range)."""
        return int_range(self.bits, signed=self.signed)


@dataclass(frozen=True)
class Requantize:
    """y = clamp(floor(acc * multiplier * 2^(shift - 31) + 1/2), clamp_min, clamp_max) (``fixed_point``)."""

    multiplier: Tensor  # int32, 0-D or (C,)
    shift: Tensor  # int32, like multiplier
    clamp_min: int
    clamp_max: int


@dataclass(frozen=True)
class IntConv:
    """A conv2d (``kind`` "conv2d") or linear layer; a linear weight is (out, in)."""

    name: str
    kind: str  # "conv2d" | "linear"
    input: str
    output: str
    weight: Tensor  # int8 (out, in / groups, kh, kw) or (out, in)
    bias: Tensor  # int32 (out,) at scale S_in * S_w
    weight_scale: Tensor  # float64, 0-D or (out,)
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    activation: ActivationKind
    requantize: Requantize | None  # None: output the raw int32 accumulators (clamped at 0 for a ReLU)


@dataclass(frozen=True)
class IntAdd:
    name: str
    inputs: tuple[str, str]
    output: str
    left_shift: int  # the inputs are scaled by 2^left_shift before their multipliers, for headroom
    input_requantize: tuple[Requantize, Requantize]  # to the common grid S_common = 2 max(S_a, S_b) / 2^left_shift
    output_requantize: Requantize  # from the common grid to the output scale; carries the fused activation
    activation: ActivationKind


@dataclass(frozen=True)
class IntAvgPool:
    name: str
    input: str
    output: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    requantize: Requantize  # M = S_in / (S_out * kernel_h * kernel_w)


@dataclass(frozen=True)
class IntConcat:
    name: str
    inputs: tuple[str, ...]
    output: str
    input_requantize: tuple[Requantize | None, ...]  # None: the input already has the output's scale


@dataclass(frozen=True)
class IntMaxPool:
    name: str
    input: str
    output: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class IntClamp:
    """A standalone ReLU (``clamp_max`` the type's max) or ReLU6 on the integers, at the input's scale."""

    name: str
    input: str
    output: str
    activation: ActivationKind
    clamp_min: int
    clamp_max: int


@dataclass(frozen=True)
class IntReshape:
    """Flatten (C, H, W) to (C*H*W,): no data moves."""

    name: str
    input: str
    output: str


IntNode = IntConv | IntAdd | IntAvgPool | IntConcat | IntMaxPool | IntClamp | IntReshape
NODE_TYPES: dict[str, type] = {cls.__name__: cls for cls in (IntConv, IntAdd, IntAvgPool, IntConcat, IntMaxPool, IntClamp, IntReshape)}


def int_node_inputs(node: IntNode) -> tuple[str, ...]:
    return node.inputs if isinstance(node, (IntAdd, IntConcat)) else (node.input,)


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
        """The int32 logits' scale (with per-channel weights, the largest accumulator scale: see ``build``)."""
        return self.tensors[self.output].scale

    def layers(self) -> list[IntConv]:
        return [node for node in self.nodes if isinstance(node, IntConv)]

    def input_scale_of(self, node: IntNode, index: int = 0) -> float:
        return float(self.tensors[int_node_inputs(node)[index]].scale)


def requantizations(node: IntNode) -> list[Requantize]:
    """Every rescale a node stores (none for max-pool, clamp and flatten)."""
    if isinstance(node, IntConv):
        return [node.requantize] if node.requantize is not None else []
    if isinstance(node, IntAdd):
        return [*node.input_requantize, node.output_requantize]
    if isinstance(node, IntAvgPool):
        return [node.requantize]
    if isinstance(node, IntConcat):
        return [rq for rq in node.input_requantize if rq is not None]
    return []


def parameter_bytes(model: IntegerModel) -> int:
    """Bytes of what an integer runtime stores: int8 weights, int32 biases, an int32 multiplier and shift per
    rescale value (one per tensor, or one per output channel)."""
    total = 0
    for node in model.nodes:
        if isinstance(node, IntConv):
            total += node.weight.numel() + 4 * node.bias.numel()
        total += sum(8 * rq.multiplier.numel() for rq in requantizations(node))
    return total
