"""Window geometry shared by convolutions and pools: output sizes as PyTorch computes them."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IntWindow:
    """The fields of an integer pooling node: windows of ``kernel`` every ``stride``, ``padding`` on each side."""

    name: str
    input: str
    output: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]


def pooled_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window (floor mode, no dilation), as PyTorch computes it."""
    return (size + 2 * padding - kernel) // stride + 1


def window_shape(shape: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], where: str) -> tuple[int, int]:
    """(H, W) of the output of windows over a (C, H, W) ``shape``; ``ValueError`` naming ``where`` if none fits."""
    if len(shape) != 3:
        raise ValueError(f"{where} needs a (C, H, W) input, got {shape}")
    sizes = zip(shape[1:], kernel, stride, padding, strict=True)
    out_h, out_w = (pooled_size(size, k, s, p) for size, k, s, p in sizes)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{where}: kernel {kernel}, stride {stride}, padding {padding} leave no output for {shape}")
    return out_h, out_w


__all__ = ["IntWindow", "pooled_size", "window_shape"]
