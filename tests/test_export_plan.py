"""``check_deployable`` on the integer graph, and small integer models the C and ONNX export tests share.

The shared models: ``cifar_model`` and the toys (``tests.integer_graphs``), ``identity_model``
(a hand-made graph whose requantization ties, saturations and M = 0 / M > 1 channels can be
counted), and ``with_power_of_two_multipliers`` (any model with every multiplier 2^30, so
acc * M ends in exactly .5 often: ties, where half up and half to even differ).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from pipeline.export.plan import check_deployable
from pipeline.quant.fixed_point import quantize_multiplier
from pipeline.quant.ir import IntegerModel
from pipeline.quant.ops.add import IntAdd
from pipeline.quant.ops.avgpool import IntAvgPool
from pipeline.quant.ops.base import Requantize, TensorInfo
from pipeline.quant.ops.clamp import IntClamp
from pipeline.quant.ops.concat import IntConcat
from pipeline.quant.ops.conv import IntConv
from pipeline.quant.ops.registry import IntNode
from pipeline.quant.ops.reshape import IntReshape
from tests.integer_graphs import TOYS, cifar_model, toy_model

__all__ = [
    "IDENTITY_SHAPE", "cifar_model", "identity_accumulators", "identity_model", "random_images",
    "with_power_of_two_multipliers",
]

# ---------------------------------------------------------------- shared models


def random_images(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Normalized float images, wide enough that the int8 input saturates at both ends."""
    return 3 * torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))


def _scalar(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64)


IDENTITY_SHAPE = (3, 4, 4)  # 48 input values, one per identity channel
# (real multiplier per identity channel): ties both signs, M > 1 (saturates), M = 0, arbitrary M
IDENTITY_MULTIPLIERS = [0.25, 0.5, 0.125, 3.0, 0.0, 0.37, 1.0, 0.0625]


def identity_model(last_relu: bool = True) -> IntegerModel:
    """flatten -> linear identity (acc = x + bias, per-channel M with ties and saturation) -> linear to int32 logits.

    The identity layer's accumulator is the input plus a bias, so a test can count the ties
    and saturations it really exercises (``identity_accumulators``). The head gives raw int32
    logits, clamped at 0 below when ``last_relu``.
    """
    channels = int(np.prod(IDENTITY_SHAPE))
    pairs = [quantize_multiplier(IDENTITY_MULTIPLIERS[c % len(IDENTITY_MULTIPLIERS)]) for c in range(channels)]
    generator = torch.Generator().manual_seed(11)
    tensors = {
        "x": TensorInfo(IDENTITY_SHAPE, 8, _scalar(0.1)),
        "flat": TensorInfo((channels,), 8, _scalar(0.1)),
        "identity": TensorInfo((channels,), 8, _scalar(0.4)),
        "logits": TensorInfo((7,), 32, _scalar(0.004)),
    }
    identity = IntConv(
        "identity", "linear", "flat", "identity", torch.eye(channels, dtype=torch.int8),
        torch.randint(-3, 4, (channels,), generator=generator, dtype=torch.int32), _scalar(1.0), (1, 1), (0, 0), 1,
        "none", Requantize(torch.tensor([m for m, _ in pairs], dtype=torch.int32),
                           torch.tensor([s for _, s in pairs], dtype=torch.int32), -128, 127),
    )
    head = IntConv(
        "head", "linear", "identity", "logits", torch.randint(-127, 128, (7, channels), generator=generator,
                                                               dtype=torch.int8),
        torch.randint(-5000, 5000, (7,), generator=generator, dtype=torch.int32), _scalar(0.01), (1, 1), (0, 0), 1,
        "relu" if last_relu else "none", None,
    )
    return IntegerModel("x", "logits", tensors, [IntReshape("flatten", "x", "flat"), identity, head])


