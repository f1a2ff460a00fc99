"""A sweep's grid: one override dict per point, and how ``dvc exp run -S`` takes a point."""
from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from typing import Any

# What the sweep varies by default: weight bits x calibrator x granularity, 12 experiments.
DEFAULT_CHOICES: dict[str, list[Any]] = {
    "quantize_weights.bits": [8, 6, 4],
    "quantize_weights.calibrator": ["sigma", "mse"],
    "quantize_weights.granularity": ["per_tensor", "per_channel"],
}


def product_grid(choices: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the choices, one override dict per experiment, in the choices' order."""
    keys = list(choices)
    return [dict(zip(keys, values)) for values in itertools.product(*(choices[key] for key in keys))]


DEFAULT_GRID = product_grid(DEFAULT_CHOICES)


def point_label(overrides: Mapping[str, Any]) -> str:
    """A grid point as ``key=value`` pairs, as ``dvc exp run -S`` takes them."""
    return " ".join(f"{key}={value}" for key, value in overrides.items()) or "(no overrides)"


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``-S key=value`` arguments; JSON values parse back as the same YAML type (a string stays a string)."""
    return [arg for key, value in overrides.items() for arg in ("-S", f"{key}={json.dumps(value)}")]
