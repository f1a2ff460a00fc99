"""pipeline.onnx_import: ONNX files become OnnxNetworks that compute what onnxruntime computes, and what it refuses.

The models are exported by torch.onnx.export (the TorchScript exporter, BatchNorm folded or kept, a dynamic batch
with ``x.view(x.size(0), -1)``; the newer torch.export-based one where onnxscript is installed), or built node by
node with onnx.helper (the opset-13 forms: ReduceMean's axes as an attribute, MatMul + Add, Gemm with transB=0,
Dropout, Squeeze). onnxruntime on the same file is the reference.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from pipeline.graph.capture import capture
from pipeline.graph.run import run_float
from pipeline.graph.trace import record_trace
from pipeline.onnx_import import (
    _HANDLERS,
    DATA_OPS,
    SHAPE_OPS,
    SUPPORTED_OPS,
    OnnxImportError,
    OnnxNetwork,
    build_onnx_network,
    read_onnx_model,
)
from tests.model_fixtures import LEGACY_ONNX_EXPORT_WARNINGS, randomize_batchnorm

pytestmark = LEGACY_ONNX_EXPORT_WARNINGS


class ResidualNet(nn.Module):
    """A conv-BN-ReLU stem, one residual block (conv-BN-ReLU, conv-BN, add, ReLU), max-pool, global average pool,
    flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        x = self.pool(F.relu(x + y))
        return self.fc(torch.flatten(self.gap(x), 1))


