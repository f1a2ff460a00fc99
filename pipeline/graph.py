"""The float graph: any traceable CNN as typed nodes in topological order, BatchNorm folded, activations fused.

``capture(model)`` traces ``model`` with ``torch.fx.symbolic_trace``, runs one
CIFAR-sized image through the trace to learn every tensor's shape, and turns
each traced call into one of the node types below. Anything else is an
``UnsupportedModelError`` naming the node, its op and ``SUPPORTED``, before
any work is done. Then two rewrites, each found by pattern, not by position:

- a ``BatchNorm2d`` whose input is a convolution's output read by nothing else
  is folded into that convolution (eval-mode statistics, float64 arithmetic);
- a ReLU / ReLU6 (module, function, method, ``clamp(0, 6)``, ``hardtanh(0, 6)``)
  whose input is a ``Conv``, ``Linear`` or ``Add`` output read by nothing else
  becomes that node's ``activation``; elsewhere it stays an ``Activation`` node.

Tensor names are node names; a module call is named by the module's qualified
name (``layer1.0.conv1``), a function call by fx's name for it (``add_1``). A module
called more than once (the tutorial's ``self.pool``, torchvision's ``self.relu`` in a
residual block, a shared-weight layer) is one node per call: the first keeps the
module's name, the next are ``pool@2``, ``pool@3``, ... (``@`` is in no module path
or fx name, so these never collide). A shared-weight layer is thus one layer per
call, each with its own copy of the weight (and BatchNorm, if each call has its own).
Shapes are per image: (C, H, W) for maps, (K,) after a flatten.

``run_float(graph, x)`` runs the graph in float, optionally with other weights
(the weight-only quantized model); it equals ``model.eval()(x)`` to float tolerance.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

ActivationKind = Literal["none", "relu", "relu6"]
CIFAR10_INPUT_SHAPE = (3, 32, 32)  # (C, H, W) of one image

SUPPORTED = (
    "Conv2d (dilation 1, zero padding, any groups), Linear, BatchNorm2d after a Conv2d, ReLU / ReLU6 / "
    "F.relu / F.relu6 / clamp(0, 6) / hardtanh(0, 6), MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), "
    "mean over H and W, flatten / view / reshape to (N, -1), + / torch.add, torch.cat on channels, "
    "Identity, Dropout (eval: identity)"
)


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
class MaxPool:
    name: str
    input: str
    output: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class AvgPool:
    """Average over windows (zero padding counted, as PyTorch's default); a global pool is one H x W window."""

    name: str
    input: str
    output: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


@dataclass(frozen=True)
class Activation:
    """A ReLU or ReLU6 that could not be fused into its producer."""

    name: str
    input: str
    output: str
    activation: ActivationKind


@dataclass(frozen=True)
class Reshape:
    """A flatten to (N, K): moves no data (the C, H, W order is the memory order)."""

    name: str
    input: str
    output: str


Node = Conv | Linear | Add | Concat | MaxPool | AvgPool | Activation | Reshape
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


# ---------------------------------------------------------------- capture


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    pair = tuple(int(v) for v in value)
    return (pair[0], pair[0]) if len(pair) == 1 else (pair[0], pair[1])


def _unsupported(node: torch.fx.Node, what: str, detail: str = "") -> UnsupportedModelError:
    reason = f": {detail}" if detail else ""
    return UnsupportedModelError(
        f"node {_call_name(node)!r} ({what}) is not supported{reason}; supported: {SUPPORTED}"
    )


def _call_name(node: torch.fx.Node) -> str:
    """The name a user knows a call by: the module's qualified name, or fx's name for a function call."""
    if node.op == "call_module":
        return str(node.target)
    return node.name


def _tensor_names(traced: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Each traced node's tensor name (module docstring): one per call, so a module called twice writes two tensors."""
    names: dict[torch.fx.Node, str] = {}
    calls: dict[str, int] = {}
    for node in traced.graph.nodes:
        name = _call_name(node)
        if node.op == "call_module":
            calls[name] = calls.get(name, 0) + 1
            if calls[name] > 1:
                name = f"{name}@{calls[name]}"
        names[node] = name
    return names


def _describe(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[str(node.target)]).__name__} module {node.target!r}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    target = getattr(node.target, "__name__", str(node.target))
    return f"function {getattr(node.target, '__module__', '') or ''}.{target}".replace("_operator.", "operator.")


def _tensor_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    return [arg for arg in node.args if isinstance(arg, torch.fx.Node)]


def _activation_of_clamp(low: Any, high: Any) -> ActivationKind | None:
    if low == 0 and high is None:
        return "relu"
    if low == 0 and high == 6:
        return "relu6"
    return None


def capture(model: nn.Module, input_shape: tuple[int, int, int] = CIFAR10_INPUT_SHAPE) -> FloatGraph:
    """The float graph of ``model`` in eval mode, BatchNorm folded and activations fused (module docstring)."""
    model = model.eval()
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError... on data-dependent code
        raise UnsupportedModelError(
            f"{type(model).__name__} cannot be traced by torch.fx.symbolic_trace ({type(error).__name__}: "
            f"{error}); its forward must not branch on tensor values; supported ops: {SUPPORTED}"
        ) from None
    modules = dict(traced.named_modules())
    names = _tensor_names(traced)
    raw = _convert(traced, modules, names)  # every op checked before the shapes are computed
    with torch.no_grad():
        ShapeProp(traced).propagate(torch.zeros(1, *input_shape))
    shapes = {}
    for node in traced.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if node.op in ("placeholder", "call_module", "call_function", "call_method") and hasattr(meta, "shape"):
            shapes[names[node]] = tuple(int(s) for s in meta.shape[1:])
    graph = replace(_build(raw, shapes), traced=traced)
    return fuse_activations(fold_batchnorms(graph))


@dataclass
class _Raw:
    """A traced call before folding: a node, a BatchNorm2d to fold, or an alias (identity)."""

    input_name: str
    output: str
    graph_input: str | None = None
    nodes: list[Any] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    views: list[tuple[str, str, torch.fx.Node]] = field(default_factory=list)  # (input, output, fx node)


def _convert(
    traced: torch.fx.GraphModule, modules: Mapping[str, nn.Module], names: Mapping[torch.fx.Node, str]
) -> _Raw:
    placeholders = [node for node in traced.graph.nodes if node.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"the model's forward must take one tensor, got {len(placeholders)} inputs")
    raw = _Raw(input_name=placeholders[0].name, output="")
    aliases = raw.aliases

    def resolve(arg: torch.fx.Node) -> str:
        name = names[arg]
        while name in aliases:
            name = aliases[name]
        return name

    for node in traced.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            result = node.args[0]
            if not isinstance(result, torch.fx.Node):
                raise UnsupportedModelError(f"the model must return one tensor, got {result!r}")
            raw.output = resolve(result)
            continue
        if node.op == "get_attr":
            raise _unsupported(node, f"attribute {node.target!r}", "tensors stored on the model cannot be quantized")
        name = names[node]
        what = _describe(node, modules)
        converted = _convert_call(node, name, what, modules, resolve)
        if converted is None:
            continue
        if isinstance(converted, str):
            aliases[name] = converted
        else:
            raw.nodes.append(converted)
    return raw


def _convert_call(
    node: torch.fx.Node, name: str, what: str, modules: Mapping[str, nn.Module], resolve: Callable[[torch.fx.Node], str]
) -> Any:
    """One traced call as a node (BatchNorm2d kept as ``_BatchNorm``), an alias name, or None (not a tensor)."""
    args = _tensor_args(node)
    if node.op == "call_method" and node.target == "size":
        return None  # an integer, only used as a view/reshape argument
    if node.target is torch.cat:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, -3) or not isinstance(tensors, (list, tuple)):
            raise _unsupported(node, what, f"only concatenation on channels (dim=1) is, got dim={dim}")
        return Concat(name, tuple(resolve(t) for t in tensors), name)
    if not args:
        raise _unsupported(node, what, "it reads no tensor")
    source = resolve(args[0])
    if node.op == "call_module":
        module = modules[str(node.target)]
        return _convert_module(node, name, what, module, source)
    target = node.target
    kwargs = dict(node.kwargs)
    if target in (operator.add, torch.add) or (node.op == "call_method" and target == "add"):
        if len(args) != 2 or kwargs.get("alpha", 1) != 1 or len(node.args) > 2:
            raise _unsupported(node, what, "only the sum of two tensors is supported")
        return Add(name, (source, resolve(args[1])), name)
    if target in (F.relu, torch.relu) or (node.op == "call_method" and target == "relu"):
        return Activation(name, source, name, "relu")
    if target is F.relu6:
        return Activation(name, source, name, "relu6")
    if target in (torch.clamp, torch.clip) or (node.op == "call_method" and target in ("clamp", "clip")):
        low = node.args[1] if len(node.args) > 1 else kwargs.get("min")
        high = node.args[2] if len(node.args) > 2 else kwargs.get("max")
        kind = _activation_of_clamp(low, high)
        if kind is None:
            raise _unsupported(node, what, f"only clamp(0) and clamp(0, 6) are, got min={low!r}, max={high!r}")
        return Activation(name, source, name, kind)
    if target is F.hardtanh:
        low = node.args[1] if len(node.args) > 1 else kwargs.get("min_val", -1.0)
        high = node.args[2] if len(node.args) > 2 else kwargs.get("max_val", 1.0)
        if (low, high) != (0, 6) and (low, high) != (0.0, 6.0):
            raise _unsupported(node, what, f"only hardtanh(0, 6) is, got ({low!r}, {high!r})")
        return Activation(name, source, name, "relu6")
    if target is torch.flatten or (node.op == "call_method" and target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else kwargs.get("end_dim", -1)
        if start != 1 or end != -1:
            raise _unsupported(node, what, f"only flatten(x, 1) is, got start_dim={start}, end_dim={end}")
        return Reshape(name, source, name)
    if node.op == "call_method" and target in ("view", "reshape") or target is torch.reshape:
        return _Reshape(name, source, name)  # checked against the shapes once they are known
    if target is torch.mean or (node.op == "call_method" and target == "mean"):
        dims = node.args[1] if len(node.args) > 1 else kwargs.get("dim")
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if sorted(d % 4 for d in dims) != [2, 3]:
            raise _unsupported(node, what, f"only the mean over H and W (dim=(2, 3)) is, got dim={dims}")
        return _GlobalPool(name, source, name, bool(kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)))
    if target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else kwargs.get("output_size")
        if _pair(size) != (1, 1):
            raise _unsupported(node, what, f"only output size 1 (a global average pool) is, got {size!r}")
        return _GlobalPool(name, source, name, True)
    if target is F.max_pool2d:
        return _functional_pool(node, name, what, source, MaxPool)
    if target is F.avg_pool2d:
        return _functional_pool(node, name, what, source, AvgPool)
    if target is F.dropout or (node.op == "call_method" and target == "contiguous"):
        return source
    raise _unsupported(node, what)


