"""A user's float ONNX classifier as an ordinary torch module: ``read_onnx_model``, ``OnnxNetwork``.

The rest of the pipeline works on torch modules: it captures them with torch.fx
(``pipeline.graph.capture``), records their calls (``pipeline.graph.trace``), folds BatchNorm, evaluates
and fine-tunes them and saves their state_dict. So an ONNX file (a CIFAR-10 classifier: one float input
(N, 3, 32, 32) of normalized images, one output (N, classes) of logits) becomes a module made only of the
torch modules and functions that capture and the recorded trace accept; converters that emit their own
module types (onnx2torch) would need rules in both.

``read_onnx_model(path)`` validates everything before anything is built and gives an ``ImportedOnnx``:
``architecture``, plain JSON-able data (kept in checkpoints), and ``state_dict``, the float32 weights.
``OnnxNetwork(architecture)`` builds one standard submodule per layer, activation or pool, and its
``forward`` walks the node list over a dict of named tensors: plain Python data, which torch.fx unrolls
into one call per node. ``build_onnx_network`` builds it and loads the weights.

Supported ops (``SUPPORTED_OPS``), on the tensors computed from the input:

- Conv (2-D; grouped and depthwise; strides; symmetric pads; dilations 1) -> nn.Conv2d
- Gemm (alpha = beta = 1, transA 0, transB 0 or 1, a constant weight and bias) -> nn.Linear
- MatMul of a (N, K) tensor by a constant (K, M) weight, with the Add of a constant bias that follows it
  (when only that Add reads it) -> one nn.Linear
- BatchNormalization (inference: the file's statistics and epsilon) -> nn.BatchNorm2d (torch's momentum:
  the file's is a training setting)
- Relu -> nn.ReLU; Clip (0, no max) -> nn.ReLU; Clip (0, 6) -> nn.ReLU6; other bounds are refused (the
  quantizer implements only these two clamps); LeakyRelu (alpha >= 0) -> nn.LeakyReLU; HardSwish -> nn.Hardswish
- Add of two tensors of one shape -> torch.add; Concat on channels -> torch.cat(..., 1)
- MaxPool / AveragePool (2-D, symmetric pads of at most half the kernel, dilations 1) -> nn.MaxPool2d /
  nn.AvgPool2d; ceil_mode only where it gives the output size flooring gives; AveragePool's
  count_include_pad 0 only without padding
- GlobalAveragePool -> nn.AdaptiveAvgPool2d(1); ReduceMean over axes (2, 3) (an attribute before opset 18,
  a constant input since) -> torch.mean(x, (2, 3), keepdim)
- Flatten, Reshape and Squeeze whose output is (N, C*H*W) for an input (N, C, H, W) -> torch.flatten(x, 1)
- Identity, Dropout -> nothing (the tensor is passed on)

Constant, and Identity and Cast of constants, give weights and axes; Shape, Gather, Unsqueeze, Squeeze,
Concat, Identity and Cast may compute a Reshape's target shape (``x.view(x.size(0), -1)`` exported with a
dynamic batch). A Reshape is judged by ONNX shape inference run on the input (B, 3, 32, 32), B the input's
static batch size or 2 when it is symbolic: whatever computes its target, it must flatten each image.
A Softmax (or anything else) is refused: the pipeline takes the logits.
"""
from __future__ import annotations

import json
import keyword
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor, nn

from pipeline.graph.nodes import CIFAR10_INPUT_SHAPE
from pipeline.model_spec import describe_error, first_line

FORMAT = "onnx-import"
VERSION = 1

