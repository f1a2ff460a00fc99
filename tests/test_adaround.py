"""AdaRound: the rounding math, one layer learned on a tiny problem, and the whole-model artifact."""
from __future__ import annotations

import pytest
import torch

from pipeline.graph.capture import capture
from pipeline.graph.nodes import FloatGraph, Linear
from pipeline.graph.run import run_float
from pipeline.models import build_model
from pipeline.quant import adaround
from pipeline.quant.adaround import (
    BETA_END,
    BETA_START,
    adaround_model_weights,
    beta_at,
    hard_rounding,
    initial_logits,
    learn_layer_rounding,
    rectified_sigmoid,
    rounding_regularizer,
)
from pipeline.quant.build import build_integer_model
from pipeline.quant.engine import quantize_input, run_integer
from pipeline.quant.ranges import ActivationFormat, int_range, scale_from_range
from pipeline.quant.scale_groups import activation_quantizer
from pipeline.quant.settings import AdaRoundSettings, WeightCalibration
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD, normalize

MINMAX_PER_CHANNEL = WeightCalibration("minmax", granularity="per_channel")


def test_the_soft_rounding_starts_at_the_fractional_part():
    fraction = torch.linspace(0, 0.999, 200)
    assert torch.allclose(rectified_sigmoid(initial_logits(fraction)), fraction, atol=1e-5)


def test_the_rectified_sigmoid_reaches_zero_and_one():
    assert rectified_sigmoid(torch.tensor([-10.0, 10.0])).tolist() == [0.0, 1.0]


