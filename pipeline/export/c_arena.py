"""Where the generated C keeps each tensor: the caller's input and logits, and one static arena for the rest.

The caller owns the input image and the logits. Every other one-byte tensor lives in ONE
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
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.export.c_ops import emitter_of
from pipeline.graph.nodes import numel
from pipeline.quant.ir import IntegerModel, int_node_inputs

ARENA = "ptq_arena"


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
    """Every tensor's buffer, and the arena plan of the one-byte activations (module docstring).

    A node whose C emitter moves no data (a flatten) gives its output its input's bytes.
    """
    root = {model.input: model.input}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, node in enumerate(model.nodes):
        for name in int_node_inputs(node):
            last[root[name]] = index
        if emitter_of(node).moves_no_data:
            root[node.output] = root[int_node_inputs(node)[0]]
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


__all__ = ["ARENA", "ArenaPlan", "Lifetime", "TensorStorage", "peak_live_bytes", "plan_arena", "tensor_storage"]