# The ops that compute on the image tensors, and those that only give weights, axes or a Reshape's shape.
DATA_OPS = (
    "Conv", "Gemm", "MatMul", "Add", "BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSwish", "Concat",
    "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Squeeze", "Identity",
    "Dropout",
)
SHAPE_OPS = ("Constant", "Identity", "Cast", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat")
SUPPORTED_OPS: tuple[str, ...] = DATA_OPS + tuple(op for op in SHAPE_OPS if op not in DATA_OPS)
_FOLDED_OPS = ("Constant", "Identity", "Cast")  # evaluated here when their inputs are constants
_UNBOUNDED = 3.4e38  # Clip's default bounds before opset 11 are -FLT_MAX and FLT_MAX

# The standard modules and functions an architecture may name: all accepted by capture and the recorded trace.
_MODULES: dict[str, type[nn.Module]] = {
    module.__name__: module
    for module in (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish,
                   nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
}
_FUNCTIONS: dict[str, Callable[[list[Tensor], Mapping[str, Any]], Tensor]] = {
    "torch.add": lambda inputs, attributes: torch.add(inputs[0], inputs[1]),
    "torch.cat": lambda inputs, attributes: torch.cat(inputs, 1),
    "torch.flatten": lambda inputs, attributes: torch.flatten(inputs[0], 1),
    "torch.mean": lambda inputs, attributes: torch.mean(inputs[0], (2, 3), keepdim=attributes["keepdim"]),
}


class OnnxImportError(ValueError):
    """An ONNX file this importer refuses: unreadable, invalid, or with an op or setting it does not support."""


@dataclass(frozen=True)
class ImportedOnnx:
    """An ONNX model as plain data (``architecture``) and float32 weights keyed as ``OnnxNetwork`` names them."""

    architecture: dict[str, Any]
    state_dict: dict[str, Tensor]


# ---------------------------------------------------------------- the module


class OnnxNetwork(nn.Module):
    """The network an ``architecture`` describes (module docstring), with standard torch modules and functions."""

    def __init__(self, architecture: Mapping[str, Any]) -> None:
        super().__init__()
        _check_architecture(architecture)
        self.architecture = json.loads(json.dumps(architecture))  # a plain copy, saved in checkpoints
        for node in self.architecture["nodes"]:
            if node["module"] is not None:
                self.add_module(node["module"], _MODULES[node["op"]](**node["attributes"]))

    def forward(self, x: Tensor) -> Tensor:
        # Python data only: torch.fx unrolls the loop into one call_module / call_function node per entry.
        values = {self.architecture["input"]["name"]: x}
        for node in self.architecture["nodes"]:
            inputs = [values[name] for name in node["inputs"]]
            if node["module"] is not None:
                values[node["output"]] = self.get_submodule(node["module"])(*inputs)
            else:
                values[node["output"]] = _FUNCTIONS[node["op"]](inputs, node["attributes"])
        return values[self.architecture["output"]]


def build_onnx_network(imported: ImportedOnnx) -> OnnxNetwork:
    """The network of ``imported`` with its weights, in eval mode (BatchNorm uses the file's statistics)."""
    network = OnnxNetwork(imported.architecture)
    network.load_state_dict(imported.state_dict, strict=True)
    return network.eval()


def _check_architecture(architecture: Mapping[str, Any]) -> None:
    """A ValueError unless ``architecture`` is this version's format naming only the allowed modules and functions."""
    if architecture.get("format") != FORMAT or architecture.get("version") != VERSION:
        raise ValueError(f"architecture: format {architecture.get('format')!r} version {architecture.get('version')!r} "
                         f"is not {FORMAT!r} version {VERSION} (rerun the train stage to re-import the ONNX file)")
    defined = {architecture["input"]["name"]}
    for node in architecture["nodes"]:
        op, module = node["op"], node["module"]
        if (op in _MODULES) != (module is not None) or (op not in _MODULES and op not in _FUNCTIONS):
            raise ValueError(f"architecture node {node['name']!r}: op {op!r} with module {module!r} is not allowed; "
                             f"allowed: modules {', '.join(_MODULES)}, functions {', '.join(_FUNCTIONS)}")
        if module is not None and (not module.isidentifier() or keyword.iskeyword(module)):
            raise ValueError(f"architecture node {node['name']!r}: module name {module!r} is not an identifier")
        missing = [name for name in node["inputs"] if name not in defined]
        if missing:
            raise ValueError(f"architecture node {node['name']!r} reads {missing}, which no earlier node computes")
        defined.add(node["output"])
    if architecture["output"] not in defined:
        raise ValueError(f"architecture: the output {architecture['output']!r} is computed by no node")


# ---------------------------------------------------------------- reading the file


def read_onnx_model(path: str | os.PathLike) -> ImportedOnnx:
    """The model of the ONNX file ``path``, validated (module docstring); anything refused is an OnnxImportError."""
    where = os.fspath(path)
    model = _load(where)
    graph = model.graph
    input_name, input_shape = _graph_input(graph, where)
    if len(graph.output) != 1:
        raise OnnxImportError(f"{where}: the model must have one output (the logits), got {len(graph.output)}: "
                              f"{[output.name for output in graph.output]}")
    for index, node in enumerate(graph.node):
        _check_op(node, index, where)
    constants = _initializers(graph, where)
    batch = input_shape[0] if isinstance(input_shape[0], int) else 2  # 2: a batch-fixing reshape shows
    reader = _Reader(where, constants, _infer_shapes(model, input_name, batch, where), batch,
                     Counter([*(name for node in graph.node for name in node.input), graph.output[0].name]),
                     data={input_name})
    for index, node in enumerate(graph.node):
        reader.read(node, index)
    output = reader.resolve(graph.output[0].name)
    if output not in reader.data or output == input_name:
        raise OnnxImportError(f"{where}: the output {graph.output[0].name!r} is not computed from the input")
    output_shape = reader.shape(output, f"the output {graph.output[0].name!r}")
    if len(output_shape) != 2:
        raise OnnxImportError(f"{where}: the output {graph.output[0].name!r} has shape {output_shape}; it must be "
                              f"(N, classes) logits")
    architecture = {
        "format": FORMAT,
        "version": VERSION,
        "input": {"name": input_name, "shape": list(input_shape)},
        "nodes": reader.nodes,
        "output": output,
    }
    return ImportedOnnx(architecture, reader.state_dict)


def _load(where: str) -> onnx.ModelProto:
    try:
        model = onnx.load(where)
    except OSError as error:  # missing, a folder, no permission
        raise OnnxImportError(f"{where}: cannot be read ({error.strerror or error})") from None
    except Exception as error:  # protobuf's decoder fails in many ways on a foreign or truncated file
        raise OnnxImportError(f"{where}: not an ONNX model, or a truncated or corrupted one "
                              f"({describe_error(error, None)})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # onnx.checker.ValidationError, or a protobuf error on a half-parsed file
        raise OnnxImportError(f"{where}: not a valid ONNX model, or a truncated one ({first_line(error)})") from None
    return model


def _graph_input(graph: onnx.GraphProto, where: str) -> tuple[str, list[int | str | None]]:
    """The one real input (old exports also list initializers as inputs) and its (N, 3, 32, 32) shape."""
    weights = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in weights]
    if len(inputs) != 1:
        raise OnnxImportError(f"{where}: the model must take one input (the images), got {len(inputs)}: "
                              f"{[value.name for value in inputs]}")
    value = inputs[0]
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type") or tensor_type.elem_type != onnx.TensorProto.FLOAT:
        kind = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if value.type.HasField("tensor_type") else "not a tensor"
        raise OnnxImportError(f"{where}: input {value.name!r} must be a float32 tensor, got {kind}")
    expected = (None, *CIFAR10_INPUT_SHAPE)
    if not tensor_type.HasField("shape"):
        return value.name, list(expected)
    shape = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor_type.shape.dim]
    fits = len(shape) == 4 and all(not isinstance(got, int) or got == want for got, want in zip(shape[1:], expected[1:]))
    if not fits:
        raise OnnxImportError(f"{where}: input {value.name!r} has shape {_shape_text(shape)}; the pipeline's images are "
                              f"{_shape_text(['N', *CIFAR10_INPUT_SHAPE])} (CIFAR-10, channels first)")
    return value.name, [shape[0], *CIFAR10_INPUT_SHAPE]


def _shape_text(shape: Sequence[int | str | None]) -> str:
    return f"({', '.join('?' if size is None else str(size) for size in shape)})"


def _check_op(node: onnx.NodeProto, index: int, where: str) -> None:
    if node.domain in ("", "ai.onnx") and node.op_type in SUPPORTED_OPS:
        return
    op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
    hint = "; the pipeline takes the logits: export the model without it" if op in ("Softmax", "LogSoftmax") else ""
    raise OnnxImportError(f"{where}: node {_node_name(node, index)!r} ({op}) is not supported{hint}; "
                          f"supported ops: {', '.join(SUPPORTED_OPS)}")


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index}"


