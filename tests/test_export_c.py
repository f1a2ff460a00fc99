"""The generated C: bit-exact with the integer engine, integer-only C99, and its memory figures."""
from __future__ import annotations

import platform
import re
import subprocess
from collections.abc import Callable

import numpy as np
import pytest
import torch

from pipeline.export import c_build
from pipeline.export.c_build import C_FLAGS, c_footprint, c_logits, find_compiler
from pipeline.export.c_model import generate_c, write_c_sources
from pipeline.export.plan import CIFAR10_INPUT_SHAPE
from pipeline.quant.engine import quantize_input, run_integer
from pipeline.quant.model import IntegerModel
from tests.test_export_plan import (
    GEOMETRY_SHAPE,
    IDENTITY_SHAPE,
    cifar_model,
    geometry_model,
    identity_accumulators,
    identity_model,
    random_images,
    with_power_of_two_multipliers,
)

needs_gcc = pytest.mark.skipif(find_compiler("gcc") is None, reason="needs gcc on PATH")

# name -> (model factory, input shape); each is compiled and compared with run_integer image by image
EXPORT_CASES: dict[str, tuple[Callable[[], IntegerModel], tuple[int, int, int]]] = {
    "net-per-tensor": (lambda: cifar_model("net", "per_tensor"), CIFAR10_INPUT_SHAPE),
    "net-per-channel": (lambda: cifar_model("net", "per_channel"), CIFAR10_INPUT_SHAPE),
    "bnnet-per-tensor": (lambda: cifar_model("bnnet", "per_tensor"), CIFAR10_INPUT_SHAPE),
    "bnnet-per-channel": (lambda: cifar_model("bnnet", "per_channel"), CIFAR10_INPUT_SHAPE),
    "net-ties": (lambda: with_power_of_two_multipliers(cifar_model("net", "per_channel", seed=3)), CIFAR10_INPUT_SHAPE),
    "bnnet-ties": (
        lambda: with_power_of_two_multipliers(cifar_model("bnnet", "per_tensor", seed=4)), CIFAR10_INPUT_SHAPE
    ),
    "geometry": (geometry_model, GEOMETRY_SHAPE),
}


def every_int8_per_channel() -> torch.Tensor:
    """256 images of IDENTITY_SHAPE in which every input position takes every int8 value once."""
    channels = int(np.prod(IDENTITY_SHAPE))
    values = (torch.arange(256).reshape(-1, 1) + torch.arange(channels).reshape(1, -1)) % 256 - 128
    return values.to(torch.int8).reshape(256, *IDENTITY_SHAPE)


@needs_gcc
@pytest.mark.parametrize("case", EXPORT_CASES)
def test_c_logits_equal_the_engine_on_every_image(case, tmp_path):
    factory, shape = EXPORT_CASES[case]
    model = factory()
    write_c_sources(model, tmp_path, shape)
    x_int8 = quantize_input(random_images(40, shape, seed=len(case)), model.input_scale)
    assert int(x_int8.min()) == -128 and int(x_int8.max()) == 127  # the input saturates too
    expected = run_integer(model, x_int8).flatten(1)
    logits = c_logits(tmp_path, x_int8, processes=2)
    assert logits.dtype == torch.int32 and logits.shape == expected.shape
    assert torch.equal(logits, expected)


@needs_gcc
def test_c_logits_come_back_in_image_order_from_many_chunks_and_from_none(tmp_path, monkeypatch):
    monkeypatch.setattr(c_build, "CHUNK_IMAGES", 7)  # 40 images: 6 chunks, the last one short, on 3 processes
    model = cifar_model("net", "per_channel")
    write_c_sources(model, tmp_path, CIFAR10_INPUT_SHAPE)
    x_int8 = quantize_input(random_images(40, CIFAR10_INPUT_SHAPE, seed=5), model.input_scale)
    assert torch.equal(c_logits(tmp_path, x_int8, processes=3, progress=True), run_integer(model, x_int8).flatten(1))
    assert c_logits(tmp_path, x_int8[:0]).shape == (0, 10)


@needs_gcc
@pytest.mark.parametrize("last_relu", [True, False])
def test_c_rounds_ties_half_up_and_saturates_like_the_engine(tmp_path, last_relu):
    model = identity_model(last_relu)
    x_int8 = every_int8_per_channel()
    acc, multiplier, shift = identity_accumulators(model, x_int8)
    total_shift = 31 - shift
    ties = (acc * multiplier) % (1 << total_shift) == (1 << (total_shift - 1))
    scaled = (acc * multiplier + (1 << (total_shift - 1))) >> total_shift
    # what the test exercises: ties of both signs, both saturation bounds, M = 0
    assert (ties & (acc < 0)).sum() > 100 and (ties & (acc > 0)).sum() > 100
    assert (scaled > 127).any() and (scaled < -128).any() and (multiplier == 0).any()
    write_c_sources(model, tmp_path, IDENTITY_SHAPE)
    assert torch.equal(c_logits(tmp_path, x_int8), run_integer(model, x_int8))


