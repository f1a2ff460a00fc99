"""Deployment exports of an ``IntegerModel``: ONNX graphs and bit-exact C99 sources.

- ``plan``: ``check_deployable``, what both exporters support, and shared helpers;
- ``c_model``: ``model.h``, ``model_data.h``, ``model.c`` (integer-only C99), from ``c_ops`` (one C emitter per
  integer node type, kernels from the ``c_kernels/*.c`` templates) and ``c_arena`` (the activation arena);
- ``c_build``: compile and run them (``c_logits``), measure them (``c_footprint``);
- ``onnx_model``: QLinear and bit-exact integer ONNX graphs, ``onnx_predictions``;
- ``artifacts``: everything into one folder with its metrics (the agreement with the engine is ``evaluation``'s).
"""
