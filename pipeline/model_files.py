"""The integer model and the quantized weights on disk: ``.npz`` arrays plus one JSON entry, no pickle.

Format version 2 (the graph IR): the JSON ``meta`` entry holds the tensors' shapes, bits and
scales (and ``"signed": false`` for an unsigned tensor: a tensor without the key is signed, so files
written before unsigned activations existed read as they were; likewise a rescale without ``"rounding"``
reads as the single rounding it was written with) and every node as ``{"type": "IntConv", field: value, ...}``; every torch tensor of a
node is an array named ``node<index>.<field path>``. A version 1 file (the sequential form
before the graph IR) is an error naming its version: rerun the quantize-biases stage.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.io import atomic_path
from pipeline.quant.ir import IntegerModel
from pipeline.quant.ops.base import Requantize, TensorInfo
from pipeline.quant.ops.registry import NODE_TYPES, IntNode

FORMAT_NAME = "cifar10-ptq-integer-model"
FORMAT_VERSION = 2
SIGNED_INT8_ACTIVATIONS = "activations int8 [-128,127] S_a=range/127"
SCHEME = (
    "r ~= S*q, symmetric, zero point 0; weights int8 [-127,127] S_w=range/127 (per tensor or per output "
    "channel); " + SIGNED_INT8_ACTIVATIONS + "; bias int32 round_half_even(b/(S_in*S_w)); "
    "acc int32; every rescale M ~= multiplier*2^(shift-31), " + "{rounding}" + ", then saturation; add: "
    "inputs << left_shift, each rescaled to the common grid, summed, rescaled; average pool: window sum "
    "rescaled by S_in/(S_out*area), or with mean_zero_point TFLite's AVERAGE_POOL_2D mean (half away from zero) "
    "rescaled by S_in/S_out, a global one as TFLite's MEAN (1/n folded into the multiplier); concat: "
    "inputs rescaled to S_out; the logits are int32"
)
ROUNDING_TEXT = {
    "single": "y=(x*multiplier + 2^(30-shift)) >> (31-shift) (round half up)",
    "double": "y=RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x << max(shift,0), multiplier), "
              "max(-shift,0)) (TFLite's double rounding)",
}
_VALUE_TYPES = {"Requantize": Requantize}


def scheme(model: IntegerModel) -> str:
    """``SCHEME`` with the model's activation format: the seed's text for signed int8 activations."""
    activations = [info for name, info in model.tensors.items() if info.bits != 32]
    text = SCHEME.replace("{rounding}", ROUNDING_TEXT[model.rounding])
    if all(info.bits == 8 and info.signed for info in activations):
        return text
    bits = sorted({info.bits for info in activations})
    activation_text = (f"activations {'/'.join(map(str, bits))}-bit in int8/uint8 bytes, signed [-2^(b-1),2^(b-1)-1] "
            "S_a=range/(2^(b-1)-1), or, for a tensor with \"signed\": false (non-negative by construction), "
            "unsigned [0,2^b-1] S_a=range/(2^b-1)")
    return text.replace(SIGNED_INT8_ACTIVATIONS, activation_text)


def _tensor_entry(info: TensorInfo) -> dict[str, Any]:
    entry = {"shape": list(info.shape), "bits": info.bits, "scale": float(info.scale)}
    # Only an unsigned tensor carries the key: a signed model's file stays as it was before the key existed.
    return entry if info.signed else entry | {"signed": False}


def _encode(value: Any, path: str, arrays: dict[str, np.ndarray]) -> Any:
    """A JSON-able form of a node field; tensors go into ``arrays`` under ``path``."""
    if isinstance(value, Tensor):
        arrays[path] = value.detach().cpu().numpy()
        return {"array": path}
    if isinstance(value, Requantize):
        return {"type": "Requantize"} | {
            field.name: _encode(getattr(value, field.name), f"{path}.{field.name}", arrays)
            for field in dataclasses.fields(value)
        }
    if isinstance(value, tuple):
        return {"tuple": [_encode(item, f"{path}.{index}", arrays) for index, item in enumerate(value)]}
    return value


def _decode(value: Any, archive: Any) -> Any:
    if isinstance(value, dict) and "array" in value:
        return torch.from_numpy(archive[value["array"]].copy())
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_decode(item, archive) for item in value["tuple"])
    if isinstance(value, dict) and value.get("type") in _VALUE_TYPES:
        # A rescale written before the rounding rule was recorded used the only rule there was then.
        fields = {"rounding": "single"} | {key: _decode(item, archive) for key, item in value.items() if key != "type"}
        return _VALUE_TYPES[value["type"]](**fields)
    if isinstance(value, list):
        return tuple(value)
    return value


def save_integer_model(model: IntegerModel, path: str | os.PathLike) -> None:
    """Write ``model`` as an ``.npz`` of arrays plus one JSON entry ``meta``, atomically."""
    arrays: dict[str, np.ndarray] = {}
    nodes = []
    for index, node in enumerate(model.nodes):
        entry = {"type": type(node).__name__}
        for field in dataclasses.fields(node):
            entry[field.name] = _encode(getattr(node, field.name), f"node{index}.{field.name}", arrays)
        nodes.append(entry)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "scheme": scheme(model),
        "input": model.input,
        "output": model.output,
        "input_mean": model.input_mean,
        "input_std": model.input_std,
        "tensors": {name: _tensor_entry(info) for name, info in model.tensors.items()},
        "nodes": nodes,
    }
    arrays["meta"] = np.array(json.dumps(header))
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        np.savez(file, **arrays)


def load_integer_model(path: str | os.PathLike) -> IntegerModel:
    """Read a model written by ``save_integer_model`` (no pickle is ever loaded)."""
    with np.load(path, allow_pickle=False) as archive:
        header = json.loads(str(archive["meta"]))
        if header.get("format") != FORMAT_NAME or header.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{os.fspath(path)!r} is a {header.get('format')!r} file of version {header.get('version')!r}; "
                f"this pipeline reads {FORMAT_NAME} version {FORMAT_VERSION} (the graph IR): rerun the "
                "quantize-biases stage (dvc repro) to rewrite it"
            )
        nodes: list[IntNode] = []
        for entry in header["nodes"]:
            node_type = NODE_TYPES[entry["type"]]
            nodes.append(node_type(**{key: _decode(value, archive) for key, value in entry.items() if key != "type"}))
    tensors = {
        name: TensorInfo(tuple(info["shape"]), info["bits"], torch.tensor(info["scale"], dtype=torch.float64),
                         info.get("signed", True))
        for name, info in header["tensors"].items()
    }
    return IntegerModel(header["input"], header["output"], tensors, nodes, header["input_mean"], header["input_std"])
