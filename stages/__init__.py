"""One thin entry point per DVC stage: read params, load inputs, call ``pipeline``, write outputs.

Two things happen here, before any stage module imports torch:

* DVC runs each stage's ``python`` from PATH. A dvc started as ``.venv/bin/dvc`` without the venv
  activated runs the system Python, which lacks the project's packages: say so, and how to fix it,
  instead of a ModuleNotFoundError from deep inside an import.
* On x86-64 the CPU kernels are pinned to instruction sets that every machine with AVX2 has. Left
  to choose, PyTorch's own kernels, oneDNN's convolutions and MKL's matrix products each pick the
  widest the CPU offers (AVX-512 here), and training then gives other weights on another CPU
  (benchmarks/cpu_determinism.py: ATen's AVX2 and AVX-512 kernels differ in the loss gradient and the
  SGD update, oneDNN's in BNNet's convolution backward, MKL's on an Intel CPU). MKL_CBWR=COMPATIBLE
  is the one MKL branch that gives the same results on every x86 CPU, AMD included. Measured cost
  here: about 14% of training speed at batch 128, within noise at batch 4. A variable already set in
  the environment wins, so a user can opt out (e.g. ATEN_CPU_CAPABILITY=avx512); the train stage
  records what was in force in data/train_metrics.json.
"""
import importlib.util
import os
import platform
import sys

_MISSING = [name for name in ("torch", "numpy", "ruamel.yaml") if importlib.util.find_spec(name.split(".")[0]) is None]
if _MISSING:
    sys.exit(
        f"error: the stage runs on {sys.executable}, which lacks {', '.join(_MISSING)}: the project's venv is not "
        "first on PATH. Activate it first (`. .venv/bin/activate`, then `dvc ...`), or use `make repro`."
    )

# Read by the libraries when they load, so set before torch is imported.
CPU_KERNEL_PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE"}
if platform.machine().lower() in ("x86_64", "amd64"):
    for _name, _value in CPU_KERNEL_PINS.items():
        os.environ.setdefault(_name, _value)
