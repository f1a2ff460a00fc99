"""What ``train.model`` and ``train.weights`` may name, checked without building or running any model (no torch here).

``train.model``: a built-in name (``MODEL_NAMES``; ``pipeline.models.MODELS`` holds their classes), a factory in a
project file (``models/<file>.py:<factory>``) or in an importable module (``<package.module>:<factory>``), or a
float ONNX model (``models/<file>.onnx``, ``pipeline.onnx_import``). ``check_model_spec`` validates params.yaml's
value: a model file is compiled, never run. ``train.weights``: a weights file under ``models/``
(``check_weights_spec``; ``pipeline.weights_import`` reads it). The one-line error descriptions the model code
shares live here too.
"""
from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

MODEL_NAMES = ("net", "bnnet", "resnet20", "mobilenet")

# A user's model file lives here, so that dvc.yaml can list one folder as a dependency of every stage
# that builds the model: editing the file re-runs them.
USER_MODELS_DIR = Path("models")
FACTORY_SPEC = re.compile(r"^(?P<source>[^:]+):(?P<factory>[A-Za-z_]\w*)$")
ONNX_SUFFIX = ".onnx"
# A state_dict saved with torch.save (read with weights_only=True), or safetensors (no code runs on load).
WEIGHTS_SUFFIXES = (".pt", ".pth", ".safetensors")


class ModelSpecError(ValueError):
    """``train.model`` names no built-in model and no loadable factory."""


def is_onnx_model(spec: str) -> bool:
    """Whether ``spec`` names a float ONNX model file (``models/<file>.onnx``)."""
    return spec.endswith(ONNX_SUFFIX) and FACTORY_SPEC.match(spec) is None


def is_user_model(spec: str) -> bool:
    """Whether ``spec`` names a factory (``file.py:factory`` or ``package.module:factory``) or an ONNX file, not a
    built-in."""
    return spec not in MODEL_NAMES and (FACTORY_SPEC.match(spec) is not None or is_onnx_model(spec))


def _project_file(key: str, what: str, source: str, root: Path | None) -> Path:
    """The file ``source`` names, which must exist under ``models/`` in the project (else a ModelSpecError)."""
    base = (root or Path.cwd()).resolve()
    path = (base / source).resolve()
    if not path.is_relative_to(base / USER_MODELS_DIR):
        raise ModelSpecError(
            f"{key}: the {what} {source!r} must be under {USER_MODELS_DIR}/ in the project "
            "(dvc.yaml tracks that folder, so replacing the file re-runs the stages that build the model)"
        )
    if not path.is_file():
        raise ModelSpecError(f"{key}: the {what} {source!r} does not exist")
    return path


def check_model_spec(spec: str, root: Path | None = None) -> None:
    """A ModelSpecError unless ``spec`` is a built-in name, ``models/<file>.py:factory`` or ``models/<file>.onnx``
    with the file present under ``root`` (default: the working folder), or ``package.module:factory``."""
    if spec in MODEL_NAMES:
        return
    if is_onnx_model(spec):
        _project_file("train.model", "ONNX model file", spec, root)
        return
    match = FACTORY_SPEC.match(spec)
    if match is None:
        raise ModelSpecError(
            f"train.model: value {spec!r} is not allowed; allowed: {', '.join(MODEL_NAMES)}, "
            f"{USER_MODELS_DIR}/<file>.py:<factory>, <package.module>:<factory> or {USER_MODELS_DIR}/<file>.onnx"
        )
    source = match["source"]
    if source.endswith(".py"):
        path = _project_file("train.model", "model file", source, root)
        # Compiled, not run: a syntax error fails params validation (check-params) without executing the user's code.
        try:
            compile(path.read_bytes(), source, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as error:  # ValueError: a null byte in the file
            raise ModelSpecError(f"train.model {spec!r}: cannot load {source}: {describe_error(error, source)}") from None


def check_weights_spec(spec: str, root: Path | None = None) -> None:
    """A ModelSpecError unless ``spec`` names an existing ``models/<file>`` with a suffix of ``WEIGHTS_SUFFIXES``."""
    if not spec.endswith(WEIGHTS_SUFFIXES):
        raise ModelSpecError(
            f"train.weights: value {spec!r} is not allowed; allowed: a file {USER_MODELS_DIR}/<file> ending in "
            f"{', '.join(WEIGHTS_SUFFIXES)} (a state_dict saved with torch.save, safetensors, or a checkpoint of this "
            f"pipeline); a float ONNX model goes in train.model"
        )
    _project_file("train.weights", "weights file", spec, root)


def factory_source_file(spec: str) -> str | None:
    """The file of the factory ``spec`` names (``models/<file>.py`` or an imported module's); None for a built-in."""
    match = FACTORY_SPEC.match(spec)
    if match is None:
        return None
    source = match["source"]
    return source if source.endswith(".py") else getattr(sys.modules.get(source), "__file__", None)


def describe_error(error: Exception, source_file: str | None) -> str:
    """The error in one line, ``Type: message (file, line N)``, the place being a SyntaxError's own or the innermost
    line of ``source_file`` the error passed through: the user sees no traceback, only this."""
    if isinstance(error, SyntaxError):
        message, where, line = error.msg, error.filename, error.lineno
    else:
        message, where = first_line(error), source_file
        line = _innermost_line(error, source_file) if source_file else None
    place = f" ({where}, line {line})" if where and line else ""
    return f"{type(error).__name__}: {message}{place}" if message else f"{type(error).__name__}{place}"


def _innermost_line(error: Exception, source_file: str) -> int | None:
    """The line number of the innermost traceback frame of ``error`` in ``source_file``, None when it has none there."""
    target = Path(source_file).resolve()
    frames = traceback.extract_tb(error.__traceback__)
    lines = [frame.lineno for frame in frames if Path(frame.filename).resolve() == target]
    return lines[-1] if lines else None


def first_line(error: Exception) -> str:
    """The error's message, its first three non-empty lines joined."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:3])