@dataclass(frozen=True)
class _BatchNorm:
    name: str
    input: str
    output: str
    module: nn.BatchNorm2d


@dataclass(frozen=True)
class _Reshape:
    name: str
    input: str
    output: str


@dataclass(frozen=True)
class _GlobalPool:
    name: str
    input: str
    output: str
    keepdim: bool


def _functional_pool(node: torch.fx.Node, name: str, what: str, source: str, kind: type) -> MaxPool | AvgPool:
    names = ["input", "kernel_size", "stride", "padding"]
    values = dict(zip(names, node.args)) | dict(node.kwargs)
    kernel = _pair(values["kernel_size"])
    stride = _pair(values.get("stride") or kernel)
    padding = _pair(values.get("padding", 0))
    if values.get("ceil_mode") or values.get("dilation", 1) not in (1, (1, 1)):
        raise _unsupported(node, what, "ceil_mode and dilation are not")
    if kind is AvgPool and (values.get("count_include_pad") is False or values.get("divisor_override")):
        raise _unsupported(node, what, "count_include_pad=False and divisor_override are not")
    return kind(name, source, name, kernel, stride, padding)


def _convert_module(node: torch.fx.Node, name: str, what: str, module: nn.Module, source: str) -> Any:
    if isinstance(module, nn.Conv2d):
        plain = tuple(module.dilation) == (1, 1) and module.padding_mode == "zeros" and not isinstance(module.padding, str)
        if not plain:
            raise _unsupported(
                node, what, f"needs dilation 1 and numeric zero padding, got dilation={module.dilation}, "
                f"padding={module.padding!r}, padding_mode={module.padding_mode!r}",
            )
        bias = module.bias.detach() if module.bias is not None else None
        return Conv(name, source, name, module.weight.detach(), bias, _pair(module.stride), _pair(module.padding),
                    module.groups)
    if isinstance(module, nn.Linear):
        bias = module.bias.detach() if module.bias is not None else None
        return Linear(name, source, name, module.weight.detach(), bias)
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            raise _unsupported(node, what, "a BatchNorm2d without running statistics cannot be folded")
        return _BatchNorm(name, source, name, module)
    if isinstance(module, nn.ReLU6) or (isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0, 6)):
        return Activation(name, source, name, "relu6")
    if isinstance(module, nn.ReLU):
        return Activation(name, source, name, "relu")
    if isinstance(module, nn.MaxPool2d):
        if module.dilation not in (1, (1, 1)) or module.ceil_mode or module.return_indices:
            raise _unsupported(node, what, "needs dilation 1, ceil_mode=False, return_indices=False")
        return MaxPool(name, source, name, _pair(module.kernel_size), _pair(module.stride or module.kernel_size),
                       _pair(module.padding))
    if isinstance(module, nn.AvgPool2d):
        if module.ceil_mode or not module.count_include_pad or module.divisor_override:
            raise _unsupported(node, what, "needs ceil_mode=False, count_include_pad=True, no divisor_override")
        return AvgPool(name, source, name, _pair(module.kernel_size), _pair(module.stride or module.kernel_size),
                       _pair(module.padding))
    if isinstance(module, nn.AdaptiveAvgPool2d):
        if _pair(module.output_size) != (1, 1):
            raise _unsupported(node, what, f"only output size 1 (a global average pool) is, got {module.output_size}")
        return _GlobalPool(name, source, name, True)
    if isinstance(module, nn.Flatten):
        if (module.start_dim, module.end_dim) != (1, -1):
            raise _unsupported(node, what, f"only Flatten(1, -1) is, got ({module.start_dim}, {module.end_dim})")
        return Reshape(name, source, name)
    if isinstance(module, (nn.Identity, nn.Dropout)):
        return source
    raise _unsupported(node, what)


