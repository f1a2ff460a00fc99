"""CNNs for CIFAR-10, by name. No I/O here.

``net`` and ``bnnet`` are ``nn.Sequential`` chains whose state_dict keys match the
seed's (``conv1.weight``, ...); ``resnet20`` (residual adds, global average pool) and
``mobilenet`` (depthwise convolutions, ReLU6, inverted residuals) are ordinary modules.
The quantizer works from the traced graph (``pipeline.graph``), not from this layout.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.model_spec import (
    FACTORY_SPEC,
    ModelSpecError,
    check_model_spec,
    describe_error,
    factory_source_file,
    first_line,
    is_onnx_model,
    is_user_model,
)
from pipeline.transforms import SEED_MEAN, SEED_STD, normalized_batches

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


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut, added before the last ReLU (He et al. 2016).

    Where the block changes the shape, the shortcut is a strided 1x1 conv-BN projection (the
    paper's option B): option A's zero-padded strided identity would need slicing and channel
    padding, which no integer target implements better than a 1x1 convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. 2016: a 3x3 stem, 3 stages of 3 basic blocks at 16/32/64
    channels (stride 2 at the start of stages 2 and 3), global average pool, one linear layer
    (0.27M parameters)."""

    def __init__(self, num_classes: int = NUM_CLASSES, blocks_per_stage: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_channels = [], 16
        for stage, channels in enumerate((16, 32, 64)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(BasicBlock(in_channels, channels, 2 if stage > 0 and index == 0 else 1))
                in_channels = channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion + ReLU6, 3x3 depthwise + ReLU6, linear 1x1 projection;
    the input is added back (no ReLU after the add) when the shape is kept."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        ]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNet(nn.Module):
    """A small MobileNetV2 for 32x32 inputs (0.28M parameters): a 3x3 stem, inverted residual
    blocks (expansion, channels, repeats, stride) below, a 1x1 conv to 256, the mean over H and W,
    one linear layer."""

    STAGES = ((1, 16, 1, 1), (4, 24, 2, 1), (4, 32, 3, 2), (4, 64, 3, 2), (4, 96, 2, 1))

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        blocks, in_channels = [], 32
        for expansion, channels, repeats, stride in self.STAGES:
            for index in range(repeats):
                blocks.append(InvertedResidual(in_channels, channels, stride if index == 0 else 1, expansion))
                in_channels = channels
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(in_channels, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6())
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(x.mean((2, 3)))


# In the order of MODEL_NAMES (pipeline.model_spec, which validates train.model without importing this module).
MODELS: dict[str, Callable[[], nn.Module]] = {"net": Net, "bnnet": BNNet, "resnet20": ResNet20, "mobilenet": MobileNet}


def batch_layout(model: nn.Module) -> torch.memory_format:
    """The memory layout of the batches ``model`` is given: channels-last for the built-in models, contiguous
    NCHW (what torchvision gives) for any other.

    A convolution gives its output its input's layout, so on channels-last batches every feature map of the
    model is channels-last, and a user's ``x.view(x.size(0), -1)`` after a conv fails on it. The built-in
    models flatten with ``flatten`` and ``mean`` only, and channels-last makes their oneDNN convolutions
    faster on a CPU (resnet20 trains 1.2x faster at batch 128 on one thread; net the same either way, and
    bit for bit as the reference run). The exact classes, not subclasses: a subclass may override ``forward``.
    """
    return torch.channels_last if type(model) in MODELS.values() else torch.contiguous_format


def model_factory(spec: str) -> Callable[[], nn.Module]:
    """The factory ``spec`` names: a built-in class, a function in a project file, or in an importable module."""
    if spec in MODELS:
        return MODELS[spec]
    check_model_spec(spec)
    match = FACTORY_SPEC.match(spec)
    assert match is not None  # checked above
    source, name = match["source"], match["factory"]
    if source.endswith(".py"):
        module_spec = importlib.util.spec_from_file_location(f"ptq_user_model_{Path(source).stem}", source)
        if module_spec is None or module_spec.loader is None:
            raise ModelSpecError(f"train.model: cannot load {source!r} as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:  # the user's code may raise anything: one line, naming the line that raised
            raise ModelSpecError(f"train.model {spec!r}: cannot load {source}: {describe_error(error, source)}") from None
    else:
        try:
            module = importlib.import_module(source)
        except Exception as error:
            raise ModelSpecError(f"train.model {spec!r}: cannot import {source}: {describe_error(error, None)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ModelSpecError(f"train.model: {source!r} has no callable {name!r}")
    return factory


def build_model(name: str, seed: int | None = None) -> nn.Module:
    """Build a fresh model by registry name (see ``MODELS``) or factory spec (``model_factory``), or the model of a
    float ONNX file with its weights (``pipeline.onnx_import``; an OnnxImportError names what it refuses).

    With ``seed``, the initial weights depend on it alone (the global RNG is left as it was).
    """
    if name not in MODELS and not is_user_model(name):
        raise ValueError(f"unknown model {name!r}; allowed: {sorted(MODELS)}, file.py:factory or file.onnx")
    if is_onnx_model(name):  # its weights are in the file: nothing to seed
        check_model_spec(name)
        # Imported here: the onnx package takes most of a second to load, which only an ONNX model needs.
        from pipeline.onnx_import import build_onnx_network, read_onnx_model

        return build_onnx_network(read_onnx_model(name))
    factory = model_factory(name)
    if seed is None:
        model = _call_factory(factory, name)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _call_factory(factory, name)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"train.model: {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _call_factory(factory: Callable[[], nn.Module], spec: str) -> Any:
    try:
        return factory()
    except Exception as error:  # the user's code may raise anything: one line, naming the line that raised
        raise ModelSpecError(
            f"train.model {spec!r}: the factory raised {describe_error(error, factory_source_file(spec))}"
        ) from None


def check_class_scores(model: nn.Module, spec: str, images: Tensor, num_classes: int, dataset: str) -> None:
    """A ModelSpecError unless ``model`` (built from ``spec``) maps the batch ``images`` to
    (images, ``num_classes``) class scores, ``num_classes`` being the class count of the ``dataset`` file.

    Cross-entropy trains a head of any width above the largest label, and the quantizer takes it: without this
    check a 100-class head on CIFAR-10 trains, quantizes and evaluates without a word. The model runs in eval
    mode (BatchNorm's statistics stay as they are) and is left in the mode it was in.
    """
    batch = f"a batch of shape {tuple(images.shape)}"
    was_training = model.training
    try:
        with torch.no_grad():
            scores = model.eval()(images)
    except Exception as error:  # the user's forward may raise anything: one line, naming the line that raised
        raise ModelSpecError(f"train.model {spec!r} fails on {batch}: {describe_error(error, factory_source_file(spec))}") from None
    finally:
        model.train(was_training)
    expected = (f"it must output (images, classes) scores: ({len(images)}, {num_classes}) for the {num_classes} "
                f"classes of {dataset}")
    if not isinstance(scores, Tensor):
        raise ModelSpecError(f"train.model {spec!r} outputs a {type(scores).__name__} for {batch}; {expected}")
    if scores.dim() != 2 or scores.shape[0] != len(images):
        shape = tuple(scores.shape)
        raise ModelSpecError(f"train.model {spec!r} outputs a tensor of shape {shape} for {batch}; {expected}")
    if scores.shape[1] != num_classes:
        raise ModelSpecError(
            f"train.model {spec!r} outputs {scores.shape[1]} classes per image; the dataset {dataset} has "
            f"{num_classes} classes: the model's last layer must have {num_classes} outputs"
        )


class CheckpointError(ValueError):
    """A checkpoint that does not hold the model the params name, or holds non-finite weights."""


def non_finite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of floating-point tensors that hold NaN or infinity (a diverged run), in order."""
    return [
        key for key, value in state_dict.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def _recorded_onnx_network(checkpoint: Mapping[str, Any], where: str) -> nn.Module:
    """An imported ONNX model, rebuilt from the architecture its checkpoint records, not from the file, which may have
    changed or gone since."""
    # As in build_model: only an ONNX model loads the onnx package.
    from pipeline.onnx_import import OnnxNetwork

    try:
        return OnnxNetwork(checkpoint["architecture"])
    except (KeyError, TypeError, ValueError) as error:  # no architecture, or one of another format
        raise CheckpointError(f"{where}: no readable architecture of the ONNX model {checkpoint['model']!r} "
                              f"({first_line(error)}); rerun the train stage") from None


def restore_model(checkpoint: Mapping[str, Any], expected_model: str, where: str) -> nn.Module:
    """The model a checkpoint holds, checked against the model the params name; ``where`` names the file.

    An ONNX model's checkpoint records its architecture too. Three checks, each a CheckpointError that says what to
    do: the recorded model name is
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
    model = _recorded_onnx_network(checkpoint, where) if is_onnx_model(recorded) else build_model(recorded)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as error:  # missing or unexpected keys, or tensors of another shape
        raise CheckpointError(
            f"{where}: its weights do not fit the {recorded!r} architecture ({first_line(error)}); rerun the train stage"
        ) from None
    return model


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    mean: Sequence[float] = SEED_MEAN,
    std: Sequence[float] = SEED_STD,
    batch_size: int = 1000,
    progress: bool | None = None,
) -> torch.Tensor:
    """Predicted class per uint8 image (N, 32, 32, 3), as an int64 tensor on the CPU.

    ``progress=None`` shows a bar only when stderr is a terminal.
    """
    model.eval()
    # A model with no parameters (QuantizedNet holds integer buffers) runs on the CPU.
    device = next(model.parameters(), torch.empty(0)).device
    batches = normalized_batches(images, mean, std, batch_size, "predict", progress, device, batch_layout(model))
    predictions = [model(batch).argmax(1).cpu() for batch in batches]
    return torch.cat(predictions)


def test_model(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean: Sequence[float] = SEED_MEAN,
    std: Sequence[float] = SEED_STD,
) -> float:
    """The seed's ``test_model``: test accuracy in percent."""
    return 100.0 * (predict(model, images, mean, std) == labels).float().mean().item()


test_model.__test__ = False  # a library function, not a pytest test
