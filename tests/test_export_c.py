"""The generated C: bit-exact with the integer engine, integer-only C99, its arena and its memory figures."""
from __future__ import annotations

import functools
import platform
import random
import re
import subprocess
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.export import c_build
from pipeline.export.c_arena import (
    Lifetime,
    peak_live_bytes,
    plan_arena,
    tensor_storage,
)
from pipeline.export.c_build import C_FLAGS, c_footprint, c_logits, find_compiler
from pipeline.export.c_model import generate_c, write_c_sources
from pipeline.export.c_ops import emitter_of, fill
from pipeline.graph.nodes import numel
from pipeline.quant.engine import (
    integer_tensor_outputs,
    quantize_model_input,
    run_integer,
)
from pipeline.quant.ir import IntegerModel, int_node_inputs, parameter_bytes
from pipeline.quant.ops.add import IntAdd, add_integers
from pipeline.quant.ops.avgpool import (
    IntAvgPool,
    avgpool_integers,
    window_means,
    window_sums,
)
from pipeline.quant.ops.base import Requantize, TensorInfo, requantization
from pipeline.quant.ops.clamp import IntClamp, clamp_integers
from pipeline.quant.ops.concat import IntConcat, concat_integers
from pipeline.quant.ops.conv import IntConv, conv_accumulators, raw_accumulator_clamp
from pipeline.quant.ops.hardswish import (
    HIRES_SHIFT,
    INT16_MAX,
    INT16_MIN,
    RELUISH_SCALE,
    IntHardSwish,
    hardswish_integers,
    hardswish_reference,
    int16_multiplier,
)
from pipeline.quant.ops.leaky_relu import IntLeakyReLU, leaky_relu_reference
from pipeline.quant.ops.maxpool import IntMaxPool
from pipeline.quant.ops.rescale import apply_requantize, channel_shape
from pipeline.quant.ops.reshape import IntReshape
from pipeline.quant.ranges import INT32_MAX, INT32_MIN
from tests.integer_graphs import FORMATS, TOYS, cifar_model, toy_model
from tests.test_export_plan import (
    IDENTITY_SHAPE,
    identity_accumulators,
    identity_model,
    node_named,
    random_images,
    with_node,
    with_power_of_two_multipliers,
)

needs_gcc = pytest.mark.skipif(find_compiler("gcc") is None, reason="needs gcc on PATH")
SANITIZERS = ("-fsanitize=undefined,address", "-fno-sanitize-recover=all")


@functools.cache
def built(name: str, granularity: str, form: str | None = None, rounding: str = "double") -> IntegerModel:
    """A toy (``TOYS``) or built-in model, quantized once per test session (building costs seconds), in
    activation format ``FORMATS[form]`` (None: signed int8), with ``rounding``."""
    options = {"rounding": rounding} | ({} if form is None else {"activation_format": FORMATS[form]})
    return toy_model(name, granularity, **options) if name in TOYS else cifar_model(name, granularity, **options)


def ties(name: str, granularity: str, form: str | None = None) -> Callable[[], IntegerModel]:
    return lambda: with_power_of_two_multipliers(built(name, granularity, form))


# name -> model factory; each is compiled and compared with run_integer image by image
EXPORT_CASES: dict[str, Callable[[], IntegerModel]] = {
    **{f"{toy}-{granularity.replace('_', '-')}": functools.partial(built, toy, granularity)
       for toy in TOYS for granularity in ("per_tensor", "per_channel")},
    "net-per-tensor": lambda: built("net", "per_tensor"),
    "net-per-channel": lambda: built("net", "per_channel"),
    "bnnet-per-tensor": lambda: built("bnnet", "per_tensor"),
    "bnnet-per-channel": lambda: built("bnnet", "per_channel"),
    "resnet20-per-channel": lambda: built("resnet20", "per_channel"),
    "mobilenet-per-tensor": lambda: built("mobilenet", "per_tensor"),
    "residual-ties": ties("residual", "per_channel"),
    "depthwise-ties": ties("depthwise", "per_tensor"),
    "shared-relu-ties": ties("shared-relu", "per_channel"),
    "net-ties": ties("net", "per_channel"),
    # Unsigned activations (uint8 buffers) and 4..7-bit widths: every toy in every format.
    **{f"{toy}-{form}": functools.partial(built, toy, "per_channel", form) for toy in TOYS for form in FORMATS},
    "net-unsigned": lambda: built("net", "per_tensor", "unsigned"),
    "net-unsigned-a4": lambda: built("net", "per_channel", "unsigned-a4"),
    "residual-unsigned-ties": ties("residual", "per_channel", "unsigned"),
    "mixed-sign-unsigned-ties": ties("mixed-sign", "per_tensor", "unsigned"),
}
# Building ResNet-20 and MobileNet (capture, calibration) takes 5-25 s each on two shared cores: slow tests.
SLOW_CASES = {"resnet20-per-channel", "mobilenet-per-tensor"}
FEW_IMAGES = {"resnet20-per-channel": 3, "mobilenet-per-tensor": 3}  # slow in C and in the engine too


def cases(names) -> list:
    return [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_CASES else name for name in names]


def int8_images(model: IntegerModel, count: int, seed: int) -> torch.Tensor:
    """``count`` int8 inputs: one all qmin (-128), one all qmax (127), the rest random and saturating at both ends."""
    shape = model.tensors[model.input].shape
    x_int8 = quantize_model_input(model, random_images(count, shape, seed))
    x_int8[0], x_int8[-1] = model.tensors[model.input].range
    return x_int8