def _build(raw: _Raw, shapes: Mapping[str, tuple[int, ...]]) -> FloatGraph:
    """Resolve the shape-dependent nodes (global pools, views) and collect the shapes of kept tensors."""
    nodes: list[Any] = []
    for item in raw.nodes:
        if isinstance(item, _GlobalPool):
            channels, height, width = shapes[item.input]
            pooled = item.name if item.keepdim else f"{item.name}.pooled"
            nodes.append(AvgPool(item.name, item.input, pooled, (height, width), (height, width), (0, 0)))
            if not item.keepdim:  # mean without keepdim: the (C, 1, 1) map seen as (C,)
                shapes = dict(shapes) | {pooled: (channels, 1, 1)}
                nodes.append(Reshape(f"{item.name}.flatten", pooled, item.name))
        elif isinstance(item, _Reshape):
            in_shape, out_shape = shapes[item.input], shapes[item.output]
            if len(out_shape) != 1 or out_shape[0] != numel(in_shape):
                raise UnsupportedModelError(
                    f"node {item.name!r} (view/reshape) must flatten to (N, {numel(in_shape)}), got (N, "
                    f"{', '.join(map(str, out_shape))}); supported: {SUPPORTED}"
                )
            nodes.append(Reshape(item.name, item.input, item.output))
        else:
            nodes.append(item)
    nodes = [_rename_inputs(node, raw.aliases) for node in nodes]
    output = raw.aliases.get(raw.output, raw.output)
    graph = FloatGraph(raw.input_name, output, tuple(nodes), dict(shapes))
    for node in graph.nodes:
        if isinstance(node, Add) and shapes[node.inputs[0]] != shapes[node.inputs[1]]:
            raise UnsupportedModelError(
                f"node {node.name!r} (add) needs inputs of one shape, got {shapes[node.inputs[0]]} and "
                f"{shapes[node.inputs[1]]} (broadcasting is not supported)"
            )
    return graph


