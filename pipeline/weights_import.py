"""Weights trained elsewhere (``train.weights``): read a user's file without running code from it, and fit them to
``train.model`` without changing any float.

A ``.pt``/``.pth`` file is read by ``pipeline.io.load_checkpoint`` (``torch.load`` with ``weights_only=True``: a
pickle of anything but tensors and plain data is refused, never run); a ``.safetensors`` file holds tensors and
nothing else. ``fit_weights`` checks the tensors against the model (names, shapes, finiteness, dtypes that would
round) and reports every problem in one line before it loads anything, so a refused file leaves the model as it
was and the stage writes nothing.
"""
from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from pipeline.io import UnreadableCheckpointError, file_hash, load_checkpoint
from pipeline.model_spec import WEIGHTS_SUFFIXES, describe_error
from pipeline.models import non_finite_tensors

__all__ = ["WEIGHTS_SUFFIXES", "ImportedWeights", "WeightsFileError", "file_sha256", "fit_weights", "read_weights_file"]

_SAVE_ADVICE = "save `model.state_dict()` with torch.save, or with safetensors.torch.save_file"
# What load_checkpoint's messages end with for its default writer; a user's file needs other advice.
_RERUN_ADVICE = "; rerun the train stage to rewrite it"
# The class or function torch's weights-only unpickler refused, as its message names it.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# Names shown in a message before "and N more".
_SHOWN = 5


class WeightsFileError(ValueError):
    """A weights file that cannot be read safely, or whose tensors do not fit the model; one line naming the file."""


@dataclass(frozen=True)
class ImportedWeights:
    """A weights file's tensors by name and what it was.

    ``format`` is "state_dict" (a mapping of names to tensors, or a dict holding one under "state_dict", as
    Lightning saves), "safetensors" or "checkpoint" (one this pipeline's train stage wrote); ``checkpoint`` is
    that checkpoint without its state_dict ("model", "mean", "std", "class_names"...), else None.
    """

    state_dict: dict[str, Tensor]
    format: str
    sha256: str
    checkpoint: dict[str, Any] | None


def file_sha256(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), read in chunks."""
    return file_hash(path, "sha256")


def read_weights_file(path: str | os.PathLike) -> ImportedWeights:
    """The tensors of a ``.pt``, ``.pth`` or ``.safetensors`` file, read without running any code from it.

    Anything else (another suffix, a missing, truncated or foreign file, a pickle of other objects, a file holding
    no state_dict) is a WeightsFileError naming the file.
    """
    path = Path(path)
    if not path.name.endswith(WEIGHTS_SUFFIXES):
        suffix = f"the suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise WeightsFileError(f"{path}: a weights file must end in {_or(WEIGHTS_SUFFIXES)}; this one has {suffix}")
    if not path.is_file():
        raise WeightsFileError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        if path.name.endswith(".safetensors"):
            state_dict, format_, checkpoint = _read_safetensors(path), "safetensors", None
        else:
            state_dict, format_, checkpoint = _state_dict_of(path, _read_torch_file(path))
        sha256 = file_sha256(path)
    except OSError as error:  # unreadable (permissions, I/O error): the OS's reason
        raise WeightsFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    return ImportedWeights(state_dict, format_, sha256, checkpoint)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    data = path.read_bytes()
    try:
        state_dict = safetensors.torch.load(data)
    except Exception as error:  # SafetensorError for a bad header; anything else it raises means the same to the user
        raise WeightsFileError(
            f"{path}: not a safetensors file, or a truncated or corrupted one ({describe_error(error, None)}); "
            f"copy it again whole, or {_SAVE_ADVICE}"
        ) from None
    if not state_dict:
        raise WeightsFileError(f"{path}: holds no tensors; {_SAVE_ADVICE}")
    return state_dict


def _read_torch_file(path: Path) -> Any:
    """What ``torch.load(weights_only=True)`` gives for the file; a refusal reworded for a file the user made."""
    try:
        return load_checkpoint(path)
    except UnreadableCheckpointError as error:
        # load_checkpoint raises `from None`, which hides torch's error from tracebacks but keeps it as the context.
        original = error.__context__
        if isinstance(original, pickle.UnpicklingError):
            refused = _REFUSED_GLOBAL.search(str(original))
            what = (f"it holds Python objects other than tensors and plain data (here {refused[1]}), which only a "
                    "loader that runs code could read" if refused else
                    "not tensors and plain data as torch.save writes them")  # e.g. a plain pickle, protocol 4 or 5
            raise WeightsFileError(f"{path}: refused without running any of its code: {what}; {_SAVE_ADVICE}") from None
        reason = str(error).removeprefix(f"{path}: ").removesuffix(_RERUN_ADVICE)
        raise WeightsFileError(f"{path}: {reason}; copy it again whole, or {_SAVE_ADVICE}") from None


def _state_dict_of(path: Path, content: Any) -> tuple[dict[str, Tensor], str, dict[str, Any] | None]:
    """The state_dict ``content`` holds, its format, and a checkpoint's metadata (see ``ImportedWeights``)."""
    if _is_state_dict(content):
        return content, "state_dict", None
    if isinstance(content, Mapping) and _is_state_dict(content.get("state_dict")):
        # The train stage's checkpoint; a user's own {"model": ..., "state_dict": ...} is taken as a state_dict.
        if isinstance(content.get("model"), str) and {"mean", "std", "class_names"} <= content.keys():
            return content["state_dict"], "checkpoint", {k: v for k, v in content.items() if k != "state_dict"}
        return content["state_dict"], "state_dict", None
    nested = [key for key, value in content.items() if _is_state_dict(value)] if isinstance(content, Mapping) else []
    hint = f"; its entry {_names(nested)} is one: save that entry alone" if nested else ""
    raise WeightsFileError(
        f"{path}: holds {_describe(content)}, not a state_dict (names to tensors){hint}; {_SAVE_ADVICE}"
    )


