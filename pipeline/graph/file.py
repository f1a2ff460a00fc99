"""The float graph on disk: the graph stage writes it once, every later stage reads it, without model code or pickle.

One ``torch.save`` file of plain data and tensors (``pipeline.io.save_checkpoint``; read back with
``weights_only=True``, which refuses any other object): a JSON header and a dict of tensors by key. The header
holds the format name and version, the graph's input, output and per-image shapes, every node as
``{"type": "Conv", field: value, ...}`` with a tensor field as ``{"tensor": key}`` and a tuple as a list, the
train stage's checkpoint fields but its weights (model name, input mean and std, class names), whether the
graph is cross-layer equalized and, for a graph that is not, the trained model's own calls
(``RecordedTrace``: ``pipeline.graph.trace`` records and replays them, for calibration).
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from pipeline.graph.nodes import FloatGraph, Node
from pipeline.io import load_checkpoint, save_checkpoint

FORMAT_NAME = "cifar10-ptq-float-graph"
FORMAT_VERSION = 1
NODE_TYPES: dict[str, type] = {node_type.__name__: node_type for node_type in typing.get_args(Node)}


@dataclass(frozen=True)
class RecordedTrace:
    """The trained model's torch.fx trace as plain data (``pipeline.graph.trace``).

    ``calls``: every traced node in order, with its tensor name and JSON-able arguments; ``modules``: each
    torch.nn module the calls run, as its type name and constructor arguments; ``tensors``: those modules'
    parameters and buffers, by ``<module path>.<name>``.
    """

    calls: tuple[Mapping[str, Any], ...]
    modules: Mapping[str, Mapping[str, Any]]
    tensors: Mapping[str, Tensor]


@dataclass(frozen=True)
class GraphFile:
    """What the graph stage writes: the float graph, where it comes from, and the trained model's calls."""

    graph: FloatGraph
    # The train stage's checkpoint without its state_dict: model name, input mean and std, class names.
    checkpoint: Mapping[str, Any]
    equalized: bool
    # None for an equalized graph: between its layer pairs the trained model's tensors are not the graph's.
    original: RecordedTrace | None

    @property
    def mean(self) -> list[float]:
        return self.checkpoint["mean"]

    @property
    def std(self) -> list[float]:
        return self.checkpoint["std"]


def _encode(value: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """A node field in JSON form; a tensor goes into ``tensors`` under ``key``."""
    if isinstance(value, Tensor):
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, tuple):
        return [_encode(item, f"{key}.{index}", tensors) for index, item in enumerate(value)]
    return value


def _decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, dict):
        return tensors[value["tensor"]]
    if isinstance(value, list):  # node fields hold tuples, never lists
        return tuple(_decode(item, tensors) for item in value)
    return value


def save_graph_file(path: str | os.PathLike, graph_file: GraphFile) -> None:
    """Write ``graph_file`` atomically; equal graphs give equal bytes, so DVC sees an unchanged output."""
    graph = graph_file.graph
    tensors: dict[str, Tensor] = {}
    nodes = [
        {"type": type(node).__name__}
        | {field.name: _encode(getattr(node, field.name), f"nodes.{index}.{field.name}", tensors)
           for field in dataclasses.fields(node)}
        for index, node in enumerate(graph.nodes)
    ]
    original = graph_file.original
    if original is not None:
        tensors |= {f"original.{key}": tensor for key, tensor in original.tensors.items()}
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "checkpoint": dict(graph_file.checkpoint),
        "equalized": graph_file.equalized,
        "input": graph.input,
        "output": graph.output,
        "shapes": {name: list(shape) for name, shape in graph.shapes.items()},
        "nodes": nodes,
        "original": None if original is None else {"calls": list(original.calls), "modules": dict(original.modules)},
    }
    save_checkpoint(path, {"header": json.dumps(header), "tensors": tensors})


def load_graph_file(path: str | os.PathLike) -> GraphFile:
    """Read a file ``save_graph_file`` wrote; another file or version is a ValueError naming it and the fix."""
    content = load_checkpoint(path, writer="graph")
    header = json.loads(content["header"]) if isinstance(content, dict) and "header" in content else {}
    if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)}: a {header.get('format')!r} file of version {header.get('version')!r}; this pipeline "
            f"reads {FORMAT_NAME} version {FORMAT_VERSION}: rerun the graph stage (dvc repro graph) to rewrite it"
        )
    tensors = content["tensors"]
    nodes = tuple(
        NODE_TYPES[entry["type"]](**{key: _decode(value, tensors) for key, value in entry.items() if key != "type"})
        for entry in header["nodes"]
    )
    shapes = {name: tuple(shape) for name, shape in header["shapes"].items()}
    graph = FloatGraph(header["input"], header["output"], nodes, shapes)
    original = header["original"]
    if original is not None:
        prefix = "original."
        original = RecordedTrace(
            tuple(original["calls"]), original["modules"],
            {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)},
        )
    return GraphFile(graph, header["checkpoint"], header["equalized"], original)