@needs_gcc
@pytest.mark.parametrize("case", cases(EXPORT_CASES))
def test_c_logits_equal_the_engine_on_every_image(case, tmp_path):
    model = EXPORT_CASES[case]()
    write_c_sources(model, tmp_path)
    x_int8 = int8_images(model, FEW_IMAGES.get(case, 16), seed=len(case))
    expected = run_integer(model, x_int8).flatten(1)
    logits = c_logits(tmp_path, x_int8, processes=2)
    assert logits.dtype == torch.int32 and logits.shape == expected.shape
    assert torch.equal(logits, expected)


# ---------------------------------------------------------------- ties and saturation


def reference_values(model: IntegerModel, x_int8: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` for ``x_int8``, by the definitions of ``pipeline.quant.ops`` (int64).

    A plain interpreter, on purpose not the engine: these tests need every intermediate tensor
    exactly, independent of the engine's fast paths (``test_c_logits_equal_the_engine_on_every_image``
    compares the C with the engine itself).
    """
    values = {model.input: x_int8.to(torch.int64)}
    for node in model.nodes:
        if isinstance(node, IntConv):
            acc = conv_accumulators(values[node.input], node.weight, node.bias, node.stride, node.padding, node.groups)
            out = acc.clamp(*raw_accumulator_clamp(node)) if node.requantize is None else \
                apply_requantize(acc, node.requantize)
        elif isinstance(node, IntAdd):
            a, b = (values[name] for name in node.inputs)
            out = add_integers(a, b, node.left_shift, node.input_requantize, node.output_requantize)
        elif isinstance(node, IntAvgPool):
            out = avgpool_integers(values[node.input], node)
        elif isinstance(node, IntConcat):
            out = concat_integers([values[name] for name in node.inputs], node.input_requantize)
        elif isinstance(node, IntMaxPool):
            out = F.max_pool2d(values[node.input].to(torch.float64), node.kernel, node.stride, node.padding).long()
        elif isinstance(node, IntClamp):
            out = clamp_integers(values[node.input], node.clamp_min, node.clamp_max)
        elif isinstance(node, IntLeakyReLU):
            x = values[node.input]
            out = torch.where(x >= 0, apply_requantize(x, node.positive), apply_requantize(x, node.negative))
        elif isinstance(node, IntHardSwish):
            out = hardswish_integers(values[node.input], node)
        elif isinstance(node, IntReshape):
            out = values[node.input].flatten(1)
        else:
            raise TypeError(f"reference_values has no definition of {type(node).__name__}")
        values[node.output] = out
    return values


def rescaled_values(model: IntegerModel, x_int8: torch.Tensor) -> list[tuple[type, torch.Tensor, object]]:
    """(node type, the int32 values one requantization receives, that Requantize) for every requantization."""
    values = reference_values(model, x_int8)
    found = []
    for node in model.nodes:
        if isinstance(node, IntConv) and node.requantize is not None:
            acc = conv_accumulators(values[node.input], node.weight, node.bias, node.stride, node.padding, node.groups)
            found.append((IntConv, acc, node.requantize))
        elif isinstance(node, IntAdd):
            lifted = [values[name] << node.left_shift for name in node.inputs]
            found += [(IntAdd, x, rq) for x, rq in zip(lifted, node.input_requantize, strict=True)]
            total = sum(apply_requantize(x, rq) for x, rq in zip(lifted, node.input_requantize, strict=True))
            found.append((IntAdd, total, node.output_requantize))
        elif isinstance(node, IntAvgPool):
            sums = window_sums(values[node.input], node.kernel, node.stride, node.padding)
            if node.mean_zero_point is None:
                found.append((IntAvgPool, sums, node.requantize))
                continue
            count = node.kernel[0] * node.kernel[1]
            # the rounded mean's own ties: the centred sum times 1 / count (a power of two here) ends in .5
            mean_division = Requantize(torch.tensor(2**30, dtype=torch.int32),
                                       torch.tensor(1 - count.bit_length() + 1, dtype=torch.int32), INT32_MIN,
                                       INT32_MAX)
            found.append((IntAvgPool, sums - node.mean_zero_point * count, mean_division))
            found.append((IntAvgPool, window_means(sums, count, node.mean_zero_point), node.requantize))
        elif isinstance(node, IntConcat):
            found += [(IntConcat, values[name], rq) for name, rq in zip(node.inputs, node.input_requantize,
                                                                        strict=True) if rq is not None]
    return found


def tie_count(acc: torch.Tensor, rq) -> int:
    """How many of ``acc`` * M end in exactly .5 (round half up and half to even differ there)."""
    multiplier = channel_shape(rq.multiplier.to(torch.int64), acc.ndim)
    total_shift = 31 - channel_shape(rq.shift.to(torch.int64), acc.ndim)
    one = torch.ones_like(total_shift)
    return int(((acc * multiplier) % (one << total_shift) == (one << (total_shift - 1))).sum())


@pytest.mark.parametrize(("case", "kinds"), [
    ("residual-ties", {IntConv, IntAdd, IntAvgPool}),
    ("depthwise-ties", {IntConv, IntConcat, IntAvgPool}),
    ("net-ties", {IntConv}),
    ("residual-unsigned-ties", {IntConv, IntAdd, IntAvgPool}),
    ("mixed-sign-unsigned-ties", {IntConv, IntAdd, IntConcat, IntAvgPool}),
])
def test_power_of_two_multipliers_make_ties_where_the_c_is_compared(case, kinds):
    # The C runs these models in test_c_logits_equal_the_engine_on_every_image; here: it meets ties there.
    model = EXPORT_CASES[case]()
    x_int8 = int8_images(model, 16, seed=len(case))  # the images the C test runs
    tied = {kind: 0 for kind in kinds}
    for kind, acc, rq in rescaled_values(model, x_int8):
        if kind in tied:
            tied[kind] += tie_count(acc, rq)
    assert all(count > 0 for count in tied.values()), tied


def every_int8_per_channel() -> torch.Tensor:
    """256 images of IDENTITY_SHAPE in which every input position takes every int8 value once."""
    channels = int(np.prod(IDENTITY_SHAPE))
    values = (torch.arange(256).reshape(-1, 1) + torch.arange(channels).reshape(1, -1)) % 256 - 128
    return values.to(torch.int8).reshape(256, *IDENTITY_SHAPE)


@needs_gcc
@pytest.mark.parametrize("last_relu", [True, False])
def test_c_rounds_ties_half_up_and_saturates_like_the_engine(tmp_path, last_relu):
    model = identity_model(last_relu)
    x_int8 = every_int8_per_channel()
    acc, multiplier, shift = identity_accumulators(model, x_int8)
    total_shift = 31 - shift
    tied = (acc * multiplier) % (1 << total_shift) == (1 << (total_shift - 1))
    scaled = (acc * multiplier + (1 << (total_shift - 1))) >> total_shift
    # what the test exercises: ties of both signs, both saturation bounds, M = 0
    assert (tied & (acc < 0)).sum() > 100 and (tied & (acc > 0)).sum() > 100
    assert (scaled > 127).any() and (scaled < -128).any() and (multiplier == 0).any()
    write_c_sources(model, tmp_path)
    expected = run_integer(model, x_int8)
    if last_relu:
        assert (expected == 0).any()  # the ReLU clamps some raw logits at 0
    assert torch.equal(c_logits(tmp_path, x_int8), expected)


# ---------------------------------------------------------------- undefined behavior, portability


def sanitizers_work(tmp_path) -> bool:
    probe = tmp_path / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    command = ["gcc", *SANITIZERS, str(probe), "-o", str(tmp_path / "probe")]
    built_ok = subprocess.run(command, capture_output=True).returncode == 0
    return built_ok and subprocess.run([str(tmp_path / "probe")], capture_output=True).returncode == 0


@pytest.mark.parametrize("case", ["residual-unsigned", "mixed-sign-unsigned-a6", "depthwise-unsigned-a4",
                                  "net-unsigned"])
def test_the_engine_is_its_integer_semantics_with_unsigned_and_narrow_activations(case):
    """Every tensor of the engine (float fast paths proved with the uint8 bounds) equals the plain interpreter."""
    model = EXPORT_CASES[case]()
    x_int8 = int8_images(model, 8, seed=5)
    expected = reference_values(model, x_int8)
    for name, value in integer_tensor_outputs(model, x_int8).items():
        assert torch.equal(value, expected[name]), name


@needs_gcc
@pytest.mark.parametrize("case", ["residual-per-channel", "depthwise-ties", "mixed-sign-unsigned-ties",
                                  "depthwise-unsigned-a4", "rescaling-activations-unsigned-a4"])
def test_c_has_no_undefined_behavior_or_out_of_bounds_access(case, tmp_path):
    # Padded windows clipped at the borders, grouped and depthwise channels, negative values floored,
    # every int8 extreme: UBSan and ASan stop the run at the first signed overflow, bad shift or
    # stray access (the arena is one array, so ASan sees accesses outside it, not between tensors:
    # test_arena_keeps_every_tensor_until_its_last_reader covers those).
    if not sanitizers_work(tmp_path):
        pytest.skip("gcc cannot build and run -fsanitize=undefined,address programs here")
    model = EXPORT_CASES[case]()
    write_c_sources(model, tmp_path)
    x_int8 = int8_images(model, 6, seed=2)
    assert torch.equal(c_logits(tmp_path, x_int8, extra_flags=SANITIZERS), run_integer(model, x_int8).flatten(1))


def strip_c_comments(text: str) -> str:
    return re.sub(r"/\*.*?\*/", "", text, flags=re.DOTALL)


KERNELS = {  # the node types each static function serves
    "ptq_conv_s8": IntConv, "ptq_conv_s32": IntConv, "ptq_maxpool": IntMaxPool, "ptq_avgpool": IntAvgPool,
    "ptq_add": IntAdd, "ptq_copy_s8": IntConcat, "ptq_rescale_s8": IntConcat, "ptq_clamp_s8": IntClamp,
    "ptq_leaky_relu": IntLeakyReLU, "ptq_hardswish": IntHardSwish,
}


@pytest.mark.parametrize("name", [*TOYS, "net"])
def test_sources_are_integer_only_freestanding_c99_with_the_kernels_used(name):
    model = built(name, "per_channel")
    sources = generate_c(model)
    for file_name, text in sources.files().items():
        code = strip_c_comments(text)
        assert not re.search(r"\b(float|double)\b|\d\.\d|\d[eE][+-]?\d", code), file_name  # no float type or literal
        assert not re.search(r"\b(malloc|calloc|realloc|free)\b", code), file_name
        assert set(re.findall(r"#include <([^>]+)>", code)) <= {"stdint.h", "stddef.h"}, file_name
    arrays = re.findall(r"^(.*)\b\w+\[\d+\] = \{", strip_c_comments(sources.data), flags=re.MULTILINE)
    assert len(arrays) == 4 * len(model.layers())  # weight, bias, multiplier, shift (per channel: the logits too)
    assert set(arrays) == {"static const int8_t ", "static const int32_t "}
    # Exactly the kernels the nodes need are defined, each called: an unused one would fail -Werror.
    defined = set(re.findall(r"^static \w+ (ptq_\w+)\(", sources.source, flags=re.MULTILINE))
    run = sources.source[sources.source.index("void ptq_model_run"):]
    called = set(re.findall(r"\b(ptq_\w+)\(", run)) - {"ptq_model_run"}
    assert called == {kernel for kernel in KERNELS if kernel in defined}
    types = {type(node) for node in model.nodes}
    for kernel, kind in KERNELS.items():
        assert (kernel in defined) <= (kind in types), kernel
    assert "ptq_model_run(const int8_t input[PTQ_MODEL_INPUT_SIZE], int32_t logits[PTQ_MODEL_OUTPUT_SIZE])" in \
        sources.header


def test_the_toys_use_every_kernel():
    defined = set()
    for name in TOYS:
        defined |= set(re.findall(r"^static \w+ (ptq_\w+)\(", generate_c(built(name, "per_channel")).source,
                                  flags=re.MULTILINE))
    assert set(KERNELS) <= defined


def test_unsigned_tensors_live_in_uint8_buffers_with_kernels_for_their_types():
    model = built("mixed-sign", "per_channel", "unsigned")
    source = generate_c(model).source
    defined = set(re.findall(r"^static \w+ (ptq_\w+)\(", source, flags=re.MULTILINE))
    assert {"ptq_accumulate_row_u8", "ptq_conv_u8", "ptq_conv_u8_s32", "ptq_add_s8_u8_s8", "ptq_rescale_u8_s8",
            "ptq_avgpool_u8_u8"} <= defined
    run = source[source.index("void ptq_model_run"):]
    assert "ptq_conv_u8(&conv1_op, input, (uint8_t *)(ptq_arena + " in run  # int8 image in, uint8 ReLU output
    assert re.search(r"ptq_conv_u8_s32\(&fc_op, \(uint8_t \*\)ptq_arena\S*, logits\);", run)
    assert "static int8_t ptq_arena[" in source and "static void ptq_avgpool_u8_u8(const ptq_pool *p, const " \
        "ptq_rescale *r, int32_t mean_count, int32_t mean_zero_point,\n                    const uint8_t *in, uint8_t *out)" \
        in source
    header = generate_c(built("residual", "per_channel", "a4")).header
    assert "q = clamp(round_half_to_even(x_normalized / S_in), -8, 7)" in header  # a 4-bit input


@needs_gcc
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="-mgeneral-regs-only is an x86 option")
@pytest.mark.parametrize("name", TOYS)
def test_model_compiles_without_floating_point_registers(name, tmp_path):
    # With -mgeneral-regs-only any float or double operation is a compile error.
    write_c_sources(built(name, "per_channel"), tmp_path)
    source, object_file = str(tmp_path / "model.c"), str(tmp_path / "model.o")
    command = ["gcc", *C_FLAGS, "-mgeneral-regs-only", "-O2", "-c", source, "-o", object_file]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- leaky ReLU and hard swish on every input code

CODE_BITS = (4, 5, 6, 7, 8)
# (S_in / S_out, negative_slope): M_pos = 1 (every code itself), < 1 with ties, > 1 (saturates); M_neg = 0 too
LEAKY_RELU_SCALES = [(1.0, 0.1), (0.37, 0.25), (1.7, 0.01), (0.5, 0.0)]
# (S_in, S_out / S_in): reluish exponents from -10 to 25 (saturating left shifts), output exponents 0 to -15
HARDSWISH_SCALES = [(0.002, 0.01), (0.01, 1.0), (0.05, 0.5), (0.3, 3.0), (40.0, 512.0), (0.0117, 0.008),
                    (1e-5, 1.0), (300.0, 100.0), (3e5, 100.0)]


def leaky_relu_nodes(output: TensorInfo) -> list[Callable[[str, str, str], IntLeakyReLU]]:
    """One factory (name, input, output) -> node per ``LEAKY_RELU_SCALES`` entry, as ``leaky_relu.build`` makes it."""
    return [functools.partial(IntLeakyReLU, negative_slope=slope,
                              positive=requantization(ratio, output.range, "double"),
                              negative=requantization(slope * ratio, output.range, "double"))
            for ratio, slope in LEAKY_RELU_SCALES]


def hardswish_nodes(output: TensorInfo) -> list[Callable[[str, str, str], IntHardSwish]]:
    """One factory (name, input, output) -> node per ``HARDSWISH_SCALES`` entry, with ``hardswish.build``'s
    multipliers."""
    factories = []
    for input_scale, ratio in HARDSWISH_SCALES:
        hires_scale = input_scale / 2**HIRES_SHIFT
        output_multiplier, output_exponent = int16_multiplier(hires_scale / (input_scale * ratio))
        reluish_multiplier, reluish_exponent = int16_multiplier(hires_scale / RELUISH_SCALE)
        factories.append(functools.partial(
            IntHardSwish, reluish_multiplier=reluish_multiplier, reluish_exponent=reluish_exponent,
            output_multiplier=output_multiplier, output_exponent=output_exponent, clamp_min=output.range[0],
            clamp_max=output.range[1]))
    return factories


def _ones_depthwise(name: str, source: str, target: str, channels: int, bias: int, rq: Requantize | None) -> IntConv:
    """A 1x1 depthwise conv of weight 1: acc = x + bias, requantized by ``rq`` (None: the raw int32 logits)."""
    return IntConv(name, "conv2d", source, target, torch.ones(channels, 1, 1, 1, dtype=torch.int8),
                   torch.full((channels,), bias, dtype=torch.int32), torch.tensor(1.0, dtype=torch.float64), (1, 1),
                   (0, 0), channels, "none", rq)


def every_code_model(bits: int, unsigned: bool, factories: list[Callable[[str, str, str], object]],
                     output: TensorInfo) -> IntegerModel:
    """A model whose op nodes (one per factory, each at ``output``'s type) all read one tensor holding every code of
    a ``bits``-bit signed or unsigned tensor once, their outputs concatenated and copied to the int32 logits.

    Input (2^bits, 1, 1) signed; unsigned: lifted by a 1x1 depthwise conv to q + 2^(bits - 1) (M = 1), every code of
    [0, 2^bits - 1]. The head is a 1x1 depthwise conv of weight 1, no requantization: logits = the op outputs.
    """
    codes = 2**bits
    scale = torch.tensor(0.05, dtype=torch.float64)
    tensors = {"x": TensorInfo((codes, 1, 1), bits, scale)}
    nodes: list = []
    source = "x"
    if unsigned:
        tensors["codes"] = TensorInfo((codes, 1, 1), bits, scale, signed=False)
        lift = Requantize(torch.tensor(2**30, dtype=torch.int32), torch.tensor(1, dtype=torch.int32), 0, codes - 1)
        nodes.append(_ones_depthwise("lift", "x", "codes", codes, codes // 2, lift))
        source = "codes"
    outputs = [f"y{index}" for index in range(len(factories))]
    for target, factory in zip(outputs, factories, strict=True):
        tensors[target] = replace(output, shape=(codes, 1, 1))
        nodes.append(factory(f"op_{target}", source, target))
    width = codes * len(factories)
    tensors["y"] = replace(output, shape=(width, 1, 1))
    tensors["logits"] = TensorInfo((width, 1, 1), 32, output.scale)
    nodes += [IntConcat("all", tuple(outputs), "y", (None,) * len(outputs)),
              _ones_depthwise("head", "y", "logits", width, 0, None)]
    return IntegerModel("x", "logits", tensors, nodes)


def every_code_image(bits: int) -> torch.Tensor:
    """One int8 image holding every code of a signed ``bits``-bit input once, ascending."""
    return torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1)).to(torch.int8).reshape(1, -1, 1, 1)


OP_REFERENCES = {
    "leaky_relu": (leaky_relu_nodes, lambda node, q: leaky_relu_reference(q, node.positive, node.negative)),
    "hardswish": (hardswish_nodes, lambda node, q: hardswish_reference(q, node)),
}


@needs_gcc
@pytest.mark.parametrize("op", sorted(OP_REFERENCES))
@pytest.mark.parametrize("unsigned", [False, True], ids=["signed", "unsigned"])
@pytest.mark.parametrize("bits", CODE_BITS)
def test_c_activations_equal_the_engine_on_every_input_code(op, unsigned, bits, tmp_path):
    """Leaky ReLU and hard swish in C, engine and the op's one-value reference: 0 mismatches on every code.

    Under UBSan and ASan where gcc runs them: no signed overflow, bad shift or stray access on any code.
    """
    make_nodes, reference = OP_REFERENCES[op]
    output = TensorInfo((1,), bits, torch.tensor(0.05, dtype=torch.float64), signed=not unsigned)
    model = every_code_model(bits, unsigned, make_nodes(output), output)
    image = every_code_image(bits)
    ops = [node for node in model.nodes if node.name.startswith("op_")]
    codes = reference_values(model, image)[ops[0].input].flatten()
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert codes.tolist() == list(range(low, high + 1))  # the op reads every code of its input once
    write_c_sources(model, tmp_path)
    flags = SANITIZERS if sanitizers_work(tmp_path) else ()
    from_c = c_logits(tmp_path, image, extra_flags=flags).flatten()
    from_engine = run_integer(model, image).flatten()
    expected = torch.tensor([reference(node, int(q)) for node in ops for q in codes], dtype=torch.int64)
    assert int((from_c.long() != from_engine.long()).sum()) == 0
    assert int((from_c.long() != expected).sum()) == 0
    assert from_c.min() < from_c.max()  # not a constant output


def test_the_every_code_models_reach_every_branch_of_hard_swish():
    nodes = hardswish_nodes(TensorInfo((1,), 8, torch.tensor(0.05, dtype=torch.float64)))
    made = [factory("hs", "x", "y") for factory in nodes]
    reluish = {node.reluish_exponent for node in made}
    assert min(reluish) < 0 and 0 in reluish and max(reluish) >= 16  # right shift, none, saturating left shifts
    assert {min(node.output_exponent for node in made), max(node.output_exponent for node in made)} == {-15, 0}


def gemmlowp_helpers(x: np.ndarray, b: np.ndarray, exponent: np.ndarray) -> dict[str, np.ndarray]:
    """gemmlowp's int16 helpers as its source writes them (mask and threshold, arithmetic shifts), in int64 numpy."""
    x, b, exponent = (np.asarray(v, dtype=np.int64) for v in (x, b, exponent))
    both_min = (x == INT16_MIN) & (b == INT16_MIN)
    product = x * b
    total = product + np.where(product >= 0, 1 << 14, 1 - (1 << 14))

    def truncate(v: np.ndarray) -> np.ndarray:  # C's division by 2^15
        return np.where(v >= 0, v >> 15, -((-v) >> 15))

    mask = (np.int64(1) << exponent) - 1
    threshold = (mask >> 1) + (x < 0)
    return {
        "srdhm": np.where(both_min, INT16_MAX, truncate(total)),
        "sdhm": np.where(both_min, INT16_MAX, truncate(product)),
        "divide": (x >> exponent) + ((x & mask) > threshold),
        "left_shift": np.clip(x * (np.int64(1) << np.minimum(2 * exponent, 29)), INT16_MIN, INT16_MAX),
    }


HELPERS_MAIN = """
#include <stdio.h>

int main(void)
{
    for (int32_t x = INT16_MIN; x <= INT16_MAX; ++x) {
        for (int32_t k = 0; k < 16; ++k) {
            const int16_t b = (int16_t)(k == 0 ? INT16_MIN : (k == 15 ? INT16_MAX : k * 4099 - 30000));
            const int32_t amount = k < 15 ? 2 * k : 29;
            const int32_t row[4] = {ptq_srdhm16((int16_t)x, b), ptq_sdhm16((int16_t)x, b),
                                    ptq_rounding_divide_by_pot(x, k), ptq_saturating_left_shift16((int16_t)x, amount)};
            fwrite(row, sizeof row[0], 4, stdout);
        }
    }
    return 0;
}
"""


@needs_gcc
def test_hard_swish_helpers_equal_gemmlowp_on_every_int16(tmp_path):
    """The C's fixed-point helpers (no shift of a negative value) against gemmlowp's own formulas, every int16 x."""
    source = tmp_path / "helpers.c"
    source.write_text("#include <stdint.h>\n" + fill("hardswish_value") + HELPERS_MAIN)
    runner = tmp_path / "helpers"
    flags = [*SANITIZERS] if sanitizers_work(tmp_path) else []
    build = subprocess.run(["gcc", *C_FLAGS, "-Wno-unused-function", "-O2", *flags, str(source), "-o", str(runner)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    got = np.frombuffer(subprocess.run([str(runner)], capture_output=True, check=True).stdout, dtype=np.int32)
    x = np.repeat(np.arange(INT16_MIN, INT16_MAX + 1), 16)
    k = np.tile(np.arange(16), 2**16)
    b = np.where(k == 0, INT16_MIN, np.where(k == 15, INT16_MAX, k * 4099 - 30000))
    expected = gemmlowp_helpers(x, b, k)
    got = got.reshape(-1, 4)
    for column, name in enumerate(["srdhm", "sdhm", "divide", "left_shift"]):
        assert int((got[:, column] != expected[name]).sum()) == 0, name



# ---------------------------------------------------------------- the arena


def random_lifetimes(rng: random.Random) -> list[Lifetime]:
    lifetimes = []
    for index in range(rng.randint(0, 14)):
        first = rng.randint(0, 20)
        lifetimes.append(Lifetime(f"t{index}", rng.choice([0, 1, rng.randint(1, 64), rng.randint(1, 4096)]),
                                  first, first + rng.choice([0, 0, 1, rng.randint(0, 10)])))
    return lifetimes


def assert_no_live_overlap(plan) -> None:
    for a in plan.lifetimes:
        for b in plan.lifetimes:
            if a is not b and a.overlaps(b) and a.size and b.size:
                start_a, start_b = plan.offsets[a.name], plan.offsets[b.name]
                assert start_a + a.size <= start_b or start_b + b.size <= start_a, (a, b, plan.offsets)


def test_plan_arena_never_overlaps_live_buffers_and_is_bounded():
    rng = random.Random(20240601)
    for _ in range(400):
        lifetimes = random_lifetimes(rng)
        plan = plan_arena(lifetimes)
        assert set(plan.offsets) == {lifetime.name for lifetime in lifetimes}
        assert_no_live_overlap(plan)
        assert all(plan.offsets[item.name] + item.size <= plan.size for item in lifetimes)
        assert peak_live_bytes(lifetimes) <= plan.size <= plan.tensor_bytes()
    # Buffers that are never live together share offset 0; a chain of pairs ping-pongs.
    chain = [Lifetime(f"t{i}", 100 - i, i, i + 1) for i in range(6)]
    plan = plan_arena(chain)
    assert plan.size == peak_live_bytes(chain) == 199 and [plan.offsets[f"t{i}"] for i in range(6)] == [
        0, 100, 0, 98, 0, 96]
    assert plan_arena([]).size == 0
    with pytest.raises(ValueError, match="unique"):
        plan_arena([Lifetime("a", 1, 0, 0), Lifetime("a", 2, 1, 1)])
    with pytest.raises(ValueError, match="first <= last"):
        plan_arena([Lifetime("a", 1, 3, 2)])


ARENA_MODELS = [(name, "per_channel") for name in TOYS] + [
    ("net", "per_tensor"), ("bnnet", "per_tensor"),
    pytest.param("resnet20", "per_channel", marks=pytest.mark.slow),
    pytest.param("mobilenet", "per_tensor", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "granularity"), ARENA_MODELS)
def test_arena_keeps_every_tensor_until_its_last_reader(name, granularity):
    """Replay the model on one image in a Python copy of the arena, each output written where the plan puts it.

    Every node must find its inputs intact, and no node may write bytes of its own inputs.
    """
    model = built(name, granularity)
    storage = tensor_storage(model)
    x_int8 = int8_images(model, 1, seed=3)
    reference = {key: value[0] for key, value in reference_values(model, x_int8).items()}
    arena = np.full(storage.arena.size, 999, dtype=np.int64)  # 999: no int8 value, so stale bytes show

    def span(tensor: str) -> range | None:
        root = storage.root[tensor]
        if root in (storage.input, storage.logits):
            return None
        start = storage.arena.offsets[root]
        return range(start, start + numel(model.tensors[root].shape))

    for node in model.nodes:
        for tensor in int_node_inputs(node):
            where = span(tensor)
            if where is not None:
                stored = torch.from_numpy(arena[where.start:where.stop].copy())
                assert torch.equal(stored, reference[tensor].flatten()), (node.name, tensor)
        out = span(node.output)
        if out is not None and not isinstance(node, IntReshape):
            for tensor in int_node_inputs(node):
                where = span(tensor)
                assert where is None or not set(where) & set(out), (node.name, tensor)
            arena[out.start:out.stop] = reference[node.output].flatten().numpy()
    assert storage.logits == storage.root[model.output]
    assert peak_live_bytes(storage.arena.lifetimes) <= storage.arena.size <= storage.arena.tensor_bytes()


def test_static_ram_is_the_arena_and_model_c_lists_it():
    model = built("net", "per_tensor")
    sources = generate_c(model)
    # conv1 (6*28*28, nodes 0..1) and pool1 (6*14*14, 1..2) are live together at the pool; the
    # later tensors fit below: conv2 and fc1 at 0, pool2 after conv2, fc2 after fc1.
    assert sources.static_ram_bytes == sources.arena.size == 6 * 28 * 28 + 6 * 14 * 14
    assert sources.arena.offsets == {"relu1": 0, "pool1": 4704, "relu2": 0, "pool2": 1600, "relu3": 0, "relu4": 120}
    assert sources.arena.tensor_bytes() == 4704 + 1176 + 1600 + 400 + 120 + 84
    assert "static int8_t ptq_arena[5880];" in sources.source
    assert "#define PTQ_MODEL_STATIC_RAM_BYTES 5880 " in sources.header
    assert re.search(r"^ \* pool2 +1600 +400 +3\.\.5$", sources.source, flags=re.MULTILINE)  # flatten's reader: 5
    assert "ptq_conv_s8(&fc1_op, ptq_arena + 1600, ptq_arena);" in sources.source  # the flatten is pool2's bytes
    assert "ptq_conv_s32(&fc3_op, ptq_arena + 120, logits);" in sources.source
    assert "ptq_conv_s8(&conv1_op, input, ptq_arena);" in sources.source
    weights = 6 * 3 * 25 + 16 * 6 * 25 + 120 * 400 + 84 * 120 + 10 * 84
    biases, rescale_words = 6 + 16 + 120 + 84 + 10, 4 * 2  # per tensor: one multiplier and one shift per layer
    assert sources.parameter_bytes == parameter_bytes(model) == weights + 4 * (biases + rescale_words)
    assert "#define PTQ_MODEL_PARAMETER_BYTES " + str(sources.parameter_bytes) in sources.header


@needs_gcc
def test_a_model_with_no_activations_between_input_and_logits_has_no_arena(tmp_path):
    # flatten -> linear: the flatten is the caller's input, the layer writes the caller's logits.
    identity = identity_model()
    flatten, _, head = identity.nodes
    model = replace(identity, nodes=[flatten, replace(head, input=flatten.output)],
                    tensors={name: info for name, info in identity.tensors.items() if name != "identity"})
    sources = write_c_sources(model, tmp_path)
    assert sources.static_ram_bytes == 0 and "ptq_arena" not in strip_c_comments(sources.source)
    assert "ptq_conv_s32(&head_op, input, logits);" in sources.source
    x_int8 = every_int8_per_channel()[:16]
    assert torch.equal(c_logits(tmp_path, x_int8), run_integer(model, x_int8))


@needs_gcc
@pytest.mark.parametrize("name", ["net", "residual"])
def test_footprint_measures_the_object(name, tmp_path):
    sources = write_c_sources(built(name, "per_tensor"), tmp_path)
    footprint = c_footprint(tmp_path)
    assert footprint["static_ram_bytes"] == sources.static_ram_bytes == sources.arena.size
    assert sources.static_ram_bytes <= footprint["bss_bytes"] < sources.static_ram_bytes + 64  # alignment only
    assert footprint["code_size_bytes"] == footprint["text_bytes"] + footprint["data_bytes"]
    assert sources.parameter_bytes < footprint["code_size_bytes"] < sources.parameter_bytes + 12288


# ---------------------------------------------------------------- what the generator refuses


def test_generator_checks_the_model_first():
    # single rounding: double rounding would refuse the left shift of 12 below before the C's sum check is reached
    residual = built("residual", "per_channel", rounding="single")
    _, add = node_named(residual, "add")
    bad = replace(add.output_requantize, multiplier=torch.tensor(-1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\('add', IntAdd\) needs multipliers in \[0, 2\^31\)"):  # check_deployable
        generate_c(with_node(residual, "add", output_requantize=bad))
    with pytest.raises(ValueError, match=r"\('add', IntAdd\): left_shift 25 must be in \[0, 24\]"):
        generate_c(with_node(residual, "add", left_shift=25))
    # M_a = M_b = 2^11: each rescaled input can saturate at int32's max, and their sum does not fit.
    large = replace(add.input_requantize[0], multiplier=torch.tensor(2**30, dtype=torch.int32),
                    shift=torch.tensor(12, dtype=torch.int32))
    with pytest.raises(OverflowError, match=r"\('add', IntAdd\): the sum of the rescaled inputs can reach "
                                            r"\[-4294967296, 4294967294\]"):
        generate_c(with_node(residual, "add", input_requantize=(large, large)))
    fits = replace(large, clamp_min=-(2**30), clamp_max=2**30 - 1)  # the sum in [-2^31, 2^31 - 2]
    generate_c(with_node(residual, "add", input_requantize=(fits, fits)))
    conv = residual.nodes[0]
    wide = replace(conv.requantize, clamp_max=200)
    with pytest.raises(ValueError, match=r"\('conv1', IntConv\) saturates to \[0, 200\], which is not a range "
                                         r"within its int8 output \[-128, 127\]"):
        generate_c(with_node(residual, "conv1", requantize=wide))
    shared = built("shared-relu", "per_channel")
    with pytest.raises(ValueError, match=r"\('relu', IntClamp\) saturates to \[0, 300\]"):
        generate_c(with_node(shared, "relu", clamp_max=300))


def test_generator_checks_the_limits_of_the_activations_c():
    model = built("rescaling-activations", "per_channel")
    with pytest.raises(ValueError, match=r"\('hardswish', IntHardSwish\): output_exponent 1 must be in \[-15, 0\]"):
        generate_c(with_node(model, "hardswish", output_exponent=1))
    with pytest.raises(ValueError, match=r"\('hardswish_1', IntHardSwish\): reluish_exponent 31 must be in "
                                         r"\[-15, 30\]"):
        generate_c(with_node(model, "hardswish_1", reluish_exponent=31))
    with pytest.raises(ValueError, match=r"\('hardswish', IntHardSwish\): multipliers \(40000, "):
        generate_c(with_node(model, "hardswish", reluish_multiplier=40000))
    _, leaky = node_named(model, "leaky")
    with pytest.raises(ValueError, match=r"\('leaky', IntLeakyReLU\) saturates to \[-128, 300\], which is not a "
                                         r"range within its int8 output"):
        generate_c(with_node(model, "leaky", negative=replace(leaky.negative, clamp_max=300)))


def test_emitter_of_names_a_node_type_the_c_backend_lacks():
    # tests/test_op_registry.py checks that C_EMITTERS has every node type of the registry
    with pytest.raises(ValueError, match=r"node 'odd' \(SimpleNamespace\) has no C emitter; the C backend supports "):
        emitter_of(SimpleNamespace(name="odd"))


# ---------------------------------------------------------------- c_build


@needs_gcc
def test_c_logits_come_back_in_image_order_from_many_chunks_and_from_none(tmp_path, monkeypatch):
    monkeypatch.setattr(c_build, "CHUNK_IMAGES", 7)  # 40 images: 6 chunks, the last one short, on 3 processes
    model = built("net", "per_channel")
    write_c_sources(model, tmp_path)
    x_int8 = int8_images(model, 40, seed=5)
    assert torch.equal(c_logits(tmp_path, x_int8, processes=3, progress=True), run_integer(model, x_int8).flatten(1))
    assert c_logits(tmp_path, x_int8[:0]).shape == (0, 10)


@needs_gcc
def test_c_logits_checks_its_input(tmp_path):
    write_c_sources(identity_model(), tmp_path)
    with pytest.raises(TypeError, match="x_int8 must hold int8 values, got dtype float32"):
        c_logits(tmp_path, np.zeros((2, *IDENTITY_SHAPE), np.float32))
    with pytest.raises(ValueError, match=r"with 48 values per image, got shape \(2, 3, 4, 5\)"):
        c_logits(tmp_path, torch.zeros(2, 3, 4, 5, dtype=torch.int8))


@needs_gcc
def test_c_build_reports_compiler_and_runner_errors(tmp_path):
    write_c_sources(identity_model(), tmp_path)
    (tmp_path / "model.c").write_text((tmp_path / "model.c").read_text() + "\nstatic int unused;\n")
    with pytest.raises(RuntimeError, match=r"(?s)failed with status \d+:\n.*unused"):
        c_logits(tmp_path, torch.zeros(1, *IDENTITY_SHAPE, dtype=torch.int8))
    (tmp_path / "model.h").write_text("/* nothing */\n")
    with pytest.raises(ValueError, match=r"model.h has no '#define PTQ_MODEL_INPUT_SIZE <integer>'"):
        c_logits(tmp_path, torch.zeros(1, *IDENTITY_SHAPE, dtype=torch.int8))