class DepthwiseNet(nn.Module):
    """A strided conv + ReLU6, a depthwise conv + ReLU6 concatenated with its input, a padded average pool,
    LeakyReLU, Hardswish, the mean over H and W, ``view(x.size(0), -1)``, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self.conv(x))
        x = torch.cat([F.relu6(self.depthwise(x)), x], 1)
        x = F.hardswish(F.leaky_relu(self.pool(x), 0.1))
        x = x.mean((2, 3), keepdim=True)
        return self.fc(x.view(x.size(0), -1))


def _model(kind: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    model = kind()
    randomize_batchnorm(model, seed=1)
    return model.eval()


def _export(model: nn.Module, path: Path, **options: object) -> Path:
    """The model exported by the TorchScript exporter with a dynamic batch size."""
    torch.onnx.export(model.eval(), (torch.zeros(1, 3, 32, 32),), path, dynamo=False, input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}}, **options)
    return path


def _onnxruntime(path: Path, x: Tensor) -> Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _images(count: int = 4) -> Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def _ops(network: OnnxNetwork) -> list[str]:
    return [node["op"] for node in network.architecture["nodes"]]


@pytest.mark.parametrize("folding", [True, False], ids=["bn-folded", "bn-kept"])
def test_residual_net_computes_what_onnxruntime_computes(tmp_path: Path, folding: bool) -> None:
    path = _export(_model(ResidualNet), tmp_path / "residual.onnx", do_constant_folding=folding)
    network = build_onnx_network(read_onnx_model(path))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(network(x), _onnxruntime(path, x), atol=1e-5, rtol=0)
    ops = _ops(network)
    # The exporter folds BatchNorm into the convolution, unless constant folding is off.
    assert ops.count("BatchNorm2d") == (0 if folding else 3)
    assert [op for op in ops if op != "BatchNorm2d"] == [
        "Conv2d", "ReLU", "Conv2d", "ReLU", "Conv2d", "torch.add", "ReLU", "MaxPool2d", "AdaptiveAvgPool2d",
        "torch.flatten", "Linear",
    ]


def test_depthwise_net_computes_what_onnxruntime_computes(tmp_path: Path) -> None:
    path = _export(_model(DepthwiseNet), tmp_path / "depthwise.onnx")
    file_ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= file_ops  # the view of a dynamic batch
    network = build_onnx_network(read_onnx_model(path))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(network(x), _onnxruntime(path, x), atol=1e-5, rtol=0)
    assert _ops(network) == [
        "Conv2d", "ReLU6", "Conv2d", "ReLU6", "torch.cat", "AvgPool2d", "LeakyReLU", "Hardswish", "torch.mean",
        "torch.flatten", "Linear",
    ]
    assert network.architecture["nodes"][2]["attributes"]["groups"] == 8
    assert network.architecture["input"] == {"name": "images", "shape": ["batch", 3, 32, 32]}


@pytest.mark.parametrize("kind", [ResidualNet, DepthwiseNet])
def test_capture_and_the_recorded_trace_take_the_network(tmp_path: Path, kind: type[nn.Module]) -> None:
    path = _export(_model(kind), tmp_path / "model.onnx", do_constant_folding=False)
    network = build_onnx_network(read_onnx_model(path))
    graph = capture(network)
    recorded = record_trace(graph.traced)
    modules = {name for name, module in network.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}
    assert {layer.name for layer in graph.layers()} == modules
    assert set(recorded.modules) == {name for name, _ in network.named_children()}
    x = _images()
    torch.testing.assert_close(run_float(graph, x), _onnxruntime(path, x), atol=1e-4, rtol=0)  # BatchNorm folded


def test_architecture_and_weights_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    path = _export(_model(ResidualNet), tmp_path / "residual.onnx", do_constant_folding=False)
    imported = read_onnx_model(path)
    assert json.loads(json.dumps(imported.architecture)) == imported.architecture
    assert all(value.dtype == torch.float32 for value in imported.state_dict.values())
    network = build_onnx_network(imported)
    # The module's own state_dict adds only BatchNorm's batch counters to the imported weights.
    own = network.state_dict()
    assert set(own) - set(imported.state_dict) == {key for key in own if key.endswith(".num_batches_tracked")}
    for key, value in imported.state_dict.items():
        assert torch.equal(own[key], value), key
    torch.save({"architecture": network.architecture, "state_dict": own}, tmp_path / "model.pt")
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=True)
    rebuilt = OnnxNetwork(checkpoint["architecture"])
    rebuilt.load_state_dict(checkpoint["state_dict"], strict=True)
    x = _images()
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), network(x))


def test_the_network_can_be_fine_tuned(tmp_path: Path) -> None:
    network = build_onnx_network(read_onnx_model(_export(_model(ResidualNet), tmp_path / "m.onnx")))
    parameters = dict(network.named_parameters())
    assert parameters and all(value.requires_grad for value in parameters.values())
    before = {name: value.detach().clone() for name, value in parameters.items()}
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    network.train()
    loss = F.cross_entropy(network(_images(8)), torch.arange(8) % 10)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(before[name], value) for name, value in parameters.items())


def _write(path: Path, nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray], opset: int = 17,
           input_shape: tuple[int | str, ...] = ("N", 3, 32, 32), check: bool = True) -> Path:
    """A model of ``nodes`` from the input ``x`` to the output ``logits``, its ``weights`` as initializers."""
    graph = helper.make_graph(
        nodes, "handmade",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(value.astype(np.float32), name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    if check:
        onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _weights(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    generator = np.random.default_rng(3)
    return {name: generator.standard_normal(shape).astype(np.float32) * 0.3 for name, shape in shapes.items()}


def test_opset13_forms_compute_what_onnxruntime_computes(tmp_path: Path) -> None:
    weights = _weights(conv_w=(4, 3, 3, 3), matmul_w=(4, 6), matmul_b=(6,), gemm_w=(6, 10), gemm_c=(1, 10))
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["zero"], name="zero", value_float=0.0),
        helper.make_node("Clip", ["c", "zero"], ["r"], name="clip"),  # no max: a ReLU
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        helper.make_node("ReduceMean", ["p"], ["m"], name="mean", axes=[-2, -1]),  # keepdims 1 by default
        helper.make_node("Constant", [], ["hw"], name="hw", value_ints=[2, 3]),
        helper.make_node("Squeeze", ["m", "hw"], ["s"], name="squeeze"),
        helper.make_node("Dropout", ["s"], ["d"], name="dropout"),
        helper.make_node("Identity", ["d"], ["i"], name="identity"),
        helper.make_node("MatMul", ["i", "matmul_w"], ["mm"], name="fc1/MatMul"),
        helper.make_node("Add", ["matmul_b", "mm"], ["a"], name="fc1/Add"),
        helper.make_node("Relu", ["a"], ["h"], name="relu"),
        helper.make_node("Gemm", ["h", "gemm_w", "gemm_c"], ["logits"], name="fc2", transB=0),
    ]
    path = _write(tmp_path / "opset13.onnx", nodes, weights, opset=13)
    imported = read_onnx_model(path)
    network = build_onnx_network(imported)
    assert _ops(network) == ["Conv2d", "ReLU", "MaxPool2d", "torch.mean", "torch.flatten", "Linear", "ReLU", "Linear"]
    assert [node["module"] for node in imported.architecture["nodes"] if node["module"]] == [
        "conv", "clip", "pool", "fc1_MatMul", "relu", "fc2"]
    torch.testing.assert_close(imported.state_dict["fc1_MatMul.bias"], torch.from_numpy(weights["matmul_b"]))
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(network(x), _onnxruntime(path, x), atol=1e-5, rtol=0)
    capture(network)


def _conv_head(**conv: object) -> list[onnx.NodeProto]:
    """Conv (3 -> 10 channels), global average pool, flatten: the logits of the tiny models below."""
    return [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **conv),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["logits"], name="flatten"),
    ]


def _tail(node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The tiny model with ``node`` (reading ``f``, giving ``logits``) after the flatten."""
    head = _conv_head()
    head[-1] = helper.make_node("Flatten", ["g"], ["f"], name="flatten")
    return [*head, node]


