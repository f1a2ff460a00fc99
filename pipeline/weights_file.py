"""The quantize-weights stage's file: int8 weights and float64 scales by layer (and bias correction's biases),
as ``.npz`` arrays plus one JSON ``meta`` entry, no pickle."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.io import atomic_path


def save_quantized_weights(
    quantized_weights: dict[str, tuple[Tensor, Tensor]],
    meta: dict[str, Any],
    path: str | os.PathLike,
    corrected_biases: Mapping[str, Tensor] | None = None,
) -> None:
    """Write ``quantize_model_weights``' result (int8 weights and float64 scales, by layer) and a JSON ``meta``.

    ``corrected_biases`` (bias correction's float32 biases, by layer) replace the float model's
    biases when the biases are quantized; without them the file has none.
    """
    arrays = {}
    for name, (q_weight, weight_scale) in quantized_weights.items():
        arrays[f"{name}.weight"] = q_weight.numpy()
        arrays[f"{name}.scale"] = weight_scale.numpy()
    for name, bias in (corrected_biases or {}).items():
        arrays[f"{name}.bias"] = bias.numpy()
    corrected = {"corrected_biases": list(corrected_biases)} if corrected_biases else {}
    arrays["meta"] = np.array(json.dumps(meta | {"layers": list(quantized_weights)} | corrected))
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, **arrays)


def load_quantized_weights(path: str | os.PathLike) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Any]]:
    """Read ``save_quantized_weights``' file: the weights by layer name, and the meta dict."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        weights = {
            name: (torch.from_numpy(archive[f"{name}.weight"].copy()), torch.from_numpy(archive[f"{name}.scale"].copy()))
            for name in meta["layers"]
        }
    return weights, meta


def load_corrected_biases(path: str | os.PathLike) -> dict[str, Tensor]:
    """The corrected float biases ``save_quantized_weights`` stored, by layer name ({} when there are none)."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        return {name: torch.from_numpy(archive[f"{name}.bias"].copy()) for name in meta.get("corrected_biases", [])}
