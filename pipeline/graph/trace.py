"""The trained model's own calls: recorded from its torch.fx trace as plain data, replayed without its code.

Calibration observes the tensors the trained model computes, BatchNorm not folded
(``pipeline.profile.profile_activations``), as ``pipeline.graph.capture.observe_original`` does on the
trace. The stages after the graph stage have no model code, only its file (``pipeline.graph.file``), so
``record_trace`` turns the trace into data: each traced call with its constant arguments, and each
torch.nn module a call runs as its type, constructor arguments, parameters and buffers.
``replay_trace`` rebuilds those modules and makes the same calls in the same order on the same tensors,
so what it observes is bit for bit what ``observe_original`` observes (tests/test_graph_file.py).

Only the calls ``pipeline.graph.capture`` accepts are recorded (``MODULE_ARGUMENTS``, ``FUNCTIONS``,
``METHODS``), and only those are replayed: a file naming another is refused.
"""
from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.graph.file import RecordedTrace
from pipeline.graph.nodes import UnsupportedModelError, tensor_names

# The torch.nn modules a trace may call, with the constructor arguments that rebuild each (its attributes of the
# same names); Conv2d and Linear also take ``bias``, whether they have one.
MODULE_ARGUMENTS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.ReLU: ("inplace",),
    nn.ReLU6: ("inplace",),
    nn.Hardtanh: ("min_val", "max_val", "inplace"),
    nn.LeakyReLU: ("negative_slope", "inplace"),
    nn.Hardswish: ("inplace",),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool2d: ("output_size",),
    nn.Flatten: ("start_dim", "end_dim"),
    nn.Identity: (),
    nn.Dropout: ("p", "inplace"),
}
_MODULE_TYPES = {module_type.__name__: module_type for module_type in MODULE_ARGUMENTS}
_WITH_BIAS_FLAG = (nn.Conv2d, nn.Linear)
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "operator.add": operator.add,
    "torch.add": torch.add,
    "torch.cat": torch.cat,
    "torch.relu": torch.relu,
    "torch.clamp": torch.clamp,
    "torch.clip": torch.clip,
    "torch.flatten": torch.flatten,
    "torch.reshape": torch.reshape,
    "torch.mean": torch.mean,
    "F.relu": F.relu,
    "F.relu6": F.relu6,
    "F.hardtanh": F.hardtanh,
    "F.leaky_relu": F.leaky_relu,
    "F.hardswish": F.hardswish,
    "F.adaptive_avg_pool2d": F.adaptive_avg_pool2d,
    "F.max_pool2d": F.max_pool2d,
    "F.avg_pool2d": F.avg_pool2d,
    "F.dropout": F.dropout,
}
METHODS = ("size", "add", "relu", "clamp", "clip", "flatten", "view", "reshape", "mean", "contiguous")
_MEMORY_FORMATS = {str(layout): layout for layout in (torch.contiguous_format, torch.channels_last, torch.preserve_format)}


def _refused(node: torch.fx.Node, what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"node {node.name!r}: {what} cannot be recorded for calibration "
                                 "(pipeline.graph.trace lists the calls it records)")


def _encode(value: Any, node: torch.fx.Node) -> Any:
    """A call argument as JSON: ``{"node": name}`` for a traced value, ``{"tuple": [...]}`` for a tuple."""
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, node) for item in value]}
    if isinstance(value, list):
        return [_encode(item, node) for item in value]
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise _refused(node, f"the argument {value!r} ({type(value).__name__})")


def _decode(value: Any, values: Mapping[str, Any]) -> Any:
    if isinstance(value, list):
        return [_decode(item, values) for item in value]
    if not isinstance(value, dict):
        return value
    if "node" in value:
        return values[value["node"]]
    if "tuple" in value:
        return tuple(_decode(item, values) for item in value["tuple"])
    return _MEMORY_FORMATS[value["memory_format"]]


def _function_name(node: torch.fx.Node) -> str:
    name = next((name for name, function in FUNCTIONS.items() if function is node.target), None)
    if name is None:
        raise _refused(node, f"the function {getattr(node.target, '__name__', node.target)!r}")
    return name


