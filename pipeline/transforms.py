"""Per-batch tensor transforms of the uint8 images, and the seeded subsets every stage draws.

The dataset stays uint8 (N, 32, 32, 3); each batch is normalized on its device with tensor
operations (``normalize``, ``normalized_batches``). Subsets of a split (calibration, held-out and
SQNR images) are seeded random draws (``sample_indices``), never a prefix: an image-folder source
stores each split grouped by class.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import numpy as np
import torch

# Re-exported: the default normalization of the functions that take one (pipeline.normalization holds it).
from pipeline.normalization import SEED_MEAN as SEED_MEAN
from pipeline.normalization import SEED_STD as SEED_STD
from pipeline.progress import progress_items


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W), per-channel ``(x / 255 - mean) / std``.

    The same float operations, in the same order, as torchvision's ``ToTensor`` + ``Normalize``; contiguous
    NCHW as they give, unless ``memory_format`` asks for another layout (see ``pipeline.models.batch_layout``).
    """
    mean_t, std_t = _channel_constants(tuple(mean), tuple(std), images.device)
    # The conversion copy writes the asked layout directly: no extra pass over the batch.
    return images.permute(0, 3, 1, 2).float(memory_format=memory_format).div_(255).sub_(mean_t).div_(std_t)


@functools.lru_cache(maxsize=8)
def _channel_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per device, not at every step: at batch size 4 that is a measurable share of the step.
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
        torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1),
    )


def normalized_batches(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    desc: str,
    progress: bool | None = None,
    device: torch.device | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Iterator[torch.Tensor]:
    """uint8 images (N, H, W, C) as normalized float batches (B, C, H, W) on ``device``, in order, in
    ``memory_format``.

    A progress bar labelled ``desc`` counts the batches; ``progress=None`` shows it only when
    stderr is a terminal.
    """
    for start in progress_items(range(0, len(images), batch_size), desc, progress, every_item=False):
        yield normalize(images[start : start + batch_size].to(device), mean, std, memory_format)


def sample_indices(total: int, count: int, seed: int) -> np.ndarray:
    """A sorted random subset of ``count`` indices out of ``range(total)``, reproducible from ``seed``."""
    if not 0 <= count <= total:
        raise ValueError(f"count: value {count} is out of range; allowed: 0..{total}")
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


def calibration_indices(num_train: int, num_samples: int, seed: int, key: str = "profile.num_samples") -> np.ndarray:
    """A sorted random subset of ``num_samples`` training indices, reproducible from ``seed`` (``key``: the param, for errors)."""
    if not 1 <= num_samples <= num_train:
        raise ValueError(f"{key}: value {num_samples} is out of range; allowed: 1..{num_train} (training images)")
    return sample_indices(num_train, num_samples, seed)
