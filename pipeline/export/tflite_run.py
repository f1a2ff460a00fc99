"""Running a .tflite file of ``tflite_model`` on engine integers: in TensorFlow Lite Micro, or LiteRT's reference kernels.

TFLM plans every tensor in one arena of a size fixed up front; its Python runtime crashes the process (a
segmentation fault, tflite-micro's Python interpreter as installed) when the arena is too small, so the
arena is sized from the file with room to spare (``arena_bound``), never found by trial.

Both take the engine's int8 input codes (N, C, H, W) and give the output's codes as int64 in the engine's
layout: (N, K) for flat logits, (N, C, H, W) for a map, each value less its zero point (an unsigned tensor
is stored at zero point -128), so they compare integer for integer with ``engine.run_integer``. The file
is for one image, so the images run one at a time.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import tflite
import torch
from torch import Tensor

from pipeline.progress import progress_items

ARENA_SLACK_BYTES = 64 * 1024  # TFLM's interpreter structures and alignment
TENSOR_OVERHEAD_BYTES = 1024  # per tensor: its TfLiteTensor / TfLiteEvalTensor records, per-channel multipliers


def _io(blob: bytes) -> tuple[int, int]:
    """The zero points of the file's input and output tensors."""
    graph = tflite.Model.GetRootAsModel(blob, 0).Subgraphs(0)

    def zero(index: int) -> int:
        quantization = graph.Tensors(index).Quantization()
        return int(quantization.ZeroPoint(0)) if quantization is not None and quantization.ZeroPointLength() else 0

    return zero(graph.Inputs(0)), zero(graph.Outputs(0))


def arena_bound(blob: bytes) -> int:
    """An arena TFLM surely fits in: every tensor without constant data as if none shared memory (int4 weights
    too, which TFLM unpacks into a scratch buffer), at 4 bytes a value, plus per-tensor records and slack."""
    model = tflite.Model.GetRootAsModel(blob, 0)
    graph = model.Subgraphs(0)
    total = ARENA_SLACK_BYTES
    for index in range(graph.TensorsLength()):
        tensor = graph.Tensors(index)
        total += TENSOR_OVERHEAD_BYTES
        if model.Buffers(tensor.Buffer()).DataLength() == 0 or tensor.Type() == tflite.TensorType.INT4:
            total += 4 * int(np.prod(tensor.ShapeAsNumpy()))
    return total


def tflm_interpreter(blob: bytes, arena_size: int | None = None):
    """A TFLM interpreter of ``blob`` with ``arena_size`` bytes (default ``arena_bound``)."""
    from tflite_micro import runtime  # a C++ extension; loaded only to run a file

    return runtime.Interpreter.from_bytes(blob, arena_size=arena_size or arena_bound(blob))


def _engine_layout(stored: np.ndarray, zero_point: int) -> Tensor:
    codes = torch.from_numpy(stored.astype(np.int64) - zero_point)
    return codes.permute(0, 3, 1, 2) if codes.ndim == 4 else codes


def run_each(blob: bytes, x_int8: Tensor, run_one: Callable[[np.ndarray], np.ndarray], desc: str,
             progress: bool | None) -> Tensor:
    """``run_one`` (one NHWC int8 image of the file's input in, its output out) on every image of ``x_int8``, the
    outputs less their zero point in the engine's layout (module docstring), with a progress bar ``desc``."""
    if x_int8.dtype != torch.int8 or x_int8.ndim != 4:
        raise ValueError(f"x_int8 must be int8 (N, C, H, W), got {x_int8.dtype} {tuple(x_int8.shape)}")
    input_zero, output_zero = _io(blob)
    images = (x_int8.to(torch.int64) + input_zero).permute(0, 2, 3, 1).numpy().astype(np.int8)
    outputs = [run_one(images[index:index + 1])
               for index in progress_items(range(len(images)), desc, progress, every_item=False)]
    return _engine_layout(np.concatenate(outputs), output_zero)


def run_tflm(blob: bytes, x_int8: Tensor, progress: bool | None = None) -> Tensor:
    """The file's output codes (int64, engine layout: module docstring) for int8 engine inputs (N, C, H, W), in TFLM."""
    interpreter = tflm_interpreter(blob)

    def run_one(image: np.ndarray) -> np.ndarray:
        interpreter.set_input(image, 0)
        interpreter.invoke()
        return interpreter.get_output(0).copy()

    return run_each(blob, x_int8, run_one, "TFLM", progress)


def run_litert_reference(blob: bytes, x_int8: Tensor, progress: bool | None = None) -> Tensor:
    """``run_tflm`` with LiteRT's reference kernels (``OpResolverType.BUILTIN_REF``) instead.

    Not always the engine's integers: ai-edge-litert 2.3's per-channel FULLY_CONNECTED rounds once (an
    accumulator 3221 at M = 1317137716 * 2^-35, 123.47, gives 123 there, 124 in TFLM and the engine).
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=blob, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]

    def run_one(image: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(input_index, image)
        interpreter.invoke()
        return interpreter.get_tensor(output_index).copy()

    return run_each(blob, x_int8, run_one, "LiteRT reference", progress)


def tflm_arena_bytes(blob: bytes) -> int:
    """The arena bytes TFLM uses for ``blob`` after one invoke on a zero image.

    The installed runtime has no ``arena_used_bytes``; its ``print_allocations`` writes the recording
    allocator's total ("Arena allocation total N bytes") to the C stderr, which is read back here.
    """
    interpreter = tflm_interpreter(blob)
    graph = tflite.Model.GetRootAsModel(blob, 0).Subgraphs(0)
    interpreter.set_input(np.zeros(graph.Tensors(graph.Inputs(0)).ShapeAsNumpy(), np.int8), 0)
    interpreter.invoke()
    report = _c_stderr(interpreter.print_allocations)
    match = re.search(r"Arena allocation total (\d+) bytes", report)
    if match is None:
        raise RuntimeError(f"TFLM's allocation report has no total: {report[:500]!r}")
    return int(match.group(1))


def _c_stderr(call: Callable[[], None]) -> str:
    """What ``call`` writes to file descriptor 2 (C++ code bypasses ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            call()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        capture.seek(0)
        return capture.read().decode(errors="replace")


__all__ = ["arena_bound", "run_each", "run_litert_reference", "run_tflm", "tflm_arena_bytes", "tflm_interpreter"]