SANITIZERS = ("-fsanitize=undefined,address", "-fno-sanitize-recover=all")


def sanitizers_work(tmp_path) -> bool:
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    command = ["gcc", *SANITIZERS, str(probe), "-o", str(tmp_path / "probe")]
    built = subprocess.run(command, capture_output=True).returncode == 0
    return built and subprocess.run([str(tmp_path / "probe")], capture_output=True).returncode == 0


@needs_gcc
@pytest.mark.parametrize("case", ["geometry", "bnnet-ties"])
def test_c_has_no_undefined_behavior_or_out_of_bounds_reads(case, tmp_path):
    # Padded windows clipped at odd borders, negative values floored, every int8 extreme:
    # UBSan and ASan stop the run at the first signed overflow, bad shift or stray read.
    if not sanitizers_work(tmp_path):
        pytest.skip("gcc cannot build and run -fsanitize=undefined,address programs here")
    factory, shape = EXPORT_CASES[case]
    model = factory()
    write_c_sources(model, tmp_path, shape)
    x_int8 = quantize_input(random_images(8, shape, seed=2), model.input_scale)
    assert torch.equal(c_logits(tmp_path, x_int8, extra_flags=SANITIZERS), run_integer(model, x_int8).flatten(1))


def strip_c_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)


def test_sources_are_integer_only_freestanding_c99():
    sources = generate_c(cifar_model("net", "per_channel"))
    for name, text in sources.files().items():
        code = strip_c_comments(text)
        assert not re.search(r"\b(float|double)\b|\d\.\d|\d[eE][+-]?\d", code), name  # no float type or literal
        assert not re.search(r"\b(malloc|calloc|realloc|free)\b", code), name
        assert set(re.findall(r"#include <([^>]+)>", code)) <= {"stdint.h", "stddef.h"}, name
    arrays = re.findall(r"^(.*)\b\w+\[\d+\] = \{", strip_c_comments(sources.data), flags=re.MULTILINE)
    assert len(arrays) == 5 * 4  # weight, bias, multiplier, shift per layer (per-channel: the logits are rescaled too)
    assert set(arrays) == {"static const int8_t ", "static const int32_t "}
    assert "conv1_weight[450]" in sources.data and "scale S_w" in sources.data


@needs_gcc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mgeneral-regs-only is an x86 option")
def test_model_compiles_without_floating_point_registers(tmp_path):
    # With -mgeneral-regs-only any float or double operation is a compile error.
    write_c_sources(cifar_model("bnnet", "per_channel"), tmp_path)
    source, object_file = str(tmp_path / "model.c"), str(tmp_path / "model.o")
    command = ["gcc", *C_FLAGS, "-mgeneral-regs-only", "-O2", "-c", source, "-o", object_file]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_static_ram_is_the_two_ping_pong_buffers():
    sources = generate_c(cifar_model("net", "per_tensor"))
    # conv1 (6*28*28) and fc1 (120) write buffer a; pool1 (6*14*14), conv2, pool2, fc2 write buffer b
    assert sources.static_ram_bytes == 6 * 28 * 28 + 6 * 14 * 14
    assert "static int8_t ptq_buffer_a[4704];" in sources.source
    assert "static int8_t ptq_buffer_b[1176];" in sources.source
    weights = 6 * 3 * 25 + 16 * 6 * 25 + 120 * 400 + 84 * 120 + 10 * 84
    biases, rescale_words = 6 + 16 + 120 + 84 + 10, 4 * 2  # per tensor: one multiplier and one shift per layer
    assert sources.parameter_bytes == weights + 4 * (biases + rescale_words)


@needs_gcc
def test_footprint_measures_the_object(tmp_path):
    sources = write_c_sources(cifar_model("net", "per_tensor"), tmp_path)
    footprint = c_footprint(tmp_path)
    assert footprint["static_ram_bytes"] == sources.static_ram_bytes
    assert sources.static_ram_bytes <= footprint["bss_bytes"] < sources.static_ram_bytes + 64  # alignment only
    assert footprint["code_size_bytes"] == footprint["text_bytes"] + footprint["data_bytes"]
    assert sources.parameter_bytes < footprint["code_size_bytes"] < sources.parameter_bytes + 8192


@needs_gcc
def test_c_logits_checks_its_input(tmp_path):
    write_c_sources(identity_model(), tmp_path, IDENTITY_SHAPE)
    with pytest.raises(TypeError, match="x_int8 must hold int8 values, got dtype float32"):
        c_logits(tmp_path, np.zeros((2, *IDENTITY_SHAPE), np.float32))
    with pytest.raises(ValueError, match=r"with 48 values per image, got shape \(2, 3, 4, 5\)"):
        c_logits(tmp_path, torch.zeros(2, 3, 4, 5, dtype=torch.int8))