def numel(shape: Iterable[int]) -> int:
    """Values in a tensor of ``shape``."""
    total = 1
    for size in shape:
        total *= size
    return total


def _rename_inputs(node: Any, aliases: Mapping[str, str]) -> Any:
    def resolve(name: str) -> str:
        while name in aliases:
            name = aliases[name]
        return name

    if isinstance(node, (Add, Concat)):
        return replace(node, inputs=tuple(resolve(name) for name in node.inputs))
    return replace(node, input=resolve(node.input))


# ---------------------------------------------------------------- rewrites


def folded_conv_parameters(
    weight: Tensor, bias: Tensor | None, batchnorm: nn.BatchNorm2d
) -> tuple[Tensor, Tensor]:
    """(weight, bias) of a convolution with eval-mode ``batchnorm`` folded into it.

    BN(y) = gamma * (y - mean) / sqrt(var + eps) + beta, per output channel, so
    w' = w * gamma / sqrt(var + eps) and b' = (b - mean) * gamma / sqrt(var + eps) + beta.
    Computed in float64, returned in the weight's dtype.
    """
    running_mean = batchnorm.running_mean.to(torch.float64)
    inv_std = torch.rsqrt(batchnorm.running_var.to(torch.float64) + batchnorm.eps)
    gamma = batchnorm.weight.detach().to(torch.float64) if batchnorm.affine else torch.ones_like(running_mean)
    beta = batchnorm.bias.detach().to(torch.float64) if batchnorm.affine else torch.zeros_like(running_mean)
    bias64 = bias.to(torch.float64) if bias is not None else torch.zeros_like(running_mean)
    gain = gamma * inv_std
    folded_weight = weight.to(torch.float64) * gain.reshape(-1, *([1] * (weight.ndim - 1)))
    folded_bias = (bias64 - running_mean) * gain + beta
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def fold_batchnorms(graph: FloatGraph) -> FloatGraph:
    """Fold every BatchNorm2d into the Conv whose output only it reads; any other BatchNorm2d is an error."""
    consumers = graph.consumers()
    conv_index: dict[str, int] = {}  # output tensor -> position in ``nodes`` of the Conv producing it
    renamed: set[str] = set()
    nodes: list[Any] = []
    for node in graph.nodes:
        if not isinstance(node, _BatchNorm):
            if isinstance(node, Conv):
                conv_index[node.output] = len(nodes)
            nodes.append(node)
            continue
        index = conv_index.get(node.input)
        if index is None or len(consumers[node.input]) != 1:
            raise UnsupportedModelError(
                f"node {node.name!r} (BatchNorm2d) must read the output of a Conv2d that nothing else reads, "
                "to be folded into it"
            )
        conv = nodes[index]
        weight, bias = folded_conv_parameters(conv.weight, conv.bias, node.module)
        nodes[index] = replace(conv, weight=weight, bias=bias, output=node.output)
        conv_index[node.output] = index
        renamed.add(conv.output)
    shapes = {name: shape for name, shape in graph.shapes.items() if name not in renamed}
    return replace(graph, nodes=tuple(nodes), shapes=shapes)


