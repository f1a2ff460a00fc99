"""CNNs for CIFAR-10, by name. No I/O here.

Every model is an ``nn.Sequential`` of ``Conv2d``, ``BatchNorm2d``, ``ReLU``,
``MaxPool2d``, ``Flatten`` and ``Linear`` children. That keeps the layer order
explicit, so the quantizer and the integer engine can walk the graph without
tracing, and the state_dict keys match the seed's (``conv1.weight``, ...).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

NUM_CLASSES = 10


class Net(nn.Sequential):
    """The seed's network, exactly: two 5x5 convolutions and three linear layers (62k parameters)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, 6, 5)),  # (B, 3, 32, 32) -> (B, 6, 28, 28)
                    ("relu1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2, 2)),  # -> (B, 6, 14, 14)
                    ("conv2", nn.Conv2d(6, 16, 5)),  # -> (B, 16, 10, 10)
                    ("relu2", nn.ReLU()),
                    ("pool2", nn.MaxPool2d(2, 2)),  # -> (B, 16, 5, 5)
                    ("flatten", nn.Flatten()),  # -> (B, 400)
                    ("fc1", nn.Linear(16 * 5 * 5, 120)),
                    ("relu3", nn.ReLU()),
                    ("fc2", nn.Linear(120, 84)),
                    ("relu4", nn.ReLU()),
                    ("fc3", nn.Linear(84, num_classes)),
                ]
            )
        )


def _conv_bn_relu(index: int, in_channels: int, out_channels: int) -> list[tuple[str, nn.Module]]:
    return [
        (f"conv{index}", nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)),
        (f"bn{index}", nn.BatchNorm2d(out_channels)),
        (f"relu{index}", nn.ReLU()),
    ]


class BNNet(nn.Sequential):
    """A VGG-style CIFAR CNN with BatchNorm (about 290k parameters).

    Three blocks of two 3x3 conv-BN-ReLU layers, each block ending in a 2x2
    max-pool, then one linear classifier. BatchNorm is folded into the
    preceding convolution before quantization.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 32) -> None:
        channels = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
        layers: list[tuple[str, nn.Module]] = []
        for index in range(1, 7):
            layers += _conv_bn_relu(index, channels[index - 1], channels[index])
            if index % 2 == 0:
                layers.append((f"pool{index // 2}", nn.MaxPool2d(2, 2)))
        # After three pools: (B, 4*width, 4, 4).
        layers += [("flatten", nn.Flatten()), ("fc", nn.Linear(4 * width * 4 * 4, num_classes))]
        super().__init__(OrderedDict(layers))


MODELS: dict[str, Callable[[], nn.Sequential]] = {"net": Net, "bnnet": BNNet}


def build_model(name: str, seed: int | None = None) -> nn.Sequential:
    """Build a fresh model by registry name (see ``MODELS``).

    With ``seed``, the initial weights depend on it alone (the global RNG is left as it was).
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}") from None
    if seed is None:
        return factory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


class CheckpointError(ValueError):
    """A checkpoint that does not hold the model the params name, or holds non-finite weights."""


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of floating-point tensors that hold NaN or infinity (a diverged run), in order."""
    return [
        key for key, value in state_dict.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def restore_model(checkpoint: Mapping[str, Any], expected_model: str, where: str) -> nn.Sequential:
    """The model a checkpoint holds, checked against the model the params name; ``where`` names the file.

    Three checks, each a CheckpointError that says what to do: the recorded model name is
    ``expected_model`` (a checkpoint of another model is never quantized as if it were this one),
    its tensors fit that architecture, and every weight is finite.
    """
    recorded = checkpoint.get("model") if isinstance(checkpoint, Mapping) else None
    if recorded is None or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{where}: not a checkpoint of this pipeline (no model name or state_dict); rerun the train stage"
        )
    if recorded != expected_model:
        raise CheckpointError(
            f"{where}: holds a {recorded!r} model but train.model is {expected_model!r}; "
            "rerun the train stage (dvc repro) or set train.model to the checkpoint's model"
        )
    state_dict = checkpoint["state_dict"]
    bad = non_finite_tensors(state_dict)
    if bad:
        raise CheckpointError(
            f"{where}: non-finite values (NaN or infinity) in {', '.join(bad)}; the training run diverged: "
            "lower train.lr or retrain"
        )
    model = build_model(recorded)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # missing or unexpected keys, or tensors of another shape
        raise CheckpointError(
            f"{where}: its weights do not fit the {recorded!r} architecture ({_first_line(error)}); rerun the train stage"
        ) from None
    return model


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:3])
