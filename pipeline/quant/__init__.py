"""Post-training quantization: one module a concern, found by name.

- ``ranges``: integer ranges of a bit width, scales, quantize/dequantize, the accumulator bound;
- ``observers``, ``calibrators``: activation statistics in bounded memory, and ranges from them;
- ``fixed_point``: the multiplier-and-shift rescale every integer op uses;
- ``ir``: the integer graph (typed nodes over named int8/int32 tensors);
- ``integer_ops``: the integer semantics of each node, with pure-Python references;
- ``build``: float graph (``pipeline.graph``) + ranges + quantized weights -> integer graph;
- ``engine``: runs the integer graph, its float simulation, and weight-only quantization.

Files on disk are read and written by ``pipeline.model_files``; exports by ``pipeline.export``.
"""
