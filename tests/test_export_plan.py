"""The export plan, and the integer models the C and ONNX export tests share.

The shared models cover what the exporters must reproduce: Net and BNNet(width=4),
per-tensor and per-channel weights, activations that saturate, requantization
ties (multipliers that are powers of two), M > 1 and M = 0 channels, conv and
max-pool padding and strides, a fused ReLU on raw int32 logits, and a
convolution as the last layer.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.export.plan import plan_model
from pipeline.models import BNNet, Net
from pipeline.quant.fixed_point import quantize_multiplier
from pipeline.quant.graph import fold_batchnorm
from pipeline.quant.model import IntegerModel, build_integer_model
from tests.model_fixtures import randomize_batchnorm

# ---------------------------------------------------------------- shared models


def input_ranges(model: nn.Sequential, x: torch.Tensor, shrink: float) -> dict[str, float]:
    """``shrink`` * max|input| of each Conv2d/Linear layer: below 1, activations saturate at +-127."""
    ranges: dict[str, float] = {}
    with torch.no_grad():
        for name, layer in model.named_children():
            if isinstance(layer, (nn.Conv2d, nn.Linear)):
                ranges[name] = shrink * float(x.abs().max())
            x = layer(x)
    return ranges


def cifar_model(name: str, granularity: str, seed: int = 0) -> IntegerModel:
    """Net or BNNet(width=4) with random weights; ranges at 0.6 of the observed maxima, so some values saturate."""
    torch.manual_seed(seed)
    model = Net() if name == "net" else BNNet(width=4)
    randomize_batchnorm(model, seed + 1)
    model.eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 2))
    calibrator = "sigma" if granularity == "per_tensor" else "minmax"
    return build_integer_model(
        model, input_ranges(fold_batchnorm(model), x, 0.6), 8, calibrator, granularity,
        input_mean=[0.49, 0.48, 0.45], input_std=[0.25, 0.24, 0.26],
    )


def with_power_of_two_multipliers(model: IntegerModel) -> IntegerModel:
    """A copy whose int8 layers rescale by a power of two, M = 2^(shift - 1) (multiplier 2^30, same shift).

    acc * M then ends in exactly .5 for one accumulator in 2^(1 - shift): ties,
    where rounding half up and half to even differ, happen in every layer.
    """
    ops = []
    for op in model.ops:
        if op.get("output_bits") == 8:
            op = op | {"multiplier": torch.full_like(op["multiplier"], 2**30)}
        ops.append(op)
    return IntegerModel(model.input_scale, ops, model.input_mean, model.input_std)


IDENTITY_SHAPE = (3, 4, 4)  # 48 input values, one per identity channel
# (real multiplier per identity channel): ties both signs, M > 1 (saturates), M = 0, arbitrary M
IDENTITY_MULTIPLIERS = [0.25, 0.5, 0.125, 3.0, 0.0, 0.37, 1.0, 0.0625]


def identity_model(last_relu: bool = True) -> IntegerModel:
    """flatten -> linear identity (acc = x + bias, per-channel M with ties and saturation) -> linear to int32 logits.

    The first layer's accumulator is the input plus a bias, so the test can
    count the ties and saturations it really exercises (``identity_accumulators``).
    """
    channels = int(np.prod(IDENTITY_SHAPE))
    pairs = [quantize_multiplier(IDENTITY_MULTIPLIERS[c % len(IDENTITY_MULTIPLIERS)]) for c in range(channels)]
    generator = torch.Generator().manual_seed(11)
    identity = {
        "op": "linear", "name": "identity", "weight": torch.eye(channels, dtype=torch.int8),
        "bias": torch.randint(-3, 4, (channels,), generator=generator, dtype=torch.int32),
        "input_scale": 0.1, "weight_scale": torch.tensor(1.0, dtype=torch.float64),
        "output_scale": torch.tensor(0.4, dtype=torch.float64), "output_bits": 8, "requantize": True, "relu": False,
        "multiplier": torch.tensor([m for m, _ in pairs], dtype=torch.int32),
        "shift": torch.tensor([s for _, s in pairs], dtype=torch.int32),
    }
    head = {
        "op": "linear", "name": "head",
        "weight": torch.randint(-127, 128, (7, channels), generator=generator, dtype=torch.int8),
        "bias": torch.randint(-5000, 5000, (7,), generator=generator, dtype=torch.int32),
        "input_scale": 0.4, "weight_scale": torch.tensor(0.01, dtype=torch.float64),
        "output_scale": torch.tensor(0.004, dtype=torch.float64), "output_bits": 32,
        "requantize": False, "multiplier": None, "shift": None, "relu": last_relu,
    }
    return IntegerModel(0.1, [{"op": "flatten", "name": "flatten"}, identity, head])


def identity_accumulators(model: IntegerModel, x_int8: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(acc, multiplier, shift) of the identity layer, broadcast per image and channel."""
    identity = model.ops[1]
    acc = x_int8.flatten(1).numpy().astype(np.int64) + identity["bias"].numpy()
    return acc, identity["multiplier"].numpy().astype(np.int64), identity["shift"].numpy().astype(np.int64)