def _refused_softmax(tmp_path: Path) -> Path:
    return _write(tmp_path / "m.onnx", _tail(helper.make_node("Softmax", ["f"], ["logits"], name="probs")),
                  _weights(w=(10, 3, 1, 1)))


def _refused_sigmoid(tmp_path: Path) -> Path:
    nodes = _conv_head()
    nodes.insert(1, helper.make_node("Sigmoid", ["c"], ["s"], name="gate"))
    nodes[2] = helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap")
    return _write(tmp_path / "m.onnx", nodes, _weights(w=(10, 3, 1, 1)))


def _refused_input_size(tmp_path: Path) -> Path:
    return _write(tmp_path / "m.onnx", _conv_head(), _weights(w=(10, 3, 1, 1)), input_shape=(1, 3, 64, 64))


def _refused_truncated(tmp_path: Path) -> Path:
    whole = _write(tmp_path / "whole.onnx", _conv_head(), _weights(w=(10, 3, 3, 3))).read_bytes()
    path = tmp_path / "m.onnx"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _refused_foreign(tmp_path: Path) -> Path:
    path = tmp_path / "m.onnx"
    path.write_text("not a model\n")
    return path


def _refused_nan(tmp_path: Path) -> Path:
    weights = _weights(w=(10, 3, 1, 1))
    weights["w"][2, 1] = np.nan
    return _write(tmp_path / "m.onnx", _conv_head(), weights)


def _refused_pads(tmp_path: Path) -> Path:
    return _write(tmp_path / "m.onnx", _conv_head(pads=[0, 0, 1, 1]), _weights(w=(10, 3, 2, 2)))


def _refused_clip(tmp_path: Path) -> Path:
    nodes = [
        helper.make_node("Constant", [], ["low"], name="low", value_float=-1.0),
        helper.make_node("Constant", [], ["high"], name="high", value_float=1.0),
        *_tail(helper.make_node("Clip", ["f", "low", "high"], ["logits"], name="clamp")),
    ]
    return _write(tmp_path / "m.onnx", nodes, _weights(w=(10, 3, 1, 1)))


def _refused_two_inputs(tmp_path: Path) -> Path:
    nodes = _tail(helper.make_node("Add", ["f", "y"], ["logits"], name="add"))
    graph = helper.make_graph(
        nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 32, 32]),
                       helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(_weights(w=(10, 3, 1, 1))["w"], "w")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _refused_constant_add(tmp_path: Path) -> Path:
    nodes = _tail(helper.make_node("Add", ["f", "shift"], ["logits"], name="shift"))
    return _write(tmp_path / "m.onnx", nodes, _weights(w=(10, 3, 1, 1), shift=(10,)))


