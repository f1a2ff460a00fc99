"""Activation scale groups: the tensors that share one scale and one integer range, and their signedness.

Max-pool, flatten and a standalone ReLU/ReLU6 keep their input's integers and scale, so the
tensors they connect form one *scale group* with one range and one signedness, calibrated on the
group's tensors that a rescaling node (conv, linear, add, concat, average pool, leaky ReLU, hard swish)
reads. A group is
unsigned (the full range [0, 2^b - 1]) when the activation format asks for it and its root is
non-negative by construction.

The profile stage calibrates one range per group; the builder gives each group its scale.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from pipeline.graph.nodes import (
    Activation,
    Add,
    AvgPool,
    Concat,
    Conv,
    FloatGraph,
    HardSwish,
    LeakyReLU,
    Linear,
    MaxPool,
    Reshape,
)
from pipeline.quant.ranges import ActivationFormat, fake_quantize, scale_from_range

# Nodes whose inputs' scales enter their multipliers.
RESCALING_NODES = (Conv, Linear, Add, Concat, AvgPool, LeakyReLU, HardSwish)
SCALE_KEEPING_NODES = (MaxPool, Reshape, Activation)  # output integers and scale are the input's




@dataclass(frozen=True)
class ScaleGroup:
    """Tensors sharing one scale and integer range: ``root`` and what scale-keeping nodes make of it.

    ``observed`` are the members whose statistics set the range: those read by a rescaling node
    (the root when none is). ``read_by`` names those rescaling nodes.
    """

    root: str
    members: tuple[str, ...]
    observed: tuple[str, ...]
    read_by: tuple[str, ...]


def scale_groups(graph: FloatGraph) -> dict[str, ScaleGroup]:
    """The activation scale groups of ``graph`` by root name, in topological order (the logits are not one)."""
    group_of = {graph.input: graph.input}
    for node in graph.nodes:
        group_of[node.output] = group_of[node.input] if isinstance(node, SCALE_KEEPING_NODES) else node.output
    logits_group = group_of[graph.output]
    readers = graph.consumers()
    groups: dict[str, ScaleGroup] = {}
    for root in dict.fromkeys(group_of.values()):
        if root == logits_group:
            continue
        members = tuple(name for name, group in group_of.items() if group == root)
        observed = tuple(m for m in members if any(isinstance(r, RESCALING_NODES) for r in readers[m]))
        read_by = tuple(dict.fromkeys(r.name for m in members for r in readers[m] if isinstance(r, RESCALING_NODES)))
        groups[root] = ScaleGroup(root, members, observed or (root,), read_by)
    return groups


def nonnegative_tensors(graph: FloatGraph) -> set[str]:
    """The tensors of ``graph`` that are >= 0 by construction, whatever the input.

    A ReLU or ReLU6 (fused into a conv, linear or add, or standalone) makes one; max-pool, average pool
    and flatten keep it; a concat of such tensors is one. The input (a normalized image) is not.
    """
    nonnegative: set[str] = set()
    for node in graph.nodes:
        if isinstance(node, (Conv, Linear, Add, Activation)):
            is_nonnegative = node.activation != "none"
        elif isinstance(node, Concat):
            is_nonnegative = all(name in nonnegative for name in node.inputs)
        elif isinstance(node, (LeakyReLU, HardSwish)):
            is_nonnegative = False  # both can be negative (kept signed even after a ReLU, where leaky ReLU is x)
        else:  # MaxPool, AvgPool, Reshape
            is_nonnegative = node.input in nonnegative
        if is_nonnegative:
            nonnegative.add(node.output)
    return nonnegative


def tensor_signedness(graph: FloatGraph, activation_format: ActivationFormat) -> dict[str, bool]:
    """Whether each activation tensor (the members of ``scale_groups``) is signed.

    A scale group shares its integers, so it has one signedness: unsigned when the format asks for
    unsigned activations and the group's root is non-negative by construction (then so is every
    member: a max-pool, flatten or clamp of it). A standalone ReLU of a signed tensor stays signed,
    in its input's group.
    """
    nonnegative = nonnegative_tensors(graph) if activation_format.unsigned else set()
    return {member: root not in nonnegative for root, group in scale_groups(graph).items() for member in group.members}


def group_ranges(graph: FloatGraph, activation_format: ActivationFormat) -> dict[str, tuple[int, int]]:
    """The integer range [qmin, qmax] of every scale group, by root: what its calibrated range maps onto."""
    signed = tensor_signedness(graph, activation_format)
    return {root: activation_format.range(signed[root]) for root in scale_groups(graph)}


def activation_quantizer(
    graph: FloatGraph, activation_ranges: Mapping[str, float], activation_format: ActivationFormat = ActivationFormat()
) -> Callable[[str, Tensor], Tensor]:
    """The integer model's activation quantization, in float, for ``run_float(activations=...)``.

    Every member of a scale group is snapped to the group's grid (``fake_quantize``: the scale
    ``build_integer_model`` gives it from ``activation_ranges[root]``, round half to even, clamped to
    the group's [qmin, qmax]); the logits and any tensor outside the groups pass unchanged.
    """
    integer_ranges = group_ranges(graph, activation_format)
    grids = {}
    for root, group in scale_groups(graph).items():
        qmin, qmax = integer_ranges[root]
        scale = scale_from_range(float(activation_ranges[root]), qmax)
        grids |= dict.fromkeys(group.members, (scale, qmin, qmax))

    def quantized(name: str, value: Tensor) -> Tensor:
        grid = grids.get(name)
        return value if grid is None else fake_quantize(value, *grid)

    return quantized


