"""One thin entry point per DVC stage: read params, load inputs, call ``pipeline``, write outputs.

DVC runs each stage's ``python`` from PATH. A dvc started as ``.venv/bin/dvc`` without the venv
activated runs the system Python, which lacks the project's packages: say so, and how to fix it,
instead of a ModuleNotFoundError from deep inside an import.
"""
import importlib.util
import sys

_MISSING = [name for name in ("torch", "numpy", "ruamel.yaml") if importlib.util.find_spec(name.split(".")[0]) is None]
if _MISSING:
    sys.exit(
        f"error: the stage runs on {sys.executable}, which lacks {', '.join(_MISSING)}: the project's venv is not "
        "first on PATH. Activate it first (`. .venv/bin/activate`, then `dvc ...`), or use `make repro`."
    )
