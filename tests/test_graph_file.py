"""The graph stage's file: the float graph and the trained model's own calls, read back exactly, no pickle.

The profile stage used to calibrate on ``observe_original`` (the model's torch.fx trace, BatchNorm not
folded); it now replays the calls the file records. These tests prove the replay observes the same values,
bit for bit, for every built-in model, the toy graphs and a model that makes every call capture accepts.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.graph.capture import capture, observe_original
from pipeline.graph.file import GraphFile, load_graph_file, save_graph_file
from pipeline.graph.nodes import FloatGraph, UnsupportedModelError
from pipeline.graph.run import run_float
from pipeline.graph.trace import record_trace, replay_trace, tensor_names
from pipeline.io import save_checkpoint
from pipeline.models import MODELS, build_model
from pipeline.profile import profile_activations
from pipeline.quant.equalization import equalize
from pipeline.quant.observers import ActivationObserver
from pipeline.quant.scale_groups import scale_groups
from pipeline.transforms import SEED_MEAN, SEED_STD, normalized_batches
from tests.integer_graphs import TOYS, random_uint8_images
from tests.model_fixtures import randomize_batchnorm
from tests.project_copy import PROJECT_ROOT, run_graph_stage, set_params

SOURCE = {"model": "net", "mean": list(SEED_MEAN), "std": list(SEED_STD), "class_names": ["a", "b"]}


class EveryCall(nn.Module):
    """Every call form capture accepts: modules, functions and tensor methods, a module called twice, views."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu, self.leaky, self.hardswish = nn.ReLU(inplace=True), nn.LeakyReLU(0.1), nn.Hardswish()
        self.conv2, self.relu6, self.hardtanh = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(), nn.Hardtanh(0.0, 6.0)
        self.conv3, self.drop, self.identity = nn.Conv2d(16, 8, 1), nn.Dropout(0.5), nn.Identity()
        self.pool, self.avg, self.gap, self.flat = nn.MaxPool2d(2), nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.hardswish(F.leaky_relu(self.hardswish(self.leaky(x)), negative_slope=0.2))
        y = self.conv2(x)
        a = F.relu6(y) + torch.clamp(y, 0, 6)
        b = torch.add(self.relu6(y), F.hardtanh(y, 0.0, 6.0))
        c = self.hardtanh(y).add(torch.clip(y, min=0))
        z = F.relu(self.identity(self.drop(self.conv3(torch.cat([a, b], dim=1)))) + c)
        z = F.max_pool2d(self.pool(z), 2)
        z = self.avg(torch.relu(F.avg_pool2d(z.relu(), 2, 2)))
        w = F.dropout(z, 0.1, training=False).contiguous()
        p = self.gap(w).flatten(1)
        q = torch.flatten(F.adaptive_avg_pool2d(w, 1), 1)
        r = w.mean((2, 3))
        s = torch.mean(w, dim=(-1, -2), keepdim=True).view(w.size(0), -1)
        t = torch.reshape(self.flat(self.gap(w)), (-1, 8)) + r.reshape(-1, 8)
        return self.fc2(F.relu(self.fc1(p + q + s + t)))


MODEL_NAMES = [*sorted(MODELS), *(f"toy:{toy}" for toy in sorted(TOYS)), "every-call"]


def trained_like(name: str) -> nn.Module:
    """The model ``name`` in eval mode with random BatchNorm statistics, so that folding changes the values."""
    torch.manual_seed(1)
    model = EveryCall() if name == "every-call" else TOYS[name[4:]]() if name.startswith("toy:") else build_model(name)
    randomize_batchnorm(model, seed=2)
    return model.eval()


def same(a: object, b: object) -> bool:
    """Equal values; tensors equal bit for bit, in dtype and memory layout too."""
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.dtype == b.dtype and a.stride() == b.stride() and torch.equal(a, b)
    return type(a) is type(b) and a == b


def assert_same_graph(loaded: FloatGraph, graph: FloatGraph) -> None:
    assert (loaded.input, loaded.output, dict(loaded.shapes)) == (graph.input, graph.output, dict(graph.shapes))
    assert [type(node) for node in loaded.nodes] == [type(node) for node in graph.nodes]
    for ours, theirs in zip(loaded.nodes, graph.nodes):
        for field in dataclasses.fields(theirs):
            assert same(getattr(ours, field.name), getattr(theirs, field.name)), (theirs.name, field.name)


def round_trip(graph: FloatGraph, path: Path, equalized: bool = False) -> GraphFile:
    original = None if equalized else record_trace(graph.traced)
    save_graph_file(path, GraphFile(graph, SOURCE, equalized, original))
    return load_graph_file(path)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_file_gives_back_the_graph_and_replays_what_the_trace_computes_bit_for_bit(name, tmp_path):
    graph = capture(trained_like(name))
    loaded = round_trip(graph, tmp_path / "graph.pt")
    assert_same_graph(loaded.graph, graph)
    assert (loaded.checkpoint, loaded.mean, loaded.std, loaded.equalized) == (SOURCE, SOURCE["mean"], SOURCE["std"], False)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert torch.equal(run_float(loaded.graph, x), run_float(graph, x))
    names = set(tensor_names(graph.traced).values())
    expected: dict[str, Tensor] = {}
    replayed: dict[str, Tensor] = {}
    output = observe_original(graph, x, names, lambda tensor, value: expected.__setitem__(tensor, value.clone()))
    assert torch.equal(replay_trace(loaded.original, x, names, lambda t, v: replayed.__setitem__(t, v.clone())), output)
    assert list(replayed) == list(expected)
    assert all(same(replayed[tensor], expected[tensor]) for tensor in expected)
    # The same graph writes the same bytes: DVC sees an unchanged output and re-runs nothing after it.
    save_graph_file(tmp_path / "again.pt", GraphFile(graph, SOURCE, False, record_trace(graph.traced)))
    assert (tmp_path / "again.pt").read_bytes() == (tmp_path / "graph.pt").read_bytes()


