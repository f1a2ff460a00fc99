"""Cross-layer equalization: the same float outputs, equal per-channel ranges, better per-tensor 4-bit weights,
and pairs only where nothing but scale-equivariant ops join two layers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.graph.capture import capture, observe_original
from pipeline.graph.nodes import FloatGraph
from pipeline.graph.run import run_float, tensor_values
from pipeline.models import MODELS, build_model
from pipeline.profile import profile_activations
from pipeline.quant.equalization import (
    EqualizationPair,
    equalization_pairs,
    equalize,
    equalize_pair,
    equalizing_scales,
    input_channel_index,
    input_channel_ranges,
    pair_ranges,
)
from pipeline.quant.ranges import dequantize
from pipeline.quant.weights import quantize_layer_weights
from pipeline.transforms import normalize
from tests.integer_graphs import TOYS
from tests.model_fixtures import randomize_batchnorm


class DepthwiseChain(nn.Module):
    """Pointwise (no activation) -> depthwise + ReLU -> grouped conv -> max pool -> flatten -> linear: a chain of
    four layers, every pair eligible, with grouped and depthwise convs on both sides of a pair."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(6 * 8 * 8, 10)

    def forward(self, x):
        x = F.relu(self.depthwise(self.bn(self.expand(x))))
        x = F.avg_pool2d(F.relu(F.max_pool2d(self.grouped(x), 2)), 1)  # pool, standalone ReLU, pool
        return self.fc(torch.flatten(x, 1))


