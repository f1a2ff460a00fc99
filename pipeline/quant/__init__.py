"""Post-training int8 quantization: ranges, observers, calibrators, fixed point, the integer model and engine.

The scheme: r ~= S * q, symmetric, zero point 0. Weights int8 in [-127, 127]
with S_w = range / 127 (per tensor or per output channel); activations int8 in
[-128, 127] with S_a = range / 127; biases int32, q_b = round(b / (S_in * S_w));
int32 accumulators requantized by M = S_in * S_w / S_out ~= multiplier *
2^(shift - 31) with one rounding, half up; ReLU and max-pool on integers.
Details in each module's docstring.
"""
from pipeline.quant.calibrators import (
    ACTIVATION_CALIBRATORS,
    GRANULARITIES,
    WEIGHT_CALIBRATORS,
    Granularity,
    PerChannel,
    PerTensor,
    abs_histogram,
    activation_range,
    parse_granularity,
    weight_range,
)
from pipeline.quant.engine import (
    QuantizedNet,
    dequantize_logits,
    integer_layer_outputs,
    quantize_input,
    run_integer,
    run_simulated,
    weight_only_model,
)
from pipeline.quant.fixed_point import (
    quantize_multiplier,
    quantize_multipliers,
    requantize,
    requantize_reference,
)
from pipeline.quant.graph import QUANTIZED_LAYER_TYPES, fold_batchnorm, quantized_layer_names
from pipeline.quant.model import (
    IntegerModel,
    accumulator_bound,
    build_integer_model,
    load_integer_model,
    load_quantized_weights,
    quantize_bias,
    quantize_layer_weights,
    quantize_model_biases,
    quantize_model_weights,
    save_integer_model,
    save_quantized_weights,
)
from pipeline.quant.observers import (
    ActivationObserver,
    register_activation_profiling_hooks,
    register_observers,
)
from pipeline.quant.ranges import (
    ZERO_RANGE_SCALE,
    dequantize,
    fake_quantize,
    int_range,
    quantize,
    scale_from_range,
)

__all__ = [
    "ACTIVATION_CALIBRATORS",
    "GRANULARITIES",
    "QUANTIZED_LAYER_TYPES",
    "WEIGHT_CALIBRATORS",
    "ZERO_RANGE_SCALE",
    "ActivationObserver",
    "Granularity",
    "IntegerModel",
    "PerChannel",
    "PerTensor",
    "QuantizedNet",
    "abs_histogram",
    "accumulator_bound",
    "activation_range",
    "build_integer_model",
    "dequantize",
    "dequantize_logits",
    "fake_quantize",
    "fold_batchnorm",
    "int_range",
    "integer_layer_outputs",
    "load_integer_model",
    "load_quantized_weights",
    "parse_granularity",
    "quantize",
    "quantize_bias",
    "quantize_input",
    "quantize_layer_weights",
    "quantize_model_biases",
    "quantize_model_weights",
    "quantize_multiplier",
    "quantize_multipliers",
    "quantized_layer_names",
    "register_activation_profiling_hooks",
    "register_observers",
    "requantize",
    "requantize_reference",
    "run_integer",
    "run_simulated",
    "save_integer_model",
    "save_quantized_weights",
    "scale_from_range",
    "weight_only_model",
    "weight_range",
]