def fuse_activations(graph: FloatGraph) -> FloatGraph:
    """Fuse each ReLU/ReLU6 into the Conv, Linear or Add whose output only it reads (module docstring)."""
    consumers = graph.consumers()
    nodes: list[Node] = list(graph.nodes)
    index_of = {node.output: index for index, node in enumerate(nodes)}
    aliases: dict[str, str] = {}
    kept: list[bool] = [True] * len(nodes)
    for index, node in enumerate(graph.nodes):
        if not isinstance(node, Activation):
            continue
        producer_index = index_of.get(node.input)
        if producer_index is None or not kept[producer_index]:
            continue
        producer = nodes[producer_index]
        fusable = isinstance(producer, (Conv, Linear, Add)) and producer.activation == "none"
        if fusable and len(consumers[node.input]) == 1 and node.input != graph.output:
            nodes[producer_index] = replace(producer, activation=node.activation, output=node.output)
            index_of[node.output] = producer_index
            kept[index] = False
            aliases[node.input] = node.output
    fused = [_rename_inputs(node, aliases) for node, keep in zip(nodes, kept) if keep]
    shapes = {name: shape for name, shape in graph.shapes.items() if name not in aliases}
    return replace(graph, nodes=tuple(fused), shapes=shapes)


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


# ---------------------------------------------------------------- running


def apply_activation(x: Tensor, activation: ActivationKind) -> Tensor:
    if activation == "relu":
        return F.relu(x)
    if activation == "relu6":
        return F.relu6(x)
    return x