@pytest.mark.parametrize(("build", "fragments"), [
    (_refused_softmax, ["node 'probs' (Softmax) is not supported", "logits", "supported ops: Conv, Gemm"]),
    (_refused_sigmoid, ["node 'gate' (Sigmoid) is not supported", "HardSwish"]),
    (_refused_input_size, ["input 'x' has shape (1, 3, 64, 64)", "(N, 3, 32, 32)"]),
    (_refused_truncated, ["truncated"]),
    (_refused_foreign, ["not an ONNX model"]),
    (_refused_nan, ["tensor 'w' holds 1 non-finite values"]),
    (_refused_pads, ["node 'conv' (Conv) attribute pads=[0, 0, 1, 1]", "asymmetric"]),
    (_refused_clip, ["node 'clamp' (Clip) bounds min=-1.0, max=1.0 are not supported"]),
    (_refused_two_inputs, ["must take one input", "'x', 'y'"]),
    (_refused_constant_add, ["node 'shift' (Add) adds the constant 'shift'"]),
], ids=lambda value: getattr(value, "__name__", "")[len("_refused_"):])
def test_refusals_name_the_file_and_what_is_refused(tmp_path: Path, build, fragments: list[str]) -> None:
    path = build(tmp_path)
    with pytest.raises(OnnxImportError) as refused:
        read_onnx_model(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_the_supported_list_is_what_the_reader_implements() -> None:
    """Every op the list (and every refusal message) names has a handler or is folded, and no handler is unlisted."""
    assert set(_HANDLERS) == set(DATA_OPS) and set(SUPPORTED_OPS) == set(DATA_OPS) | set(SHAPE_OPS)


def test_nodes_named_like_python_keywords_become_usable_module_names(tmp_path: Path) -> None:
    """torch.fx writes the module names into Python code: `class` or `import` must not reach it as they are."""
    path = _export(_model(ResidualNet), tmp_path / "residual.onnx")
    model = onnx.load(path)
    for node, name in zip(model.graph.node, ("class", "import", "None", "lambda")):
        node.name = name
    onnx.save(model, path)
    network = build_onnx_network(read_onnx_model(path))
    assert {"class_", "import_", "None_", "lambda_"} <= {name for name, _ in network.named_children()}
    x = _images()
    torch.testing.assert_close(capture(network).traced(x), _onnxruntime(path, x), rtol=1e-5, atol=1e-5)


def test_the_newer_exporter_is_read(tmp_path: Path) -> None:
    """torch.onnx.export(dynamo=True) writes ReduceMean with axes as an input, Reshape to a constant shape and Gemm
    with transA / transB attributes; it needs onnxscript (the bench extra)."""
    pytest.importorskip("onnxscript")
    for kind in (ResidualNet, DepthwiseNet):
        path = tmp_path / f"{kind.__name__}.onnx"
        torch.onnx.export(_model(kind), (torch.zeros(1, 3, 32, 32),), path, dynamo=True, verbose=False)
        network = build_onnx_network(read_onnx_model(path))
        x = _images(1)
        with torch.no_grad():
            torch.testing.assert_close(network(x), _onnxruntime(path, x), atol=1e-5, rtol=0)
        capture(network)
    model = onnx.load(path)
    ops = {node.op_type: node for node in model.graph.node}
    assert len(ops["ReduceMean"].input) == 2 and {"transA", "transB"} <= {a.name for a in ops["Gemm"].attribute}
    assert "Reshape" in ops


def test_float_attributes_are_the_numbers_written_not_their_float32_roundings(tmp_path: Path) -> None:
    """ONNX keeps eps and alpha in float32: 1e-05 and 0.1 come back as 9.99999974738e-06 and 0.100000001490116."""
    residual = build_onnx_network(read_onnx_model(_export(_model(ResidualNet), tmp_path / "residual.onnx",
                                                          training=torch.onnx.TrainingMode.PRESERVE,
                                                          do_constant_folding=False)))
    assert {module.eps for module in residual.modules() if isinstance(module, nn.BatchNorm2d)} == {1e-05}
    depthwise = build_onnx_network(read_onnx_model(_export(_model(DepthwiseNet), tmp_path / "depthwise.onnx")))
    assert [module.negative_slope for module in depthwise.modules() if isinstance(module, nn.LeakyReLU)] == [0.1]