def identity_accumulators(model: IntegerModel, x_int8: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acc, multiplier, shift) of the identity layer, broadcast per image and channel."""
    identity = model.nodes[1]
    acc = x_int8.flatten(1).numpy().astype(np.int64) + identity.bias.numpy()
    rq = identity.requantize
    return acc, rq.multiplier.numpy().astype(np.int64), rq.shift.numpy().astype(np.int64)


def _power_of_two(rq: Requantize) -> Requantize:
    return replace(rq, multiplier=torch.full_like(rq.multiplier, 2**30))


def with_power_of_two_multipliers(model: IntegerModel) -> IntegerModel:
    """A copy in which every requantization rescales by a power of two, M = 2^(shift - 1) (multiplier 2^30).

    acc * M then ends in exactly .5 for one accumulator in 2^(1 - shift): ties, where rounding
    half up and half to even differ, in every layer, add, average pool and concat. Every M only
    shrinks (multiplier 2^30 is the smallest of a shift), so nothing can overflow that could not before.
    """
    nodes: list[IntNode] = []
    for node in model.nodes:
        if isinstance(node, IntConv) and node.requantize is not None:
            node = replace(node, requantize=_power_of_two(node.requantize))
        elif isinstance(node, IntAdd):
            node = replace(node, input_requantize=tuple(map(_power_of_two, node.input_requantize)),
                           output_requantize=_power_of_two(node.output_requantize))
        elif isinstance(node, IntAvgPool):
            node = replace(node, requantize=_power_of_two(node.requantize))
        elif isinstance(node, IntConcat):
            node = replace(node, input_requantize=tuple(
                None if rq is None else _power_of_two(rq) for rq in node.input_requantize))
        nodes.append(node)
    return replace(model, nodes=nodes)


# ---------------------------------------------------------------- check_deployable


def node_named(model: IntegerModel, name: str) -> tuple[int, IntNode]:
    return next((index, node) for index, node in enumerate(model.nodes) if node.name == name)


def with_node(model: IntegerModel, name: str, **changes) -> IntegerModel:
    """A copy of ``model`` with fields of node ``name`` replaced."""
    index, node = node_named(model, name)
    nodes = list(model.nodes)
    nodes[index] = replace(node, **changes)
    return replace(model, nodes=nodes)


def with_tensor(model: IntegerModel, name: str, **changes) -> IntegerModel:
    return replace(model, tensors=model.tensors | {name: replace(model.tensors[name], **changes)})


@pytest.fixture(scope="module")
def net() -> IntegerModel:
    return cifar_model("net", "per_tensor")


@pytest.fixture(scope="module")
def residual() -> IntegerModel:
    return toy_model("residual", "per_channel")


@pytest.fixture(scope="module")
def depthwise() -> IntegerModel:
    return toy_model("depthwise", "per_tensor")


@pytest.mark.parametrize("name", TOYS)
def test_the_toys_and_their_power_of_two_copies_are_deployable(name):
    model = toy_model(name, "per_tensor")
    check_deployable(model)
    check_deployable(with_power_of_two_multipliers(model))
    check_deployable(identity_model())


def test_shapes_must_follow_from_the_inputs(net, depthwise):
    with pytest.raises(ValueError, match=r"node 0 \('conv1', IntConv\) outputs \(6, 28, 28\), but its inputs give "
                                         r"\(6, 32, 32\)"):
        check_deployable(with_tensor(net, net.input, shape=(3, 36, 36)))
    with pytest.raises(ValueError, match=r"node 1 \('pool1', IntMaxPool\) outputs \(6, 13, 14\), but its inputs"):
        check_deployable(with_tensor(net, "pool1", shape=(6, 13, 14)))
    with pytest.raises(ValueError, match=r"node 5 \('fc1', IntConv\) needs a flat input of 400 values"):
        check_deployable(with_node(net, "fc1", input="pool2"))  # a linear layer on the unflattened map
    with pytest.raises(ValueError, match=r"\('grouped', IntConv\) has weight \(8, 4, 3, 3\) with groups 4 for input"):
        check_deployable(with_node(depthwise, "grouped", groups=4))
    with pytest.raises(ValueError, match=r"\('cat', IntConcat\) concatenates maps of unequal H, W"):
        check_deployable(with_node(depthwise, "cat", inputs=("clamp", depthwise.input)))


def test_adds_need_equal_shapes(residual):
    with pytest.raises(ValueError, match=r"node 3 \('add', IntAdd\) adds tensors of different shapes"):
        check_deployable(with_node(residual, "add", inputs=("conv2", "relu")))


def test_every_input_must_be_written_before_it_is_read(net):
    nodes = list(net.nodes)
    nodes[1], nodes[2] = nodes[2], nodes[1]  # conv2 before the pool that makes its input
    with pytest.raises(ValueError, match=r"node 1 \('conv2', IntConv\) reads \['pool1'\], which no earlier node"):
        check_deployable(replace(net, nodes=nodes))
    with pytest.raises(ValueError, match=r"node 1 \('pool1', IntMaxPool\) reads \['nowhere'\]"):
        check_deployable(with_node(net, "pool1", input="nowhere"))
    with pytest.raises(ValueError, match=r"node 2 \('conv2', IntConv\) writes 'relu1', which an earlier node"):
        check_deployable(with_node(net, "conv2", output=net.nodes[0].output))


def test_multipliers_and_shifts_must_be_in_range(net, residual, depthwise):
    conv1 = net.nodes[0]
    small = replace(conv1.requantize, multiplier=torch.tensor(-1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"node 0 \('conv1', IntConv\) needs multipliers in \[0, 2\^31\)"):
        check_deployable(with_node(net, "conv1", requantize=small))
    too_far = replace(conv1.requantize, shift=torch.tensor(31, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"and shifts in \[-31, 30\]"):
        check_deployable(with_node(net, "conv1", requantize=too_far))
    three = replace(conv1.requantize, multiplier=torch.full((3,), 2**30, dtype=torch.int32),
                    shift=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"needs 1 or 6 multipliers and as many shifts, got 3 and 3"):
        check_deployable(with_node(net, "conv1", requantize=three))
    empty = replace(conv1.requantize, clamp_min=5, clamp_max=4)
    with pytest.raises(ValueError, match=r"saturates to an empty range \[5, 4\]"):
        check_deployable(with_node(net, "conv1", requantize=empty))
    _, add = node_named(residual, "add")
    bad = replace(add.output_requantize, multiplier=torch.tensor(-(2**30), dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\('add', IntAdd\) needs multipliers in"):
        check_deployable(with_node(residual, "add", output_requantize=bad))
    _, pool = node_named(residual, "avg_pool2d")
    with pytest.raises(ValueError, match=r"\('avg_pool2d', IntAvgPool\) needs multipliers in"):
        check_deployable(with_node(residual, "avg_pool2d",
                                   requantize=replace(pool.requantize, multiplier=small.multiplier)))
    _, cat = node_named(depthwise, "cat")
    rq = next(rq for rq in cat.input_requantize if rq is not None)
    wrong = tuple(replace(rq, shift=torch.tensor(-32, dtype=torch.int32)) for _ in cat.inputs)
    with pytest.raises(ValueError, match=r"\('cat', IntConcat\) needs multipliers in .* shifts in \[-31, 30\]"):
        check_deployable(with_node(depthwise, "cat", input_requantize=wrong))


def test_accumulators_that_can_overflow_int32_are_an_overflow_error(net, depthwise):
    fc3 = net.nodes[-1]
    with pytest.raises(OverflowError, match=r"node 7 \('fc3', IntConv\): worst-case accumulator \d+ for inputs in \[-128, 127\] exceeds int32"):
        check_deployable(with_node(net, "fc3", bias=torch.full_like(fc3.bias, 2**31 - 1)))
    # A depthwise layer sums over its own group only: 9 taps of 127 * 128 plus the bias.
    _, layer = node_named(depthwise, "depthwise")
    weight = torch.full_like(layer.weight, 127)
    check_deployable(with_node(depthwise, "depthwise", weight=weight,
                               bias=torch.full_like(layer.bias, 2**31 - 1 - 9 * 127 * 128)))
    with pytest.raises(OverflowError, match=r"\('depthwise', IntConv\): worst-case accumulator 2147483648 for inputs in \[-128, 127\] exceeds"):
        check_deployable(with_node(depthwise, "depthwise", weight=weight,
                                   bias=torch.full_like(layer.bias, 2**31 - 9 * 127 * 128)))


def test_int32_belongs_to_the_logits_only(net):
    with pytest.raises(ValueError, match=r"node 0 \('conv1', IntConv\) is not requantized, but only the logits"):
        check_deployable(with_node(net, "conv1", requantize=None))
    with pytest.raises(ValueError, match=r"the output 'pool2' must be the logits of the last layer.*MaxPool"):
        check_deployable(replace(net, output="pool2", nodes=net.nodes[:4]))
    # A node after the logits: only a flatten may read them.
    logits = net.nodes[-1].output
    after = IntClamp("late", logits, "late", "relu", 0, 127)
    late = replace(net, nodes=[*net.nodes, after], tensors=net.tensors | {"late": net.tensors[logits]})
    with pytest.raises(ValueError, match=r"node 8 \('late', IntClamp\) reads int32 logits"):
        check_deployable(late)
    # An int32 tensor that is not the logits, even if nothing reads it.
    fc3 = net.nodes[-1]
    extra = replace(fc3, name="extra", output="extra")
    spare = replace(net, nodes=[*net.nodes, extra], tensors=net.tensors | {"extra": net.tensors[fc3.output]})
    with pytest.raises(ValueError, match=r"tensor 'extra' is int32 but not the model's logits"):
        check_deployable(spare)
    with pytest.raises(ValueError, match=r"node 2 \('conv2', IntConv\) reads int32 logits"):
        check_deployable(with_tensor(net, "pool1", bits=32))
    with pytest.raises(ValueError, match=r"node 4 \('flatten', IntReshape\) changes int8 to int32"):
        check_deployable(with_tensor(net, "flatten", bits=32))
    with pytest.raises(ValueError, match=r"the input 'input_1' must be signed and at most 8 bits wide"):
        check_deployable(with_tensor(net, net.input, bits=32))


def test_max_pool_padding_is_at_most_half_the_kernel(depthwise):
    check_deployable(with_node(depthwise, "max_pool2d", kernel=(3, 3), padding=(1, 1)))
    with pytest.raises(ValueError, match=r"\('max_pool2d', IntMaxPool\): padding \(2, 1\) must be at most half the "
                                         r"kernel \(3, 3\)"):
        check_deployable(with_node(depthwise, "max_pool2d", padding=(2, 1)))


def test_unknown_nodes_are_rejected(net):
    @dataclass(frozen=True)
    class IntSoftmax:
        name: str
        input: str
        output: str

    softmax = IntSoftmax("softmax", "pool1", "softmax")
    model = replace(net, nodes=[*net.nodes[:2], softmax, *net.nodes[2:]],
                    tensors=net.tensors | {"softmax": net.tensors["pool1"]})
    with pytest.raises(ValueError, match=r"node 2 \('softmax', IntSoftmax\) is not supported by the exporters"):
        check_deployable(model)