def _initializers(graph: onnx.GraphProto, where: str) -> dict[str, np.ndarray]:
    return {initializer.name: _array(initializer, initializer.name, where) for initializer in graph.initializer}


def _array(tensor: onnx.TensorProto, name: str, where: str) -> np.ndarray:
    """The values of a stored tensor, which must be finite where they are floats."""
    try:
        array = numpy_helper.to_array(tensor)
    except Exception as error:  # data of another size than its shape, an unknown type: a corrupted file
        raise OnnxImportError(f"{where}: tensor {name!r} cannot be read ({describe_error(error, None)}); the "
                              "file is corrupted") from None
    return _finite(array, name, where)


def _finite(array: np.ndarray, name: str, where: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise OnnxImportError(f"{where}: tensor {name!r} holds {bad} non-finite values (NaN or infinity) of "
                              f"{array.size}; the model's weights must be finite")
    return array


def _infer_shapes(model: onnx.ModelProto, input_name: str, batch: int, where: str) -> dict[str, tuple[int | None, ...]]:
    """Every tensor's shape, by ONNX shape inference on the input (``batch``, 3, 32, 32)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]  # the file's own intermediate shapes may keep the batch symbolic
    for value in probe.graph.output:
        value.type.tensor_type.ClearField("shape")
    for value in probe.graph.input:
        if value.name == input_name:
            value.type.tensor_type.shape.CopyFrom(
                onnx.TensorShapeProto(dim=[onnx.TensorShapeProto.Dimension(dim_value=size)
                                           for size in (batch, *CIFAR10_INPUT_SHAPE)]))
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True)
    except Exception as error:  # onnx.shape_inference.InferenceError: shapes that do not fit the ops
        raise OnnxImportError(f"{where}: ONNX shape inference fails on a {_shape_text([batch, *CIFAR10_INPUT_SHAPE])} "
                              f"input ({first_line(error)})") from None
    shapes = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = tuple(dim.dim_value if dim.HasField("dim_value") else None
                                       for dim in value.type.tensor_type.shape.dim)
    return shapes


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    values = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
    return {name: value.decode() if isinstance(value, bytes) else value for name, value in values.items()}


def _module_name(node: onnx.NodeProto, index: int, taken: set[str]) -> str:
    """A Python identifier from the node's name (``/layer1/conv/Conv`` -> ``layer1_conv_Conv``), unique."""
    name = re.sub(r"\W+", "_", node.name, flags=re.ASCII).strip("_")
    if not name:
        name = f"{node.op_type.lower()}{index}"
    elif name[0].isdigit():
        name = f"{node.op_type.lower()}_{name}"
    if name in _RESERVED or keyword.iskeyword(name):  # an attribute of the module itself, or a word torch.fx's code uses
        name = f"{name}_"
    unique, count = name, 1
    while unique in taken:
        count += 1
        unique = f"{name}_{count}"
    taken.add(unique)
    return unique


_RESERVED = frozenset(dir(OnnxNetwork)) | {"training", "architecture"}


@dataclass
class _Reader:
    """The nodes read so far: the architecture's nodes and weights, and what each ONNX tensor is."""

    where: str
    constants: dict[str, np.ndarray]  # initializers and folded Constant / Identity / Cast outputs
    shapes: Mapping[str, tuple[int | None, ...]]
    batch: int
    consumers: Counter[str]  # how many node inputs (and the graph output) read each tensor
    data: set[str]  # tensors computed from the input; the others are constants or shape values
    nodes: list[dict[str, Any]] = field(default_factory=list)
    state_dict: dict[str, Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # Identity / Dropout outputs -> their input
    producers: dict[str, dict[str, Any]] = field(default_factory=dict)
    taken: set[str] = field(default_factory=set)  # module names
    node: onnx.NodeProto = field(default_factory=onnx.NodeProto)  # the node being read, for messages
    index: int = 0

    # ------------------------------------------------ dispatch

    def read(self, node: onnx.NodeProto, index: int) -> None:
        self.node, self.index = node, index
        reads_data = any(name in self.data for name in node.input)
        if node.op_type == "Shape" or not reads_data:
            self._constant_or_shape(node)
            return
        handler = _HANDLERS.get(node.op_type)
        if handler is None:
            raise self.error(f"is supported only on constants and shapes, not on the tensor "
                             f"{next(name for name in node.input if name in self.data)!r} computed from the input")
        handler(self, node, _attributes(node))
        self.data.update(name for name in node.output if name)

    def _constant_or_shape(self, node: onnx.NodeProto) -> None:
        """Fold Constant and Identity / Cast of constants; leave shape computations to shape inference."""
        if node.op_type not in SHAPE_OPS:
            raise self.error("reads only constants or shapes; it is supported only on tensors computed from the "
                             "input")
        if node.op_type not in _FOLDED_OPS or any(name not in self.constants for name in node.input):
            return
        attributes = _attributes(node)
        if node.op_type == "Constant":
            value = self._constant_value(node, attributes)
        elif node.op_type == "Cast":
            value = self.constants[node.input[0]].astype(helper.tensor_dtype_to_np_dtype(attributes["to"]))
        else:
            value = self.constants[node.input[0]]
        self.constants[node.output[0]] = _finite(np.asarray(value), node.output[0], self.where)

    def _constant_value(self, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> Any:
        if "value" in attributes:
            return _array(attributes["value"], node.output[0], self.where)
        for name, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                            ("value_ints", np.int64)):
            if name in attributes:
                return np.asarray(attributes[name], dtype=dtype)
        raise self.error(f"attribute {', '.join(attributes)} is not supported (only numeric constants are)")

    # ------------------------------------------------ helpers for the handlers

    def error(self, message: str) -> OnnxImportError:
        return OnnxImportError(f"{self.where}: node {_node_name(self.node, self.index)!r} ({self.node.op_type}) "
                               f"{message}")

    def resolve(self, name: str) -> str:
        return self.aliases.get(name, name)

    def input(self, node: onnx.NodeProto, position: int) -> str:
        """The name of the tensor computed from the input that ``node`` reads at ``position``."""
        name = node.input[position] if position < len(node.input) else ""
        if name not in self.data:
            raise self.error(f"input {position} ({name!r}) must be computed from the model's input")
        return self.resolve(name)

    def constant(self, node: onnx.NodeProto, position: int, optional: bool = False) -> np.ndarray | None:
        name = node.input[position] if position < len(node.input) else ""
        if optional and not name:
            return None
        if name not in self.constants:
            raise self.error(f"input {position} ({name!r}) must be a constant (an initializer or a Constant node)")
        return self.constants[name]

    def weight(self, node: onnx.NodeProto, position: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        value = self.constant(node, position)
        assert value is not None  # not optional
        if not np.issubdtype(value.dtype, np.floating) or (shape is not None and value.shape != shape):
            wanted = f" of shape {shape}" if shape is not None else ""
            raise self.error(f"input {position} ({node.input[position]!r}) must be a float tensor{wanted}, got "
                             f"{value.dtype} {value.shape}")
        return value

    def shape(self, name: str, what: str | None = None) -> tuple[int, ...]:
        shape = self.shapes.get(name)
        if shape is None or any(size is None for size in shape):
            message = f"{what or f'tensor {name!r}'}: ONNX shape inference cannot tell its shape"
            raise OnnxImportError(f"{self.where}: {message}")
        return tuple(int(size) for size in shape)  # type: ignore[arg-type]  # no None, checked above

    def image_shape(self, name: str, rank: int) -> tuple[int, ...]:
        shape = self.shape(name)
        if len(shape) != rank:
            raise self.error(f"reads {name!r} of shape {shape}; it must be {rank}-D")
        return shape

    def alias(self, node: onnx.NodeProto, source: str) -> None:
        self.aliases[node.output[0]] = source

    def no_extra_outputs(self, node: onnx.NodeProto) -> None:
        used = [name for name in node.output[1:] if name and self.consumers[name]]
        if used:
            raise self.error(f"output {used[0]!r} is read, which is a training output (only the first is supported)")

    def emit(self, node: onnx.NodeProto, op: str, inputs: Sequence[str], attributes: dict[str, Any],
             weights: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        module = _module_name(node, self.index, self.taken) if op in _MODULES else None
        entry = {"op": op, "name": node.name, "onnx_op": node.op_type, "module": module, "inputs": list(inputs),
                 "output": node.output[0], "attributes": attributes}
        self.nodes.append(entry)
        self.producers[node.output[0]] = entry
        for key, value in (weights or {}).items():
            self.state_dict[f"{module}.{key}"] = _tensor(value)
        return entry


def _written_value(value: float) -> float:
    """The number a float32 attribute was written from: the shortest decimal that rounds to it.

    ONNX keeps float attributes in float32, so torch's BatchNorm eps 1e-5 comes back as 9.99999974738e-06; folded
    with that, a layer's weights differ in their last bit from the same model's folded from its state_dict.
    """
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _tensor(value: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32, order="C", copy=True))


def _pairs(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """A window's (stride, padding), refusing dilation, automatic or asymmetric padding."""
    if attributes.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise reader.error(f"attribute auto_pad={attributes['auto_pad']!r} is not supported; supported: NOTSET "
                           "with explicit pads, VALID")
    dilations = list(attributes.get("dilations", [1, 1]))
    if dilations != [1, 1]:
        raise reader.error(f"attribute dilations={dilations} is not supported (the quantizer's convolutions and "
                           "pools have dilation 1)")
    strides = [int(size) for size in attributes.get("strides", [1, 1])]
    pads = [int(size) for size in attributes.get("pads", [0, 0, 0, 0])]
    if len(strides) != 2 or len(pads) != 4:
        raise reader.error(f"attributes strides={strides} and pads={pads} must be 2-D")
    if pads[:2] != pads[2:]:
        raise reader.error(f"attribute pads={pads} (top, left, bottom, right) is asymmetric; only the same padding "
                           "on both sides of each axis is supported")
    return strides, pads[:2]


def _conv(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    source = reader.input(node, 0)
    weight = reader.weight(node, 1)
    if weight.ndim != 4:
        raise reader.error(f"has a {weight.ndim - 2}-D kernel {weight.shape}; only 2-D convolutions are supported")
    out_channels, group_channels, *kernel = (int(size) for size in weight.shape)
    bias = None if reader.constant(node, 2, optional=True) is None else reader.weight(node, 2, (out_channels,))
    groups = int(attributes.get("group", 1))
    in_channels = reader.image_shape(source, 4)[1]
    if group_channels * groups != in_channels:
        raise reader.error(f"weight {weight.shape} with group={groups} does not fit {in_channels} input channels")
    strides, padding = _pairs(reader, node, attributes)
    weights = {"weight": weight} | ({"bias": bias} if bias is not None else {})
    reader.emit(node, "Conv2d", [source], {
        "in_channels": in_channels, "out_channels": out_channels, "kernel_size": kernel, "stride": strides,
        "padding": padding, "groups": groups, "bias": bias is not None,
    }, weights)


def _linear(reader: _Reader, node: onnx.NodeProto, source: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
    features = reader.image_shape(source, 2)[1]
    if weight.shape[1] != features:
        raise reader.error(f"weight of {weight.shape[1]} inputs does not fit {features} features")
    weights = {"weight": weight} | ({"bias": bias} if bias is not None else {})
    reader.emit(node, "Linear", [source], {
        "in_features": features, "out_features": int(weight.shape[0]), "bias": bias is not None,
    }, weights)


def _bias(reader: _Reader, value: np.ndarray, features: int, what: str) -> np.ndarray:
    """A constant added to (N, ``features``) outputs, as one value per feature: the same for every image."""
    try:
        fits = value.ndim <= 2 and np.broadcast_shapes(value.shape, (1, features)) == (1, features)
    except ValueError:  # shapes that do not broadcast
        fits = False
    if not fits:
        raise reader.error(f"{what} of shape {value.shape} is not a bias of {features} features")
    return np.broadcast_to(value, (1, features))[0]


def _gemm(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    source = reader.input(node, 0)
    settings = {name: attributes.get(name, default) for name, default in
                (("alpha", 1.0), ("beta", 1.0), ("transA", 0), ("transB", 0))}
    bias = reader.constant(node, 2, optional=True)
    if settings["alpha"] != 1 or settings["transA"] != 0 or (bias is not None and settings["beta"] != 1):
        raise reader.error(f"attributes {settings} are not supported; supported: alpha=1, beta=1, transA=0")
    weight = reader.weight(node, 1)
    if weight.ndim != 2:
        raise reader.error(f"weight {weight.shape} must be 2-D")
    weight = weight if settings["transB"] else weight.T
    _linear(reader, node, source, weight,
            None if bias is None else _bias(reader, reader.weight(node, 2), weight.shape[0], "bias C"))


def _matmul(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    source = reader.input(node, 0)
    weight = reader.weight(node, 1)
    if weight.ndim != 2:
        raise reader.error(f"weight {weight.shape} must be 2-D (a matrix of (inputs, outputs))")
    _linear(reader, node, source, weight.T, None)


def _add(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    first, second = node.input
    if first in reader.data and second in reader.data:
        shapes = (reader.shape(reader.resolve(first)), reader.shape(reader.resolve(second)))
        if shapes[0] != shapes[1]:
            raise reader.error(f"adds tensors of shapes {shapes[0]} and {shapes[1]}; broadcasting is not supported")
        reader.emit(node, "torch.add", [reader.resolve(first), reader.resolve(second)], {})
        return
    tensor, position = (first, 1) if first in reader.data else (second, 0)
    source = reader.resolve(tensor)
    producer = reader.producers.get(source)
    fusable = (producer is not None and producer["op"] == "Linear" and not producer["attributes"]["bias"]
               and reader.consumers[tensor] == 1 and reader.consumers[source] == 1)
    if not fusable:
        raise reader.error(f"adds the constant {node.input[position]!r} to {tensor!r}; a constant is supported only "
                           "as the bias of a MatMul or Gemm whose output only this Add reads")
    assert producer is not None  # fusable
    value = reader.weight(node, position)
    bias = _bias(reader, value, producer["attributes"]["out_features"], f"constant {node.input[position]!r}")
    producer["attributes"]["bias"] = True
    reader.state_dict[f"{producer['module']}.bias"] = _tensor(bias)
    reader.alias(node, source)


def _batch_norm(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    source = reader.input(node, 0)
    channels = reader.image_shape(source, 4)[1]
    if attributes.get("training_mode", 0) != 0 or attributes.get("spatial", 1) != 1:
        raise reader.error(f"attributes training_mode={attributes.get('training_mode', 0)}, spatial="
                           f"{attributes.get('spatial', 1)} are not supported (inference: 0 and 1)")
    reader.no_extra_outputs(node)
    weights = {key: reader.weight(node, position, (channels,))
               for position, key in enumerate(("weight", "bias", "running_mean", "running_var"), start=1)}
    reader.emit(node, "BatchNorm2d", [source],
                {"num_features": channels, "eps": _written_value(attributes.get("epsilon", 1e-5))}, weights)


def _activation(op: str) -> Callable[[_Reader, onnx.NodeProto, Mapping[str, Any]], None]:
    def handler(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
        reader.emit(node, op, [reader.input(node, 0)], {})
    return handler


def _bound(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any], name: str, position: int,
           unbounded: float) -> float:
    """Clip's ``name`` bound: an attribute before opset 11, an optional constant input since."""
    value = attributes[name] if name in attributes else reader.constant(node, position, optional=True)
    if value is None:
        return unbounded
    if np.size(value) != 1:
        raise reader.error(f"{name} of shape {np.shape(value)} must be one number")
    number = float(np.asarray(value).reshape(()))
    return unbounded if abs(number) >= _UNBOUNDED else number


def _clip(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    source = reader.input(node, 0)
    low = _bound(reader, node, attributes, "min", 1, -float("inf"))
    high = _bound(reader, node, attributes, "max", 2, float("inf"))
    if low == 0 and high in (6, float("inf")):
        reader.emit(node, "ReLU6" if high == 6 else "ReLU", [source], {})
        return
    raise reader.error(f"bounds min={low}, max={high} are not supported; supported: min=0 without max (ReLU), "
                       "min=0 max=6 (ReLU6)")


def _leaky_relu(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    alpha = _written_value(attributes.get("alpha", 0.01))
    if not 0 <= alpha < float("inf"):
        raise reader.error(f"attribute alpha={alpha} is not supported; it must be >= 0 (the integer form's "
                           "negative slope is a non-negative multiplier)")
    reader.emit(node, "LeakyReLU", [reader.input(node, 0)], {"negative_slope": alpha})


def _pool(op: str) -> Callable[[_Reader, onnx.NodeProto, Mapping[str, Any]], None]:
    def handler(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
        source = reader.input(node, 0)
        kernel = [int(size) for size in attributes["kernel_shape"]]
        if len(kernel) != 2:
            raise reader.error(f"attribute kernel_shape={kernel} is not supported; only 2-D pools are")
        strides, padding = _pairs(reader, node, attributes)
        if any(pad > size // 2 for pad, size in zip(padding, kernel)):
            raise reader.error(f"pads {padding} exceed half the kernel {kernel} (torch's pools allow at most that)")
        reader.no_extra_outputs(node)
        height, width = reader.image_shape(source, 4)[2:]
        floor = [(size + 2 * pad - window) // stride + 1
                 for size, pad, window, stride in zip((height, width), padding, kernel, strides)]
        if list(reader.image_shape(node.output[0], 4)[2:]) != floor:
            raise reader.error(f"attribute ceil_mode={attributes.get('ceil_mode')} gives a larger output than "
                               f"{floor} (flooring); only pools whose windows fit the input are supported")
        settings = {"kernel_size": kernel, "stride": strides, "padding": padding}
        if op == "AvgPool2d" and any(padding) and not attributes.get("count_include_pad", 0):
            raise reader.error("attribute count_include_pad=0 with padding is not supported (the padding counts "
                               "in the quantizer's average)")
        reader.emit(node, op, [source], settings)
    return handler


def _global_pool(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    source = reader.input(node, 0)
    reader.image_shape(source, 4)
    reader.emit(node, "AdaptiveAvgPool2d", [source], {"output_size": 1})


def _reduce_mean(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    source = reader.input(node, 0)
    reader.image_shape(source, 4)
    # An attribute before opset 18, an optional constant input since; none means all axes.
    axes = attributes["axes"] if "axes" in attributes else reader.constant(node, 1, optional=True)
    listed = [int(axis) for axis in np.ravel(axes)] if axes is not None else "all"
    if axes is None or sorted(axis % 4 for axis in listed) != [2, 3]:
        raise reader.error(f"axes {listed} are not supported; only the mean over H and W (axes 2, 3) is")
    reader.emit(node, "torch.mean", [source], {"keepdim": bool(attributes.get("keepdims", 1))})


def _flatten(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    """Flatten, Reshape or Squeeze: supported where it maps each (C, H, W) image to (C*H*W,) (module docstring)."""
    source = reader.input(node, 0)
    in_shape = reader.shape(source)
    out_shape = reader.shape(node.output[0])
    features = int(np.prod(in_shape[1:]))
    if out_shape != (reader.batch, features):
        raise reader.error(f"maps {in_shape} to {out_shape} for a batch of {reader.batch}; only a flatten of "
                           f"each image, (N, ...) to (N, {features}), is supported")
    reader.emit(node, "torch.flatten", [source], {})


def _concat(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    sources = [reader.input(node, position) for position in range(len(node.input))]
    rank = len(reader.shape(node.output[0]))
    axis = int(attributes["axis"]) % rank
    if axis != 1:
        raise reader.error(f"attribute axis={attributes['axis']} is not supported; only concatenation on channels "
                           "(axis 1) is")
    reader.emit(node, "torch.cat", sources, {})


def _pass_on(reader: _Reader, node: onnx.NodeProto, attributes: Mapping[str, Any]) -> None:
    """Identity, and Dropout at inference: the output is the input."""
    reader.no_extra_outputs(node)
    reader.alias(node, reader.input(node, 0))


_HANDLERS: dict[str, Callable[[_Reader, onnx.NodeProto, Mapping[str, Any]], None]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "Add": _add,
    "BatchNormalization": _batch_norm,
    "Relu": _activation("ReLU"),
    "Clip": _clip,
    "LeakyRelu": _leaky_relu,
    "HardSwish": _activation("Hardswish"),
    "Concat": _concat,
    "MaxPool": _pool("MaxPool2d"),
    "AveragePool": _pool("AvgPool2d"),
    "GlobalAveragePool": _global_pool,
    "ReduceMean": _reduce_mean,
    "Flatten": _flatten,
    "Reshape": _flatten,
    "Squeeze": _flatten,
    "Identity": _pass_on,
    "Dropout": _pass_on,
}
