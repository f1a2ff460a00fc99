"""The ONNX exports: the integer graph is bit-exact with the engine, the QLinear graph agrees on predictions."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

from pipeline.export.onnx_model import build_onnx_model, onnx_predictions, save_onnx_model
from pipeline.quant.engine import quantize_input, run_integer
from tests.test_export_c import EXPORT_CASES
from tests.test_export_plan import IDENTITY_SHAPE, cifar_model, identity_model, random_images

# Models whose scales and fixed-point multipliers agree, as build_integer_model makes them.
CONSISTENT_CASES = ["net-per-tensor", "net-per-channel", "bnnet-per-tensor", "bnnet-per-channel"]
INTEGER_OPS = {
    "Cast", "Div", "Round", "Clip", "ConvInteger", "Add", "Mul", "Mod", "Sub", "MaxPool", "Reshape", "Flatten", "Max"
}


def engine_logits(model, x_normalized: torch.Tensor) -> torch.Tensor:
    return run_integer(model, quantize_input(x_normalized, model.input_scale)).flatten(1)


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_integer_graph_is_bit_exact(case, tmp_path):
    factory, shape = EXPORT_CASES[case]
    model = factory()
    save_onnx_model(model, tmp_path / "model.onnx", "integer", shape)
    x = random_images(64, shape, seed=len(case))  # 3 sigma wide: the input saturates
    predictions, logits = onnx_predictions(tmp_path / "model.onnx", x, batch_size=25)
    expected = engine_logits(model, x)
    assert logits.dtype == torch.int32 and torch.equal(logits, expected)
    assert torch.equal(predictions, expected.argmax(dim=1))


def test_integer_graph_rounds_ties_half_up(tmp_path):
    model = identity_model(last_relu=False)
    save_onnx_model(model, tmp_path / "model.onnx", "integer", IDENTITY_SHAPE)
    # every input value, quantized exactly: x_normalized = q * S_in
    q = (torch.arange(256).reshape(-1, 1) + torch.arange(48).reshape(1, -1)) % 256 - 128
    x = (q.double() * model.input_scale).float().reshape(256, *IDENTITY_SHAPE)
    _, logits = onnx_predictions(tmp_path / "model.onnx", x)
    assert torch.equal(logits, engine_logits(model, x))


@pytest.mark.parametrize("case", CONSISTENT_CASES)
def test_qlinear_graph_agrees_with_the_engine(case, tmp_path):
    factory, shape = EXPORT_CASES[case]
    model = factory()
    save_onnx_model(model, tmp_path / "model.onnx", "qlinear", shape)
    x = random_images(300, shape, seed=len(case))
    predictions, logits = onnx_predictions(tmp_path / "model.onnx", x)
    expected = engine_logits(model, x)
    # Float32 rescaling and half-to-even rounding move a few activations by one step
    # (measured: logits identical on 98.8-99.7% of images, predictions on 100%).
    assert float((predictions == expected.argmax(dim=1)).double().mean()) >= 0.995
    assert float((logits == expected).all(dim=1).double().mean()) >= 0.9


def test_qlinear_graph_uses_standard_quantized_ops():
    onnx_model = build_onnx_model(cifar_model("net", "per_channel"), "qlinear")
    op_types = [node.op_type for node in onnx_model.graph.node]
    assert op_types[0] == "QuantizeLinear" and op_types.count("QLinearConv") == 4 and op_types.count("MaxPool") == 2
    assert op_types.count("ConvInteger") == 1  # the int32 logits layer
    initializers = {init.name: numpy_helper.to_array(init) for init in onnx_model.graph.initializer}
    conv1_weight = next(value for name, value in initializers.items() if name.startswith("conv1_weight"))
    conv1_bias = next(value for name, value in initializers.items() if name.startswith("conv1_bias"))
    assert conv1_weight.dtype == np.int8 and conv1_weight.shape == (6, 3, 5, 5)
    assert conv1_bias.dtype == np.int32 and conv1_bias.shape == (6,)
    metadata = {prop.key: prop.value for prop in onnx_model.metadata_props}
    assert metadata["style"] == "qlinear" and float(metadata["input_scale"]) > 0


def test_integer_graph_has_no_float_after_the_input():
    onnx_model = build_onnx_model(cifar_model("bnnet", "per_channel"), "integer")
    nodes = onnx_model.graph.node
    assert {node.op_type for node in nodes} <= INTEGER_OPS
    inferred = onnx.shape_inference.infer_shapes(onnx_model, strict_mode=True).graph.value_info
    floating = {TensorProto.FLOAT, TensorProto.DOUBLE}
    float_values = {value.name for value in inferred if value.type.tensor_type.elem_type in floating}
    # only the input quantization (Cast to double, Div, Round, Clip) computes in float
    assert [node.op_type for node in nodes[:5]] == ["Cast", "Div", "Round", "Clip", "Cast"]
    assert float_values == {node.output[0] for node in nodes[:4]}


def test_qlinear_refuses_multipliers_that_disagree_with_the_scales():
    with pytest.raises(ValueError, match=r"layer 'identity': multiplier \* 2\^\(shift - 31\) = .* style='integer'"):
        build_onnx_model(identity_model(), "qlinear", IDENTITY_SHAPE)


def test_build_rejects_an_unknown_style():
    with pytest.raises(ValueError, match=r"style must be one of \('qlinear', 'integer'\), got 'qdq'"):
        build_onnx_model(cifar_model("net", "per_tensor"), "qdq")


def test_onnx_predictions_checks_its_input(tmp_path):
    save_onnx_model(identity_model(), tmp_path / "model.onnx", "integer", IDENTITY_SHAPE)
    with pytest.raises(ValueError, match=r"must be a non-empty \(N, C, H, W\) batch, got shape \(0, 3, 4, 4\)"):
        onnx_predictions(tmp_path / "model.onnx", torch.zeros(0, *IDENTITY_SHAPE))
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        onnx_predictions(tmp_path / "model.onnx", torch.zeros(1, *IDENTITY_SHAPE), batch_size=0)