def _record_module(node: torch.fx.Node, module: nn.Module) -> dict[str, Any]:
    if type(module) not in MODULE_ARGUMENTS:
        raise _refused(node, f"a {type(module).__name__} module (only these exact torch.nn types: "
                             f"{', '.join(_MODULE_TYPES)})")
    arguments = {name: _encode(getattr(module, name), node) for name in MODULE_ARGUMENTS[type(module)]}
    if isinstance(module, _WITH_BIAS_FLAG):
        arguments["bias"] = module.bias is not None
    return {"type": type(module).__name__, "arguments": arguments}


def record_trace(traced: torch.fx.GraphModule) -> RecordedTrace:
    """The calls of ``traced`` (``capture``'s trace of the model in eval mode) as data; a call outside
    ``MODULE_ARGUMENTS``, ``FUNCTIONS`` and ``METHODS`` is an UnsupportedModelError naming it."""
    names = tensor_names(traced)
    calls: list[dict[str, Any]] = []
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    for node in traced.graph.nodes:
        call = {"node": node.name, "tensor": names[node], "op": node.op}
        if node.op == "call_module":
            path = str(node.target)
            if path not in modules:
                module = traced.get_submodule(path)
                modules[path] = _record_module(node, module)
                tensors |= {f"{path}.{key}": value for key, value in module.state_dict().items()}
            call["target"] = path
        elif node.op == "call_function":
            call["target"] = _function_name(node)
        elif node.op == "call_method":
            if node.target not in METHODS:
                raise _refused(node, f"the method .{node.target}()")
            call["target"] = node.target
        elif node.op not in ("placeholder", "output"):
            raise _refused(node, f"a {node.op} node")
        if node.op != "placeholder":
            call["args"] = _encode(tuple(node.args), node)["tuple"]
            call["kwargs"] = {key: _encode(value, node) for key, value in node.kwargs.items()}
        calls.append(call)
    return RecordedTrace(tuple(calls), modules, tensors)


def _rebuild_module(path: str, entry: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> nn.Module:
    module_type = _MODULE_TYPES.get(entry["type"])
    if module_type is None:
        raise ValueError(f"recorded module {path!r}: type {entry['type']!r} is not allowed; allowed: "
                         f"{', '.join(_MODULE_TYPES)}")
    arguments = {name: _decode(value, {}) for name, value in entry["arguments"].items()}
    prefix = f"{path}."
    state = {key[len(prefix):]: tensor for key, tensor in tensors.items() if key.startswith(prefix)}
    if not state:
        return module_type(**arguments).eval()
    # Built on the meta device, then given the recorded tensors themselves (their values and memory layouts).
    module = module_type(**arguments, device="meta")
    module.load_state_dict(state, assign=True)
    return module.eval()


def _run_call(call: Mapping[str, Any], modules: Mapping[str, nn.Module], values: Mapping[str, Any]) -> Any:
    args, kwargs = _decode(call["args"], values), {key: _decode(value, values) for key, value in call["kwargs"].items()}
    op, target = call["op"], call.get("target")
    if op == "call_module":
        return modules[target](*args, **kwargs)
    if op == "call_function":
        if target not in FUNCTIONS:
            raise ValueError(f"recorded call {call['node']!r}: function {target!r} is not allowed; allowed: "
                             f"{', '.join(FUNCTIONS)}")
        return FUNCTIONS[target](*args, **kwargs)
    if op == "call_method":
        if target not in METHODS:
            raise ValueError(f"recorded call {call['node']!r}: method {target!r} is not allowed; allowed: "
                             f"{', '.join(METHODS)}")
        return getattr(args[0], target)(*args[1:], **kwargs)
    if op == "output":
        return args[0]
    raise ValueError(f"recorded call {call['node']!r}: op {op!r} is not allowed")


@torch.no_grad()
def replay_trace(trace: RecordedTrace, x: Tensor, names: Iterable[str], observe: Callable[[str, Tensor], None]) -> Tensor:
    """Make the recorded calls on the batch ``x`` and call ``observe(name, value)`` for the named tensors, as
    ``observe_original`` does on the trace itself; the model's output."""
    wanted = set(names)
    modules = {path: _rebuild_module(path, entry, trace.tensors) for path, entry in trace.modules.items()}
    values: dict[str, Any] = {}
    for call in trace.calls:
        value = x if call["op"] == "placeholder" else _run_call(call, modules, values)
        values[call["node"]] = value
        if call["tensor"] in wanted and isinstance(value, Tensor):
            observe(call["tensor"], value)
    return value
