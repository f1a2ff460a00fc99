"""The shape of an ``IntegerModel`` as a deployment sees it: every op with its input and output shapes.

Both exporters (C and ONNX) walk the same plan, so a model one of them accepts
the other accepts too, and they reject unsupported models with the same error.

Activations are (C, H, W) per image, NCHW in memory. A flattened activation
is (K, 1, 1): the C,H,W order of ``torch.flatten`` is already its memory
order, so flatten moves no data, and a linear layer is a 1x1 convolution on
a (K, 1, 1) map (its (out, in) weight is the (out, in, 1, 1) kernel).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.quant.fixed_point import INT32_MAX, MAX_SHIFT, MIN_SHIFT
from pipeline.quant.model import IntegerModel, accumulator_bound

CIFAR10_INPUT_SHAPE = (3, 32, 32)  # (C, H, W) of one image
LAYER_OPS = ("conv2d", "linear")


@dataclass(frozen=True)
class Step:
    """One op of the model with the (C, H, W) shapes it reads and writes; ``index`` is its position in ``ops``."""

    index: int
    op: dict[str, Any]
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]

    @property
    def is_layer(self) -> bool:
        return self.op["op"] in LAYER_OPS

    @property
    def out_size(self) -> int:
        """Values per image in the output."""
        return int(np.prod(self.out_shape))


def pooled_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or max-pool window (floor mode, no dilation), as PyTorch computes it."""
    return (size + 2 * padding - kernel) // stride + 1


def plan_model(model: IntegerModel, input_shape: tuple[int, int, int] = CIFAR10_INPUT_SHAPE) -> list[Step]:
    """Check that ``model`` is deployable and return its ops with their shapes.

    Raises ``ValueError`` naming the op for anything the exporters do not
    implement: an unknown op, a shape mismatch, int32 outputs before the last
    layer, ops other than flatten after it, out-of-range multipliers or shifts;
    ``OverflowError`` if a layer's worst-case accumulator does not fit int32
    (the exports accumulate in int32).
    """
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape!r}")
    layer_indices = [index for index, op in enumerate(model.ops) if op["op"] in LAYER_OPS]
    if not layer_indices:
        raise ValueError("the model has no conv2d or linear op to export")
    last_layer = layer_indices[-1]
    steps: list[Step] = []
    shape = tuple(input_shape)
    flat = False
    for index, op in enumerate(model.ops):
        kind = op["op"]
        where = f"op {index} ({op.get('name')!r}, {kind})"
        if index > last_layer and kind != "flatten":
            raise ValueError(f"{where} follows the last layer, which outputs int32 logits; only flatten may follow it")
        if kind in LAYER_OPS:
            _check_layer(op, where, is_last=index == last_layer)
            out_shape = _layer_shape(op, shape, flat, where)
        elif kind == "maxpool2d":
            if flat:
                raise ValueError(f"{where} needs a (C, H, W) input, but the activation was flattened before it")
            out_shape = _maxpool_shape(op, shape, where)
        elif kind == "flatten":
            out_shape = (int(np.prod(shape)), 1, 1)
            flat = True
        else:
            raise ValueError(f"{where} is not supported; allowed ops: conv2d, linear, maxpool2d, flatten")
        steps.append(Step(index, op, shape, out_shape))
        shape = out_shape
    return steps


def _layer_shape(op: dict[str, Any], shape: tuple[int, int, int], flat: bool, where: str) -> tuple[int, int, int]:
    weight = op["weight"]
    got = f"got input {shape}, weight {tuple(weight.shape)}"
    if op["op"] == "linear":
        if not flat or weight.ndim != 2:
            raise ValueError(f"{where} needs a flattened input and a 2-D weight; {got}")
        kernel, stride, padding = [1, 1], [1, 1], [0, 0]
    else:
        if flat or weight.ndim != 4:
            raise ValueError(f"{where} needs a (C, H, W) input and a 4-D weight; {got}")
        kernel, stride, padding = list(weight.shape[2:]), op["stride"], op["padding"]
    if weight.shape[1] != shape[0]:
        raise ValueError(f"{where} has weight {tuple(weight.shape)} for {shape[0]} input channels (input {shape})")
    return (int(weight.shape[0]), *_window_output(shape, kernel, stride, padding, where))


def _maxpool_shape(op: dict[str, Any], shape: tuple[int, int, int], where: str) -> tuple[int, int, int]:
    kernel, stride, padding = op["kernel"], op["stride"], op["padding"]
    # PyTorch's rule; it also means every window holds at least one real value,
    # so padding never reaches the output (it acts as -infinity).
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        raise ValueError(f"{where}: padding {padding} must be at most half the kernel {kernel}")
    return (shape[0], *_window_output(shape, kernel, stride, padding, where))


def _window_output(
    shape: tuple[int, int, int], kernel: list[int], stride: list[int], padding: list[int], where: str
) -> tuple[int, int]:
    """(out_h, out_w) of a sliding window over the (C, H, W) ``shape``; an error if it leaves no output."""
    sizes = zip(shape[1:], kernel, stride, padding, strict=True)
    out_h, out_w = (pooled_size(size, k, s, p) for size, k, s, p in sizes)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{where}: kernel {kernel}, stride {stride}, padding {padding} leave no output for {shape}")
    return out_h, out_w


def _check_layer(op: dict[str, Any], where: str, is_last: bool) -> None:
    expected_bits = 32 if is_last else 8
    if op["output_bits"] != expected_bits:
        raise ValueError(
            f"{where} has output_bits {op['output_bits']}; the last layer gives int32 logits (32), every other int8 (8)"
        )
    if not op["requantize"]:
        if not is_last:
            raise ValueError(f"{where} is not requantized, but only the last layer may output raw accumulators")
    else:
        _check_multipliers(op, where)
    bound = accumulator_bound(op["weight"], op["bias"])
    if bound > INT32_MAX:  # int32 accumulators: a larger sum would overflow (undefined behavior in C)
        raise OverflowError(f"{where}: worst-case accumulator {bound} exceeds int32 max {INT32_MAX}")


def _check_multipliers(op: dict[str, Any], where: str) -> None:
    out_channels = int(op["weight"].shape[0])
    multiplier, shift = channel_values(op["multiplier"]), channel_values(op["shift"])
    if multiplier.size not in (1, out_channels) or shift.size != multiplier.size:
        raise ValueError(
            f"{where} needs 1 or {out_channels} multipliers and as many shifts, got {multiplier.size} and {shift.size}"
        )
    # The rounding term 2^(30 - shift) and the shift 31 - shift must stay in [1, 62] bits of int64.
    valid = (multiplier == 0) | ((multiplier >= 2**30) & (multiplier < 2**31))
    if not valid.all() or not ((shift >= MIN_SHIFT) & (shift <= MAX_SHIFT)).all():
        raise ValueError(
            f"{where} needs multipliers 0 or in [2^30, 2^31) and shifts in [{MIN_SHIFT}, {MAX_SHIFT}], "
            f"got multipliers {multiplier.tolist()}, shifts {shift.tolist()}"
        )


def as_array(value: Any, dtype: type) -> np.ndarray:
    """A tensor, array or number as a numpy array of ``dtype``."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def channel_values(values: Any) -> np.ndarray:
    """A scalar or per-channel tensor as a 1-D int64 array (one value for per-tensor)."""
    return as_array(values, np.int64).reshape(-1)


def layer_steps(steps: list[Step]) -> list[Step]:
    """The conv2d/linear steps, in forward order."""
    return [step for step in steps if step.is_layer]
