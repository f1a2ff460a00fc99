"""Capture: any traceable CNN as a typed float graph, BatchNorm folded and activations fused by pattern."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.graph.capture import capture
from pipeline.graph.nodes import (
    Activation,
    Add,
    AvgPool,
    Concat,
    Conv,
    Linear,
    MaxPool,
    Reshape,
    UnsupportedModelError,
    folded_state_dict,
    with_weights,
)
from pipeline.graph.run import run_float
from pipeline.models import MODELS, build_model
from tests.integer_graphs import TOYS
from tests.model_fixtures import randomize_batchnorm


def _random_eval(model: nn.Module, seed: int) -> nn.Module:
    randomize_batchnorm(model, seed)
    return model.eval()


@pytest.mark.parametrize("name", [*sorted(MODELS), *(f"toy:{toy}" for toy in sorted(TOYS))])
def test_folded_float_graph_equals_the_model_in_eval_mode(name):
    torch.manual_seed(1)
    model = TOYS[name[4:]]() if name.startswith("toy:") else build_model(name, seed=1)
    model = _random_eval(model, seed=2)
    graph = capture(model)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x)
    assert torch.allclose(run_float(graph, x), expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(run_float(graph, x.double()), expected.double(), rtol=1e-4, atol=1e-4)
    # every tensor the nodes read exists, and every tensor has a shape
    known = {graph.input}
    for node in graph.nodes:
        reads = node.inputs if isinstance(node, (Add, Concat)) else (node.input,)
        assert set(reads) <= known, node
        known.add(node.output)
    assert known <= set(graph.shapes)


def test_resnet20_graph_has_residual_adds_fused_relus_and_a_global_pool():
    graph = capture(_random_eval(build_model("resnet20", seed=0), seed=1))
    kinds = [type(node) for node in graph.nodes]
    assert kinds.count(Conv) == 21 and kinds.count(Add) == 9 and kinds.count(Linear) == 1  # 19 + 2 projections
    assert not any(isinstance(node, Activation) for node in graph.nodes)  # every ReLU fused
    adds = [node for node in graph.nodes if isinstance(node, Add)]
    assert all(node.activation == "relu" for node in adds)
    pool = next(node for node in graph.nodes if isinstance(node, AvgPool))
    assert pool.kernel == (8, 8) and graph.shapes[pool.output] == (64, 1, 1)
    assert sum(p.numel() for p in build_model("resnet20").parameters()) == 272474


def test_mobilenet_graph_has_depthwise_relu6_and_adds_without_relu():
    graph = capture(_random_eval(build_model("mobilenet", seed=0), seed=1))
    convs = [node for node in graph.nodes if isinstance(node, Conv)]
    depthwise = [node for node in convs if node.groups > 1]
    assert depthwise and all(node.groups == node.weight.shape[0] and node.weight.shape[1] == 1 for node in depthwise)
    assert {node.activation for node in depthwise} == {"relu6"}
    adds = [node for node in graph.nodes if isinstance(node, Add)]
    assert adds and {node.activation for node in adds} == {"none"}
    assert isinstance(graph.nodes[-2], Reshape) and isinstance(graph.nodes[-3], AvgPool)  # x.mean((2, 3))


def test_batchnorm_is_folded_into_the_conv_by_pattern():
    torch.manual_seed(0)
    model = _random_eval(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                       nn.Linear(4 * 30 * 30, 10)), seed=1)
    graph = capture(model)
    conv = graph.nodes[0]
    assert isinstance(conv, Conv) and conv.bias is not None and conv.activation == "relu"
    gain = model[1].weight / torch.sqrt(model[1].running_var + model[1].eps)
    assert torch.allclose(conv.weight, model[0].weight * gain.reshape(-1, 1, 1, 1), rtol=1e-6)
    assert model[1].running_mean.abs().sum() > 0  # the model is untouched


def test_an_activation_whose_producer_has_other_readers_stays_standalone():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 32 * 32, 10)

        def forward(self, x):
            y = self.conv(x)
            return self.fc((F.relu(y) + y).flatten(1))

    graph = capture(Shared())
    assert [type(node) for node in graph.nodes] == [Conv, Activation, Add, Reshape, Linear]
    assert graph.nodes[0].activation == "none"


def test_clamp_and_hardtanh_are_relu6_and_clamp_min_is_relu():
    class Clamps(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3, 10)

        def forward(self, x):
            x = torch.clamp(self.a(x), 0, 6)
            x = F.hardtanh(self.b(x), 0.0, 6.0)
            x = self.c(x).clamp(min=0)
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    graph = capture(Clamps())
    assert [node.activation for node in graph.layers()] == ["relu6", "relu6", "relu", "none"]


@pytest.mark.parametrize(
    ("forward", "node", "op"),
    [
        (lambda self, x: self.fc(torch.sigmoid(self.conv(x)).flatten(1)), "sigmoid", "function torch.sigmoid"),
        (lambda self, x: self.fc(self.conv(x).flatten(1) * 2), "mul", "operator.mul"),
        (lambda self, x: self.fc(torch.clamp(self.conv(x), -1, 1).flatten(1)), "clamp", "clamp"),
        (lambda self, x: self.fc(torch.cat([self.conv(x)], dim=2).flatten(1)), "cat", "torch.cat"),
    ],
)
def test_an_unsupported_op_names_the_node_the_op_and_the_supported_list(forward, node, op):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)
            self.fc = nn.Linear(2 * 32 * 32, 10)

    Model.forward = forward
    with pytest.raises(UnsupportedModelError, match=rf"node '{node}' \(.*{op}.*\) is not supported.*supported: Conv2d"):
        capture(Model())


def test_an_unsupported_module_is_named_and_data_dependent_code_cannot_be_traced():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.GELU(), nn.Flatten(), nn.Linear(2 * 30 * 30, 10))
    with pytest.raises(UnsupportedModelError, match=r"node '1' \(GELU module '1'\) is not supported"):
        capture(model)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedModelError, match="cannot be traced by torch.fx.symbolic_trace"):
        capture(Branchy())


def test_a_batchnorm_with_no_conv_before_it_is_an_error():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    with pytest.raises(UnsupportedModelError, match=r"node '1' \(BatchNorm2d\) must read the output of a Conv2d"):
        capture(model)


def test_dilated_conv_and_broadcasting_add_are_errors():
    with pytest.raises(UnsupportedModelError, match="needs dilation 1"):
        capture(nn.Sequential(nn.Conv2d(3, 2, 3, dilation=2)))

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 1)

        def forward(self, x):
            return x + self.conv(x)

    with pytest.raises(UnsupportedModelError, match=r"node 'add' \(add\) needs inputs of one shape"):
        capture(Broadcast())


def test_pool_dilation_given_as_a_list_of_ones_is_dilation_one_and_any_other_is_refused():
    """onnx2torch's MaxPool2d and some user code give dilation as [1, 1]: the same pool as dilation 1."""

    class Pools(nn.Module):
        def __init__(self, dilation):
            super().__init__()
            self.pool = nn.MaxPool2d(2, dilation=dilation)
            self.fc = nn.Linear(3 * 8 * 8, 10)

        def forward(self, x):
            return self.fc(F.max_pool2d(self.pool(x), 2, dilation=[1, 1]).flatten(1))

    graph = capture(Pools([1, 1]))
    assert [type(node).__name__ for node in graph.nodes] == ["MaxPool", "MaxPool", "Reshape", "Linear"]
    with pytest.raises(UnsupportedModelError, match="needs dilation 1"):
        capture(Pools([2, 2]))


def test_weights_can_be_swapped_by_layer_name():
    graph = capture(build_model("net", seed=0))
    state = folded_state_dict(graph)
    assert list(state)[:2] == ["conv1.weight", "conv1.bias"]
    state["fc3.weight"] = torch.zeros_like(state["fc3.weight"])
    swapped = with_weights(graph, state)
    x = torch.randn(2, 3, 32, 32)
    logits = run_float(swapped, x)
    assert torch.equal(logits, state["fc3.bias"].expand(2, 10))
    assert isinstance(graph.nodes[1], MaxPool)