class ConcatBranches(nn.Module):
    """One conv read by two convs, whose outputs are concatenated: no pair may be formed."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.left = nn.Conv2d(4, 4, 3, padding=1)
        self.right = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(8, 10, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        both = torch.cat([F.relu(self.left(x)), self.right(x)], dim=1)
        return self.head(both).mean((2, 3))


def _relu_pair(activation: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), activation, nn.Conv2d(4, 5, 3))


def _graph(model: nn.Module, seed: int = 0) -> FloatGraph:
    """The captured graph of ``model`` with its BatchNorms randomized (so folding changes the weights)."""
    randomize_batchnorm(model, seed)
    return capture(model.eval())


def _model(name: str) -> nn.Module:
    if name in MODELS:
        return build_model(name, seed=1)
    torch.manual_seed(1)
    return {"depthwise-chain": DepthwiseChain, "concat": ConcatBranches, **TOYS}[name]()


def _images(count: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _parameters(graph: FloatGraph) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    return {layer.name: (layer.weight.clone(), None if layer.bias is None else layer.bias.clone())
            for layer in graph.layers()}


def _tensor(graph: FloatGraph, x: torch.Tensor, name: str) -> torch.Tensor:
    """The tensor ``name`` of ``graph`` on ``x``, in float64."""
    seen = {}
    run_float(graph, x.double(), observe=lambda tensor, value: seen.setdefault(tensor, value))
    return seen[name]


ALL_MODELS = [*sorted(MODELS), "depthwise-chain", "concat", *sorted(TOYS)]


@pytest.mark.parametrize("name", ALL_MODELS)
def test_equalization_keeps_the_float_outputs_and_does_not_change_its_input(name):
    graph = _graph(_model(name), seed=2)
    before = _parameters(graph)
    x = _images()
    expected = run_float(graph, x.double())
    result = equalize(graph)
    got = run_float(result.graph, x.double())
    # Only the float32 rounding of the rescaled weights differs.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    for layer, (weight, bias) in _parameters(graph).items():
        assert torch.equal(weight, before[layer][0]) and (bias is None or torch.equal(bias, before[layer][1]))
    assert [layer.weight.dtype for layer in result.graph.layers()] == [layer.weight.dtype for layer in graph.layers()]
    # exactly the paired layers changed
    changed = {layer for layer, (weight, _) in _parameters(result.graph).items()
               if not torch.equal(weight, before[layer][0])}
    assert changed == {layer for pair in result.pairs for layer in (pair.first, pair.second)}
    # deterministic: every stage that equalizes the same graph gets the same weights
    again = _parameters(equalize(graph).graph)
    assert all(torch.equal(again[layer][0], weight) for layer, (weight, _) in _parameters(result.graph).items())


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("net", [("conv1", "conv2", 1), ("conv2", "fc1", 25), ("fc1", "fc2", 1), ("fc2", "fc3", 1)]),
        ("bnnet", [*((f"conv{i}", f"conv{i + 1}", 1) for i in range(1, 6)), ("conv6", "fc", 16)]),
        # Only inside each basic block: every block's input and output is also read by a residual add.
        ("resnet20", [(f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv2", 1) for s in (1, 2, 3) for b in range(3)]),
        # Everything else ends in a ReLU6 or is read by an inverted residual's add.
        ("mobilenet", [("blocks.0.block.3", "blocks.1.block.0", 1)]),
        ("depthwise-chain", [("expand", "depthwise", 1), ("depthwise", "grouped", 1), ("grouped", "fc", 64)]),
        ("concat", []),
        ("residual", []),  # conv1's pooled output, conv2's, conv3's and project's are all read by adds
        ("shared-relu", []),  # conv1's output is read by a ReLU and an add
        ("depthwise", []),  # ReLU6 after every layer but the pointwise, which a standalone ReLU6 follows
    ],
)
def test_pairs_are_the_layers_joined_by_scale_equivariant_ops_only(name, expected):
    graph = _graph(_model(name))
    assert [(pair.first, pair.second, pair.block) for pair in equalization_pairs(graph)] == expected


@pytest.mark.parametrize("name", [*sorted(MODELS), "depthwise-chain"])
def test_every_pair_ends_with_equal_ranges_the_fixed_point_of_the_rule(name):
    result = equalize(_graph(_model(name), seed=4))
    assert result.converged and result.pairs
    for pair in result.pairs:
        first_ranges, second_ranges = pair_ranges(result.graph, pair)
        torch.testing.assert_close(first_ranges, second_ranges, rtol=1e-5, atol=0)
        # and the rule has nothing left to do there
        torch.testing.assert_close(equalizing_scales(first_ranges, second_ranges),
                                   torch.ones_like(first_ranges), rtol=1e-5, atol=0)


def test_the_scales_say_how_each_tensor_between_a_pair_changed():
    graph = _graph(_model("net"))
    result = equalize(graph)
    x = _images(2)
    for first, tensor in (("conv1", "pool1"), ("fc1", "relu3")):  # through a pool; a fused ReLU's output
        scales = result.scales[(first, next(p.second for p in result.pairs if p.first == first))]
        shape = (1, -1) + (1,) * (len(graph.shapes[tensor]) - 1)
        before, after = (_tensor(g, x, tensor) for g in (graph, result.graph))
        torch.testing.assert_close(after * scales.reshape(shape), before, rtol=1e-4, atol=1e-5)


def test_a_two_layer_pair_needs_one_sweep():
    result = equalize(_graph(_relu_pair(nn.ReLU())))
    assert [(pair.first, pair.second) for pair in result.pairs] == [("0", "3")]
    assert result.iterations == 2 and result.converged  # the second sweep only confirms


def test_relu6_pairs_are_left_unchanged():
    graph = _graph(_relu_pair(nn.ReLU6()))
    result = equalize(graph)
    assert result.pairs == () and result.graph is graph
    mobilenet = equalize(_graph(_model("mobilenet")))
    relu6_layers = {layer.name for layer in mobilenet.graph.layers() if layer.activation == "relu6"}
    assert relu6_layers and not relu6_layers & {pair.first for pair in mobilenet.pairs}


def test_layers_beside_residual_adds_and_concats_are_left_unchanged():
    graph = _graph(_model("resnet20"))
    result = equalize(graph)
    touched = {name for pair in result.pairs for name in (pair.first, pair.second)}
    untouched = [layer.name for layer in graph.layers() if layer.name not in touched]
    assert {"conv1", "fc", "layer2.0.shortcut.0", "layer3.0.shortcut.0"} <= set(untouched)
    after = _parameters(result.graph)
    for name, (weight, bias) in _parameters(graph).items():
        if name in untouched:
            assert torch.equal(after[name][0], weight) and torch.equal(after[name][1], bias)
    concat = _graph(_model("concat"))
    assert equalize(concat).graph is concat


def test_depthwise_and_grouped_weights_are_read_per_input_channel():
    graph = _graph(_model("depthwise-chain"))
    layers = {layer.name: layer for layer in graph.layers()}
    depthwise, grouped = layers["depthwise"], layers["grouped"]
    # depthwise: filter c is the only one reading channel c
    torch.testing.assert_close(input_channel_ranges(depthwise.weight, input_channel_index(depthwise), 8),
                               depthwise.weight.double().abs().amax(dim=(1, 2, 3)))
    # groups=2, 8 -> 6: channel c is read by output channels 3g..3g+2 (g = c // 4) at their input slot c % 4
    expected = torch.stack([grouped.weight[3 * (c // 4):3 * (c // 4) + 3, c % 4].abs().max() for c in range(8)])
    torch.testing.assert_close(input_channel_ranges(grouped.weight, input_channel_index(grouped), 8),
                               expected.double())
    # after a flatten: channel c owns features c*H*W .. (c+1)*H*W - 1
    fc = layers["fc"]
    expected = fc.weight.reshape(10, 6, 64).abs().amax(dim=(0, 2))
    torch.testing.assert_close(input_channel_ranges(fc.weight, input_channel_index(fc, 64), 6), expected.double())


def test_one_step_by_hand():
    first_weight = torch.tensor([[4.0, 1.0], [0.5, 0.25]], dtype=torch.float64)  # r1 = (4, 0.5)
    second_weight = torch.tensor([[1.0, -2.0]], dtype=torch.float64)  # r2 = (1, 2)
    index = torch.tensor([[0, 1]])
    weight, bias, second, scales = equalize_pair(first_weight, torch.tensor([2.0, 1.0], dtype=torch.float64),
                                                 second_weight, index)
    torch.testing.assert_close(scales, torch.tensor([2.0, 0.5], dtype=torch.float64))  # sqrt(4 / 1), sqrt(0.5 / 2)
    torch.testing.assert_close(weight, torch.tensor([[2.0, 0.5], [1.0, 0.5]], dtype=torch.float64))
    torch.testing.assert_close(bias, torch.tensor([1.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(second, torch.tensor([[2.0, -1.0]], dtype=torch.float64))  # both ranges now (2, 1)


def test_zero_ranges_give_scale_one():
    first = torch.tensor([0.0, 2.0, 3.0, 8.0], dtype=torch.float64)
    second = torch.tensor([1.0, 0.0, 3.0, 2.0], dtype=torch.float64)
    expected = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)  # sqrt(8 / 2) in the last channel
    torch.testing.assert_close(equalizing_scales(first, second), expected)


def test_a_dead_channel_stays_dead_and_the_outputs_stay_the_same():
    model = _relu_pair(nn.ReLU())
    with torch.no_grad():
        model[0].weight[1] = 0.0  # channel 1 is its bias only
    graph = _graph(model)
    result = equalize(graph)
    assert float(result.scales[("0", "3")][1]) == 1.0
    torch.testing.assert_close(run_float(result.graph, _images().double()), run_float(graph, _images().double()))


def _channel_sqnr(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per output channel, the SQNR (dB) of per-tensor max-abs quantization at ``bits``: each channel's noise
    against its own signal (a whole-tensor SQNR only sees the largest channels)."""
    q_weight, scale = quantize_layer_weights(weight, bits, "minmax", "per_tensor")
    signal = weight.double().reshape(len(weight), -1)
    noise = signal - dequantize(q_weight, scale).reshape(len(weight), -1)
    return 10 * torch.log10(signal.pow(2).sum(dim=1) / noise.pow(2).sum(dim=1))


