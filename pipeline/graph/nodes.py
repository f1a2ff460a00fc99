"""The float graph's nodes: typed, in topological order, with every tensor's per-image shape.

Tensor names are node names; a module call is named by the module's qualified name
(``layer1.0.conv1``), a function call by fx's name for it (``add_1``); a module called more than
once is one node per call (``pool``, ``pool@2``, ...: ``pipeline.graph.capture``). Shapes are per
image: (C, H, W) for maps, (K,) after a flatten.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from torch import Tensor

if TYPE_CHECKING:
    import torch.fx

ActivationKind = Literal["none", "relu", "relu6"]
CIFAR10_INPUT_SHAPE = (3, 32, 32)  # (C, H, W) of one image


class UnsupportedModelError(ValueError):
    """The model has an op, or an op configuration, that the quantizer does not implement."""


# ---------------------------------------------------------------- nodes


@dataclass(frozen=True)
class Conv:
    """A 2-D convolution; ``groups == in_channels == out_channels`` is depthwise."""

    name: str
    input: str
    output: str
    weight: Tensor  # (out, in / groups, kh, kw)
    bias: Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int = 1
    activation: ActivationKind = "none"


@dataclass(frozen=True)
class Linear:
    name: str
    input: str
    output: str
    weight: Tensor  # (out, in)
    bias: Tensor | None
    activation: ActivationKind = "none"


@dataclass(frozen=True)
class Add:
    """Elementwise sum of two tensors of the same shape (a residual add)."""

    name: str
    inputs: tuple[str, str]
    output: str
    activation: ActivationKind = "none"


@dataclass(frozen=True)
class Concat:
    """Concatenation along channels."""

    name: str
    inputs: tuple[str, ...]
    output: str


@dataclass(frozen=True)
class Window:
    """The fields of a pooling node: windows of ``kernel`` every ``stride``, ``padding`` on each side."""

    name: str
    input: str
    output: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class MaxPool(Window):
    """The max over windows (padding is -inf)."""


@dataclass(frozen=True)
class AvgPool(Window):
    """Average over windows (zero padding counted, as PyTorch's default); a global pool is one H x W window."""


@dataclass(frozen=True)
class Activation:
    """A ReLU or ReLU6 that could not be fused into its producer."""

    name: str
    input: str
    output: str
    activation: ActivationKind


@dataclass(frozen=True)
class LeakyReLU:
    """max(x, 0) + negative_slope * min(x, 0), with negative_slope >= 0; never fused (it rescales its input)."""

    name: str
    input: str
    output: str
    negative_slope: float


@dataclass(frozen=True)
class HardSwish:
    """x * relu6(x + 3) / 6 (MobileNetV3's activation)."""

    name: str
    input: str
    output: str


@dataclass(frozen=True)
class Reshape:
    """A flatten to (N, K): moves no data (the C, H, W order is the memory order)."""

    name: str
    input: str
    output: str


Node = Conv | Linear | Add | Concat | MaxPool | AvgPool | Activation | LeakyReLU | HardSwish | Reshape
LAYER_TYPES = (Conv, Linear)  # the nodes with weights


def node_inputs(node: Node) -> tuple[str, ...]:
    """The tensors a node reads."""
    return node.inputs if isinstance(node, (Add, Concat)) else (node.input,)


@dataclass(frozen=True)
class FloatGraph:
    """Nodes in topological order; ``shapes`` maps every tensor name to its per-image shape."""

    input: str
    output: str
    nodes: tuple[Node, ...]
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # The trace of the original (unfolded) model, for ``observe_original``.
    traced: torch.fx.GraphModule | None = field(default=None, compare=False, repr=False)

    def layers(self) -> list[Conv | Linear]:
        """The Conv and Linear nodes, in forward order."""
        return [node for node in self.nodes if isinstance(node, LAYER_TYPES)]

    def consumers(self) -> dict[str, list[Node]]:
        """For every tensor, the nodes that read it (in order)."""
        readers: dict[str, list[Node]] = {self.input: []}
        for node in self.nodes:
            readers.setdefault(node.output, [])
            for name in node_inputs(node):
                readers[name].append(node)
        return readers

    def producer(self) -> dict[str, Node]:
        return {node.output: node for node in self.nodes}


def layer_names(graph: FloatGraph) -> list[str]:
    """Names of the Conv and Linear nodes, in forward order."""
    return [node.name for node in graph.layers()]


def numel(shape: Iterable[int]) -> int:
    """Values in a tensor of ``shape``."""
    total = 1
    for size in shape:
        total *= size
    return total


def check_output_layer(graph: FloatGraph) -> Conv | Linear:
    """The Conv/Linear node whose output (through flattens) is the model's output: it gives the int32 logits."""
    producer = graph.producer()
    name = graph.output
    while isinstance(producer.get(name), Reshape):
        name = producer[name].input
    node = producer.get(name)
    if not isinstance(node, (Conv, Linear)):
        raise UnsupportedModelError(
            f"the model's output {graph.output!r} must come from a Conv2d or Linear layer (through flattens only), "
            f"to be its int32 logits; it comes from {type(node).__name__ if node else 'the input'} {name!r}"
        )
    readers = graph.consumers()
    others = [reader.name for reader in readers[name] if not isinstance(reader, Reshape)]
    if others:
        raise UnsupportedModelError(f"the logits layer {node.name!r} output is also read by {others}")
    return node


def float_parameter_count(graph: FloatGraph) -> int:
    """Weights and biases of the folded graph (what a float deployment stores)."""
    return sum(node.weight.numel() + (node.bias.numel() if node.bias is not None else 0) for node in graph.layers())


def folded_state_dict(graph: FloatGraph, weights: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """``{name.weight, name.bias}`` of every layer of the folded graph (with ``weights`` replacing some)."""
    state: dict[str, Tensor] = {}
    for node in graph.layers():
        state[f"{node.name}.weight"] = (weights or {}).get(node.name, node.weight).detach().clone()
        if node.bias is not None:
            state[f"{node.name}.bias"] = node.bias.detach().clone()
    return state


def with_weights(graph: FloatGraph, state_dict: Mapping[str, Tensor]) -> FloatGraph:
    """A copy of ``graph`` whose layers take their weight and bias from ``folded_state_dict``'s form."""
    nodes = []
    for node in graph.nodes:
        if isinstance(node, LAYER_TYPES):
            bias = state_dict.get(f"{node.name}.bias")
            node = replace(node, weight=state_dict[f"{node.name}.weight"], bias=bias)
        nodes.append(node)
    return replace(graph, nodes=tuple(nodes))


def with_biases(graph: FloatGraph, biases: Mapping[str, Tensor]) -> FloatGraph:
    """A copy of ``graph`` whose named layers take ``biases`` in place of their own (bias correction's)."""
    return with_weights(graph, folded_state_dict(graph) | {f"{name}.bias": bias for name, bias in biases.items()})


def tensor_names(traced: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Each traced node's tensor name, as the graph's tensors are named: a module call by the module's qualified
    name (``pool``, then ``pool@2``, ... when called again: a module called twice writes two tensors), any other
    node by fx's name."""
    names: dict[torch.fx.Node, str] = {}
    calls: dict[str, int] = {}
    for node in traced.graph.nodes:
        name = str(node.target) if node.op == "call_module" else node.name
        if node.op == "call_module":
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                name = f"{name}@{calls[name]}"
        names[node] = name
    return names