def geometry_model(seed: int = 5) -> IntegerModel:
    """conv (stride 2, padding 1) -> maxpool (3x3, stride 2, padding 1) -> conv (padding 2) as the last layer.

    The last layer is a convolution: its int32 logits are a (C, H, W) map.
    Per-channel multipliers below and above 1.
    """
    generator = torch.Generator().manual_seed(seed)
    first_pairs = [quantize_multiplier(m) for m in (0.0011, 0.004, 0.02, 1.7, 0.25)]
    first = {
        "op": "conv2d", "name": "conv_a", "stride": [2, 2], "padding": [1, 1],
        "weight": torch.randint(-127, 128, (5, 3, 3, 3), generator=generator, dtype=torch.int8),
        "bias": torch.randint(-3000, 3000, (5,), generator=generator, dtype=torch.int32),
        "input_scale": 0.05, "weight_scale": torch.full((5,), 0.01, dtype=torch.float64),
        "output_scale": torch.tensor(0.1, dtype=torch.float64), "output_bits": 8, "requantize": True, "relu": True,
        "multiplier": torch.tensor([m for m, _ in first_pairs], dtype=torch.int32),
        "shift": torch.tensor([s for _, s in first_pairs], dtype=torch.int32),
    }
    first["weight"][3] //= 32  # small accumulators where M > 1, so not everything saturates
    pool = {"op": "maxpool2d", "name": "pool", "kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]}
    last_multiplier, last_shift = quantize_multiplier(0.75)
    last = {
        "op": "conv2d", "name": "conv_b", "stride": [1, 1], "padding": [2, 2],
        "weight": torch.randint(-127, 128, (4, 5, 3, 3), generator=generator, dtype=torch.int8),
        "bias": torch.randint(-3000, 3000, (4,), generator=generator, dtype=torch.int32),
        "input_scale": 0.1, "weight_scale": torch.tensor(0.02, dtype=torch.float64),
        "output_scale": torch.tensor(0.0015, dtype=torch.float64), "output_bits": 32, "requantize": True, "relu": False,
        "multiplier": torch.tensor(last_multiplier, dtype=torch.int32),
        "shift": torch.tensor(last_shift, dtype=torch.int32),
    }
    return IntegerModel(0.05, [first, pool, last])


GEOMETRY_SHAPE = (3, 9, 11)  # odd sizes: windows clipped unevenly at the borders


def random_images(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Normalized float images, wide enough that the int8 input saturates too."""
    return 3 * torch.randn(count, *shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the plan


def test_plan_shapes_of_net():
    steps = plan_model(cifar_model("net", "per_tensor"))
    assert [(step.op["name"], step.in_shape, step.out_shape) for step in steps] == [
        ("conv1", (3, 32, 32), (6, 28, 28)),
        ("pool1", (6, 28, 28), (6, 14, 14)),
        ("conv2", (6, 14, 14), (16, 10, 10)),
        ("pool2", (16, 10, 10), (16, 5, 5)),
        ("flatten", (16, 5, 5), (400, 1, 1)),
        ("fc1", (400, 1, 1), (120, 1, 1)),
        ("fc2", (120, 1, 1), (84, 1, 1)),
        ("fc3", (84, 1, 1), (10, 1, 1)),
    ]


def test_plan_shapes_with_padding_and_strides():
    steps = plan_model(geometry_model(), GEOMETRY_SHAPE)
    assert [step.out_shape for step in steps] == [(5, 5, 6), (5, 3, 3), (4, 5, 5)]


def test_plan_rejects_a_wrong_input_shape():
    with pytest.raises(ValueError, match=r"op 5 \('fc1', linear\) has weight \(120, 400\) for 576 input channels"):
        plan_model(cifar_model("net", "per_tensor"), (3, 36, 36))


def test_plan_rejects_unknown_ops_and_ops_after_the_logits():
    model = identity_model()
    with pytest.raises(ValueError, match=r"op 3 \('softmax', softmax\) follows the last layer"):
        plan_model(IntegerModel(0.1, [*model.ops, {"op": "softmax", "name": "softmax"}]), IDENTITY_SHAPE)
    with pytest.raises(ValueError, match=r"op 0 \('norm', layernorm\) is not supported; allowed ops"):
        plan_model(IntegerModel(0.1, [{"op": "layernorm", "name": "norm"}, *model.ops]), IDENTITY_SHAPE)


def test_plan_rejects_a_linear_layer_on_an_unflattened_map():
    model = identity_model()
    with pytest.raises(ValueError, match=r"op 0 \('identity', linear\) needs a flattened input"):
        plan_model(IntegerModel(0.1, model.ops[1:]), IDENTITY_SHAPE)


def test_plan_rejects_out_of_range_multipliers():
    model = identity_model()
    model.ops[1] = model.ops[1] | {"multiplier": torch.full((48,), 2**29, dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"op 1 \('identity', linear\) needs multipliers 0 or in \[2\^30, 2\^31\)"):
        plan_model(model, IDENTITY_SHAPE)


def test_plan_rejects_int32_outputs_before_the_last_layer():
    model = identity_model()
    model.ops[1] = model.ops[1] | {"output_bits": 32}
    with pytest.raises(ValueError, match=r"op 1 \('identity', linear\) has output_bits 32; the last layer gives int32"):
        plan_model(model, IDENTITY_SHAPE)


def test_plan_rejects_accumulators_that_overflow_int32():
    model = identity_model()
    model.ops[2] = model.ops[2] | {"bias": torch.full((7,), 2**31 - 1, dtype=torch.int32)}
    with pytest.raises(OverflowError, match=r"op 2 \('head', linear\): worst-case accumulator \d+ exceeds int32 max"):
        plan_model(model, IDENTITY_SHAPE)


def test_plan_rejects_pool_padding_wider_than_half_the_kernel():
    model = geometry_model()
    model.ops[1] = model.ops[1] | {"padding": [2, 2]}
    with pytest.raises(ValueError, match=r"op 1 \('pool', maxpool2d\): padding \[2, 2\] must be at most half the"):
        plan_model(model, GEOMETRY_SHAPE)
