"""Tracing a model into the float graph: ``capture(model)``, and ``observe_original`` on the trace.

``capture(model)`` traces ``model`` with ``torch.fx.symbolic_trace``, runs one
CIFAR-sized image through the trace to learn every tensor's shape, and turns
each traced call into one of the node types of ``pipeline.graph.nodes``. Anything else is an
``UnsupportedModelError`` naming the node, its op and ``SUPPORTED``, before
any work is done. Then the rewrites of ``pipeline.graph.rewrite`` (BatchNorm folding,
activation fusion), each found by pattern, not by position.

A module called more than once (the tutorial's ``self.pool``, torchvision's ``self.relu`` in a
residual block, a shared-weight layer) is one node per call: the first keeps the
module's name, the next are ``pool@2``, ``pool@3``, ... (``@`` is in no module path
or fx name, so these never collide). A shared-weight layer is thus one layer per
call, each with its own copy of the weight (and BatchNorm, if each call has its own).
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from pipeline.graph.nodes import (
    CIFAR10_INPUT_SHAPE,
    Activation,
    ActivationKind,
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
    UnsupportedModelError,
    numel,
    tensor_names,
)
from pipeline.graph.rewrite import (
    BatchNormCall,
    fold_batchnorms,
    fuse_activations,
    rename_inputs,
)

SUPPORTED = (
    "Conv2d (dilation 1, zero padding, any groups), Linear, BatchNorm2d after a Conv2d, ReLU / ReLU6 / "
    "F.relu / F.relu6 / clamp(0, 6) / hardtanh(0, 6), LeakyReLU / F.leaky_relu (negative_slope >= 0), Hardswish / "
    "F.hardswish, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), "
    "mean over H and W, flatten / view / reshape to (N, -1), + / torch.add, torch.cat on channels, "
    "Identity, Dropout (eval: identity)"
)



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
    names = tensor_names(traced)
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
    """One traced call as a node (BatchNorm2d kept as ``BatchNormCall``), an alias name, or None (not a tensor)."""
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
    if target is F.leaky_relu:
        slope = node.args[1] if len(node.args) > 1 else kwargs.get("negative_slope", 0.01)
        return _leaky_relu(node, name, what, source, slope)
    if target is F.hardswish:
        return HardSwish(name, source, name)
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
    if values.get("ceil_mode") or _pair(values.get("dilation", 1)) != (1, 1):
        raise _unsupported(node, what, "ceil_mode and dilation are not")
    if kind is AvgPool and (values.get("count_include_pad") is False or values.get("divisor_override")):
        raise _unsupported(node, what, "count_include_pad=False and divisor_override are not")
    return kind(name, source, name, kernel, stride, padding)


def _leaky_relu(node: torch.fx.Node, name: str, what: str, source: str, slope: Any) -> LeakyReLU:
    # The integer form's negative side is a fixed-point multiplier, which is never negative.
    if not isinstance(slope, (int, float)) or not 0 <= slope < float("inf"):
        raise _unsupported(node, what, f"negative_slope must be a number >= 0, got {slope!r}")
    return LeakyReLU(name, source, name, float(slope))


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
        return BatchNormCall(name, source, name, module)
    if isinstance(module, nn.ReLU6) or (isinstance(module, nn.Hardtanh) and (module.min_val, module.max_val) == (0, 6)):
        return Activation(name, source, name, "relu6")
    if isinstance(module, nn.ReLU):
        return Activation(name, source, name, "relu")
    if isinstance(module, nn.LeakyReLU):
        return _leaky_relu(node, name, what, source, module.negative_slope)
    if isinstance(module, nn.Hardswish):
        return HardSwish(name, source, name)
    if isinstance(module, nn.MaxPool2d):
        if _pair(module.dilation) != (1, 1) or module.ceil_mode or module.return_indices:  # [1, 1] too (onnx2torch)
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
    nodes = [rename_inputs(node, raw.aliases) for node in nodes]
    output = raw.aliases.get(raw.output, raw.output)
    graph = FloatGraph(raw.input_name, output, tuple(nodes), dict(shapes))
    for node in graph.nodes:
        if isinstance(node, Add) and shapes[node.inputs[0]] != shapes[node.inputs[1]]:
            raise UnsupportedModelError(
                f"node {node.name!r} (add) needs inputs of one shape, got {shapes[node.inputs[0]]} and "
                f"{shapes[node.inputs[1]]} (broadcasting is not supported)"
            )
    return graph


@torch.no_grad()
def observe_original(graph: FloatGraph, x: Tensor, names: Iterable[str], observe: Callable[[str, Tensor], None]) -> Tensor:
    """Run the original model's trace on ``x`` and call ``observe(name, value)`` for the named tensors.

    The values are the model's own (BatchNorm not folded), computed by the same calls as
    ``model(x)``: calibration sees exactly what the trained model computes.
    """
    if graph.traced is None:
        raise ValueError("this graph was not captured from a model (no trace); use run_float(observe=...)")
    wanted = set(names)
    name_of = tensor_names(graph.traced)

    class _Observer(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            value = super().run_node(node)
            name = name_of[node]
            if name in wanted and isinstance(value, Tensor):
                observe(name, value)
            return value

    return _Observer(graph.traced).run(x)