def observed_with_the_trace(graph: FloatGraph, images: Tensor, batch_size: int) -> dict[str, dict]:
    """The profile's statistics as ``observe_original`` gave them before the graph file existed: the reference."""
    groups = scale_groups(graph)
    observers = {root: ActivationObserver() for root in groups}
    group_of = {name: root for root, group in groups.items() for name in group.observed}
    for batch in normalized_batches(images, SEED_MEAN, SEED_STD, batch_size, "reference", progress=False):
        observe_original(graph, batch, group_of, lambda name, value: observers[group_of[name]].observe(value))
    return {root: observer.stats() for root, observer in observers.items()}


@pytest.mark.parametrize("name", ["bnnet", "every-call"])
def test_the_profile_from_the_file_has_the_statistics_of_the_trace(name, tmp_path):
    graph = capture(trained_like(name))
    loaded = round_trip(graph, tmp_path / "graph.pt")
    images = random_uint8_images(24, seed=7)
    from_file = profile_activations(loaded.graph, images, loaded.mean, loaded.std, batch_size=10, progress=False,
                                    original=loaded.original)
    reference = observed_with_the_trace(graph, images, batch_size=10)
    assert list(from_file) == list(reference)
    for root, stats in reference.items():
        assert {key: from_file[root][key] for key in stats} == stats, root
    assert profile_activations(graph, images, SEED_MEAN, SEED_STD, batch_size=10, progress=False) == from_file


def test_an_equalized_graph_is_stored_without_the_trained_models_calls(tmp_path):
    equalized = equalize(capture(trained_like("bnnet"))).graph
    loaded = round_trip(equalized, tmp_path / "graph.pt", equalized=True)
    assert loaded.original is None and loaded.equalized
    assert_same_graph(loaded.graph, equalized)


def test_a_recorded_call_outside_the_lists_is_refused_when_replayed(tmp_path):
    trace = round_trip(capture(trained_like("net")), tmp_path / "graph.pt").original
    x = torch.zeros(1, 3, 32, 32)
    calls = [dict(call) for call in trace.calls]
    relu = next(index for index, call in enumerate(calls) if call.get("target") == "relu1")
    calls[relu] = {**calls[relu], "op": "call_function", "target": "os.system"}
    with pytest.raises(ValueError, match="function 'os.system' is not allowed; allowed: operator.add"):
        replay_trace(dataclasses.replace(trace, calls=tuple(calls)), x, [], lambda name, value: None)
    modules = {**trace.modules, "conv1": {**trace.modules["conv1"], "type": "Module"}}
    with pytest.raises(ValueError, match="recorded module 'conv1': type 'Module' is not allowed; allowed: Conv2d"):
        replay_trace(dataclasses.replace(trace, modules=modules), x, [], lambda name, value: None)


def test_a_call_the_replay_cannot_make_is_refused_when_recorded():
    class Sigmoid(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.sigmoid(x)

    with pytest.raises(UnsupportedModelError, match="node 'sigmoid': the function 'sigmoid' cannot be recorded"):
        record_trace(torch.fx.symbolic_trace(Sigmoid()))
    with pytest.raises(UnsupportedModelError, match="node 'gelu': a GELU module .* cannot be recorded"):
        record_trace(torch.fx.symbolic_trace(nn.Sequential(OrderedDict(gelu=nn.GELU()))))


def test_a_file_of_another_format_or_version_names_the_file_and_the_stage_to_rerun(tmp_path):
    path = tmp_path / "graph.pt"
    save_checkpoint(path, {"header": json.dumps({"format": "cifar10-ptq-float-graph", "version": 0}), "tensors": {}})
    with pytest.raises(ValueError, match=r"graph.pt: a 'cifar10-ptq-float-graph' file of version 0; .* rerun the graph "
                                         r"stage \(dvc repro graph\)"):
        load_graph_file(path)


def project_with_checkpoint(root: Path, model: str) -> Path:
    (root / "data").mkdir(parents=True)
    shutil.copy(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    save_checkpoint(root / "data" / "model.pt", {"model": model, "state_dict": trained_like(model).state_dict()} | {
        key: SOURCE[key] for key in ("mean", "std", "class_names")})
    return root


def test_the_graph_stage_builds_the_checkpoints_own_model_and_equalizes_with_its_param(tmp_path):
    project = project_with_checkpoint(tmp_path, "net")
    set_params(project, {"train": {"model": "bnnet"}})  # train's section: the graph stage reads the checkpoint's name
    run_graph_stage(project)
    written = load_graph_file(project / "data" / "graph.pt")
    graph = capture(trained_like("net"))
    assert_same_graph(written.graph, graph)
    assert (written.checkpoint, written.equalized) == (SOURCE, False)
    assert written.original is not None
    set_params(project, {"graph": {"equalize": True}})
    run_graph_stage(project)
    written = load_graph_file(project / "data" / "graph.pt")
    assert written.equalized and written.original is None
    assert_same_graph(written.graph, equalize(graph).graph)