def _is_state_dict(content: Any) -> bool:
    """A non-empty mapping of str names to tensors."""
    return (isinstance(content, Mapping) and bool(content)
            and all(isinstance(key, str) and isinstance(value, Tensor) for key, value in content.items()))


def _describe(content: Any) -> str:
    """What a file holds, for a message: a dict's entries (non-tensors by key and kind, tensors counted)."""
    if not isinstance(content, Mapping) or not content:
        return _kind(content)
    others = [f"{key!r}: {_kind(value)}" for key, value in content.items() if not isinstance(value, Tensor)]
    tensors = [repr(key) for key, value in content.items() if isinstance(value, Tensor)]
    counted = [f"{_count(len(tensors), 'tensor')} ({_listing(tensors)})"] if tensors else []
    return f"a dict of {_count(len(content), 'entry')} ({_listing(others + counted)})"


def _kind(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a {_dtype(value)} tensor of shape {tuple(value.shape)}"
    if isinstance(value, Mapping):
        return f"a dict of {_count(len(value), 'entry')}" if value else "an empty dict"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {_count(len(value), 'item')}"
    name = type(value).__name__
    return "None" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def fit_weights(model: nn.Module, state_dict: Mapping[str, Tensor], where: str) -> None:
    """Load ``state_dict`` into ``model`` exactly, after checking that it fits; ``where`` names the file.

    Every problem is reported at once, in one WeightsFileError, before anything is loaded: missing and unexpected
    names, shapes other than the model's, values that are not tensors, NaN or infinity, and dtypes the model's would
    round. A file without BatchNorm's ``num_batches_tracked`` counters is taken: they count training batches and
    matter only to a BatchNorm trained with ``momentum=None``, never in eval, so the model keeps its own (0 for a
    fresh model).
    """
    expected = model.state_dict()
    problems = _problems(expected, state_dict)
    if problems:
        raise WeightsFileError(f"{where}: does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(_with_own_counters(state_dict, expected), strict=True)


def _problems(expected: Mapping[str, Tensor], given: Mapping[str, Any]) -> list[str]:
    """What keeps ``given`` from loading into a model whose state_dict is ``expected``, one phrase a kind."""
    missing = [key for key in expected if key not in given and not _is_batch_counter(key)]
    unexpected = [key for key in given if key not in expected]
    not_tensors = [f"{key} ({type(value).__name__})" for key, value in given.items() if not isinstance(value, Tensor)]
    # torch.ao's quantized weights, sparse or meta tensors: nothing a float model loads, and nothing to check values of.
    not_dense = [f"{key} ({_dtype(value)}, {_layout(value)})" for key, value in given.items()
                 if isinstance(value, Tensor) and not _is_dense_float_or_integer(value)]
    common = {key: value for key, value in given.items()
              if key in expected and isinstance(value, Tensor) and _is_dense_float_or_integer(value)}
    shapes = [f"{key}: file {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
              for key, value in common.items() if value.shape != expected[key].shape]
    non_finite = non_finite_tensors(common)
    # load_state_dict copies each tensor into the model's with Tensor.copy_, which casts to the model's dtype without
    # a word: float64 to float32 rounds, a float into an integer buffer truncates. A cast that gives back the same
    # values (float16 or bfloat16 into float32, float64 that float32 holds exactly) changes nothing, so only the
    # values decide. Non-finite tensors are reported as such (NaN never equals itself).
    casts = [f"{key} ({_dtype(value)} -> {_dtype(expected[key])})" for key, value in common.items()
             if value.dtype != expected[key].dtype and value.shape == expected[key].shape and key not in non_finite
             and not _casts_exactly(value, expected[key])]
    problems = [
        (missing, "missing from the file"),
        (unexpected, "not in the model"),
        (shapes, "of another shape"),
        (not_tensors, "not tensors"),
        (not_dense, "not dense float or integer tensors (save the float model's state_dict, before quantizing it)"),
        (non_finite, "with NaN or infinity"),
        (casts, "whose values the model's dtype would change"),
    ]
    described = [f"{len(items)} {what}: {_listing(items)}" for items, what in problems if items]
    hint = _prefix_hint(expected, given)
    return described + [hint] if described and hint else described


def _is_dense_float_or_integer(tensor: Tensor) -> bool:
    return (tensor.layout == torch.strided and not tensor.is_quantized and not tensor.is_meta
            and not tensor.is_complex())


def _layout(tensor: Tensor) -> str:
    if tensor.is_quantized:
        return "quantized"
    if tensor.is_meta:
        return "meta, no values"
    return str(tensor.layout).removeprefix("torch.")


def _casts_exactly(value: Tensor, target: Tensor) -> bool:
    return bool((value.to(target.dtype).to(value.dtype) == value).all())


def _prefix_hint(expected: Mapping[str, Tensor], given: Mapping[str, Any]) -> str | None:
    """A hint when every name in the file is a model name behind one prefix (a DataParallel or Lightning wrapper)."""
    prefixes = {key.split(".", 1)[0] for key in given}
    if len(prefixes) != 1 or not all("." in key for key in given):
        return None
    prefix = f"{prefixes.pop()}."
    stripped = {key.removeprefix(prefix) for key in given}
    required = {key for key in expected if not _is_batch_counter(key)}
    if not (required <= stripped <= set(expected)):
        return None
    return f"every name in the file starts with {prefix!r} (a wrapper's): remove that prefix from the names"


def _is_batch_counter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] == "num_batches_tracked"


def _with_own_counters(state_dict: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``state_dict`` with the model's own values for the BatchNorm counters it lacks (see ``fit_weights``)."""
    absent = [key for key in expected if key not in state_dict and _is_batch_counter(key)]
    if not absent:
        return state_dict
    completed = OrderedDict(state_dict)
    completed.update((key, expected[key]) for key in absent)
    if hasattr(state_dict, "_metadata"):  # module versions torch.save kept; load_state_dict reads them from here
        completed._metadata = state_dict._metadata  # type: ignore[attr-defined]
    return completed


def _dtype(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _listing(items: list[str]) -> str:
    """The first few items, then how many more."""
    more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def _count(number: int, noun: str) -> str:
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{number} {noun if number == 1 else plural}"


def _names(keys: list[Any]) -> str:
    return _or([repr(key) for key in keys])


def _or(items: list[str] | tuple[str, ...]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