def test_per_tensor_4_bit_quantization_improves_on_unbalanced_channels():
    generator = torch.Generator().manual_seed(0)
    # A 32x32 kernel sees the whole image: 8 features, then a linear layer.
    model = nn.Sequential(nn.Conv2d(3, 8, 32), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():  # the conv's output channel ranges span 100x; the linear layer is balanced
        spread = torch.logspace(-2, 0, 8)[:, None, None, None]
        model[0].weight.copy_(torch.randn(8, 3, 32, 32, generator=generator) * spread)
        model[3].weight.copy_(torch.randn(4, 8, generator=generator))
    graph = capture(model.eval())
    result = equalize(graph)
    (pair,) = result.pairs
    # The paper's objective: the sum over channels of both layers' precision r_i / max(r).
    precision = [float(((r1 / r1.max()) * (r2 / r2.max())).sum()) for r1, r2 in
                 (pair_ranges(g, pair) for g in (graph, result.graph))]
    assert precision[1] > 1.5 * precision[0]
    before, after = ({layer.name: layer.weight for layer in g.layers()} for g in (graph, result.graph))
    assert float(_channel_sqnr(after["0"], 4).mean()) > float(_channel_sqnr(before["0"], 4).mean()) + 2  # dB
    # What counts: the outputs of the weight-only 4-bit model (the small channels are no longer rounded to 0).
    x = _images(64)
    errors = []
    for g, weights in ((graph, before), (result.graph, after)):
        quantized = {name: dequantize(*quantize_layer_weights(w, 4, "minmax", "per_tensor")).float()
                     for name, w in weights.items()}
        errors.append(float((run_float(g, x, quantized) - run_float(g, x)).pow(2).mean()))
    assert errors[1] < errors[0] / 2


def test_the_equalized_graph_refuses_the_unequalized_trace():
    graph = _graph(_model("net"))
    with pytest.raises(ValueError, match="run_float"):
        observe_original(equalize(graph).graph, _images(1), ["pool1"], lambda name, value: None)


def test_profiling_the_equalized_graph_sees_its_own_tensors_between_the_pairs():
    """The profile stage with quantize_weights.equalize: every scale group observed on the equalized graph, the
    input's statistics unchanged, and a tensor between a pair's layers the unequalized one divided by s per channel."""
    graph = _graph(_model("net"))
    result = equalize(graph)
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    before, after = (profile_activations(g, images, mean, std, batch_size=4, progress=False)
                     for g in (graph, result.graph))
    assert list(after) == list(before) and all(stats["count"] > 0 for stats in after.values())
    assert after[graph.input] == before[graph.input]
    # pool1 (the group of conv1's output "relu1") lies between conv1 and conv2: ReLU and max pool commute with s.
    unequalized = tensor_values(graph, normalize(images, mean, std), "pool1")
    expected = (unequalized / result.scales[("conv1", "conv2")].float()[None, :, None, None]).abs().max()
    assert after["relu1"]["abs_max"] == pytest.approx(float(expected), rel=1e-5)
    assert after["relu1"]["abs_max"] != pytest.approx(before["relu1"]["abs_max"], rel=1e-3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_iterations": 0}, "max_iterations: value 0 is not allowed"),
    ({"tolerance": 0.0}, "tolerance: value 0.0 is not allowed"),
])
def test_bad_settings_are_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        equalize(_graph(_model("net")), **kwargs)


def test_max_iterations_bounds_the_sweeps_and_says_it_did_not_converge():
    result = equalize(_graph(_model("bnnet")), max_iterations=2)
    assert result.iterations == 2 and not result.converged
    assert EqualizationPair("conv1", "conv2") in result.pairs
