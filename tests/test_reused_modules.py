"""A module called more than once in ``forward`` is one node and one tensor per call, through every stage."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.graph.capture import capture, observe_original
from pipeline.graph.nodes import Conv, MaxPool
from pipeline.graph.run import run_float
from pipeline.models import build_model
from pipeline.profile import profile_activations
from pipeline.quant.ops.conv import IntConv
from pipeline.transforms import SEED_MEAN, SEED_STD
from tests.integer_graphs import ReusedModulesToy, random_uint8_images, toy_model
from tests.project_copy import run, set_params, tiny_project_copy

TUTORIAL_NET = "models/tutorial_net.py:Net"
RESNET18 = "models/torchvision_resnet18.py:resnet18"


def test_each_call_of_a_module_writes_its_own_tensor():
    graph = capture(build_model(TUTORIAL_NET, seed=0))
    pools = [node for node in graph.nodes if isinstance(node, MaxPool)]
    assert [(pool.name, pool.output) for pool in pools] == [("pool", "pool"), ("pool@2", "pool@2")]
    outputs = [node.output for node in graph.nodes]
    assert len(outputs) == len(set(outputs)) and graph.input not in outputs
    convs = {node.name: node for node in graph.nodes if isinstance(node, Conv)}
    assert convs["conv2"].input == "pool"  # the first call's output, not the second's


def test_torchvision_basic_blocks_call_their_relu_twice_and_each_call_is_a_node():
    model = build_model(RESNET18, seed=0).eval()
    graph = capture(model)
    outputs = [node.output for node in graph.nodes]
    assert len(outputs) == len(set(outputs))
    assert {"layer1.0.relu", "layer1.0.relu@2", "layer4.1.relu@2"} <= set(outputs)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(run_float(graph, x), model(x), rtol=1e-4, atol=1e-4)


def test_the_profile_sees_each_call_of_the_original_model_apart():
    model = ReusedModulesToy().eval()
    graph = capture(model)
    seen: dict[str, torch.Tensor] = {}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    observe_original(graph, x, ["pool", "pool@2"], lambda name, value: seen.setdefault(name, value))
    assert seen["pool"].shape == (2, 8, 16, 16) and seen["pool@2"].shape == (2, 8, 8, 8)
    stats = profile_activations(graph, random_uint8_images(8, 0), SEED_MEAN, SEED_STD, 8, progress=False)
    readers = [name for group in stats.values() for name in group["read_by"]]
    assert sorted(readers) == sorted(["conv1", "shared", "shared@2", "add", "add", "fc"])  # one group per input read
    group_of = {name: root for root, group in stats.items() for name in group["observed"]}
    assert group_of["pool"] != group_of["flatten"]  # the first pool's output and the second's (as fc reads it)


def test_a_shared_weight_is_quantized_alike_for_each_call_and_each_call_requantizes_on_its_own():
    model = toy_model("reused-modules", "per_channel")
    nodes = {node.name: node for node in model.nodes}
    first, second = nodes["shared"], nodes["shared@2"]
    assert isinstance(first, IntConv) and isinstance(second, IntConv)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.weight_scale, second.weight_scale)
    assert first.input != second.input and first.output != second.output


# Each run trains one epoch on the tiny data and compiles the C model; ResNet-18 (11 M weights) takes about 5 minutes
# on two cores, most of it the sensitivity stage (two widths here) and the C build.
@pytest.mark.slow
@pytest.mark.parametrize("model", [TUTORIAL_NET, RESNET18])
def test_a_users_model_with_reused_modules_runs_end_to_end_and_its_exports_are_exact(model, tmp_path):
    project = tiny_project_copy(tmp_path)
    set_params(project, {"evaluate": {"batch_size": 30}, "sensitivity": {"num_samples": 40, "bits": [4, 8]}})
    run(["git", "commit", "--quiet", "-am", "tiny params"], project)
    run(["dvc", "exp", "run", "-S", f"train.model={model}"], project)
    metrics = json.loads((project / "data/metrics.json").read_text())
    assert metrics["test_images"] == 30
    assert metrics["mismatches"]["c_logits"] == 0 and metrics["mismatches"]["onnx_integer_logits"] == 0
    assert metrics["mismatches"]["tflite_logits"] == 0  # data/export/model.tflite in TensorFlow Lite Micro