def test_the_regularizer_is_zero_at_hard_roundings_and_largest_halfway():
    assert float(rounding_regularizer(torch.tensor([0.0, 1.0, 0.0]), 2.0)) == 0.0
    values = [float(rounding_regularizer(torch.tensor([h]), 2.0)) for h in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert values.index(max(values)) == 2 and values[2] == 1.0


def test_beta_is_off_in_the_warm_up_then_falls_from_start_to_end():
    assert beta_at(0, 100) is None and beta_at(19, 100) is None
    assert beta_at(20, 100) == BETA_START and beta_at(99, 100) == pytest.approx(BETA_END)
    betas = [beta_at(step, 100) for step in range(20, 100)]
    assert betas == sorted(betas, reverse=True)


def test_hard_rounding_rounds_up_where_the_logit_is_non_negative_and_clamps():
    floor = torch.tensor([-8.0, 0.0, 2.0, 7.0])
    assert hard_rounding(floor, torch.tensor([-1.0, 0.0, 0.5, 3.0]), -7, 7).tolist() == [-7, 1, 3, 7]


def tiny_layer_problem(seed: int = 0):
    """A Linear 16 -> 8 layer with ReLU, 512 inputs, its 4-bit per-tensor max-abs scale."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, 16, generator=generator) * 0.3
    bias = torch.randn(8, generator=generator) * 0.1
    node = Linear("fc", "x", "fc", weight, bias, "relu")
    inputs = torch.randn(512, 16, generator=generator).abs()
    targets = torch.relu(inputs @ weight.T + bias)
    scale = torch.tensor(scale_from_range(float(weight.abs().max()), int_range(4, narrow=True)[1]), dtype=torch.float64)
    return node, scale, inputs, targets


def test_a_learned_layer_is_within_one_step_of_nearest_hard_and_no_worse():
    node, scale, inputs, targets = tiny_layer_problem()
    settings = AdaRoundSettings(iterations=1000, batch_size=64, lr=0.05)
    rounding = learn_layer_rounding(node, scale, 4, inputs, targets, settings, progress=False)
    nearest = torch.round(node.weight / scale.float()).clamp(-7, 7)
    assert int((rounding.q_weight - nearest).abs().max()) <= 1
    assert bool((rounding.q_weight != nearest).any())  # it learned something
    assert bool(((rounding.soft < 1e-2) | (rounding.soft > 1 - 1e-2)).all())  # the regularizer made it hard
    assert rounding.learned_error <= rounding.nearest_error
    again = learn_layer_rounding(node, scale, 4, inputs, targets, settings, progress=False)
    assert torch.equal(again.q_weight, rounding.q_weight)  # deterministic for a seed


def test_adaround_model_weights_is_the_nearest_artifact_with_other_integers():
    model = build_model("net", seed=0).eval()
    graph = capture(model)
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    settings = AdaRoundSettings(iterations=30, batch_size=16)
    learned, errors = adaround_model_weights(graph, images, SEED_MEAN, SEED_STD, 4, MINMAX_PER_CHANNEL,
                                             settings=settings, progress=False)
    nearest = quantize_model_weights(graph, 4, "minmax", "per_channel")
    assert list(learned) == list(nearest) == list(errors)
    for name, (q_weight, scale) in learned.items():
        assert q_weight.dtype == torch.int8 and q_weight.shape == nearest[name][0].shape
        assert torch.equal(scale, nearest[name][1])  # AdaRound chooses the rounding, never the scale
        assert int(q_weight.abs().max()) <= 7
        assert int((q_weight.to(torch.int64) - nearest[name][0].to(torch.int64)).abs().max()) <= 1
    ranges = {"input_1": 2.5, "relu1": 3.0, "relu2": 3.0, "relu3": 3.0, "relu4": 3.0}
    integer_model = build_integer_model(graph, ranges, learned, list(SEED_MEAN), list(SEED_STD))
    x_int8 = quantize_input(normalize(images[:4], SEED_MEAN, SEED_STD), integer_model.input_scale)
    assert run_integer(integer_model, x_int8).shape == (4, 10)


NET_RANGES = {"input_1": 2.5, "relu1": 3.0, "relu2": 3.0, "relu3": 3.0, "relu4": 3.0}


def _net_and_images(count: int = 32) -> tuple[FloatGraph, torch.Tensor]:
    images = torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    return capture(build_model("net", seed=0).eval()), images


def test_a_layer_keeps_round_to_nearest_where_its_learned_rounding_reconstructs_worse():
    graph, images = _net_and_images()
    settings = AdaRoundSettings(iterations=1, lr=10.0, batch_size=8)  # one huge Adam step: a poor rounding
    learned, errors = adaround_model_weights(graph, images, SEED_MEAN, SEED_STD, 4, MINMAX_PER_CHANNEL,
                                             settings=settings, progress=False)
    nearest = quantize_model_weights(graph, 4, "minmax", "per_channel")
    worse = [name for name, error in errors.items() if error["adaround"] > error["nearest"]]
    assert worse and len(worse) < len(errors)  # both cases occur
    assert {name: error["kept"] for name, error in errors.items()} == {
        name: "nearest" if name in worse else "adaround" for name in errors}
    for name in worse:
        assert torch.equal(learned[name][0], nearest[name][0])  # exactly round-to-nearest's weights


@pytest.mark.parametrize("activation_format", [ActivationFormat(), ActivationFormat(4, unsigned=True)])
def test_the_activation_quantizer_puts_every_group_member_on_the_integer_models_grid(activation_format):
    graph, images = _net_and_images(8)
    integer_model = build_integer_model(graph, NET_RANGES, quantize_model_weights(graph, 8, "minmax", "per_channel"),
                                        list(SEED_MEAN), list(SEED_STD), activation_format)
    seen = {}
    run_float(graph, normalize(images, SEED_MEAN, SEED_STD).double(), observe=seen.__setitem__,
              activations=activation_quantizer(graph, NET_RANGES, activation_format))
    for name, value in seen.items():
        info = integer_model.tensors[name]
        if info.bits == 32:  # the logits are not snapped
            continue
        steps = value / info.scale
        assert torch.allclose(steps, steps.round(), atol=1e-9), name
        assert info.range[0] <= int(steps.round().min()) and int(steps.round().max()) <= info.range[1], name
    assert len({float(integer_model.tensors[name].scale) for name in ("relu1", "pool1")}) == 1  # one group, one grid


def test_adaround_learns_from_inputs_with_quantized_activations_when_given_them(monkeypatch):
    graph, images = _net_and_images()
    quantizer = activation_quantizer(graph, NET_RANGES, ActivationFormat(4, unsigned=True))
    seen_inputs = {}
    learn = adaround.learn_layer_rounding

    def recording(node, scale, bits, inputs, targets, settings, progress):
        seen_inputs[node.name] = (inputs, targets)
        return learn(node, scale, bits, inputs, targets, settings, progress)

    monkeypatch.setattr(adaround, "learn_layer_rounding", recording)
    settings = AdaRoundSettings(iterations=20, batch_size=8, quantized_activations=True)
    _, errors = adaround_model_weights(graph, images, SEED_MEAN, SEED_STD, 4, MINMAX_PER_CHANNEL,
                                       settings=settings, progress=False, activations=quantizer)
    unsigned_4_bit_step = scale_from_range(3.0, 15)
    inputs, targets = seen_inputs["fc1"]
    assert len(torch.unique(inputs)) <= 16  # the input of fc1 holds 4-bit unsigned integers on one grid
    assert torch.allclose(inputs / unsigned_4_bit_step, (inputs / unsigned_4_bit_step).round(), atol=1e-4)
    assert len(torch.unique(targets)) > 16  # the targets stay the float outputs
    assert set(errors) == {"conv1", "conv2", "fc1", "fc2", "fc3"}