def run_float(
    graph: FloatGraph,
    x: Tensor,
    weights: Mapping[str, Tensor] | None = None,
    observe: Callable[[str, Tensor], None] | None = None,
    activations: Callable[[str, Tensor], Tensor] | None = None,
    computed: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """The graph's output for a batch ``x`` (N, C, H, W), in ``x``'s dtype.

    ``weights`` replaces layers' weights by name (the weight-only quantized model);
    ``activations(tensor_name, value)`` replaces every tensor as it is computed (the input included), e.g. by its
    quantized value (``pipeline.profile.activation_quantizer``); ``observe(tensor_name, value)`` then sees it.
    ``computed`` holds tensors of an earlier pass on ``x`` whose nodes are not run again: the caller's promise that
    they are what this pass would compute (the same weights up to them), so a pass that changes one layer's weight
    can start at that layer.
    """
    if x.dim() == 4:
        # The graph's own ops, not the user's code (which gets contiguous NCHW): oneDNN's convolutions run
        # channels-last faster on a CPU (ResNet-20 0.87x, net 0.76x as fast without).
        x = x.contiguous(memory_format=torch.channels_last)
    values = {graph.input: x if activations is None else activations(graph.input, x)}
    if observe is not None:
        observe(graph.input, values[graph.input])
    for node in graph.nodes:
        if computed is not None and node.output in computed:
            values[node.output] = computed[node.output]
            continue
        values[node.output] = _float_node(node, values, x.dtype, weights or {})
        if activations is not None:
            values[node.output] = activations(node.output, values[node.output])
        if observe is not None:
            observe(node.output, values[node.output])
    return values[graph.output]


def tensor_values(
    graph: FloatGraph, x: Tensor, name: str, weights: Mapping[str, Tensor] | None = None, batch_size: int = 256,
    activations: Callable[[str, Tensor], Tensor] | None = None,
) -> Tensor:
    """The tensor ``name`` for every image of ``x`` (``weights`` and ``activations`` as in ``run_float``),
    ``batch_size`` images a pass."""
    parts = []

    def keep(tensor_name: str, value: Tensor) -> None:
        if tensor_name == name:
            parts.append(value.detach())

    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            run_float(graph, x[start : start + batch_size], weights, keep, activations)
    return torch.cat(parts)


def run_layer(node: Conv | Linear, x: Tensor, weight: Tensor) -> Tensor:
    """One Conv/Linear node on ``x`` with ``weight`` in its place (its own bias and fused activation), in x's dtype."""
    weight = weight.to(x.dtype)
    bias = node.bias.to(x.dtype) if node.bias is not None else None
    if isinstance(node, Conv):
        y = F.conv2d(x, weight, bias, node.stride, node.padding, 1, node.groups)
    else:
        y = F.linear(x, weight, bias)
    return apply_activation(y, node.activation)


def _float_node(node: Node, values: Mapping[str, Tensor], dtype: torch.dtype, weights: Mapping[str, Tensor]) -> Tensor:
    if isinstance(node, (Conv, Linear)):
        return run_layer(node, values[node.input], weights.get(node.name, node.weight))
    if isinstance(node, Add):
        return apply_activation(values[node.inputs[0]] + values[node.inputs[1]], node.activation)
    if isinstance(node, Concat):
        return torch.cat([values[name] for name in node.inputs], dim=1)
    if isinstance(node, MaxPool):
        return F.max_pool2d(values[node.input], node.kernel, node.stride, node.padding)
    if isinstance(node, AvgPool):
        return F.avg_pool2d(values[node.input], node.kernel, node.stride, node.padding)
    if isinstance(node, Activation):
        return apply_activation(values[node.input], node.activation)
    return values[node.input].flatten(1)


class GraphModel(nn.Module):
    """A float graph as an ``nn.Module`` (``forward`` is ``run_float``), for code that runs modules."""

    def __init__(self, graph: FloatGraph) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> Tensor:
        return run_float(self.graph, x)


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


@torch.no_grad()
def observe_original(graph: FloatGraph, x: Tensor, names: Iterable[str], observe: Callable[[str, Tensor], None]) -> Tensor:
    """Run the original model's trace on ``x`` and call ``observe(name, value)`` for the named tensors.

    The values are the model's own (BatchNorm not folded), computed by the same calls as
    ``model(x)``: calibration sees exactly what the trained model computes.
    """
    if graph.traced is None:
        raise ValueError("this graph was not captured from a model (no trace); use run_float(observe=...)")
    wanted = set(names)
    tensor_names = _tensor_names(graph.traced)

    class _Observer(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            value = super().run_node(node)
            name = tensor_names[node]
            if name in wanted and isinstance(value, Tensor):
                observe(name, value)
            return value

    return _Observer(graph.traced).run(x)


__all__ = [
    "Activation", "ActivationKind", "Add", "AvgPool", "CIFAR10_INPUT_SHAPE", "Concat", "Conv", "FloatGraph",
    "GraphModel", "float_parameter_count",
    "LAYER_TYPES", "Linear", "MaxPool", "Node", "Reshape", "SUPPORTED", "UnsupportedModelError", "capture",
    "check_output_layer", "fold_batchnorms", "folded_conv_parameters", "folded_state_dict", "fuse_activations", "layer_names",
    "node_inputs", "numel", "observe_original", "run_float", "run_layer", "tensor_values", "with_biases", "with_weights",
]
