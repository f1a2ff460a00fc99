"""Shared fixtures: tiny synthetic data, so no test downloads anything."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# As orchestration.OFFLINE_ENV: a loaded CI machine needs more than Prefect's 20 s to start an ephemeral server.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@pytest.fixture
def synthetic_images() -> tuple[torch.Tensor, torch.Tensor]:
    """64 uint8 images (N, 32, 32, 3) whose class (0..9) is encoded in a bright square's position."""
    generator = torch.Generator().manual_seed(0)
    count = 64
    labels = torch.arange(count) % 10
    images = torch.randint(0, 60, (count, 32, 32, 3), dtype=torch.uint8, generator=generator)
    for index, label in enumerate(labels.tolist()):
        row, col = divmod(label, 4)
        images[index, 8 * row : 8 * row + 8, 8 * col : 8 * col + 8] = 250
    return images, labels
