"""Post-training quantization: one module a concern, found by name.

- ``ranges``: integer ranges of a bit width, scales, quantize/dequantize, the accumulator bound;
- ``observers``, ``calibrators``, ``settings``: activation statistics in bounded memory, ranges from them,
  and the calibrators' settings;
- ``scale_groups``: the tensors that share one scale, and their signedness;
- ``weights``: weight quantization (per tensor or per channel);
- ``equalization``, ``adaround``, ``bias_correction``, ``mixed_precision``: the methods beyond rounding to nearest;
- ``fixed_point``: the multiplier-and-shift rescale every integer op uses;
- ``ops``: one module per integer op (node type, build, exact engine run, float simulation, reference) and
  their registry;
- ``ir``: the integer graph (``IntegerModel``) over those nodes;
- ``build``: float graph (``pipeline.graph``) + ranges + quantized weights -> integer graph;
- ``engine``: runs the integer graph, its float simulation, and weight-only quantization.

Files on disk are read and written by ``pipeline.model_files``; exports by ``pipeline.export``.
"""
