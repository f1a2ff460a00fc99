"""Integer models of small graphs for the engine, C and ONNX tests: adds, depthwise, pools, concat, ReLU6,
leaky ReLU and hard swish.

``integer_model_of(module)`` captures a float module, calibrates it on random images and builds
its integer model, so every test works from what the pipeline itself would produce, in any
activation format (``FORMATS``: 8 or 4..7 bits, signed everywhere or unsigned where non-negative).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.graph.capture import capture
from pipeline.models import build_model
from pipeline.profile import calibrate_ranges, logits_tensor, profile_activations
from pipeline.quant.build import build_integer_model
from pipeline.quant.ir import IntegerModel
from pipeline.quant.ranges import ActivationFormat
from pipeline.quant.scale_groups import group_ranges
from pipeline.quant.weights import quantize_model_weights
from pipeline.transforms import SEED_MEAN, SEED_STD
from tests.model_fixtures import randomize_batchnorm


class ResidualToy(nn.Module):
    """A residual add with a ReLU after it, one without, a projection shortcut and a standalone ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.project = nn.Conv2d(8, 12, 1, stride=2)
        self.conv3 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        y = F.relu(self.conv2(x) + x)  # fused ReLU after the add
        z = self.conv3(y) + self.project(y)  # an add with no ReLU
        z = F.avg_pool2d(torch.relu(z), 2)  # the add's output is read by the ReLU only: fused
        return self.fc(torch.flatten(z, 1))


class DepthwiseToy(nn.Module):
    """Depthwise and grouped convolutions, ReLU6, concat on channels, a standalone ReLU6, global mean."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pointwise = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu6(self.bn(x))
        branch = torch.clamp(self.depthwise(x), 0, 6)
        other = self.grouped(x)
        both = torch.cat([branch, F.relu6(other)], dim=1)
        y = nn.functional.max_pool2d(self.pointwise(both), 3, stride=2, padding=1)
        y = F.relu6(y)  # after a max-pool: a standalone ReLU6
        return self.fc(y.mean((2, 3)))


class SharedReluToy(nn.Module):
    """A conv output read by a ReLU and by an add (the ReLU cannot be fused), and a concat of one scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(12 * 16 * 16, 10)

    def forward(self, x):
        a = self.conv1(x)
        b = F.relu(a)
        c = self.conv2(b) + a
        d = torch.cat([F.max_pool2d(c, 2), F.max_pool2d(c, 2)], dim=1)  # both inputs at the output's scale
        return self.fc(d.flatten(1))


class MixedSignToy(nn.Module):
    """Unsigned and signed tensors meeting (with unsigned activations): a concat and an add of one of each."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.conv4 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        positive = F.relu(self.conv1(x))
        both = torch.cat([positive, self.conv2(x)], dim=1)  # unsigned and signed into a signed concat
        y = self.conv3(both) + positive  # a signed add of a signed and an unsigned input
        z = F.avg_pool2d(F.relu(self.conv4(y)), 2)  # unsigned average pool
        return self.fc(z.flatten(1))


class ReusedModulesToy(nn.Module):
    """Modules called more than once: a max-pool module twice (the PyTorch tutorial's ``self.pool``), one ReLU module
    three times, once after a residual add (torchvision's ``BasicBlock``), and a conv whose weights serve two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.pool(self.relu(self.conv1(x)))
        y = self.relu(self.shared(x))
        y = self.relu(self.shared(y) + x)
        return self.fc(self.pool(y).flatten(1))


class RescalingActivationsToy(nn.Module):
    """Leaky ReLU and hard swish, as modules and as functions, on signed tensors and (after a ReLU, with unsigned
    activations) on an unsigned one, one of them feeding a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.leaky = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.hardswish = nn.Hardswish()
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        x = self.leaky(self.conv1(x))
        y = self.hardswish(self.conv2(x))
        y = F.leaky_relu(F.relu(self.conv3(y)), 0.25) + y  # a leaky ReLU of an unsigned tensor, into an add
        y = F.hardswish(F.max_pool2d(y, 2))
        return self.fc(y.flatten(1))


TOYS = {"residual": ResidualToy, "depthwise": DepthwiseToy, "shared-relu": SharedReluToy, "mixed-sign": MixedSignToy,
        "reused-modules": ReusedModulesToy, "rescaling-activations": RescalingActivationsToy}
# Activation formats beyond the default signed int8, by a short name for test ids.
FORMATS = {
    "unsigned": ActivationFormat(8, unsigned=True),
    "a4": ActivationFormat(4),
    "unsigned-a4": ActivationFormat(4, unsigned=True),
    "unsigned-a6": ActivationFormat(6, unsigned=True),
}


def random_uint8_images(count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)


def integer_model_of(
    module: nn.Module, granularity: str = "per_channel", calibrator: str = "minmax", seed: int = 0,
    weight_calibrator: str = "minmax", activation_format: ActivationFormat = ActivationFormat(),
    rounding: str = "double", logits: str = "int32",
) -> IntegerModel:
    """Capture ``module`` (BatchNorm randomized), calibrate on random images, build its integer model (with
    ``logits`` "int8": int8 logits at the calibrated range of the float logits, as the pipeline's default)."""
    torch.manual_seed(seed)
    randomize_batchnorm(module, seed)
    graph = capture(module.eval())
    stats = profile_activations(graph, random_uint8_images(48, seed), SEED_MEAN, SEED_STD, 24, progress=False,
                                with_logits=True)
    logits_stats = {name: stats.pop(name) for name in [logits_tensor(graph)]}
    calibrated = calibrate_ranges(stats, calibrator, integer_ranges=group_ranges(graph, activation_format))
    ranges = {root: chosen["range"] for root, chosen in calibrated.items()}
    logits_range = next(iter(calibrate_ranges(logits_stats, calibrator).values()))["range"]
    weights = quantize_model_weights(graph, 8, weight_calibrator, granularity)
    return build_integer_model(graph, ranges, weights, list(SEED_MEAN), list(SEED_STD), activation_format, rounding,
                               logits_range if logits == "int8" else None)


def toy_model(name: str, granularity: str = "per_channel", seed: int = 0,
              activation_format: ActivationFormat = ActivationFormat(), rounding: str = "double",
              logits: str = "int32") -> IntegerModel:
    torch.manual_seed(seed)
    return integer_model_of(TOYS[name](), granularity, seed=seed, activation_format=activation_format,
                            rounding=rounding, logits=logits)


def cifar_model(name: str, granularity: str = "per_tensor", seed: int = 0,
                activation_format: ActivationFormat = ActivationFormat(), rounding: str = "double",
                logits: str = "int32") -> IntegerModel:
    """A built-in model (``pipeline.models``) with seeded random weights, quantized."""
    return integer_model_of(build_model(name, seed=seed), granularity, calibrator="seed", seed=seed,
                            weight_calibrator="sigma", activation_format=activation_format, rounding=rounding,
                            logits=logits)
